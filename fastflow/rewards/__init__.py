"""Reward registry. A config names rewards with weights (``[reward] weights = {ocr = 1.0}``); the
total is the weighted sum, and every component is logged.

A reward is any callable ``reward(images, prompts, metadata) -> Tensor[B]`` (float32, on CPU):
images ``[B, 3, H, W]`` float in [0, 1]; prompts a list of B strings; metadata a list of B dicts
(per-prompt tags from the prompt file, e.g. GenEval's). Factories take ``(device, **options)``.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

import torch
from torch import Tensor

from fastflow.registry import resolve

REGISTRY: dict[str, str] = {
    "toy_color": "fastflow.models.toy:ColorReward",
    "shapes": "fastflow.shapes.reward:ShapesReward",
    "pickscore": "fastflow.rewards.pickscore:PickScore",
    "aesthetic": "fastflow.rewards.aesthetic:Aesthetic",
    "clipscore": "fastflow.rewards.clipscore:ClipScore",
    "imagereward": "fastflow.rewards.imagereward:ImageRewardScore",
    "ocr": "fastflow.rewards.ocr:OcrReward",
    "geneval": "fastflow.rewards.geneval:GenEvalReward",
    "remote": "fastflow.rewards.remote:RemoteReward",
    "flow_grpo_server": "fastflow.rewards.flow_grpo_server:FlowGrpoServerReward",
}


class Reward(Protocol):
    def __call__(self, images: Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> Tensor: ...


def register(name: str, spec: str | Callable) -> None:
    """Add a reward (a "module:factory" string or a factory) under ``name``."""
    REGISTRY[name] = spec


def build_reward(name: str, device="cpu", **options) -> Reward:
    if name not in REGISTRY:
        raise ValueError(f"reward.weights: unknown reward {name!r}; known: {', '.join(sorted(REGISTRY))}")
    spec = REGISTRY[name]
    factory = resolve(spec) if isinstance(spec, str) else spec
    return factory(device=device, **options)


class WeightedReward:
    """The weighted sum of named rewards; returns the total and each component.

    device: where the rewards run (reward.device; the trainer passes the rank's device); one
    reward's ``device`` option (``reward.options.NAME.device``) overrides it for that reward.
    """

    def __init__(self, weights: dict[str, float], device="cpu", options: dict[str, dict] | None = None):
        if not weights:
            raise ValueError("reward.weights: at least one reward is needed")
        options = options or {}
        self.weights = dict(weights)
        self.devices = {n: str(options.get(n, {}).get("device") or device) for n in weights}
        self.rewards = {n: build_reward(n, **{**options.get(n, {}), "device": self.devices[n]})
                        for n in weights}

    def __call__(self, images: Tensor, prompts: Sequence[str],
                 metadata: Sequence[dict] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        metadata = metadata if metadata is not None else [{} for _ in prompts]
        parts = {n: torch.as_tensor(r(images, prompts, metadata), dtype=torch.float32).reshape(-1).cpu()
                 for n, r in self.rewards.items()}
        total = sum(self.weights[n] * parts[n] for n in parts)
        return total, parts
