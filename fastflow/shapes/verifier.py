"""The exact GenEval-style verifier of the shapes world (DESIGN.md "The shapes task").

Pixels -> palette colour classes -> 8-connected components per colour (>= 6 px) -> objects with a
shape from their fill ratio and a centroid -> the prompt's conditions. Component labelling is a
batched max-propagation in torch (no SciPy), so a batch of RL rollouts is judged in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fastflow.shapes.world import COLORS, PALETTE, POSITION_MARGIN, PromptSpec, parse_prompt

COLOR_THRESHOLD = 0.35
MIN_PIXELS = 6
SQUARE_FILL = 0.88
CIRCLE_FILL = (0.70, 0.88)
TRIANGLE_FILL = (0.35, 0.65)


@dataclass(frozen=True)
class Detected:
    """An object found in an image: colour, shape ("unknown" when the fill matches none), pixel
    count, fill ratio and centroid (x right, y down)."""

    color: str
    shape: str
    area: int
    fill: float
    cx: float
    cy: float


def shape_from_fill(fill: float) -> str:
    """The shape word a fill ratio (area / bounding-box area) stands for, or "unknown"."""
    if fill >= SQUARE_FILL:
        return "square"
    if CIRCLE_FILL[0] <= fill < CIRCLE_FILL[1]:
        return "circle"
    if TRIANGLE_FILL[0] <= fill < TRIANGLE_FILL[1]:
        return "triangle"
    return "unknown"


def classify_pixels(images: Tensor) -> Tensor:
    """Per-pixel colour class ``[B, H, W]`` long: index into COLORS, or -1 for background."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
    x = images.detach().float().cpu()
    pal = torch.tensor([PALETTE[c] for c in COLORS], dtype=torch.float32)        # [K, 3]
    dist = (x[:, None] - pal[None, :, :, None, None]).pow(2).sum(2).sqrt()       # [B, K, H, W]
    dmin, k = dist.min(1)
    dwhite = (x - 1.0).pow(2).sum(1).sqrt()
    fg = (dmin < COLOR_THRESHOLD) & (dwhite >= COLOR_THRESHOLD)
    return torch.where(fg, k, torch.full_like(k, -1))


def _label_components(mask: Tensor) -> Tensor:
    """8-connected component labels of a boolean ``[N, H, W]`` mask: 0 = off, else a label unique
    over the whole batch (the largest flat pixel index + 1 of the component)."""
    n, h, w = mask.shape
    ids = torch.arange(1, n * h * w + 1, dtype=torch.float32).view(n, h, w)
    lab = torch.where(mask, ids, torch.zeros_like(ids))
    m = mask.float()
    while True:
        new = F.max_pool2d(lab[:, None], 3, stride=1, padding=1)[:, 0] * m
        if torch.equal(new, lab):
            return lab.long()
        lab = new


def detect_objects(images: Tensor) -> list[list[Detected]]:
    """The objects in each image of ``[B, 3, H, W]`` (values in [0, 1])."""
    cls = classify_pixels(images)
    b, h, w = cls.shape
    k = len(COLORS)
    masks = torch.stack([cls == i for i in range(k)], 1).view(b * k, h, w)        # [B*K, H, W]
    lab = _label_components(masks).view(b, k, h, w)
    flat = lab.reshape(-1)
    on = flat > 0
    labels = flat[on]
    if labels.numel() == 0:
        return [[] for _ in range(b)]
    uniq, inv = torch.unique(labels, return_inverse=True)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    xs = xx.expand(b, k, h, w).reshape(-1)[on].float()
    ys = yy.expand(b, k, h, w).reshape(-1)[on].float()
    nc = uniq.numel()
    area = torch.zeros(nc).index_add_(0, inv, torch.ones_like(xs))
    sx = torch.zeros(nc).index_add_(0, inv, xs)
    sy = torch.zeros(nc).index_add_(0, inv, ys)
    big = float(max(h, w) + 1)
    xmin = torch.full((nc,), big).scatter_reduce(0, inv, xs, "amin")
    xmax = torch.full((nc,), -1.0).scatter_reduce(0, inv, xs, "amax")
    ymin = torch.full((nc,), big).scatter_reduce(0, inv, ys, "amin")
    ymax = torch.full((nc,), -1.0).scatter_reduce(0, inv, ys, "amax")
    # the label is a flat index + 1 into [B, K, H, W]: recover the image and colour
    img_of = (uniq - 1) // (k * h * w)
    col_of = ((uniq - 1) // (h * w)) % k
    out: list[list[Detected]] = [[] for _ in range(b)]
    for i in range(nc):
        a = int(area[i])
        if a < MIN_PIXELS:
            continue
        fill = a / float((xmax[i] - xmin[i] + 1) * (ymax[i] - ymin[i] + 1))
        out[int(img_of[i])].append(Detected(COLORS[int(col_of[i])], shape_from_fill(fill), a, fill,
                                            float(sx[i] / a), float(sy[i] / a)))
    for objs in out:   # a stable order (top-to-bottom, left-to-right) for readable reports
        objs.sort(key=lambda o: (o.cy, o.cx))
    return out


def _relation(a: Detected, b: Detected, relation: str) -> bool:
    return {"left of": b.cx - a.cx >= POSITION_MARGIN, "right of": a.cx - b.cx >= POSITION_MARGIN,
            "above": b.cy - a.cy >= POSITION_MARGIN, "below": a.cy - b.cy >= POSITION_MARGIN}[relation]


def _matches(obj: Detected, want) -> bool:
    return obj.shape == want.shape and (want.color is None or obj.color == want.color)


def conditions(spec: PromptSpec, objects: Sequence[Detected]) -> list[bool]:
    """The prompt's conditions on the detected objects, each True/False. The image is correct when
    all hold; their mean is the partial credit. Conditions: the exact object count, then one per
    requested object (matched one-to-one, greedily in prompt order), then the relation if any."""
    want = spec.objects
    conds = [len(objects) == len(want)]
    free = list(objects)
    matched: list[Detected | None] = []
    for w in want:
        hit = next((o for o in free if _matches(o, w)), None)
        if hit is not None:
            free.remove(hit)
        matched.append(hit)
        conds.append(hit is not None)
    if spec.relation is not None:
        a, b = matched[0], matched[1]
        conds.append(a is not None and b is not None and _relation(a, b, spec.relation))
    return conds


def judge(images: Tensor, prompts: Sequence[str | PromptSpec]) -> list[list[bool]]:
    """Per image, the list of its prompt's conditions (see ``conditions``)."""
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
    specs = [p if isinstance(p, PromptSpec) else parse_prompt(p) for p in prompts]
    return [conditions(s, objs) for s, objs in zip(specs, detect_objects(images))]


def is_correct(images: Tensor, prompts: Sequence[str | PromptSpec]) -> Tensor:
    """Strict 0/1 correctness ``[B]`` bool: every condition of the prompt holds."""
    return torch.tensor([all(c) for c in judge(images, prompts)], dtype=torch.bool)
