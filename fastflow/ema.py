"""Exponential moving average of the trainable weights, used for evaluation and checkpoints.

Stepped once every ``every`` optimizer steps (never per micro-batch, unlike the public code).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor


@contextlib.contextmanager
def swapped_in(params: dict[str, torch.nn.Parameter], weights: dict[str, Tensor]):
    """``weights`` copied into ``params`` for the duration; the current values wait in host memory,
    one tensor at a time (a sharded parameter keeps only its local shard there), and are restored
    after. Shared by the EMA and DiffusionNFT's old policy."""
    from fastflow.parallel import local

    backup = {}
    with torch.no_grad():
        for n, p in params.items():
            shard = local(p.detach())
            backup[n] = shard.clone() if shard.device.type == "cpu" else shard.to("cpu")
            p.copy_(weights[n].to(p.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                local(p.detach()).copy_(backup.pop(n))


class EMA:
    def __init__(self, named_params: dict[str, torch.nn.Parameter], decay: float, every: int):
        if not 0 <= decay < 1:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {decay}")
        self.params = named_params
        self.decay = decay
        self.every = max(1, every)
        self.shadow = {n: p.detach().clone().float() for n, p in named_params.items()}
        self.optimizer_steps = 0

    @torch.no_grad()
    def on_optimizer_step(self) -> bool:
        """Count one optimizer step; update the average every ``every`` steps. Returns True if updated."""
        self.optimizer_steps += 1
        if self.optimizer_steps % self.every:
            return False
        for n, p in self.params.items():
            self.shadow[n].lerp_(p.detach().float(), 1 - self.decay)
        return True

    @contextlib.contextmanager
    def applied(self):
        """Temporarily copy the EMA weights into the model (for evaluation and export).

        The current weights wait in host memory meanwhile, one tensor at a time, so the device
        never holds a second copy of every trained weight (4 bytes per parameter more at every
        evaluation, e.g. 5.5 GiB per GPU for FLUX full fine-tuning over 8 ranks). A sharded
        parameter keeps only its local shard there."""
        with swapped_in(self.params, self.shadow):
            yield

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, Tensor], optimizer_steps: int) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[0]}")
        for n in self.shadow:
            self.shadow[n].copy_(state[n])
        self.optimizer_steps = optimizer_steps

