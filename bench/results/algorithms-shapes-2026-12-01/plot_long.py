"""The two 90-minute DiffusionNFT runs of docs/algorithms.md: training reward, v-KL to the
reference and in-run evaluations against iterations, from their metrics.jsonl.

    python bench/results/algorithms-shapes-2026-12-01/plot_long.py docs/img/algorithms_nft_long.png
"""
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).parent
RUNS = [("old-policy decay type 1 (stopped at 300)", "nftlong_s0", "tab:red"),
        ("old-policy decay type 2", "nftlong_t2_s0", "tab:blue")]


def main(out: str) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for label, name, colour in RUNS:
        rows = [json.loads(l) for l in (HERE / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in rows if "reward_mean" in r]
        its = [r["iteration"] for r in train]
        rew = [r["reward_mean"] for r in train]
        smooth = [sum(rew[max(0, i - 19):i + 1]) / len(rew[max(0, i - 19):i + 1]) for i in range(len(rew))]
        axes[0].plot(its, smooth, color=colour, label=label)
        axes[1].semilogy(its, [max(r["kl"], 1e-4) for r in train], color=colour, label=label)
        ev = [(r["iteration"], r["eval/category_mean/accuracy"]) for r in rows if "eval/category_mean/accuracy" in r]
        axes[2].plot(*zip(*ev), "o-", color=colour, label=label)
    axes[0].set(title="training reward (20-iteration moving mean)", xlabel="iteration")
    axes[1].set(title="v-KL to the reference, mean |v - v_ref|^2", xlabel="iteration")
    axes[2].set(title="held-out category mean (772 images, in-run)", xlabel="iteration", ylim=(0, 0.7))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("DiffusionNFT on shapes_long (90 min, lr 3e-4, 96 images per iteration)")
    fig.tight_layout()
    fig.savefig(out, dpi=90)


if __name__ == "__main__":
    main(sys.argv[1])
