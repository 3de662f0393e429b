"""The reward server's wire format: JSON with base64 PNG images. Never pickle.

Request  (POST /score): {"images": [base64 PNG, ...], "prompts": [str, ...], "metadata": [dict, ...]}
Response (200):          {"scores": [float, ...]}
Errors:                  {"error": "one line"} with a 4xx/5xx status.

PNGs are 8-bit RGB, so images travel quantised to 1/255 (what every image reward here feeds its
model anyway).
"""

from __future__ import annotations

import base64
import io

import numpy as np
import torch
from torch import Tensor

from fastflow.rewards._clip import to_uint8


def encode_images(images: Tensor) -> list[str]:
    """[B, 3, H, W] floats in [0, 1] -> base64 PNG strings."""
    from PIL import Image

    out = []
    for arr in to_uint8(images):
        buf = io.BytesIO()
        Image.fromarray(arr, mode="RGB").save(buf, format="PNG", compress_level=1)
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def decode_images(items: list) -> Tensor:
    """base64 PNG strings (all the same size) -> [B, 3, H, W] float32 in [0, 1]."""
    from PIL import Image

    arrays = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise ValueError(f"images[{i}] is not a base64 string")
        try:
            with Image.open(io.BytesIO(base64.b64decode(item, validate=True))) as im:
                if im.format != "PNG":
                    raise ValueError(f"format {im.format}")
                arrays.append(np.asarray(im.convert("RGB")))
        except Exception as e:
            raise ValueError(f"images[{i}] is not a valid base64 PNG ({e})") from None
    if not arrays:
        raise ValueError("no images in the request")
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"images differ in size: {sorted({a.shape[:2] for a in arrays})}")
    # Contiguous NCHW, as images reach an in-process reward: reductions then add in the same order.
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous().float() / 255.0


def parse_request(body: dict) -> tuple[Tensor, list[str], list[dict]]:
    """Validate a decoded JSON request; raise ValueError with a one-line cause when malformed."""
    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    images, prompts = body.get("images"), body.get("prompts")
    metadata = body.get("metadata")
    if not isinstance(images, list) or not isinstance(prompts, list):
        raise ValueError('request needs lists "images" and "prompts"')
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError('"prompts" must be strings')
    if metadata is None:
        metadata = [{} for _ in prompts]
    if not isinstance(metadata, list) or not all(isinstance(m, dict) for m in metadata):
        raise ValueError('"metadata" must be a list of objects')
    if not len(images) == len(prompts) == len(metadata):
        raise ValueError(f"{len(images)} images, {len(prompts)} prompts, {len(metadata)} metadata entries")
    return decode_images(images), prompts, metadata
