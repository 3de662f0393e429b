"""Evaluate a policy on grammar prompts with fixed seeds: strict accuracy per category and overall.

    python -m fastflow.evaluate CONFIG [--checkpoint PATH] [--prompts FILE] [--seeds N] [--steps K]
                                [--min-category-images M] [--guidance G] [--batch B] --out DIR

writes DIR/images/*.png (the raw 32 x 32 samples, lossless), DIR/samples.jsonl (prompt, file, seed,
category, correct, partial), DIR/summary.json and DIR/grid.png (a per-category grid), and prints
per-category and overall strict accuracy. ``--baseline base`` (or a model file) also evaluates that
model on the same prompts and seeds and writes DIR/compare.png (before | after, image by image). Without --checkpoint it evaluates the model of CONFIG's
[model] (for the shapes task: the shipped base model).

The core, :func:`evaluate_policy`, samples with the ODE at the full step count
(fastflow.rollout.sample, kind="ode"); the noise of each image is a pure function of (prompt text,
seed index), so two evaluations of the same prompts and seeds (e.g. before / after RL) are directly
comparable image by image, whatever the prompt order or batch size.

A category with few prompts gets more seeds per prompt (``--min-category-images``, default
``eval.min_category_images``): the headline is the mean over categories, so each category's
accuracy should be measured about equally well (see :func:`seeds_per_prompt`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import ContextManager, Sequence

import torch
from torch import Tensor

from fastflow.rollout import sample

OVERALL = "overall"


def seeds_per_prompt(categories: Sequence[str], seeds: int, min_category_images: int = 0) -> list[int]:
    """Images per prompt: ``seeds``, raised for the prompts of small categories so that every
    category gets at least ``min_category_images`` images (0 = plain ``seeds``).

    Why: the headline is the mean of the category accuracies, and its variance is the sum of the
    categories' variances / (number of categories)^2. On the shapes task's held-out prompts at the
    base model's accuracies, the standard error of the mean is about 3.0 points with 8 seeds
    everywhere (504 images; single_object is 1 prompt, 8 images), 2.1 with 16 seeds (1008 images)
    and 1.6 with 8 seeds and at least 96 images per category (772 images). ``categories``: one
    entry per prompt. The extra seeds come after the first ``seeds``, so a balanced evaluation
    contains the plain one's images.
    """
    if seeds < 1 or min_category_images < 0:
        raise ValueError(f"seeds must be >= 1 and min_category_images >= 0, got {seeds}, {min_category_images}")
    size: dict[str, int] = {}
    for c in categories:
        size[c] = size.get(c, 0) + 1
    return [max(seeds, -(-min_category_images // size[c])) for c in categories]


def image_seed(prompt: str, index: int) -> int:
    """The fixed noise seed of image ``index`` of ``prompt`` (stable across runs and platforms)."""
    return zlib.crc32(f"{prompt}\x00{index}".encode()) & 0x7FFFFFFF


@dataclass
class EvalRecord:
    """One evaluated image."""

    prompt: str
    seed_index: int
    seed: int
    category: str
    correct: bool
    partial: float
    image: Tensor | None = None


@dataclass
class EvalResults:
    """Per-image records and the strict accuracy per category; ``accuracy[OVERALL]`` is the mean of
    the category accuracies (GenEval's overall score), ``image_accuracy`` the mean over prompts of
    each prompt's accuracy (= the mean over images when every prompt has the same seed count)."""

    records: list[EvalRecord] = field(default_factory=list)

    @property
    def categories(self) -> list[str]:
        seen: list[str] = []
        for r in self.records:
            if r.category not in seen:
                seen.append(r.category)
        return seen

    @property
    def accuracy(self) -> dict[str, float]:
        out = {}
        for c in self.categories:
            rs = [r.correct for r in self.records if r.category == c]
            out[c] = sum(rs) / len(rs)
        if out:
            out[OVERALL] = sum(out.values()) / len(out)
        return out

    @property
    def image_accuracy(self) -> float:
        per_prompt: dict[str, list[bool]] = {}
        for r in self.records:
            per_prompt.setdefault(r.prompt, []).append(r.correct)
        if not per_prompt:
            return 0.0
        return sum(sum(v) / len(v) for v in per_prompt.values()) / len(per_prompt)

    def table(self) -> str:
        """A printable per-category table."""
        acc = self.accuracy
        lines = [f"{'category':<16} {'images':>6} {'strict acc':>10}"]
        for c in self.categories:
            n = sum(r.category == c for r in self.records)
            lines.append(f"{c:<16} {n:>6} {acc[c]:>10.3f}")
        lines.append(f"{OVERALL:<16} {len(self.records):>6} {acc.get(OVERALL, 0.0):>10.3f}"
                     f"   (per image: {self.image_accuracy:.3f})")
        return "\n".join(lines)


def _judge(policy, images: Tensor, texts: list[str]) -> tuple[list[bool], list[float]]:
    if hasattr(policy, "eval_metrics"):
        m = policy.eval_metrics(images, texts, [{} for _ in texts])
        strict = [bool(x) for x in m["accuracy"].tolist()]
        partial = [float(x) for x in m.get("partial", m["accuracy"]).tolist()]
        return strict, partial
    from fastflow.shapes import verifier  # the shapes verifier judges any grammar prompt
    conds = verifier.judge(images, texts)
    return [all(c) for c in conds], [sum(c) / len(c) for c in conds]


def _category(policy, text: str) -> str:
    if hasattr(policy, "prompt_category"):
        return policy.prompt_category(text)
    from fastflow.shapes.world import category_of
    return category_of(text)


@torch.no_grad()
def evaluate_policy(policy, prompts: Sequence[str], seeds: int, steps: int, guidance_scale: float, *,
                    batch_size: int = 64, autocast: ContextManager | None = None, device=None,
                    keep_images: bool = False, min_category_images: int = 0) -> EvalResults:
    """ODE samples of every prompt x its seeds (fixed noise, see image_seed), judged strictly.

    prompts: grammar prompt texts; seeds: images per prompt (>= 4 recommended: 252 images give
    about +-3 points); min_category_images: more seeds for the prompts of small categories
    (seeds_per_prompt); steps: the full ODE step count; keep_images: keep each image ([3, H, W] in
    [0, 1], CPU) on its record, for grids and files.
    """
    if seeds < 1 or steps < 1 or batch_size < 1:
        raise ValueError(f"evaluate: seeds, steps and batch_size must be >= 1, got {seeds}, {steps}, {batch_size}")
    texts = [p if isinstance(p, str) else p.text for p in prompts]
    if not texts:
        raise ValueError("evaluate: no prompts")
    cats = {t: _category(policy, t) for t in texts}  # also rejects prompts outside the grammar early
    counts = seeds_per_prompt([cats[t] for t in texts], seeds, min_category_images)
    pairs = [(t, j) for t, n in zip(texts, counts) for j in range(n)]
    results = EvalResults()
    sampling = policy.sampling() if hasattr(policy, "sampling") else contextlib.nullcontext()
    with sampling:  # e.g. the shapes policy samples with its LoRA merged (faster, no grad)
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            ctexts = [t for t, _ in chunk]
            seed_vals = [image_seed(t, j) for t, j in chunk]
            cond = policy.encode_prompts(ctexts)
            traj = sample(policy, cond, num_steps=steps, guidance_scale=guidance_scale, noise_level=0.0,
                          kind="ode", seeds=torch.tensor(seed_vals), autocast=autocast, device=device)
            images = policy.decode(traj.final).float().cpu()
            strict, partial = _judge(policy, images, ctexts)
            for k, ((t, j), s) in enumerate(zip(chunk, seed_vals)):
                results.records.append(EvalRecord(t, j, s, cats[t], strict[k], partial[k],
                                                  images[k].clone() if keep_images else None))
    return results


def category_grid(results: Sequence[EvalResults], path: str | Path, *, per_category: int = 8,
                  scale: int = 3, labels: Sequence[str] = ()) -> Path:
    """A PNG with one row per category: the first ``per_category`` images of that category (same
    prompts and seeds in every ``results``, so before / after sit side by side as column blocks),
    each framed green (correct) or red (wrong). ``results`` must have been run with keep_images."""
    from PIL import Image, ImageDraw

    if not results:
        raise ValueError("category_grid: no results")
    cats = results[0].categories
    keys_by_cat = {c: [(r.prompt, r.seed_index) for r in results[0].records if r.category == c][:per_category]
                   for c in cats}
    tiles = [{(r.prompt, r.seed_index): r for r in res.records} for res in results]
    h, w = 32, 32
    for res in results:
        img = next((r.image for r in res.records if r.image is not None), None)
        if img is None:
            raise ValueError("category_grid: results were evaluated without keep_images=True")
        h, w = img.shape[-2:]
    cell_h, cell_w = h * scale + 4, w * scale + 4
    label_w, head_h, gap = 96, 14, 12
    block_w = per_category * cell_w
    W = label_w + len(results) * block_w + (len(results) - 1) * gap
    H = head_h + len(cats) * cell_h
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for b, name in enumerate(labels):
        draw.text((label_w + b * (block_w + gap), 1), str(name), fill=(0, 0, 0))
    for row, c in enumerate(cats):
        y = head_h + row * cell_h
        draw.text((2, y + cell_h // 2 - 6), c, fill=(0, 0, 0))
        for b, lookup in enumerate(tiles):
            for col, key in enumerate(keys_by_cat[c]):
                rec = lookup.get(key)
                if rec is None or rec.image is None:
                    continue
                x = label_w + b * (block_w + gap) + col * cell_w
                frame = (20, 160, 40) if rec.correct else (210, 30, 30)
                draw.rectangle([x, y, x + cell_w - 2, y + cell_h - 2], fill=frame)
                arr = (rec.image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
                tile = Image.fromarray(arr).resize((w * scale, h * scale), Image.NEAREST)
                canvas.paste(tile, (x + 1, y + 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def write_results(results: EvalResults, out: str | Path) -> None:
    """DIR/images/*.png (lossless, raw size), DIR/samples.jsonl, DIR/summary.json."""
    from PIL import Image

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    with (out / "samples.jsonl").open("w", encoding="utf-8") as f:
        for n, r in enumerate(results.records):
            name = f"images/{n:05d}.png"
            if r.image is not None:
                arr = (r.image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
                Image.fromarray(arr).save(out / name)
            f.write(json.dumps({"prompt": r.prompt, "file": name, "seed": r.seed, "seed_index": r.seed_index,
                                "category": r.category, "correct": r.correct,
                                "partial": round(r.partial, 4)}) + "\n")
    summary = {"accuracy": results.accuracy, "image_accuracy": results.image_accuracy,
               "images": len(results.records)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def load_checkpoint_into(policy, path: str | Path) -> None:
    """Load weights into ``policy``: a trainer checkpoint folder (``.../checkpoints/iter-N``: its
    EMA weights when present, else the trainable ones, by Policy parameter name; single-file or the
    sharded format of multi-rank runs) or a run directory (its latest checkpoint). A model file
    (``model.safetensors`` from Policy.export) is handled by building the policy with
    ``model.path`` instead (see main)."""
    from safetensors.torch import load_file

    from fastflow.checkpoint import is_sharded_checkpoint, latest_checkpoint, load_sharded_weights

    p = Path(path)
    if (p / "checkpoints").is_dir():
        latest = latest_checkpoint(p)
        if latest is None:
            raise FileNotFoundError(f"--checkpoint: no complete checkpoint under {p / 'checkpoints'}")
        p = latest
    params = policy.named_trainable_parameters()
    if is_sharded_checkpoint(p):  # written by a multi-rank run (torch.distributed.checkpoint)
        state, _ = load_sharded_weights(p, params)
        _copy_into(params, state)
        return
    src = p / "ema.safetensors" if (p / "ema.safetensors").is_file() else p / "trainable.safetensors"
    if not src.is_file():
        raise FileNotFoundError(f"--checkpoint: {p} holds neither ema.safetensors, trainable.safetensors "
                                f"nor a sharded/ folder")
    state = load_file(str(src))
    missing = sorted(set(params) - set(state))
    if missing:
        raise ValueError(f"--checkpoint: {src} lacks {len(missing)} of the policy's parameters "
                         f"(e.g. {missing[0]}); was it written with another model.finetune / LoRA setting?")
    _copy_into(params, state)


def _copy_into(params: dict[str, torch.nn.Parameter], state: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for n, prm in params.items():
            prm.copy_(state[n].to(prm.dtype))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m fastflow.evaluate",
                                 description="Strict accuracy of a policy on grammar prompts, per category.")
    ap.add_argument("config", nargs="?", default=None, help="TOML run config (default: the embedded shapes run)")
    ap.add_argument("--checkpoint", default="", help="model.safetensors / export folder, trainer checkpoint "
                    "folder or run directory (default: the config's model, e.g. the shipped base model)")
    ap.add_argument("--prompts", default="", help="a .txt/.jsonl file of grammar prompts "
                    "(default: the config's data.eval_prompts, else the model's held-out list)")
    ap.add_argument("--seeds", type=int, default=0, help="images per prompt (default: eval.seeds)")
    ap.add_argument("--min-category-images", type=int, default=None, help="more seeds for the prompts of "
                    "small categories, so each category has at least this many images; 0 = off "
                    "(default: eval.min_category_images)")
    ap.add_argument("--steps", type=int, default=0, help="ODE steps (default: sample.eval_steps)")
    ap.add_argument("--guidance", type=float, default=0.0, help="CFG scale (default: the config's eval scale)")
    ap.add_argument("--batch", type=int, default=0, help="images per forward (default: eval.batch_size)")
    ap.add_argument("--device", default="", help="cpu | cuda (default: run.device)")
    ap.add_argument("--baseline", default="", help="also evaluate this model (a model file / export folder, or "
                    "'base' for the config's model) on the same prompts and seeds; writes DIR/compare.png")
    ap.add_argument("--out", required=True, help="output directory")
    return ap.parse_args(argv)


def _policy_for(config: str | None, ck: Path | None, device):
    """The config's policy, with ``ck`` applied: a model file / export folder replaces the weights
    (model.path), a trainer checkpoint folder or run directory is loaded on top."""
    from fastflow.config import load_config
    from fastflow.models import build_policy

    if ck is not None and not ck.exists():
        raise SystemExit(f"--checkpoint not found: {ck}")
    is_model_file = ck is not None and (ck.suffix == ".safetensors" or (ck / "model.safetensors").is_file())
    cfg = load_config(config, ["--model.path", str(ck)] if is_model_file else [])
    policy = build_policy(cfg, device)
    if ck is not None and not is_model_file:
        load_checkpoint_into(policy, ck)
    return policy


def main(argv=None) -> int:
    from fastflow.logs import setup_logging

    setup_logging()
    args = parse_args(argv)
    if args.min_category_images is not None and args.min_category_images < 0:
        raise SystemExit(f"evaluate: --min-category-images must be >= 0 (0 = off), got {args.min_category_images}")
    from fastflow.config import load_config
    from fastflow.data import load_prompts

    ck = Path(args.checkpoint) if args.checkpoint else None
    cfg = load_config(args.config)
    device_name = args.device or cfg.run.device
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    policy = _policy_for(args.config, ck, device)
    baseline = None
    if args.baseline:
        baseline = _policy_for(args.config, None if args.baseline == "base" else Path(args.baseline), device)
    if args.prompts:
        texts = [p.text for p in load_prompts(args.prompts)]
    elif cfg.data.eval_prompts:
        texts = [p.text for p in load_prompts(cfg.data.eval_prompts)]
    elif hasattr(policy, "default_prompts"):
        texts = [p.text for p in policy.default_prompts("eval")]
    else:
        raise SystemExit("evaluate: no prompts: give --prompts FILE or data.eval_prompts")
    seeds = args.seeds or cfg.eval.seeds
    min_cat = cfg.eval.min_category_images if args.min_category_images is None else args.min_category_images
    steps = args.steps or cfg.sample.eval_steps
    guidance = args.guidance or cfg.eval.guidance_scale or cfg.sample.guidance_scale
    autocast = (torch.autocast(device.type, dtype=getattr(torch, cfg.model.dtype))
                if cfg.model.dtype != "float32" else contextlib.nullcontext())
    kw = dict(batch_size=args.batch or cfg.eval.batch_size, autocast=autocast, device=device, keep_images=True,
              min_category_images=min_cat)
    res = evaluate_policy(policy, texts, seeds, steps, guidance, **kw)
    write_results(res, args.out)
    category_grid([res], Path(args.out) / "grid.png")
    print(f"{len(texts)} prompts x {seeds} seeds" + (f" (at least {min_cat} images per category)" if min_cat else "")
          + f", {len(res.records)} images, {steps} ODE steps, guidance {guidance}")
    if baseline is not None:
        base_res = evaluate_policy(baseline, texts, seeds, steps, guidance, **kw)
        category_grid([base_res, res], Path(args.out) / "compare.png", labels=["baseline", "evaluated"])
        print("baseline:")
        print(base_res.table())
        print("evaluated:")
    print(res.table())
    print(f"wrote {args.out}/samples.jsonl, {args.out}/images/, {args.out}/grid.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
