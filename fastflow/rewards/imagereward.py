"""ImageReward (optional extra): a BLIP-based human-preference model.

Needs ``pip install image-reward`` (not a fastflow dependency); the checkpoint id or path is the
``model`` option (default "ImageReward-v1.0", fetched by that package on first use).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from fastflow.rewards._clip import check_images, to_uint8


class ImageRewardScore:
    """ImageReward reward. Options: model (name or checkpoint path), med_config (path, optional)."""

    def __init__(self, device="cpu", model: str = "ImageReward-v1.0", med_config: str | None = None):
        try:
            import ImageReward as RM
        except ImportError:
            raise ImportError("imagereward reward: needs the optional package `pip install image-reward`") from None
        kwargs = {"device": str(device)}
        if med_config:
            kwargs["med_config"] = med_config
        self.model = RM.load(model, **kwargs)
        self.model.eval()

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str], metadata=None) -> Tensor:
        from PIL import Image

        check_images(images, prompts, "imagereward")
        scores = [float(self.model.score(p, Image.fromarray(a))) for p, a in zip(prompts, to_uint8(images))]
        return torch.tensor(scores, dtype=torch.float32)
