"""Run logging: metrics.jsonl (the source of truth), TensorBoard, Weights & Biases (optional), and
the reward/accuracy curve PNG.

Only rank 0 writes; other ranks get a logger that drops everything.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import secrets
import string
from pathlib import Path
from typing import Any

WANDB_STATE = "wandb.json"  # in the run directory: the wandb run id, so that a resumed run continues it


def check_wandb(log_cfg) -> None:
    """With ``log.wandb = true``: that the wandb package is installed. Raises ConfigError (one line)
    before anything heavy loads and before a run directory is made."""
    if getattr(log_cfg, "wandb", False) and importlib.util.find_spec("wandb") is None:
        from fastflow.config import ConfigError
        raise ConfigError("config: log.wandb = true needs the wandb package: pip install 'fastflow[wandb]' "
                         "(or set log.wandb = false)")


class MetricsLogger:
    """metrics.jsonl (+ TensorBoard, + wandb when ``config.log.wandb``). ``config``: the run's
    Config, stored as the wandb run's config and read for its log.wandb_* settings."""

    def __init__(self, run_dir: Path, *, enabled: bool = True, tensorboard: bool = True, config=None):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.path = self.run_dir / "metrics.jsonl"
        self.tb = None
        self.wandb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:  # tensorboard is a dependency, but never let logging kill a run
                self.tb = None
        log_cfg = getattr(config, "log", None)
        if enabled and getattr(log_cfg, "wandb", False):
            self.wandb = _start_wandb(self.run_dir, log_cfg, config)

    def truncate_after(self, iteration: int) -> None:
        """On resume: keep the lines up to ``iteration``; move later ones (work lost with the
        interrupted iterations) to metrics.orphaned.jsonl rather than deleting them."""
        if not self.enabled or not self.path.is_file():
            return
        keep, orphaned = [], []
        for line in self.path.read_text().splitlines():
            try:
                it = json.loads(line).get("iteration", -1)
            except json.JSONDecodeError:
                continue
            (keep if it <= iteration else orphaned).append(line)
        if orphaned:
            with (self.run_dir / "metrics.orphaned.jsonl").open("a") as f:
                f.write("\n".join(orphaned) + "\n")
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def log(self, iteration: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"iteration": iteration}
        row.update({k: _plain(v) for k, v in metrics.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "iteration" and math.isfinite(v):
                    self.tb.add_scalar(k, v, iteration)
            self.tb.flush()
        if self.wandb is not None:
            self._wandb_log(iteration, row)

    def log_image(self, key: str, path: Path, iteration: int) -> None:
        """An image the run saved (an eval grid), to TensorBoard and wandb under ``key``."""
        if not self.enabled or (self.tb is None and self.wandb is None):
            return
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
        if self.tb is not None:
            self.tb.add_image(key, arr, iteration, dataformats="HWC")
            self.tb.flush()
        if self.wandb is not None:
            import wandb
            self.wandb.log({"iteration": iteration, key: wandb.Image(arr, caption=Path(path).name)})

    def _wandb_log(self, iteration: int, row: dict) -> None:
        import wandb

        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(v)}
        scalars["iteration"] = iteration
        ev = {k: v for k, v in scalars.items() if _is_eval_cell(k)}
        if ev:
            cats = sorted({k.split("/")[1] for k in ev}, key=lambda c: (c in ("overall", "category_mean"), c))
            metrics = sorted({k.split("/")[2] for k in ev})
            scalars["eval/table"] = wandb.Table(
                columns=["category", *metrics],
                data=[[c, *[ev.get(f"eval/{c}/{m}") for m in metrics]] for c in cats])
            if row.get("final"):
                # The run's first eval (in metrics.jsonl, also after a resume) is the "before" column.
                before = next((r for r in read_metrics(self.path)
                               if not r.get("final") and any(_is_eval_cell(k) for k in r)), {})
                scalars["eval/before_after"] = wandb.Table(
                    columns=["category", "metric", "before", "after", "delta"],
                    data=[[k.split("/")[1], k.split("/")[2], before.get(k), v,
                           v - before[k] if isinstance(before.get(k), (int, float)) else None]
                          for k, v in sorted(ev.items())])
        self.wandb.log(scalars)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            import wandb

            self.wandb.finish()
            self.wandb = None
            # finish() only tells wandb's service process that the run is over: the service writes
            # and uploads the rest afterwards. teardown() waits for it to be done. Without it the
            # run's file can still be empty when finish() returns (a resumed run started at once
            # then races it), and a torchrun rank, which leaves with os._exit (exit_rank), would
            # skip the atexit hook that waits for the upload.
            wandb.teardown()


def _is_eval_cell(key: str) -> bool:
    """eval/CATEGORY/METRIC (not eval/time_s)."""
    return key.startswith("eval/") and key.count("/") == 2


def _start_wandb(run_dir: Path, log_cfg, config) -> Any:
    """wandb.init for this run directory: the id stored in run_dir/wandb.json when there is one (a
    resumed run continues its wandb run), else a new one, stored there. Raises ValueError (one
    line) when wandb cannot start."""
    try:
        import wandb
    except ImportError:
        raise ValueError("config: log.wandb = true needs the wandb package: pip install 'fastflow[wandb]'") from None
    state_path = run_dir / WANDB_STATE
    try:
        state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        state = {}
    run_id = state.get("id") if isinstance(state.get("id"), str) else None
    run_id = run_id or "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    as_dict = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config or {})
    try:
        run = wandb.init(project=log_cfg.wandb_project or None, entity=log_cfg.wandb_entity or None,
                         name=log_cfg.wandb_name or run_dir.name, tags=list(log_cfg.wandb_tags) or None,
                         config=as_dict, id=run_id, resume="allow", dir=str(run_dir))
    except Exception as e:  # wandb's errors (no login, a bad entity) are not one class
        raise ValueError(f"log.wandb: wandb could not start: {' '.join(str(e).split())[:300]} (wandb login, "
                         f"WANDB_API_KEY, or WANDB_MODE=offline)") from None
    # Every metric is plotted against the trainer's iteration, not wandb's own step counter: a
    # resumed run repeats the iterations after its checkpoint, which a step counter would drop.
    run.define_metric("iteration")
    run.define_metric("*", step_metric="iteration")
    state_path.write_text(json.dumps({"id": run_id, "project": log_cfg.wandb_project,
                                      "entity": log_cfg.wandb_entity, "name": run.name}) + "\n")
    return run


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def read_metrics(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


HEADLINE_KEYS = ("eval/category_mean/accuracy", "eval/overall/accuracy", "eval/overall/reward")
"""The eval metric a run is judged by, first present wins: the mean over categories (GenEval's
convention) where the reward reports accuracy per category, else overall accuracy, else reward."""


def headline_key(ev: dict) -> str | None:
    """The key of ``ev``'s headline metric (see HEADLINE_KEYS), or None when it has no eval metric."""
    for key in HEADLINE_KEYS:
        if key in ev:
            return key
    return next((k for k in ev if k.startswith("eval/overall/")), None)


def headline(ev: dict) -> float | None:
    key = headline_key(ev)
    return None if key is None else ev[key]


def moving_average_window(n: int) -> int:
    """The smoothing window for n train points: about 1/20 of the run, 1 (none) for short runs."""
    return max(1, min(n // 20, 100)) if n >= 40 else 1


def moving_average(values, window: int) -> list[float]:
    """Trailing means over ``window`` consecutive values (``len(values) - window + 1`` of them)."""
    if window < 1 or window > len(values):
        raise ValueError(f"moving_average: window {window} must be in 1..{len(values)}")
    import numpy as np
    csum = np.concatenate([[0.0], np.cumsum(np.asarray(values, dtype=np.float64))])
    return ((csum[window:] - csum[:-window]) / window).tolist()


def plot_curves(metrics_path: Path, out_png: Path) -> Path | None:
    """Reward (train) and eval metrics over iterations, one PNG."""
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["iteration"], r["reward_mean"]) for r in rows if isinstance(r.get("reward_mean"), (int, float))]
    eval_keys = sorted({k for r in rows for k in r if k.startswith("eval/") and not k.startswith("eval/time")})
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        its, rewards = zip(*train)
        ax.plot(its, rewards, label="train reward (mean)", color="tab:blue", alpha=0.3, linewidth=0.8)
        window = moving_average_window(len(rewards))
        if window > 1:  # one iteration's reward is noisy (a dozen groups): show the trend over it
            ax.plot(its[window - 1:], moving_average(rewards, window), color="tab:blue",
                    label=f"train reward ({window}-iteration moving average)")
    for k in eval_keys:
        pts = [(r["iteration"], r[k]) for r in rows if isinstance(r.get(k), (int, float))]
        if pts and ("overall" in k or "category_mean" in k or k.endswith("reward")):
            ax.plot(*zip(*pts), marker="o", label=k)
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward / accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return Path(out_png)
