"""fastflow.compare: per-run gains and per-recipe mean / spread over seeds, from run directories."""

import json

import pytest

from fastflow.compare import format_tables, group_recipes, main, read_run
from fastflow.config import load_config, to_toml


def fake_run(root, name, overrides, evals, final=True):
    """A run directory: config.toml from ``overrides``, metrics.jsonl with train rows and
    ``evals`` = [(iteration, category_mean, overall), ...]; the last one marked final."""
    d = root / name
    d.mkdir(parents=True)
    (d / "config.toml").write_text(to_toml(load_config(None, ["--run.name", name, *overrides])))
    rows = []
    for i, (it, cat, overall) in enumerate(evals):
        if it:
            rows.append({"iteration": it, "reward_mean": 0.3, "kl": 1e-4})
        row = {"iteration": it, "eval/category_mean/accuracy": cat, "eval/overall/accuracy": overall}
        if final and i == len(evals) - 1:
            row["final"] = 1
        rows.append(row)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_gains_and_recipes_over_seeds(tmp_path):
    dirs = [fake_run(tmp_path, "a0", ["--run.seed", "0"], [(0, 0.40, 0.20), (60, 0.45, 0.22), (120, 0.50, 0.25)]),
            fake_run(tmp_path, "a1", ["--run.seed", "1", "--eval.seed", "1"], [(0, 0.42, 0.20), (120, 0.44, 0.21)]),
            fake_run(tmp_path, "b0", ["--run.seed", "0", "--train.lr", "2e-3"], [(0, 0.40, 0.20), (120, 0.60, 0.30)])]
    runs = [read_run(d) for d in dirs]
    assert [round(100 * r.gain, 6) for r in runs] == [10.0, 2.0, 20.0]
    assert [round(100 * r.gain_overall, 6) for r in runs] == [5.0, 1.0, 10.0]
    groups = group_recipes(runs)
    assert list(groups) == ["(reference)", "train.lr=0.002"]  # seeds and names do not split recipes
    assert [r.path.name for r in groups["(reference)"]] == ["a0", "a1"]
    text = format_tables(runs, markdown=True)
    assert "| (reference) | 2 | +6.0 ± 5.7 | +2.0 .. +10.0 | +3.0 ± 2.8 |" in text
    assert "| train.lr=0.002 | 1 | +20.0 | +20.0 .. +20.0 | +10.0 |" in text
    # --at picks an intermediate evaluation
    assert round(100 * read_run(dirs[0], at=60).gain, 6) == 5.0


def test_unfinished_run_uses_its_last_evaluation(tmp_path):
    d = fake_run(tmp_path, "a", [], [(0, 0.4, 0.2), (60, 0.5, 0.3)], final=False)
    assert read_run(d).iteration == 60


@pytest.mark.parametrize("evals, at, message", [
    ([(60, 0.5, 0.3)], None, "no evaluation at iteration 0 (the base model)"),
    ([(0, 0.4, 0.2)], None, "only the base model was evaluated"),
    ([(0, 0.4, 0.2), (60, 0.5, 0.3)], 90, "no evaluation at iteration 90 (evaluated at [0, 60])"),
])
def test_runs_without_a_comparison_are_one_clear_line(tmp_path, capsys, evals, at, message):
    d = fake_run(tmp_path, "a", [], evals)
    assert main([str(d), *(["--at", str(at)] if at else [])]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_cli_prints_both_tables(tmp_path, capsys):
    d = fake_run(tmp_path, "a", [], [(0, 0.4, 0.2), (60, 0.5, 0.3)])
    assert main([str(d), str(tmp_path / "missing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    assert main([str(d)]) == 0
    out = capsys.readouterr().out
    assert "gain (points)" in out and "(reference)" in out and "+10.0" in out
