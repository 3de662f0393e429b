"""PickScore (the paper's human-preference reward): a CLIP-H model fine-tuned on Pick-a-Pic.

score = logit_scale.exp() * cos(image, text) / 26, as in the authors' public scorer: the model's
learned temperature (exp'd, about 100) times the cosine, divided by 26 to bring typical values
near 0.8-0.9.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from fastflow.rewards._clip import check_images, image_embeds, load_clip, text_embeds

PROCESSOR_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
MODEL_ID = "yuvalkirstain/PickScore_v1"
SCALE_DIVISOR = 26.0


class PickScore:
    """PickScore reward. Options: model, processor (hub ids or local paths), dtype, batch_size."""

    def __init__(self, device="cpu", model: str = MODEL_ID, processor: str = PROCESSOR_ID,
                 dtype="auto", batch_size: int = 32):
        self.model, self.processor = load_clip(model, processor, device, dtype)
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str], metadata=None) -> Tensor:
        check_images(images, prompts, "pickscore")
        out = []
        for i in range(0, len(prompts), self.batch_size):
            img = image_embeds(self.model, self.processor, images[i:i + self.batch_size])
            txt = text_embeds(self.model, self.processor, prompts[i:i + self.batch_size])
            scale = self.model.logit_scale.float().exp()
            out.append((scale * (img * txt).sum(-1) / SCALE_DIVISOR).cpu())
        return torch.cat(out).float()
