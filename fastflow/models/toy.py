"""A tiny Policy for tests and smoke runs: colour words -> 4x4 RGB "images".

Small enough that a rollout + training step takes milliseconds on a CPU, real enough to exercise
every path of the trainer: prompt conditioning, classifier-free guidance, a frozen reference copy
for the KL, decode to [0, 1] and a reward that can rise.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Sequence

import torch
from torch import Tensor, nn

from fastflow.sde import GuidedVelocity, flow_sigmas

COLORS = {
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.7, 0.2), "blue": (0.1, 0.2, 0.9),
    "yellow": (0.95, 0.8, 0.05), "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0),
}
WORDS = ["<null>"] + sorted(COLORS)


def color_word(prompt: str) -> str | None:
    """The first colour word of a prompt (None for the empty prompt)."""
    if not prompt.strip():
        return None
    for w in prompt.lower().split():
        if w in COLORS:
            return w
    raise ValueError(f"toy model: no colour word in prompt {prompt!r}; known: {sorted(COLORS)}")


class ToyVelocityNet(nn.Module):
    def __init__(self, latent_dim: int, hidden: int = 64, embed: int = 16):
        super().__init__()
        self.embed = nn.Embedding(len(WORDS), embed)
        self.net = nn.Sequential(nn.Linear(latent_dim + embed + 1, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, latent_dim))

    def forward(self, x: Tensor, sigma: Tensor, token: Tensor) -> Tensor:
        h = torch.cat([x.flatten(1), self.embed(token), sigma[:, None].to(x.dtype)], dim=1)
        # reshape, not view: FSDP2 warns about (and may mishandle) a root module returning a view
        return self.net(h).reshape(x.shape).clone()


class ToyPolicy:
    """Full fine-tuning of a small MLP; the reference is a frozen copy taken at construction."""

    def __init__(self, size: int = 4, shift: float = 1.0, seed: int = 0, device="cpu"):
        self.latent_shape = (3, size, size)
        self.shift = shift
        self.device = torch.device(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = ToyVelocityNet(3 * size * size).to(self.device)
        self.ref_net = copy.deepcopy(self.net).requires_grad_(False)
        self._active = self.net

    def encode_prompts(self, prompts: Sequence[str]) -> dict:
        ids = [WORDS.index(color_word(p) or "<null>") for p in prompts]
        return {"token": torch.tensor(ids, dtype=torch.long, device=self.device)}

    def sigmas(self, num_steps: int) -> Tensor:
        return flow_sigmas(num_steps, self.shift)

    def velocity(self, latents: Tensor, sigma: Tensor, cond: dict, *, guidance_scale: float):
        tok = cond["token"]
        if guidance_scale == 1.0:
            return self._active(latents, sigma, tok)
        both = self._active(torch.cat([latents, latents]), torch.cat([sigma, sigma]),
                            torch.cat([torch.zeros_like(tok), tok]))
        uncond, cond_v = both.chunk(2)
        return GuidedVelocity(uncond, cond_v, guidance_scale)

    def default_prompts(self, split: str):
        from fastflow.data import Prompt
        words = sorted(COLORS) if split == "train" else ["red", "blue"]
        return [Prompt(f"a {w} square") for w in words]

    def decode(self, latents: Tensor) -> Tensor:
        return ((latents.float() + 1) / 2).clamp(0, 1)

    def named_trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {f"net.{n}": p for n, p in self.net.named_parameters() if p.requires_grad}

    def parallel_modules(self) -> tuple[nn.Module, list[nn.Module]]:
        """The trained network and its blocks, for FSDP sharding (fastflow.parallel)."""
        return self.net, [m for m in self.net.net if isinstance(m, nn.Linear)]

    def reference_modules(self) -> tuple[nn.Module, list[nn.Module]]:
        """The frozen KL reference copy, sharded like the trained network."""
        return self.ref_net, [m for m in self.ref_net.net if isinstance(m, nn.Linear)]

    @contextlib.contextmanager
    def reference(self):
        prev, self._active = self._active, self.ref_net
        try:
            yield
        finally:
            self._active = prev


class ColorReward:
    """Negative mean absolute distance of the image to the prompt's colour (higher is better)."""

    def __init__(self, device="cpu"):
        self.device = device

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata=None) -> Tensor:
        target = torch.tensor([COLORS[color_word(p)] for p in prompts],
                              dtype=torch.float32)
        return -(images.float().cpu() - target[:, :, None, None]).abs().mean(dim=(1, 2, 3))


def build_policy(cfg, device) -> ToyPolicy:
    return ToyPolicy(shift=cfg.model.shift or 1.0, seed=cfg.run.seed, device=device)
