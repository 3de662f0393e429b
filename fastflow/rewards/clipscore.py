"""CLIPScore: how well an image matches its prompt under a CLIP model.

Convention: score = max(cos(image, text), 0), i.e. the common "100 * max(cos, 0)" CLIPScore
divided by 100, so rewards lie in [0, 1] like the other rewards. (Hessel et al. use 2.5 * max(cos, 0);
multiply by 2.5 to compare with that paper's numbers.)
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from fastflow.rewards._clip import check_images, image_embeds, load_clip, text_embeds

MODEL_ID = "openai/clip-vit-large-patch14"


class ClipScore:
    """CLIPScore reward. Options: model, processor (defaults to model), dtype, batch_size."""

    def __init__(self, device="cpu", model: str = MODEL_ID, processor: str | None = None,
                 dtype="auto", batch_size: int = 32):
        self.model, self.processor = load_clip(model, processor, device, dtype)
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str], metadata=None) -> Tensor:
        check_images(images, prompts, "clipscore")
        out = []
        for i in range(0, len(prompts), self.batch_size):
            img = image_embeds(self.model, self.processor, images[i:i + self.batch_size])
            txt = text_embeds(self.model, self.processor, prompts[i:i + self.batch_size])
            out.append((img * txt).sum(-1).clamp_min(0).cpu())
        return torch.cat(out).float()
