"""Shared pieces of the CLIP-based rewards: loading, image conversion and normalised embeddings.

Images reach every reward as ``[B, 3, H, W]`` floats in [0, 1]; CLIP processors expect 8-bit
images (the authors' scorers convert to PIL first), so images are quantised the same way here.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_dtype(dtype, device="cpu") -> torch.dtype:
    """Accept a torch dtype, one of the names in DTYPES, or "auto": bfloat16 on a CUDA device (the
    scorers' weights and activations halve, their scores move by bf16 rounding only), float32
    elsewhere (CPU bf16 matmuls are slower than fp32 on most CPUs)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"reward option dtype: unknown dtype {dtype!r}; known: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_images(images: Tensor, prompts, name: str) -> None:
    """One clear error for the shape mistakes a caller can make."""
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{name} reward: images must be a [B, 3, H, W] tensor, got {shape}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{name} reward: {images.shape[0]} images but {len(prompts)} prompts")


def to_uint8(images: Tensor) -> list[np.ndarray]:
    """[B, 3, H, W] floats in [0, 1] -> list of HWC uint8 arrays (round to nearest, as PIL does)."""
    arr = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return [a.numpy() for a in arr.permute(0, 2, 3, 1)]


def load_clip(model_id: str, processor_id: str | None, device, dtype):
    """CLIPModel + CLIPProcessor from hub ids or local directories, in eval mode on ``device``."""
    from transformers import CLIPModel, CLIPProcessor

    processor = CLIPProcessor.from_pretrained(processor_id or model_id)
    model = CLIPModel.from_pretrained(model_id).eval().to(device=device, dtype=resolve_dtype(dtype, device))
    model.requires_grad_(False)
    return model, processor


def _features(out) -> Tensor:
    # transformers >= 5 returns an output object whose pooler_output holds the projected
    # embedding; older versions return the tensor itself. Support both.
    return out if isinstance(out, Tensor) else out.pooler_output


def image_embeds(model, processor, images: Tensor) -> Tensor:
    """L2-normalised CLIP image embeddings, float32 on the model's device."""
    inputs = processor(images=to_uint8(images), return_tensors="pt")
    pixel_values = inputs["pixel_values"].to(device=model.device, dtype=model.dtype)
    emb = _features(model.get_image_features(pixel_values=pixel_values)).float()
    return emb / emb.norm(p=2, dim=-1, keepdim=True)


def text_embeds(model, processor, prompts) -> Tensor:
    """L2-normalised CLIP text embeddings (truncated to 77 tokens), float32."""
    inputs = processor(text=list(prompts), padding=True, truncation=True, max_length=77,
                       return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
    emb = _features(model.get_text_features(**inputs)).float()
    return emb / emb.norm(p=2, dim=-1, keepdim=True)
