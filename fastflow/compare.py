"""Compare finished runs: each run's gain, and each recipe's mean and spread over its seeds.

    python -m fastflow.compare RUN_DIR [RUN_DIR ...] [--at ITERATION] [--markdown]

A single RL run's gain varies with its seed by as much as most recipe changes move it (the shapes
task: 0 to +12 held-out points for one recipe), so recipes are compared over several seeds. Runs
whose configs are equal apart from the seeds and names (run.seed, eval.seed, run.name,
run.output_dir) are one recipe; the first run's recipe is the reference and every other recipe is
labelled by the options in which it differs from it. The gain of a run is its headline eval metric (fastflow.metrics.HEADLINE_KEYS: the mean
over categories for the shapes task) at ``--at`` (default: the final evaluation) minus its first
evaluation (the base model, iteration 0), and the same for overall accuracy when it is logged.
Reads only config.toml and metrics.jsonl; imports no torch.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from fastflow.config import ConfigError, config_to_dict, load_config
from fastflow.metrics import headline_key, read_metrics

SEED_KEYS = {"run.seed", "eval.seed", "run.name", "run.output_dir"}
"""Options that do not make a different recipe."""


@dataclass
class RunResult:
    path: Path
    options: dict[str, object]  # "section.key" -> value, the flattened config
    metric: str  # the headline eval key
    iteration: int  # of the evaluation compared with the base
    base: float
    value: float
    base_overall: float | None
    value_overall: float | None

    @property
    def gain(self) -> float:
        return self.value - self.base

    @property
    def gain_overall(self) -> float | None:
        if self.base_overall is None or self.value_overall is None:
            return None
        return self.value_overall - self.base_overall


def _flatten(cfg_dict: dict[str, dict]) -> dict[str, object]:
    return {f"{s}.{k}": repr(v) if isinstance(v, (dict, list)) else v
            for s, sec in cfg_dict.items() for k, v in sec.items()}


def read_run(run_dir: Path, at: int | None = None) -> RunResult:
    """A run's base and compared evaluations; ValueError (one line) when it has none to compare."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise ValueError(f"{run_dir}: no metrics.jsonl (not a run directory?)")
    try:
        options = _flatten(config_to_dict(load_config(str(run_dir / "config.toml"))))
    except ConfigError as e:
        raise ValueError(f"{run_dir}: {e}") from None
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if headline_key(r)]
    if not evals or evals[0]["iteration"] != 0:
        raise ValueError(f"{run_dir}: no evaluation at iteration 0 (the base model) to compare with")
    if at is None:
        finals = [r for r in evals if r.get("final")]
        chosen = finals[-1] if finals else evals[-1]
    else:
        hits = [r for r in evals if r["iteration"] == at]
        if not hits:
            have = sorted({r["iteration"] for r in evals})
            raise ValueError(f"{run_dir}: no evaluation at iteration {at} (evaluated at {have})")
        chosen = hits[-1]
    if chosen is evals[0]:
        raise ValueError(f"{run_dir}: only the base model was evaluated")
    key = headline_key(evals[0])
    overall = "eval/overall/accuracy" if key != "eval/overall/accuracy" else None
    return RunResult(run_dir, options, key, chosen["iteration"], evals[0][key], chosen[key],
                     evals[0].get(overall), chosen.get(overall))


def group_recipes(runs: list[RunResult]) -> dict[str, list[RunResult]]:
    """Runs grouped by their config minus SEED_KEYS, in order of first appearance. The first
    group is the reference, labelled ``"(reference)"``; every other group is labelled by the
    options in which it differs from the reference (``"train.lr=0.002 sample.kind=cps"``)."""
    groups: dict[tuple, list[RunResult]] = {}
    for r in runs:
        key = tuple(sorted((k, v) for k, v in r.options.items() if k not in SEED_KEYS))
        groups.setdefault(key, []).append(r)
    ref = dict(next(iter(groups)))
    out: dict[str, list[RunResult]] = {}
    for i, (key, members) in enumerate(groups.items()):
        d = dict(key)
        out["(reference)" if i == 0 else " ".join(f"{k}={d.get(k)}" for k in sorted(set(d) | set(ref))
                                                   if d.get(k) != ref.get(k))] = members
    return out


def _mean_std(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{100 * xs[0]:+.1f}"
    return f"{100 * statistics.mean(xs):+.1f} ± {100 * statistics.stdev(xs):.1f}"


def format_tables(runs: list[RunResult], *, markdown: bool = False) -> str:
    """One row per run, then one row per recipe (mean ± sample std of the gains, in points)."""
    def table(header: list[str], rows: list[list[str]]) -> list[str]:
        if markdown:
            return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
                    *("| " + " | ".join(r) + " |" for r in rows)]
        widths = [max(len(x) for x in col) for col in zip(header, *rows)]
        return ["  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip() for r in [header, *rows]]

    metric = runs[0].metric.removeprefix("eval/")
    run_rows = [[str(r.path), str(r.options.get("run.seed")), str(r.iteration), f"{r.base:.3f}", f"{r.value:.3f}",
                 f"{100 * r.gain:+.1f}", "" if r.gain_overall is None else f"{100 * r.gain_overall:+.1f}"]
                for r in runs]
    lines = table(["run", "seed", "iteration", f"base {metric}", "after", "gain (points)", "gain overall"],
                  run_rows)
    recipe_rows = []
    for label, members in group_recipes(runs).items():
        overall = [r.gain_overall for r in members if r.gain_overall is not None]
        recipe_rows.append([label, str(len(members)), _mean_std([r.gain for r in members]),
                            f"{100 * min(r.gain for r in members):+.1f} .. {100 * max(r.gain for r in members):+.1f}",
                            _mean_std(overall) if len(overall) == len(members) else ""])
    lines += ["", *table(["recipe", "runs", "gain (mean ± std)", "range", "gain overall"], recipe_rows)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastflow.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="run directories (with config.toml and metrics.jsonl)")
    ap.add_argument("--at", type=int, default=None,
                    help="compare the evaluation at this iteration (default: each run's final one)")
    ap.add_argument("--markdown", action="store_true", help="print Markdown tables")
    args = ap.parse_args(argv)
    try:
        runs = [read_run(p, args.at) for p in args.runs]
    except ValueError as e:
        print(f"fastflow.compare: {e}", file=sys.stderr)
        return 2
    metrics = {r.metric for r in runs}
    if len(metrics) > 1:
        print(f"fastflow.compare: the runs report different headline metrics: {sorted(metrics)}", file=sys.stderr)
        return 2
    print(format_tables(runs, markdown=args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
