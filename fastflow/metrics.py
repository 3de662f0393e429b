"""Run logging: metrics.jsonl (the source of truth), TensorBoard, and the reward/accuracy curve PNG.

Only rank 0 writes; other ranks get a logger that drops everything.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


class MetricsLogger:
    def __init__(self, run_dir: Path, *, enabled: bool = True, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.path = self.run_dir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:  # tensorboard is a dependency, but never let logging kill a run
                self.tb = None

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

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


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
