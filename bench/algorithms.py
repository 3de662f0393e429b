"""Side-by-side table and curves of training runs of different algorithms on the shapes task.

    python bench/algorithms.py --base EVAL_DIR --run LABEL=RUN_DIR,EVAL_DIR[,ITERATION] [--run ...] --png OUT.png

RUN_DIR is a trainer run directory (its metrics.jsonl: the training reward per iteration and the
iteration's rollout + training seconds); EVAL_DIR is an output folder of ``python -m
fastflow.evaluate`` (summary.json, samples.jsonl, images/). Prints a markdown table: held-out
strict accuracy per category, the category mean and the per-image mean, each with its gain over
the base evaluation, the per-image gain paired by prompt with its standard error, the within-group diversity (mean pairwise pixel distance between the images
of one prompt, in [0, 1], as the trainer's eval/overall/diversity) relative to the base, the
images generated and the training wall time (up to ITERATION when given: a checkpoint's). The PNG has the training reward (10-iteration
moving mean) against images generated and against training wall time, and the held-out gains.
"""

from __future__ import annotations

import argparse
import json
from itertools import combinations
from pathlib import Path


def records(eval_dir: Path, seeds: int) -> list[dict]:
    """The evaluated images of ``eval_dir`` whose seed index is below ``seeds`` (the first seeds of
    every prompt: evaluations with more seeds contain those with fewer, image for image)."""
    rows = [json.loads(l) for l in (eval_dir / "samples.jsonl").read_text().splitlines()]
    return [r for r in rows if r["seed_index"] < seeds]


def diversity(eval_dir: Path, rows: list[dict]) -> float:
    """Mean over prompts of the mean pairwise mean-absolute pixel difference of their images."""
    import numpy as np
    from PIL import Image

    by_prompt: dict[str, list] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt"], []).append(
            np.asarray(Image.open(eval_dir / r["file"]), dtype=np.float64) / 255.0)
    per = []
    for imgs in by_prompt.values():
        if len(imgs) > 1:
            per.append(np.mean([np.abs(a - b).mean() for a, b in combinations(imgs, 2)]))
    return float(np.mean(per))


def summary(eval_dir: Path, seeds: int) -> dict:
    """Strict accuracy per category, their mean ("overall", GenEval's headline), the per-image mean
    and the diversity, from the first ``seeds`` images of every prompt."""
    rows = records(eval_dir, seeds)
    cats: dict[str, list[float]] = {}
    for r in rows:
        cats.setdefault(r["category"], []).append(float(r["correct"]))
    acc = {c: sum(v) / len(v) for c, v in cats.items()}
    acc["overall"] = sum(acc.values()) / len(acc)
    per_prompt: dict[str, list[float]] = {}
    for r in rows:
        per_prompt.setdefault(r["prompt"], []).append(float(r["correct"]))
    return {"accuracy": acc, "image_accuracy": sum(float(r["correct"]) for r in rows) / len(rows),
            "images": len(rows), "diversity": diversity(eval_dir, rows),
            "per_prompt": {k: sum(v) / len(v) for k, v in per_prompt.items()}}


def paired_gain(run: dict, base: dict) -> tuple[float, float]:
    """Per-image gain over the base and its standard error, paired by prompt (same prompts and
    seeds in both evaluations): the mean and s.e. of the per-prompt accuracy differences."""
    d = [run["per_prompt"][k] - base["per_prompt"][k] for k in base["per_prompt"]]
    m = sum(d) / len(d)
    var = sum((x - m) ** 2 for x in d) / (len(d) - 1)
    return m, (var / len(d)) ** 0.5


def curves(run_dir: Path, last: int | None = None) -> dict:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "reward_mean" in r and (last is None or r["iteration"] <= last)]
    images, wall, reward, t = [], [], [], 0.0
    per_iter = None
    cfg = (run_dir / "config.toml").read_text()
    for line in cfg.splitlines():
        if line.startswith("group_size"):
            g = int(line.split("=")[1].split("#")[0])
        if line.startswith("prompts_per_iter"):
            p = int(line.split("=")[1].split("#")[0])
    per_iter = g * p
    for r in rows:
        t += r["time/rollout_s"] + r["time/train_s"]
        images.append(r["iteration"] * per_iter)
        wall.append(t / 60)
        reward.append(r["reward_mean"])
    return {"images": images, "wall_min": wall, "reward": reward, "iterations": len(rows)}


def moving(xs: list[float], n: int = 10) -> list[float]:
    return [sum(xs[max(0, i - n + 1):i + 1]) / len(xs[max(0, i - n + 1):i + 1]) for i in range(len(xs))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="evaluate output folder of the base model")
    ap.add_argument("--run", action="append", default=[], help="LABEL=RUN_DIR,EVAL_DIR[,ITERATION]")
    ap.add_argument("--png", default="", help="write the curves here")
    ap.add_argument("--seeds", type=int, default=8, help="use the first this many seeds of every prompt")
    args = ap.parse_args(argv)
    base = summary(Path(args.base), args.seeds)
    runs = []
    for spec in args.run:
        label, dirs = spec.split("=", 1)
        run_dir, eval_dir, *last = dirs.split(",")  # optional: the evaluated checkpoint's iteration
        runs.append((label, curves(Path(run_dir), int(last[0]) if last else None),
                     summary(Path(eval_dir), args.seeds)))
    order = ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
    cats = sorted((c for c in base["accuracy"] if c != "overall"), key=lambda c: (order + [c]).index(c))
    print(f"{base['images']} held-out images per evaluation")
    head = ["", *cats, "category mean", "per image", "paired per-image gain", "diversity", "images", "train min"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    print("| base | " + " | ".join(f"{base['accuracy'][c]:.3f}" for c in cats)
          + f" | {base['accuracy']['overall']:.3f} | {base['image_accuracy']:.3f} | | {base['diversity']:.3f} | | |")
    for label, cv, s in runs:
        gain = s["accuracy"]["overall"] - base["accuracy"]["overall"]
        gi = s["image_accuracy"] - base["image_accuracy"]
        pm, pse = paired_gain(s, base)
        print(f"| {label} | " + " | ".join(f"{s['accuracy'][c]:.3f}" for c in cats)
              + f" | {s['accuracy']['overall']:.3f} ({gain * 100:+.1f}) | {s['image_accuracy']:.3f} ({gi * 100:+.1f})"
              + f" | {pm * 100:+.1f} +- {pse * 100:.1f}"
              + f" | {s['diversity']:.3f} ({s['diversity'] / base['diversity'] * 100:.0f}%)"
              + f" | {cv['images'][-1]} | {cv['wall_min'][-1]:.1f} |")
    if args.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
        for label, cv, s in runs:
            ax[0].plot(cv["images"], moving(cv["reward"]), label=label)
            ax[1].plot(cv["wall_min"], moving(cv["reward"]), label=label)
        ax[0].set_xlabel("images generated")
        ax[1].set_xlabel("training wall time, min (shared 2-core CPU)")
        for a in ax[:2]:
            a.set_ylabel("training reward (strict, 10-iteration mean)")
            a.grid(alpha=0.3)
            a.legend(fontsize=8)
        labels = [r[0] for r in runs]
        cm = [(r[2]["accuracy"]["overall"] - base["accuracy"]["overall"]) * 100 for r in runs]
        im = [(r[2]["image_accuracy"] - base["image_accuracy"]) * 100 for r in runs]
        x = range(len(runs))
        ax[2].bar([i - 0.2 for i in x], cm, 0.4, label="category mean")
        ax[2].bar([i + 0.2 for i in x], im, 0.4, label="per image")
        ax[2].axhline(0, color="black", lw=0.8)
        ax[2].set_xticks(list(x), labels, rotation=20, fontsize=8)
        ax[2].set_ylabel(f"held-out gain over the base, points ({base['images']} images)")
        ax[2].legend(fontsize=8)
        ax[2].grid(alpha=0.3, axis="y")
        fig.tight_layout()
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.png, dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
