"""Side-by-side table and curves of training runs of different algorithms on the shapes task.

    python bench/algorithms.py --base EVAL_DIR --run LABEL=RUN_DIR,EVAL_DIR[,ITERATION] [--run ...] --png OUT.png

RUN_DIR is a trainer run directory (its metrics.jsonl: the training reward per iteration and the
iteration's rollout + training seconds); EVAL_DIR is an output folder of ``python -m
fastflow.evaluate`` (summary.json, samples.jsonl, images/). Prints a markdown table: held-out
strict accuracy per category, the category mean and the per-image mean, each with its gain over
the base evaluation, the per-image gain paired by prompt with its standard error, the within-group diversity (mean pairwise pixel distance between the images
of one prompt, in [0, 1], as the trainer's eval/overall/diversity) relative to the base, the
images generated and the training wall time (up to ITERATION when given: a checkpoint's).

Seeds: labels of the form ``ALGORITHM/SEED`` (``Flow-GRPO/0``, ``Flow-GRPO/1``) are one algorithm's
seeds; a second table gives, per algorithm, the mean and the seed spread (sample standard
deviation, min..max) of the gains, and the per-image gain paired by prompt over all its seeds
pooled (each prompt's accuracy averaged over the seeds' images, its s.e. over the prompts).

The PNG has the training reward (10-iteration moving mean, averaged over an algorithm's seeds)
against images generated and against training wall time, the held-out gains per algorithm (seed
mean, with each seed as a dot), and, for runs that evaluated during training (eval.every, the
trainer's own evaluation: the same images as the CLI's), the held-out category mean against
images generated.
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
    return {"images": images, "wall_min": wall, "reward": reward, "iterations": len(rows), "per_iter": per_iter}


def eval_curve(run_dir: Path, per_iter: int) -> tuple[list[int], list[float], list[float]]:
    """The trainer's in-run evaluations: images generated, held-out category mean and per-image
    accuracy at each evaluated iteration (the last evaluation of an iteration: the final one)."""
    at: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "eval/category_mean/accuracy" in r:
            at[r["iteration"]] = r
    its = sorted(at)
    return ([i * per_iter for i in its], [at[i]["eval/category_mean/accuracy"] for i in its],
            [at[i]["eval/overall/accuracy"] for i in its])


def algorithm_of(label: str) -> str:
    return label.split("/", 1)[0]


def seed_summary(runs: list, base: dict) -> list[dict]:
    """Per algorithm (label before "/"): the seeds' gains, their mean and spread, and the paired
    per-image gain with every seed's images pooled."""
    import statistics

    groups: dict[str, list] = {}
    for label, cv, s in runs:
        groups.setdefault(algorithm_of(label), []).append((label, cv, s))
    out = []
    for alg, rs in groups.items():
        cm = [(s["accuracy"]["overall"] - base["accuracy"]["overall"]) * 100 for _, _, s in rs]
        im = [(s["image_accuracy"] - base["image_accuracy"]) * 100 for _, _, s in rs]
        pooled = {"per_prompt": {k: sum(s["per_prompt"][k] for _, _, s in rs) / len(rs) for k in base["per_prompt"]}}
        pm, pse = paired_gain(pooled, base)
        sd = (lambda xs: statistics.stdev(xs) if len(xs) > 1 else float("nan"))
        out.append({"algorithm": alg, "seeds": len(rs), "cm": cm, "im": im, "cm_mean": sum(cm) / len(cm),
                    "cm_sd": sd(cm), "im_mean": sum(im) / len(im), "im_sd": sd(im), "paired": pm * 100,
                    "paired_se": pse * 100,
                    "diversity": sum(s["diversity"] for _, _, s in rs) / len(rs) / base["diversity"] * 100,
                    "images": rs[0][1]["images"][-1],
                    "train_min": sum(cv["wall_min"][-1] for _, cv, _ in rs) / len(rs)})
    return out


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
    run_dirs = {}
    for spec in args.run:
        label, dirs = spec.split("=", 1)
        run_dir, eval_dir, *last = dirs.split(",")  # optional: the evaluated checkpoint's iteration
        runs.append((label, curves(Path(run_dir), int(last[0]) if last else None),
                     summary(Path(eval_dir), args.seeds)))
        run_dirs[label] = Path(run_dir)
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
    groups = seed_summary(runs, base)
    if any(g["seeds"] > 1 for g in groups):
        print()
        print("| algorithm | seeds | category-mean gain, mean +- sd (min..max) | per-image gain, mean +- sd "
              "(min..max) | paired per-image gain, seeds pooled | diversity | images | train min (mean) |")
        print("|---|---|---|---|---|---|---|---|")
        for g in groups:
            sp = lambda xs: f"{min(xs):+.1f}..{max(xs):+.1f}"  # noqa: E731
            print(f"| {g['algorithm']} | {g['seeds']} | {g['cm_mean']:+.1f} +- {g['cm_sd']:.1f} ({sp(g['cm'])}) "
                  f"| {g['im_mean']:+.1f} +- {g['im_sd']:.1f} ({sp(g['im'])}) | {g['paired']:+.1f} +- {g['paired_se']:.1f} "
                  f"| {g['diversity']:.0f}% | {g['images']} | {g['train_min']:.1f} |")
    if args.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 4, figsize=(20, 4.6))
        by_alg: dict[str, list] = {}
        for label, cv, s in runs:
            by_alg.setdefault(algorithm_of(label), []).append(cv)
        cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        color = {alg: cycle[i % len(cycle)] for i, alg in enumerate(by_alg)}  # one per algorithm, every panel
        for alg, cvs in by_alg.items():  # the seeds' mean, over the iterations they all ran
            n = min(len(cv["reward"]) for cv in cvs)
            mean = lambda key: [sum(cv[key][i] for cv in cvs) / len(cvs) for i in range(n)]  # noqa: E731
            lab = f"{alg} ({len(cvs)} seed{'s' if len(cvs) > 1 else ''})"
            ax[0].plot(cvs[0]["images"][:n], moving(mean("reward")), label=lab, color=color[alg])
            ax[1].plot(mean("wall_min"), moving(mean("reward")), label=lab, color=color[alg])
        ax[0].set_xlabel("images generated")
        ax[1].set_xlabel("training wall time, min (2-core CPU)")
        for a in ax[:2]:
            a.set_ylabel("training reward (strict, 10-iteration mean)")
            a.grid(alpha=0.3)
            a.legend(fontsize=8)
        x = list(range(len(groups)))
        ax[2].bar([i - 0.2 for i in x], [g["cm_mean"] for g in groups], 0.4, label="category mean")
        ax[2].bar([i + 0.2 for i in x], [g["im_mean"] for g in groups], 0.4, label="per image")
        for i, g in enumerate(groups):
            ax[2].plot([i - 0.2] * len(g["cm"]), g["cm"], "k.", ms=4)
            ax[2].plot([i + 0.2] * len(g["im"]), g["im"], "k.", ms=4)
        ax[2].axhline(0, color="black", lw=0.8)
        ax[2].set_xticks(x, [f"{g['algorithm'].replace(', ', chr(10))}\n({g['seeds']})" for g in groups],
                         fontsize=7, rotation=30)
        ax[2].set_ylabel(f"held-out gain over the base, points ({base['images']} images)")
        ax[2].legend(fontsize=8)
        ax[2].grid(alpha=0.3, axis="y")
        drawn = False
        for label, cv, _ in runs:
            imgs, cm, _im = eval_curve(run_dirs[label], cv["per_iter"])
            if len(imgs) > 1:
                ax[3].plot(imgs, [c * 100 for c in cm], "o-", label=label, color=color[algorithm_of(label)])
                drawn = True
        ax[3].axhline(base["accuracy"]["overall"] * 100, color="gray", ls="--", lw=0.8, label="base")
        ax[3].set_xlabel("images generated")
        ax[3].set_ylabel("held-out category mean, % (in-run evaluation)")
        ax[3].grid(alpha=0.3)
        if drawn:
            ax[3].legend(fontsize=8)
        fig.tight_layout()
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.png, dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
