"""The shapes reward (registered as ``shapes``): the exact verifier's judgement of each image."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from fastflow.shapes import verifier


class ShapesReward:
    """Strict 0/1 correctness by default. ``partial=True`` gives the fraction of the prompt's
    conditions met (object count, each requested object, the relation) as RL shaping; it is 1.0
    exactly when the image is correct. Accuracy is always reported strict (Policy.eval_metrics)."""

    def __init__(self, device="cpu", partial: bool = False):
        if not isinstance(partial, bool):
            raise ValueError(f"reward.options.shapes.partial must be true or false, got {partial!r}")
        self.device = device
        self.partial = partial

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata=None) -> Tensor:
        conds = verifier.judge(images, list(prompts))
        if self.partial:
            return torch.tensor([sum(c) / len(c) for c in conds], dtype=torch.float32)
        return torch.tensor([float(all(c)) for c in conds], dtype=torch.float32)
