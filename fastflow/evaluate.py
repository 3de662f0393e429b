"""Evaluate any model of a config (or a checkpoint of it) on held-out prompts with fixed seeds.

    python -m fastflow.evaluate CONFIG [--checkpoint PATH] [--prompts FILE] [--seeds N] [--steps K]
                                [--min-category-images M] [--guidance G] [--batch B]
                                [--baseline base|PATH] --out DIR

Samples every prompt x its seeds with the ODE at the full step count, exactly the images the
trainer's own evaluation draws (fastflow.evaluation: the noise of an image is a function of
eval.seed, the prompt text and the seed index, whatever the prompt order, batch size or world
size), and scores them as the trainer does: a shapes model by its exact verifier (strict
accuracy and partial credit), every other model (SD3.5, FLUX, Qwen-Image, klein) by the config's
``reward.weights`` (the weighted total as ``reward`` and each component by name).

Writes DIR/images/*.png (lossless, the model's resolution), DIR/samples.jsonl (one line per image:
prompt, file, seed, category, every metric), DIR/summary.json (per category, ``overall`` = the
mean over prompts, ``category_mean``) and DIR/grid.png (a per-category grid; frames green / red
for the verifier's verdict), and prints the table. ``--baseline base`` (the config's model) or a
model file / checkpoint also evaluates that model on the same prompts and seeds and writes
DIR/compare.png (baseline | evaluated, image by image). Without --checkpoint it evaluates the
config's [model] (for the shapes task: the shipped base model). Categories: a prompt's metadata
``category`` / ``tag`` (jsonl), else the shapes grammar's, else "all".

Bad input (an argument out of range, a missing or invalid config, a prompt outside the grammar of
a shapes model, a prompt file that is not UTF-8, a weights file that is truncated or not
safetensors, e.g. a pickle, a served reward that does not answer) stops it with one line
``evaluate: CAUSE`` on stderr and exit code 2, before any model loads.

A category with few prompts gets more seeds per prompt (``--min-category-images``, default
``eval.min_category_images``): the headline is the mean over categories, so each category's
accuracy should be measured about equally well (see :func:`seeds_per_prompt`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ContextManager, Sequence

import torch
from torch import Tensor

from fastflow import evaluation

OVERALL = "overall"
#: Models whose prompts are in the shapes grammar, judged by their own verifier; every other kind is
#: scored by the config's rewards.
GRAMMAR_KINDS = ("shapes", "toy")
CATEGORY_MEAN = "category_mean"

#: kept importable from here
image_seed = evaluation.image_seed
seeds_per_prompt = evaluation.seeds_per_prompt


@dataclass
class EvalRecord:
    """One evaluated image: its prompt, seed and every metric it was scored with. ``correct`` and
    ``partial`` are the strict verdict and partial credit of a policy with its own verifier (the
    shapes task); None for a policy scored by rewards."""

    prompt: str
    seed_index: int
    seed: int
    category: str
    correct: bool | None
    partial: float | None
    image: Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalResults:
    """Per-image records and their means. Three summaries, as the trainer logs them: per category
    (the plain mean of its images), ``overall`` (the mean over prompts of each prompt's mean: = the
    mean over images when every prompt has the same seed count) and the category mean (GenEval's
    headline). ``accuracy`` (strict correctness, shapes) keeps its historical keys: per category,
    and ``accuracy[OVERALL]`` the category mean; ``image_accuracy`` is the mean over prompts."""

    records: list[EvalRecord] = field(default_factory=list)

    @property
    def categories(self) -> list[str]:
        seen: list[str] = []
        for r in self.records:
            if r.category not in seen:
                seen.append(r.category)
        return seen

    @property
    def metric_names(self) -> list[str]:
        names: list[str] = []
        for r in self.records:
            names += [k for k in r.metrics if k not in names]
        return names

    def means(self, metric: str) -> dict[str, float]:
        """``metric`` per category, ``overall`` (mean over prompts) and ``category_mean``."""
        out: dict[str, float] = {}
        for c in self.categories:
            vals = [r.metrics[metric] for r in self.records if r.category == c and metric in r.metrics]
            if vals:
                out[c] = sum(vals) / len(vals)
        per_prompt: dict[str, list[float]] = {}
        for r in self.records:
            if metric in r.metrics:
                per_prompt.setdefault(r.prompt, []).append(r.metrics[metric])
        cats = list(out)
        if per_prompt:
            out[OVERALL] = sum(sum(v) / len(v) for v in per_prompt.values()) / len(per_prompt)
            out[CATEGORY_MEAN] = sum(out[c] for c in cats) / len(cats)
        return out

    @property
    def accuracy(self) -> dict[str, float]:
        m = self.means(evaluation.STRICT)
        overall = m.pop(CATEGORY_MEAN, None)
        m.pop(OVERALL, None)
        if overall is not None:
            m[OVERALL] = overall
        return m

    @property
    def image_accuracy(self) -> float:
        return self.means(evaluation.STRICT).get(OVERALL, 0.0)

    def summary(self) -> dict:
        """What summary.json holds: every metric's means, and the strict accuracy's historical keys."""
        out: dict = {"images": len(self.records), "prompts": len({r.prompt for r in self.records}),
                     "metrics": {k: self.means(k) for k in self.metric_names}}
        if evaluation.STRICT in self.metric_names:
            out["accuracy"], out["image_accuracy"] = self.accuracy, self.image_accuracy
        return out

    def table(self) -> str:
        """A printable table: one row per category, one column per metric (strict accuracy first)."""
        names = sorted(self.metric_names, key=lambda k: (k != evaluation.STRICT, k))
        means = {k: self.means(k) for k in names}
        width = max([16] + [len(c) + 1 for c in self.categories])
        head = f"{'category':<{width}} {'images':>6}" + "".join(f" {k[:14]:>14}" for k in names)
        lines = [head]
        for c in self.categories:
            n = sum(r.category == c for r in self.records)
            lines.append(f"{c:<{width}} {n:>6}" + "".join(f" {means[k].get(c, float('nan')):>14.4f}" for k in names))
        for row in (CATEGORY_MEAN, OVERALL):
            label = row if row == CATEGORY_MEAN else "overall/prompt"
            n = len(self.records) if row == OVERALL else len(self.categories)
            lines.append(f"{label:<{width}} {n:>6}" + "".join(f" {means[k].get(row, float('nan')):>14.4f}" for k in names))
        return "\n".join(lines)


class _Verifier:
    """The shapes verifier as ``eval_metrics``: the judge of a policy that has no metric of its own
    and no rewards to be scored by (the toy model, test oracles drawing grammar scenes)."""

    @staticmethod
    def eval_metrics(images, texts, metas):
        from fastflow.shapes import verifier
        conds = verifier.judge(images, texts)
        return {evaluation.STRICT: torch.tensor([float(all(c)) for c in conds]),
                "partial": torch.tensor([sum(c) / len(c) for c in conds])}


def _category(policy, judge, text: str, meta: dict) -> str:
    """A prompt's category: its metadata's ``category`` / ``tag``, else the policy's, else the shapes
    grammar's for a verifier-judged policy (which also rejects a prompt outside the grammar), else
    "all" (as the trainer names it)."""
    cat = meta.get("category") or meta.get("tag")
    if cat:
        return str(cat)
    if hasattr(policy, "prompt_category"):
        return policy.prompt_category(text)
    if isinstance(judge, _Verifier) or judge is policy:
        from fastflow.shapes.world import category_of
        return category_of(text)
    return "all"


@torch.no_grad()
def evaluate_policy(policy, prompts: Sequence, seeds: int, steps: int, guidance_scale: float, *,
                    reward=None, base_seed: int = 0, batch_size: int = 64,
                    autocast: ContextManager | None = None, device=None, keep_images: bool = False,
                    min_category_images: int = 0, progress: bool = False) -> EvalResults:
    """ODE samples of every prompt x its seeds (fixed noise: fastflow.evaluation.image_seed), scored
    by the policy's own metric (the shapes verifier) or by ``reward`` (a WeightedReward).

    prompts: texts or fastflow.data.Prompt (a prompt's metadata ``category`` / ``tag`` names its
    category; else the policy's, else "all"); seeds: images per prompt; min_category_images: more
    seeds for the prompts of small categories (seeds_per_prompt); steps: the full ODE step count;
    base_seed: eval.seed; keep_images: keep each image ([3, H, W] in [0, 1], CPU) on its record;
    progress: a progress bar over the images (stderr).
    """
    if seeds < 1 or steps < 1 or batch_size < 1:
        raise ValueError(f"evaluate: seeds, steps and batch_size must be >= 1, got {seeds}, {steps}, {batch_size}")
    texts = [p if isinstance(p, str) else p.text for p in prompts]
    metas = [{} if isinstance(p, str) else dict(p.metadata) for p in prompts]
    if not texts:
        raise ValueError("evaluate: no prompts")
    judge = policy if hasattr(policy, "eval_metrics") else (None if reward is not None else _Verifier())
    cats = [_category(policy, judge, t, m) for t, m in zip(texts, metas)]  # bad prompts fail here, early
    counts = seeds_per_prompt(cats, seeds, min_category_images)
    pairs, _ = evaluation.rank_pairs(counts)
    results = EvalResults()
    sampling = policy.sampling() if hasattr(policy, "sampling") else contextlib.nullcontext()
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(pairs), desc="evaluate", unit="img", dynamic_ncols=True)
    with sampling, (bar if bar is not None else contextlib.nullcontext()):  # the shapes policy merges its LoRA
        for start, images in evaluation.sample_images(policy, texts, pairs, base_seed=base_seed, steps=steps,
                                                      guidance_scale=guidance_scale, batch_size=batch_size,
                                                      autocast=autocast, device=device):
            chunk = pairs[start:start + batch_size]
            scored = evaluation.score_images(judge or policy, reward, images,
                                             [texts[i] for i, _ in chunk], [metas[i] for i, _ in chunk])
            for k, (i, j) in enumerate(chunk):
                m = {name: float(v[k]) for name, v in scored.items()}
                strict = m.get(evaluation.STRICT)
                results.records.append(EvalRecord(
                    texts[i], j, evaluation.image_seed(texts[i], j, base_seed), cats[i],
                    None if strict is None else bool(strict >= 0.5),
                    None if strict is None else m.get("partial", strict),
                    images[k].clone() if keep_images else None, m))
            if bar is not None:
                bar.update(len(chunk))
    return results


def category_grid(results: Sequence[EvalResults], path: str | Path, *, per_category: int = 8,
                  scale: int | None = None, labels: Sequence[str] = ()) -> Path:
    """A PNG with one row per category: the first ``per_category`` images of that category (same
    prompts and seeds in every ``results``, so before / after sit side by side as column blocks),
    each framed green (correct) or red (wrong), grey when scored by rewards (no verdict). Tiles:
    ``scale`` x the image size (default: 3x up to 64 px, images larger than that shown at 128 px).
    ``results`` must have been run with keep_images."""
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
    th, tw = (h * scale, w * scale) if scale else ((3 * h, 3 * w) if max(h, w) <= 64 else
                                                    (128 * h // max(h, w), 128 * w // max(h, w)))
    cell_h, cell_w = th + 4, tw + 4
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
                frame = (150, 150, 150) if rec.correct is None else (20, 160, 40) if rec.correct else (210, 30, 30)
                draw.rectangle([x, y, x + cell_w - 2, y + cell_h - 2], fill=frame)
                arr = (rec.image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
                tile = Image.fromarray(arr).resize((tw, th), Image.NEAREST if tw >= w else Image.LANCZOS)
                canvas.paste(tile, (x + 1, y + 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def write_results(results: EvalResults, out: str | Path) -> None:
    """DIR/images/*.png (lossless, raw size), DIR/samples.jsonl (one line per image: prompt, file,
    seed, category, every metric; the strict verdict of a verifier-judged policy as ``correct`` /
    ``partial``), DIR/summary.json (EvalResults.summary)."""
    from PIL import Image

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    with (out / "samples.jsonl").open("w", encoding="utf-8") as f:
        for n, r in enumerate(results.records):
            name = f"images/{n:05d}.png"
            if r.image is not None:
                arr = (r.image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
                Image.fromarray(arr).save(out / name)
            row = {"prompt": r.prompt, "file": name, "seed": r.seed, "seed_index": r.seed_index,
                   "category": r.category}
            if r.correct is not None:
                row.update(correct=r.correct, partial=round(r.partial, 4))
            row["metrics"] = {k: round(v, 6) for k, v in r.metrics.items()}
            f.write(json.dumps(row) + "\n")
    (out / "summary.json").write_text(json.dumps(results.summary(), indent=2) + "\n")


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
    for n, prm in params.items():
        if tuple(state[n].shape) != tuple(prm.shape):
            raise ValueError(f"--checkpoint: {n} is {tuple(state[n].shape)} in the checkpoint but "
                             f"{tuple(prm.shape)} in the policy; was it written with another "
                             f"model.lora_rank / model.finetune setting?")
    with torch.no_grad():
        for n, prm in params.items():
            prm.copy_(state[n].to(prm.dtype))


# ----------------------------------------------------------------------------------- command line


class InputError(ValueError):
    """A mistake in the evaluate command line or in a file it names; the message is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line (not usage + error), and main's exit code 2
        raise InputError(f"{message} (see --help)")


def parse_args(argv=None) -> argparse.Namespace:
    ap = _Parser(prog="python -m fastflow.evaluate",
                 description="Evaluate a model or checkpoint on held-out prompts with fixed seeds, per category.")
    ap.add_argument("config", nargs="?", default=None, help="TOML run config (default: the embedded shapes run)")
    ap.add_argument("--checkpoint", default="", help="model.safetensors / export folder, trainer checkpoint "
                    "folder or run directory (default: the config's model, e.g. the shipped base model)")
    ap.add_argument("--prompts", default="", help="a .txt/.jsonl file of grammar prompts "
                    "(default: the config's data.eval_prompts, else the model's held-out list)")
    ap.add_argument("--seeds", type=int, default=None, help="images per prompt, >= 1 (default: eval.seeds)")
    ap.add_argument("--min-category-images", type=int, default=None, help="more seeds for the prompts of "
                    "small categories, so each category has at least this many images; 0 = off "
                    "(default: eval.min_category_images)")
    ap.add_argument("--steps", type=int, default=None, help="ODE steps, >= 1 (default: sample.eval_steps)")
    ap.add_argument("--guidance", type=float, default=None, help="CFG scale, >= 0; 0 = the default "
                    "(the config's eval scale, eval.guidance_scale or sample.guidance_scale)")
    ap.add_argument("--batch", type=int, default=None, help="images per forward, >= 1 (default: eval.batch_size)")
    ap.add_argument("--device", default="", help="cpu | cuda | cuda:N (default: run.device)")
    ap.add_argument("--baseline", default="", help="also evaluate this model (a model file / export folder, or "
                    "'base' for the config's model) on the same prompts and seeds; writes DIR/compare.png")
    ap.add_argument("--out", required=True, help="output directory")
    return ap.parse_args(argv)


_PICKLE_HINT = "fastflow loads weights only from .safetensors files (unpickling a file can run code)"


def check_safetensors(path: str | Path, what: str = "weights") -> dict[str, str]:
    """Check a ``.safetensors`` file from its header alone, without loading a tensor: that it is
    one (not a pickle, not a torch.save archive) and holds every byte of tensor data its header
    lists (a file cut short by a full disk or an interrupted copy does not). Returns the header's
    metadata; InputError (one line, naming ``what`` and the file) otherwise."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            kind = _foreign_format(head)
            if kind:
                raise InputError(f"{what} {path} is a {kind}, not a .safetensors file; {_PICKLE_HINT}")
            if n < 2 or n > size - 8:
                raise InputError(f"{what} {path} is not a complete .safetensors file (its {size} bytes "
                                 f"cannot hold the header it announces; truncated?)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise InputError(f"{what} {path}: cannot read it ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise InputError(f"{what} {path} is not a .safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise InputError(f"{what} {path} is not a .safetensors file (its header is not a JSON object)")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise InputError(f"{what} {path} is not a .safetensors file (malformed tensor entries)") from None
    held = size - 8 - n
    if held < end:
        raise InputError(f"{what} {path} is truncated: it holds {held} of the {end} bytes of tensor data "
                         f"its header lists")
    meta = header.get("__metadata__") or {}
    return meta if isinstance(meta, dict) else {}


def _foreign_format(head: bytes) -> str:
    """The name of a weights format other than safetensors, recognised from a file's first bytes."""
    if head[:4] == b"PK\x03\x04":
        return "zip archive (torch.save)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle file"
    return ""


def resolve_checkpoint(path: str | Path, flag: str = "--checkpoint", kind: str = "") -> tuple[Path, bool]:
    """Classify and check a ``--checkpoint`` / ``--baseline`` path before any model loads:
    (path, True) for a model file or export folder (loaded as ``model.path``), (path, False) for a
    trainer checkpoint folder, the run directory's latest checkpoint replacing a run directory.
    The weights file it will read is checked with :func:`check_safetensors`; a shapes model file
    (``kind`` "shapes") must carry the shapes architecture. InputError (one line) otherwise."""
    from fastflow.checkpoint import is_sharded_checkpoint, latest_checkpoint

    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"{flag} not found: {p}")
    model_file = p if p.is_file() else p / "model.safetensors"
    if p.is_file() or model_file.is_file():
        if model_file.suffix != ".safetensors":
            with model_file.open("rb") as f:
                foreign = _foreign_format(f.read(8))
            what = f"a {foreign}" if foreign else "not a .safetensors file"
            raise InputError(f"{flag} {p} is {what}; {_PICKLE_HINT}")
        meta = check_safetensors(model_file, flag)
        if kind == "shapes" and "fastflow_shapes_config" not in meta:
            raise InputError(f"{flag} {model_file} is not a fastflow shapes model (no 'fastflow_shapes_config' "
                             f"metadata); give an exported model (RUN/final), a checkpoint folder or a run directory")
        return p, True
    ck = p
    if (p / "checkpoints").is_dir():
        latest = latest_checkpoint(p)
        if latest is None:
            raise InputError(f"{flag}: no complete checkpoint under {p / 'checkpoints'}")
        ck = latest
    if is_sharded_checkpoint(ck):
        return ck, False
    for name in ("ema.safetensors", "trainable.safetensors"):  # the one load_checkpoint_into reads
        if (ck / name).is_file():
            check_safetensors(ck / name, flag)
            return ck, False
    raise InputError(f"{flag} {p} is neither a model file / export folder (model.safetensors), a trainer "
                     f"checkpoint folder (ema.safetensors, trainable.safetensors or sharded/) nor a run "
                     f"directory (checkpoints/iter-N)")


def _check_out_dir(out: Path) -> None:
    """The output directory must be a directory or creatable; checked before anything loads."""
    import os

    if out.exists():
        if not out.is_dir():
            raise InputError(f"--out {out} exists and is not a directory")
        parent = out
    else:
        parent = out.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise InputError(f"--out {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"--out {out}: {parent} is not writable")


def _prompt_check(kind: str):
    """The check of one evaluation prompt of a verifier-judged model (shapes, toy): in the grammar
    (the shapes verifier judges every image and names its category), and for the toy model with a
    colour word. Other models take any text (None)."""
    if kind not in GRAMMAR_KINDS:
        return None
    from fastflow.shapes.world import check_prompt

    def check(prompt) -> None:
        check_prompt(prompt.text, grammar=True)
        if kind == "toy":
            from fastflow.models.toy import color_word
            color_word(prompt.text)
    return check


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {name!r} is not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


@dataclass
class _Plan:
    """Everything main needs, checked before a model loads."""

    cfg: object
    device: torch.device
    checkpoint: tuple[Path, bool] | None
    baseline: tuple[Path, bool] | None
    texts: list | None  # fastflow.data.Prompt list; None: the built policy's default_prompts("eval")
    seeds: int
    min_category_images: int
    steps: int
    guidance: float
    batch_size: int
    out: Path


def _plan(args: argparse.Namespace) -> _Plan:
    """Check the arguments, the config and every file they name, cheapest first; InputError (one
    line) on the first mistake."""
    import copy
    import math

    from fastflow.config import ConfigError, load_config, validate
    from fastflow.data import load_prompts

    for flag, value, low in (("--seeds", args.seeds, 1), ("--steps", args.steps, 1), ("--batch", args.batch, 1),
                             ("--min-category-images", args.min_category_images, 0)):
        if value is not None and value < low:
            raise InputError(f"{flag} must be >= {low}, got {value}")
    if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
        raise InputError(f"--guidance must be a finite number >= 0 (0 = the config's), got {args.guidance}")
    if not args.out.strip():
        raise InputError("--out must not be empty")
    out = Path(args.out).expanduser()
    _check_out_dir(out)
    try:
        cfg = load_config(args.config)
        # Evaluation reads the model, sampling and eval settings; the training-only files and
        # packages (training prompts, bitsandbytes) need not be present where a model is evaluated.
        checked = copy.deepcopy(cfg)
        checked.data.train_prompts, checked.train.optimizer = "", "adamw"
        validate(checked, 1)
    except ConfigError as e:
        raise InputError(str(e)) from None
    kind = cfg.model.kind
    device = _resolve_device(args.device or cfg.run.device)
    ck = resolve_checkpoint(args.checkpoint, "--checkpoint", kind) if args.checkpoint else None
    base = None
    if args.baseline and args.baseline != "base":
        base = resolve_checkpoint(args.baseline, "--baseline", kind)
    if kind not in GRAMMAR_KINDS:  # a served reward must answer now, not after the model loaded
        from fastflow.rewards.remote import check_served_rewards
        try:
            check_served_rewards(cfg.reward.weights, cfg.reward.options)
        except (ConfigError, ValueError, OSError) as e:
            raise InputError(str(e)) from None
    if not ck and cfg.model.path and cfg.model.path.endswith(".safetensors"):
        check_safetensors(Path(cfg.model.path).expanduser(), "model.path")
    source = args.prompts or cfg.data.eval_prompts
    texts = None
    if source:
        flag = "--prompts" if args.prompts else "data.eval_prompts"
        try:
            texts = load_prompts(source, check=_prompt_check(kind))  # Prompts: metadata names categories
        except (ValueError, FileNotFoundError) as e:
            raise InputError(f"{flag}: {e}") from None
    elif kind == "shapes":
        from fastflow.shapes.policy import default_prompts
        texts = list(default_prompts("eval"))
    elif kind not in GRAMMAR_KINDS:
        raise InputError(f"no prompts: model.kind {kind} has no built-in list; give --prompts FILE or "
                         f"data.eval_prompts (e.g. pickscore:test.txt after python -m fastflow.data fetch)")
    return _Plan(cfg=cfg, device=device, checkpoint=ck, baseline=base, texts=texts,
                 seeds=args.seeds or cfg.eval.seeds,
                 min_category_images=(cfg.eval.min_category_images if args.min_category_images is None
                                      else args.min_category_images),
                 steps=args.steps or cfg.sample.eval_steps,
                 guidance=args.guidance or cfg.eval.guidance_scale or cfg.sample.guidance_scale,
                 batch_size=args.batch or cfg.eval.batch_size, out=out)


def _policy_for(config: str | None, ck: tuple[Path, bool] | None, device):
    """The config's policy, with ``ck`` (from resolve_checkpoint) applied: a model file / export
    folder replaces the weights (model.path), a trainer checkpoint folder is loaded on top."""
    from fastflow.config import load_config
    from fastflow.models import build_policy

    path, is_model_file = ck if ck is not None else (None, False)
    cfg = load_config(config, ["--model.path", str(path)] if is_model_file else [])
    policy = build_policy(cfg, device)
    if path is not None and not is_model_file:
        load_checkpoint_into(policy, path)
    return policy


def _fit_prompts_as_the_run(cfg, texts: list[str], *policies) -> None:
    """Policies whose prompt encoding depends on a run's prompt lists (Qwen-Image pads every prompt
    to the longest listed one, ``fit_prompts``) get the run's lists, the config's training and
    evaluation prompts, plus the prompts evaluated here: the images are then those the run's own
    evaluation drew."""
    policies = [p for p in policies if p is not None and hasattr(p, "fit_prompts")]
    if not policies:
        return
    from fastflow.data import load_prompts

    listed = [p.text for key in ("train_prompts", "eval_prompts") if getattr(cfg.data, key)
              for p in load_prompts(getattr(cfg.data, key))]
    for policy in policies:
        policy.fit_prompts(listed + list(texts))


def main(argv=None) -> int:
    """The command line; returns the exit code: 0, or 2 after one line ``evaluate: CAUSE`` on
    stderr for bad input (arguments, config, prompt or weights files), found before any model
    loads where it can be."""
    from fastflow.logs import setup_logging

    setup_logging()
    try:
        args = parse_args(argv)
        plan = _plan(args)
    except InputError as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    cfg, device = plan.cfg, plan.device
    try:  # what only loading reveals: weights of another architecture or LoRA setting, a hub error
        policy = _policy_for(args.config, plan.checkpoint, device)
        baseline = None
        if args.baseline:
            baseline = _policy_for(args.config, plan.baseline, device)
    except (ValueError, FileNotFoundError, OSError, ImportError) as e:
        print(f"evaluate: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    texts = plan.texts
    if texts is None:
        if not hasattr(policy, "default_prompts"):
            print("evaluate: no prompts: give --prompts FILE or data.eval_prompts", file=sys.stderr)
            return 2
        texts = list(policy.default_prompts("eval"))
    seeds, min_cat, steps, guidance = plan.seeds, plan.min_category_images, plan.steps, plan.guidance
    try:
        _fit_prompts_as_the_run(cfg, [p if isinstance(p, str) else p.text for p in texts], policy, baseline)
    except (ValueError, FileNotFoundError) as e:
        print(f"evaluate: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    from fastflow.runtime import forward_context

    autocast = forward_context(cfg, device)  # the trainer's forward: model.dtype autocast, model.attention
    reward = None
    if not hasattr(policy, "eval_metrics") and cfg.model.kind not in GRAMMAR_KINDS:
        from fastflow.rewards import WeightedReward
        try:  # the trainer's rewards, on the device the trainer would put them
            reward = WeightedReward(cfg.reward.weights, cfg.reward.device or str(device), cfg.reward.options)
        except (ValueError, FileNotFoundError, OSError, ImportError) as e:
            print(f"evaluate: reward: {' '.join(str(e).split())}", file=sys.stderr)
            return 2
    kw = dict(reward=reward, base_seed=cfg.eval.seed, batch_size=plan.batch_size, autocast=autocast,
              device=device, keep_images=True, min_category_images=min_cat, progress=cfg.log.progress)
    res = evaluate_policy(policy, texts, seeds, steps, guidance, **kw)
    base_res = evaluate_policy(baseline, texts, seeds, steps, guidance, **kw) if baseline is not None else None
    print(f"{len(texts)} prompts x {seeds} seeds" + (f" (at least {min_cat} images per category)" if min_cat else "")
          + f", {len(res.records)} images, {steps} ODE steps, guidance {guidance}")
    if base_res is not None:
        print("baseline:")
        print(base_res.table())
        print("evaluated:")
    print(res.table())
    try:
        write_results(res, plan.out)
        category_grid([res], plan.out / "grid.png")
        if base_res is not None:
            category_grid([base_res, res], plan.out / "compare.png", labels=["baseline", "evaluated"])
    except OSError as e:  # a full disk, or a folder that the checks could not foresee (e.g. read-only)
        print(f"evaluate: cannot write the results to {plan.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"wrote {plan.out}/samples.jsonl, {plan.out}/images/, {plan.out}/grid.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
