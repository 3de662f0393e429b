"""The shapes base model: a word-level text encoder and a small text-conditioned convolutional UNet
that predicts the clean image; ``ShapesFlowModel.velocity`` turns that into the rectified-flow
velocity ``v = eps - x0`` the sampler integrates.

Why a UNet predicting x0: at 32 x 32 on a CPU a conv net learns crisp, flat-coloured shapes far
faster than a patch transformer, and predicting x0 (then converting) learns much faster than
regressing the velocity in pixel space. Text enters twice: the pooled prompt and the time modulate
every residual block (AdaGN), and cross-attention at 16 x 16 and 8 x 8 lets each location read the
words (which object, which colour, where).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastflow.shapes.world import MAX_PROMPT_WORDS, vocabulary

PAD, EMPTY = 0, 1
SPECIALS = ["<pad>", "<empty>"]
T_MIN = 0.02
"""Smallest time used as the x0 -> velocity divisor: keeps v finite near t = 0 (the sampler's
grids never evaluate below 1 / num_steps, so this only guards degenerate calls)."""


@dataclass
class ModelConfig:
    """Architecture of the shapes model (stored in the weights file's metadata)."""

    vocab: list[str] = field(default_factory=lambda: SPECIALS + vocabulary())
    max_tokens: int = MAX_PROMPT_WORDS
    text_dim: int = 64
    text_layers: int = 2
    channels: tuple[int, int, int] = (24, 48, 96)
    emb_dim: int = 128
    heads: int = 4

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> "ModelConfig":
        d = json.loads(text)
        d["channels"] = tuple(d["channels"])
        return ModelConfig(**d)


class Tokenizer:
    """Word-level tokenizer over the grammar's vocabulary; "" (the unconditional prompt) is one
    <empty> token."""

    def __init__(self, vocab: Sequence[str], max_tokens: int):
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_tokens = max_tokens

    def __call__(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Token ids ``[B, L]`` long and a validity mask ``[B, L]`` bool."""
        ids = torch.full((len(prompts), self.max_tokens), PAD, dtype=torch.long)
        for i, p in enumerate(prompts):
            words = p.strip().lower().split() or [SPECIALS[EMPTY]]
            if len(words) > self.max_tokens:
                raise ValueError(f"shapes prompt {p!r} has {len(words)} words; at most {self.max_tokens}")
            for j, w in enumerate(words):
                if w not in self.index:
                    raise ValueError(f"shapes prompt {p!r}: word {w!r} is not in the grammar's vocabulary")
                ids[i, j] = self.index[w]
        return ids, ids != PAD


class Attention(nn.Module):
    """Multi-head attention (self when ``context`` is None) with SDPA."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(context_dim or dim, dim)
        self.to_v = nn.Linear(context_dim or dim, dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        ctx = x if context is None else context
        h = self.heads
        q = self.to_q(x).view(b, n, h, d // h).transpose(1, 2)
        k = self.to_k(ctx).view(b, ctx.shape[1], h, d // h).transpose(1, 2)
        v = self.to_v(ctx).view(b, ctx.shape[1], h, d // h).transpose(1, 2)
        attn_mask = None if mask is None else mask[:, None, None, :]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.to_out(o.transpose(1, 2).reshape(b, n, d))


class TextEncoder(nn.Module):
    """Token embedding + learned positions + a few pre-norm transformer layers."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.text_dim
        self.embed = nn.Embedding(len(cfg.vocab), d)
        self.pos = nn.Parameter(torch.randn(cfg.max_tokens, d) * 0.02)
        self.layers = nn.ModuleList()
        for _ in range(cfg.text_layers):
            self.layers.append(nn.ModuleDict({
                "norm1": nn.LayerNorm(d), "attn": Attention(d, cfg.heads),
                "norm2": nn.LayerNorm(d),
                "mlp": nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))}))
        self.norm = nn.LayerNorm(d)

    def forward(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Token features ``[B, L, D]`` and the masked-mean pooled feature ``[B, D]``."""
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for layer in self.layers:
            x = x + layer["attn"](layer["norm1"](x), mask=mask)
            x = x + layer["mlp"](layer["norm2"](x))
        x = self.norm(x)
        m = mask.to(x.dtype)[..., None]
        pooled = (x * m).sum(1) / m.sum(1).clamp_min(1)
        return x, pooled


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled to 0..1000 like the diffusion timesteps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=1)


def _groups(c: int) -> int:
    return 8 if c % 8 == 0 else 1


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice; the second norm is modulated (scale, shift) by the
    embedding of time + pooled text (AdaGN)."""

    def __init__(self, cin: int, cout: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(_groups(cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Self-attention (optional) and cross-attention to the prompt tokens over a feature map."""

    def __init__(self, c: int, text_dim: int, heads: int, self_attn: bool):
        super().__init__()
        self.self_attn = self_attn
        if self_attn:
            self.norm_s = nn.GroupNorm(_groups(c), c)
            self.attn_s = Attention(c, heads)
        self.norm_x = nn.GroupNorm(_groups(c), c)
        self.attn_x = Attention(c, heads, context_dim=text_dim)

    def forward(self, x: Tensor, tokens: Tensor, mask: Tensor) -> Tensor:
        b, c, h, w = x.shape
        if self.self_attn:
            s = self.norm_s(x).flatten(2).transpose(1, 2)
            x = x + self.attn_s(s).transpose(1, 2).reshape(b, c, h, w)
        s = self.norm_x(x).flatten(2).transpose(1, 2)
        return x + self.attn_x(s, tokens, mask).transpose(1, 2).reshape(b, c, h, w)


class UNet(nn.Module):
    """32 -> 16 -> 8 UNet, one residual block per level each way, attention at 16 and 8."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c0, c1, c2 = cfg.channels
        e, td, nh = cfg.emb_dim, cfg.text_dim, cfg.heads
        self.time_mlp = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.text_proj = nn.Linear(td, e)
        self.conv_in = nn.Conv2d(3, c0, 3, padding=1)
        self.down0 = ResBlock(c0, c0, e)
        self.pool0 = nn.Conv2d(c0, c1, 3, stride=2, padding=1)
        self.down1 = ResBlock(c1, c1, e)
        self.attn_d1 = AttnBlock(c1, td, nh, self_attn=False)
        self.pool1 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.mid1 = ResBlock(c2, c2, e)
        self.attn_mid = AttnBlock(c2, td, nh, self_attn=True)
        self.mid2 = ResBlock(c2, c2, e)
        self.up1 = ResBlock(c2 + c1, c1, e)
        self.attn_u1 = AttnBlock(c1, td, nh, self_attn=False)
        self.up0 = ResBlock(c1 + c0, c0, e)
        self.norm_out = nn.GroupNorm(_groups(c0), c0)
        self.conv_out = nn.Conv2d(c0, 3, 3, padding=1)
        self.emb_dim = e

    def forward(self, x: Tensor, t: Tensor, tokens: Tensor, pooled: Tensor, mask: Tensor) -> Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.emb_dim).to(x.dtype)) + self.text_proj(pooled)
        emb = F.silu(emb)
        h0 = self.down0(self.conv_in(x), emb)
        h1 = self.attn_d1(self.down1(self.pool0(h0), emb), tokens, mask)
        h = self.mid2(self.attn_mid(self.mid1(self.pool1(h1), emb), tokens, mask), emb)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = self.attn_u1(self.up1(torch.cat([h, h1], 1), emb), tokens, mask)
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        h = self.up0(torch.cat([h, h0], 1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


class ShapesFlowModel(nn.Module):
    """Text encoder + UNet. ``predict_x0`` is the network; ``velocity`` the flow-matching output."""

    def __init__(self, cfg: ModelConfig | None = None):
        super().__init__()
        self.cfg = cfg or ModelConfig()
        self.tokenizer = Tokenizer(self.cfg.vocab, self.cfg.max_tokens)
        self.text = TextEncoder(self.cfg)
        self.unet = UNet(self.cfg)

    def encode(self, prompts: Sequence[str], device=None) -> dict[str, Tensor]:
        """Token ids and mask for the prompts (the text encoder runs inside forward, so that LoRA /
        full fine-tuning may reach it and the conditioning stays a few integers per prompt)."""
        ids, mask = self.tokenizer(prompts)
        device = device or next(self.parameters()).device
        return {"ids": ids.to(device), "mask": mask.to(device)}

    def predict_x0(self, x: Tensor, t: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """The clean-image estimate at noisy ``x`` ``[B, 3, 32, 32]`` and time ``t`` ``[B]``."""
        tokens, pooled = self.text(ids, mask)
        return self.unet(x, t, tokens, pooled, mask)

    def velocity(self, x: Tensor, t: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        """``v = (x_t - x0_hat) / t`` (= eps - x0 on the rectified-flow path), returned in float32."""
        x0 = self.predict_x0(x, t, ids, mask).float()
        denom = t.float().clamp_min(T_MIN).view(-1, 1, 1, 1)
        return (x.float() - x0) / denom


def save_model(model: ShapesFlowModel, path: str | Path, extra: dict[str, str] | None = None) -> None:
    """Write the weights (float32) and the architecture to one safetensors file."""
    from safetensors.torch import save_file
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"fastflow_shapes_config": model.cfg.to_json(), **(extra or {})}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=meta)


def load_model(path: str | Path, device="cpu") -> ShapesFlowModel:
    """Load a model written by save_model; a clear error for a missing or foreign file."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"shapes model weights not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "fastflow_shapes_config" not in meta:
        raise ValueError(f"{path} is not a fastflow shapes model (no 'fastflow_shapes_config' metadata)")
    model = ShapesFlowModel(ModelConfig.from_json(meta["fastflow_shapes_config"]))
    model.load_state_dict(load_file(str(path)))
    return model.to(device)
