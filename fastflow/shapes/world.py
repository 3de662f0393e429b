"""The shapes world (DESIGN.md "The shapes task"): palette, prompt grammar, and a renderer of random
scenes that make a given prompt true.

Everything here is exact and deterministic given a ``numpy.random.Generator``: the same seed gives
the same scenes, so pretraining data, tests and evaluations are reproducible.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

SIZE = 32
"""Image side in pixels."""

PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.08, 0.08),
    "green": (0.10, 0.65, 0.15),
    "blue": (0.10, 0.25, 0.85),
    "yellow": (0.95, 0.80, 0.05),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
NUMBERS: dict[str, int] = {"two": 2, "three": 3, "four": 4}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
MIN_SIZE, MAX_SIZE = 7, 11
MAX_OBJECTS = 4
MAX_PROMPT_WORDS = 8
"""Words the text encoder reads (fastflow.shapes.model.ModelConfig.max_tokens); the longest grammar
prompt has 7."""
POSITION_MARGIN = 4.0
"""Centroid offset (px) that makes a spatial relation true."""


@dataclass(frozen=True)
class ObjectSpec:
    """One object a prompt asks for: a shape, and a colour or None (any colour)."""

    shape: str
    color: str | None = None


@dataclass(frozen=True)
class PromptSpec:
    """A parsed grammar prompt: its category, the objects it asks for (exactly these, no others)
    and, for ``position``, the relation of ``objects[0]`` to ``objects[1]``."""

    text: str
    category: str
    objects: tuple[ObjectSpec, ...]
    relation: str | None = None


@dataclass(frozen=True)
class Placed:
    """An object placed on the canvas: bounding-box top-left (x, y), size d, shape and colour."""

    shape: str
    color: str
    x: int
    y: int
    d: int


# ----------------------------------------------------------------------------------------- grammar

def _plural(shape: str) -> str:
    return shape + "s"


def all_prompts() -> dict[str, list[str]]:
    """Every prompt of the grammar, by category, in a fixed order (126 prompts)."""
    pairs = [(a, b) for a, b in itertools.permutations(SHAPES, 2)]
    out = {
        "single_object": [f"a {s}" for s in SHAPES],
        "two_object": [f"a {a} and a {b}" for a, b in pairs],
        "counting": [f"{n} {_plural(s)}" for n in NUMBERS for s in SHAPES],
        "colors": [f"a {c} {s}" for c in COLORS for s in SHAPES],
        "position": [f"a {a} {r} a {b}" for a, b in pairs for r in RELATIONS],
        "color_attr": [f"a {ca} {a} and a {cb} {b}" for a, b in pairs
                       for ca, cb in itertools.permutations(COLORS, 2)],
    }
    return out


def vocabulary() -> list[str]:
    """The grammar's words (relations split into words), sorted; the text encoder's vocabulary."""
    words: set[str] = set()
    for prompts in all_prompts().values():
        for p in prompts:
            words.update(p.split())
    return sorted(words)


@functools.cache
def _vocabulary_set() -> frozenset[str]:
    return frozenset(vocabulary())


def parse_prompt(text: str) -> PromptSpec:
    """Parse a grammar prompt; a clear ValueError for anything the grammar cannot produce."""
    words = text.strip().lower().split()
    norm = " ".join(words)

    def shape(w: str) -> str:
        if w not in SHAPES:
            raise ValueError(f"shapes prompt {text!r}: unknown shape {w!r}; known: {', '.join(SHAPES)}")
        return w

    def color(w: str) -> str:
        if w not in PALETTE:
            raise ValueError(f"shapes prompt {text!r}: unknown colour {w!r}; known: {', '.join(COLORS)}")
        return w

    def distinct(a: str, b: str, what: str) -> None:
        if a == b:
            raise ValueError(f"shapes prompt {text!r}: the two {what}s must differ")

    n = len(words)
    if n == 2 and words[0] in NUMBERS:
        if not words[1].endswith("s"):
            raise ValueError(f"shapes prompt {text!r}: counting needs a plural shape, e.g. 'two circles'")
        s = shape(words[1][:-1])
        return PromptSpec(norm, "counting", (ObjectSpec(s),) * NUMBERS[words[0]])
    if n >= 2 and words[0] == "a":
        if n == 2:
            return PromptSpec(norm, "single_object", (ObjectSpec(shape(words[1])),))
        if n == 3:
            return PromptSpec(norm, "colors", (ObjectSpec(shape(words[2]), color(words[1])),))
        if n == 5 and words[2] == "and" and words[3] == "a":
            a, b = shape(words[1]), shape(words[4])
            distinct(a, b, "shape")
            return PromptSpec(norm, "two_object", (ObjectSpec(a), ObjectSpec(b)))
        if n == 7 and words[3] == "and" and words[4] == "a":
            a, b = shape(words[2]), shape(words[6])
            ca, cb = color(words[1]), color(words[5])
            distinct(a, b, "shape")
            distinct(ca, cb, "colour")
            return PromptSpec(norm, "color_attr", (ObjectSpec(a, ca), ObjectSpec(b, cb)))
        for rel in RELATIONS:
            rw = rel.split()
            k = len(rw)
            if n == 4 + k and words[2:2 + k] == rw and words[2 + k] == "a":
                a, b = shape(words[1]), shape(words[3 + k])
                distinct(a, b, "shape")
                return PromptSpec(norm, "position", (ObjectSpec(a), ObjectSpec(b)), rel)
    raise ValueError(f"shapes prompt {text!r} is not in the grammar (e.g. 'a red circle', 'two squares', "
                     f"'a circle left of a square')")


def check_prompt(text: str, *, grammar: bool = True) -> None:
    """Raise a one-line ValueError for a prompt the shapes model cannot take: the first word
    outside the vocabulary (named, with the known words), more words than the text encoder reads
    (MAX_PROMPT_WORDS), or, with ``grammar``, a prompt the grammar cannot produce (which the
    verifier, the shapes reward and the per-category evaluation need)."""
    words = text.strip().lower().split()
    if not words:
        raise ValueError("empty prompt (the shapes model reserves \"\" for the unconditional prompt)")
    unknown = [w for w in words if w not in _vocabulary_set()]
    if unknown:
        raise ValueError(f"shapes prompt {text.strip()!r}: word {unknown[0]!r} is not in the shapes "
                         f"vocabulary ({', '.join(vocabulary())})")
    if len(words) > MAX_PROMPT_WORDS:
        raise ValueError(f"shapes prompt {text.strip()!r} has {len(words)} words; the text encoder "
                         f"reads at most {MAX_PROMPT_WORDS}")
    if grammar:
        parse_prompt(text)


def category_of(text: str) -> str:
    """The GenEval-style category of a grammar prompt."""
    return parse_prompt(text).category


# -------------------------------------------------------------------------------------- rendering

def shape_mask(shape: str, d: int) -> np.ndarray:
    """The boolean ``[d, d]`` footprint of a shape of size ``d`` (pixel centres inside the shape)."""
    c = (np.arange(d) + 0.5)
    yy, xx = np.meshgrid(c, c, indexing="ij")
    if shape == "square":
        return np.ones((d, d), dtype=bool)
    if shape == "circle":
        r = d / 2
        return (xx - r) ** 2 + (yy - r) ** 2 <= r * r
    if shape == "triangle":
        # upward: apex at the top centre, base d on the bottom edge, height d
        return np.abs(xx - d / 2) <= yy / 2 + 1e-9
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def object_mask(obj: Placed) -> np.ndarray:
    """The boolean ``[SIZE, SIZE]`` mask of a placed object."""
    m = np.zeros((SIZE, SIZE), dtype=bool)
    m[obj.y:obj.y + obj.d, obj.x:obj.x + obj.d] = shape_mask(obj.shape, obj.d)
    return m


def centroid(obj: Placed) -> tuple[float, float]:
    """Mean pixel position (cx, cy) of a placed object's footprint (x right, y down)."""
    ys, xs = np.nonzero(shape_mask(obj.shape, obj.d))
    return obj.x + float(xs.mean()), obj.y + float(ys.mean())


def render(objects: Sequence[Placed]) -> Tensor:
    """A clean ``[3, SIZE, SIZE]`` float32 image in [0, 1]: white background, flat palette colours."""
    img = np.ones((3, SIZE, SIZE), dtype=np.float32)
    for obj in objects:
        m = object_mask(obj)
        for ch, v in enumerate(PALETTE[obj.color]):
            img[ch][m] = v
    return torch.from_numpy(img)


def _dilate(m: np.ndarray, r: int) -> np.ndarray:
    """Chebyshev dilation by ``r`` pixels (no wrap-around at the borders)."""
    p = np.pad(m, r)
    h, w = m.shape
    out = np.zeros_like(m)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= p[dy:dy + h, dx:dx + w]
    return out


def _relation_holds(a: Placed, b: Placed, relation: str, margin: float) -> bool:
    (ax, ay), (bx, by) = centroid(a), centroid(b)
    return {"left of": bx - ax >= margin, "right of": ax - bx >= margin,
            "above": by - ay >= margin, "below": ay - by >= margin}[relation]


def place_objects(wanted: Sequence[tuple[str, str]], rng: np.random.Generator, *, gap: int = 2,
                  relation: str | None = None, margin: float = POSITION_MARGIN,
                  tries: int = 2000) -> list[Placed]:
    """Place objects (shape, colour) at random sizes and positions, fully inside the canvas, with
    at least ``gap`` background pixels between any two (so none touch, even 8-connected), and, if
    ``relation`` is given, that relation (with ``margin``) from the first object to the second."""
    if len(wanted) > MAX_OBJECTS:
        raise ValueError(f"at most {MAX_OBJECTS} objects per image, asked for {len(wanted)}")
    for _ in range(tries):
        placed: list[Placed] = []
        occupied = np.zeros((SIZE, SIZE), dtype=bool)
        ok = True
        for shape, color in wanted:
            for _ in range(50):
                d = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
                x = int(rng.integers(0, SIZE - d + 1))
                y = int(rng.integers(0, SIZE - d + 1))
                obj = Placed(shape, color, x, y, d)
                m = object_mask(obj)
                if not (_dilate(m, gap) & occupied).any():
                    placed.append(obj)
                    occupied |= m
                    break
            else:
                ok = False
                break
        if ok and (relation is None or _relation_holds(placed[0], placed[1], relation, margin)):
            return placed
    raise RuntimeError(f"could not place {len(wanted)} objects in {tries} tries")


def scene_for_prompt(spec: PromptSpec | str, rng: np.random.Generator, **kw) -> list[Placed]:
    """A random scene that makes the prompt true (colours drawn at random where the prompt leaves
    them free). Keyword options go to place_objects."""
    if isinstance(spec, str):
        spec = parse_prompt(spec)
    wanted = [(o.shape, o.color if o.color is not None else COLORS[int(rng.integers(len(COLORS)))])
              for o in spec.objects]
    return place_objects(wanted, rng, relation=spec.relation, **kw)


def random_prompt(rng: np.random.Generator, prompts: dict[str, list[str]] | None = None) -> str:
    """A prompt drawn uniformly over categories, then uniformly within the category."""
    prompts = prompts or all_prompts()
    cats = [c for c in CATEGORIES if prompts.get(c)]
    cat = cats[int(rng.integers(len(cats)))]
    return prompts[cat][int(rng.integers(len(prompts[cat])))]


def sample_batch(batch: int, rng: np.random.Generator,
                 prompts: dict[str, list[str]] | None = None) -> tuple[Tensor, list[str]]:
    """``batch`` random (image, true caption) pairs: images ``[B, 3, SIZE, SIZE]`` in [0, 1]."""
    caps, imgs = [], []
    for _ in range(batch):
        p = random_prompt(rng, prompts)
        caps.append(p)
        imgs.append(render(scene_for_prompt(p, rng)))
    return torch.stack(imgs), caps
