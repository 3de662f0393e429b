"""LAION aesthetic predictor: a small MLP on the normalised CLIP ViT-L/14 image embedding.

The head is the improved-aesthetic-predictor architecture; its weights (e.g.
``sac+logos+ava1-l14-linearMSE.pth``) are a file the user supplies, loaded with
``torch.load(weights_only=True)`` or from ``.safetensors``. Scores are on the predictor's own
scale (roughly 1-10; typical photos 4-7).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from fastflow.rewards._clip import check_images, image_embeds, load_clip

CLIP_ID = "openai/clip-vit-large-patch14"
EMBED_DIM = 768


class AestheticMLP(nn.Module):
    """Linear(768,1024)-Dropout-Linear(1024,128)-Dropout-Linear(128,64)-Dropout-Linear(64,16)-Linear(16,1)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(EMBED_DIM, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, embed: Tensor) -> Tensor:
        return self.layers(embed)


def load_head(path: str | Path) -> AestheticMLP:
    """Build the MLP and load its weights from a .pth/.pt (weights only) or .safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"aesthetic reward: weights file not found: {path} "
                                "(set the reward option weights = path to the MLP head)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    # Some published checkpoints are wrapped in {"state_dict": ...}.
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    head = AestheticMLP()
    try:
        head.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"aesthetic reward: {path} does not hold the aesthetic MLP head ({first})") from None
    return head.eval().requires_grad_(False)


class Aesthetic:
    """Aesthetic reward. Options: weights (required path), clip (id or path), processor, dtype, batch_size."""

    def __init__(self, device="cpu", weights: str | None = None, clip: str = CLIP_ID,
                 processor: str | None = None, dtype="auto", batch_size: int = 32):
        if not weights:
            raise ValueError("aesthetic reward: option 'weights' (path to the LAION aesthetic MLP "
                             "head, e.g. sac+logos+ava1-l14-linearMSE.pth) is required")
        self.head = load_head(weights).to(device)
        self.model, self.processor = load_clip(clip, processor, device, dtype)
        dim = self.model.config.projection_dim
        if dim != EMBED_DIM:
            raise ValueError(f"aesthetic reward: CLIP model {clip!r} has projection_dim {dim}, "
                             f"the aesthetic head expects {EMBED_DIM} (a ViT-L/14)")
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str], metadata=None) -> Tensor:
        check_images(images, prompts, "aesthetic")
        out = []
        for i in range(0, images.shape[0], self.batch_size):
            emb = image_embeds(self.model, self.processor, images[i:i + self.batch_size])
            out.append(self.head(emb).squeeze(1).float().cpu())
        return torch.cat(out)
