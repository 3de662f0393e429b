"""The learning rate as a pure function of the optimizer-step count.

No scheduler object and no state of its own: the trainer sets the rate before every optimizer step
from ``lr_at(optimizer_steps, ...)``, and ``optimizer_steps`` is already in every checkpoint, so a
resumed run continues the schedule exactly where it stopped.

    constant  lr after the warmup (the public Flow-GRPO code's only mode)
    linear    lr -> lr * min_ratio, linearly, from the end of the warmup to the last step
    cosine    lr -> lr * min_ratio along half a cosine over the same span

The warmup rises linearly to lr over the first ``warmup`` steps (step 0 runs at lr / warmup, so
no step is wasted at rate 0).
"""
from __future__ import annotations

import math

KINDS = ("constant", "linear", "cosine")


def lr_at(step: int, *, lr: float, total_steps: int, kind: str = "constant", warmup: int = 0,
          min_ratio: float = 0.0) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of a run of ``total_steps`` steps.

    Steps past ``total_steps`` (a resumed run given more iterations than it was planned with) stay
    at the schedule's final value.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown lr schedule {kind!r}; known: {', '.join(KINDS)}")
    if step < warmup:
        return lr * (step + 1) / warmup
    if kind == "constant":
        return lr
    span = total_steps - warmup
    if span <= 1:
        return lr
    # progress 0 at the first step after the warmup, 1 at the last step of the run
    progress = min(1.0, (step - warmup) / (span - 1))
    if kind == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr * (min_ratio + (1.0 - min_ratio) * factor)
