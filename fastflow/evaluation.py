"""Held-out evaluation, one implementation for the trainer and for ``python -m fastflow.evaluate``:
which images are drawn (prompts x seeds, the noise of each), how they are sampled (the ODE at the
full step count) and how they are scored (the policy's own metric, else the config's rewards).

Why one module: an evaluation inside a run and one of its checkpoint afterwards must draw the same
images, so that their numbers compare image by image (and the CLI's baseline comparison of two
checkpoints does too). The noise of an image is a pure function of (eval.seed, prompt text, seed
index): independent of the prompt order, the batch size, the world size and the run's seed.

Scoring: a policy that defines ``eval_metrics`` (the shapes task: strict accuracy and partial
credit from its exact verifier) is judged by it; any other (SD3.5, FLUX, ...) by the config's
``reward.weights``: the weighted total as ``reward`` and every component under its own name.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
from torch import Tensor

from fastflow.rollout import sample

#: The metric a policy's own ``eval_metrics`` reports as strict correctness (shapes: the verifier).
STRICT = "accuracy"


def image_seed(prompt: str, index: int, base: int = 0) -> int:
    """The fixed noise seed of image ``index`` of ``prompt`` under evaluation seed ``base``
    (eval.seed): stable across runs, platforms, prompt orders and batch sizes. ``base`` 0 keeps
    the seeds of earlier evaluations (the prompt text and index alone)."""
    key = f"{prompt}\x00{index}" if base == 0 else f"{int(base)}\x00{prompt}\x00{index}"
    return zlib.crc32(key.encode()) & 0x7FFFFFFF


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


def rank_pairs(seed_counts: Sequence[int], rank: int = 0, world: int = 1) -> tuple[list[tuple[int, int]], int]:
    """This rank's (prompt index, seed index) pairs of an evaluation, and how many are real.

    Every rank gets the same number of pairs (the real ones, then repeats of the first pair), so
    every rank samples the same number of batches: under FSDP2 a rank that sampled less would
    leave the others waiting in a forward's all-gather. Padding is sampled but must not be
    counted (weight 0)."""
    every = [(i, s) for i, n in enumerate(seed_counts) for s in range(n)]
    pairs = every[rank::world]
    real = len(pairs)
    return pairs + [every[0]] * (-(-len(every) // world) - real), real


def score_images(policy, reward, images: Tensor, texts: Sequence[str], metas: Sequence[dict]) -> dict[str, Tensor]:
    """Per-image evaluation metrics ``{name: [B]}``: the policy's own (``eval_metrics``, e.g. strict
    accuracy) when it defines them, else ``reward(images, texts, metas)``'s total as ``reward`` and
    its components under their names."""
    if hasattr(policy, "eval_metrics"):
        return {k: torch.as_tensor(v).float().cpu() for k, v in policy.eval_metrics(images, texts, metas).items()}
    if reward is None:
        raise ValueError(f"{type(policy).__name__} has no eval_metrics: evaluating it needs rewards "
                         f"(reward.weights)")
    total, parts = reward(images, texts, metas)
    return {"reward": total.float().cpu(), **{k: v.float().cpu() for k, v in parts.items()}}


def sample_images(policy, texts: Sequence[str], pairs: Sequence[tuple[int, int]], *, base_seed: int,
                  steps: int, guidance_scale: float, batch_size: int,
                  sampler: Callable | None = None, autocast: ContextManager | None = None,
                  device=None) -> Iterator[tuple[int, Tensor]]:
    """ODE samples of ``pairs`` ((index into texts, seed index)), ``batch_size`` at a time:
    yields (offset of the batch in pairs, decoded images [b, 3, H, W] float32 on the CPU).

    ``sampler``: ``fastflow.rollout.sample``'s signature without the policy (the trainer passes its
    graph-captured sampler); default: ``sample`` bound to ``policy``. The caller holds whatever
    context the weights need (EMA applied, FSDP gathered, ``policy.sampling()``)."""
    run = sampler if sampler is not None else (lambda cond, **kw: sample(policy, cond, **kw))
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        ctexts = [texts[i] for i, _ in chunk]
        seeds = torch.tensor([image_seed(texts[i], s, base_seed) for i, s in chunk])
        cond = policy.encode_prompts(ctexts)
        traj = run(cond, num_steps=steps, guidance_scale=guidance_scale, noise_level=0.0, kind="ode",
                   seeds=seeds, autocast=autocast, device=device)
        yield start, policy.decode(traj.final).float().cpu()


# ------------------------------------------------------------------ what the trainer logs of an evaluation

def prompt_category(policy, prompt) -> str:
    """A fastflow.data.Prompt's category: its metadata's ``category`` / ``tag``, else the policy's,
    else "all"."""
    cat = prompt.metadata.get("category") or prompt.metadata.get("tag")
    if cat is None and hasattr(policy, "prompt_category"):
        cat = policy.prompt_category(prompt.text)
    return str(cat) if cat else "all"


def format_eval_table(before: dict[str, Any], after: dict[str, Any]) -> str:
    """A per-category table of every eval metric, before vs after."""
    rows = sorted({k for k in after if k.startswith("eval/") and k.count("/") == 2
                   and not k.startswith("eval/time")})
    if {k.split("/")[1] for k in rows} == {"all", "overall"}:  # one category: "all" repeats "overall"
        rows = [k for k in rows if not k.startswith("eval/all/")]
    if not rows:
        return "fastflow: no evaluation metrics"
    lines = [f"{'category':<16} {'metric':<14} {'before':>8} {'after':>8} {'delta':>8}"]
    summary = ("overall", "category_mean")  # after the categories: per image, then per category
    for k in sorted(rows, key=lambda k: (k.split("/")[2], k.split("/")[1] in summary, k.split("/")[1])):
        _, cat, metric = k.split("/")
        b, a = before.get(k), after[k]
        bs = f"{b:8.3f}" if isinstance(b, float) else f"{'-':>8}"
        ds = f"{a - b:+8.3f}" if isinstance(b, float) else f"{'':>8}"
        lines.append(f"{cat:<16} {metric:<14} {bs} {a:8.3f} {ds}")
    return "\n".join(lines)


class GroupDiversity:
    """Within-group diversity of evaluation images: the mean absolute pixel difference (images in
    [0, 1], pooled to at most 64 px) over every pair of images of one prompt (its seeds). Images
    arrive prompt by prompt, so only one prompt's images are held at a time."""

    def __init__(self, max_side: int = 64):
        self.max_side = max_side
        self.key, self.images = None, []
        self.total, self.pairs = 0.0, 0

    def add(self, key, image: Tensor) -> None:
        if key != self.key:
            self._flush()
            self.key = key
        if max(image.shape[-2:]) > self.max_side:
            image = torch.nn.functional.adaptive_avg_pool2d(image[None], self.max_side)[0]
        self.images.append(image.float())

    def _flush(self) -> None:
        n = len(self.images)
        if n > 1:
            flat = torch.stack(self.images).flatten(1)
            d = torch.cdist(flat, flat, p=1) / flat.shape[1]
            self.total += float(d.sum()) / 2
            self.pairs += n * (n - 1) // 2
        self.images = []

    def totals(self) -> Tensor:
        """[sum of pair distances, number of pairs] (float64, for a sum over ranks)."""
        self._flush()
        return torch.tensor([self.total, float(self.pairs)], dtype=torch.float64)
