"""Image grids a run writes: samples_<tag>.png (a grid of evaluation images) and before_after.png
(per category, the same prompts and seeds before and after training, framed by the verdict)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor


GRID_PER_CATEGORY = 8  # images per category in before_after.png: the first prompts' fixed seeds


def save_before_after(before: dict, after: dict, path: Path) -> Path:
    """One PNG: per category a row of images before training and a row after (same prompts, same
    seeds), each framed green (correct) or red (wrong) when the policy reports accuracy."""
    from PIL import Image, ImageDraw

    cats = sorted(set(before) & set(after))
    h, w = before[cats[0]][0][0].shape[1:]
    scale = max(1, 96 // max(h, w))
    cell, pad, label_w = max(h, w) * scale + 6, 4, 120
    rows = [r for c in cats for r in ((f"{c}: before", before[c]), (f"{c}: after", after[c]))]
    ncol = max(len(r[1]) for r in rows)
    canvas = Image.new("RGB", (label_w + ncol * (cell + pad), len(rows) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, items) in enumerate(rows):
        y = pad + r * (cell + pad)
        draw.text((4, y + cell // 2 - 6), label, fill="black")
        for c, (img, ok) in enumerate(items):
            x = label_w + c * (cell + pad)
            frame = "white" if ok is None else ("#1a9641" if ok >= 0.5 else "#d7191c")
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=frame)
            arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            tile = Image.fromarray(arr).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (x + 3, y + 3))
    canvas.save(path)
    return Path(path)


def save_grid(images: Tensor, path: Path, ncol: int = 8) -> Path:
    """Save ``[N, 3, H, W]`` images in [0, 1] as one PNG grid (nearest-neighbour upscaled when tiny)."""
    from PIL import Image

    n, _, h, w = images.shape
    rows = math.ceil(n / ncol)
    pad = 2
    grid = torch.ones(3, rows * (h + pad) + pad, min(n, ncol) * (w + pad) + pad)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + c * (w + pad):pad + c * (w + pad) + w] = images[i]
    arr = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    img = Image.fromarray(arr)
    if h < 128:
        img = img.resize((img.width * 4, img.height * 4), Image.NEAREST)
    img.save(path)
    return Path(path)
