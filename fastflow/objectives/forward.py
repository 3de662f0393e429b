"""The forward process the flow-matching objectives (DiffusionNFT, AWM) train on.

Rectified flow, the convention of fastflow.sde: ``x_t = (1 - t) x_0 + t eps`` and the model's
velocity ``v ~ eps - x_0``, so ``x_0 = x_t - t v``. Training times are the rollout grid's
non-zero sigmas (``policy.sigmas(sample.train_steps)[:-1]``), each sample taking its own random
permutation of them and training the first ``count`` (DiffusionNFT's public code: every sample's
grid timesteps shuffled, ``num_steps * timestep_fraction`` of them trained). Fresh noise is drawn
for every (sample, time).
"""

from __future__ import annotations

import torch
from torch import Tensor


def training_times(grid: Tensor, batch: int, count: int, generator: torch.Generator) -> Tensor:
    """``[batch, count]`` times: for each sample, ``count`` distinct values of ``grid[:-1]`` (the
    grid's non-zero sigmas) in a random order. ``grid`` is the descending ``[N + 1]`` sigma grid."""
    times = grid[:-1].detach().to("cpu", torch.float32)
    n = times.shape[0]
    if not 1 <= count <= n:
        raise ValueError(f"count must be in [1, {n}] (the grid's non-zero times), got {count}")
    order = torch.stack([torch.randperm(n, generator=generator)[:count] for _ in range(batch)])
    return times[order]


def noised(x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """``x_t = (1 - t) x0 + t noise`` with ``t`` ``[B]`` broadcast over the sample dims."""
    tb = t.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    return (1 - tb) * x0 + tb * noise.to(x0.dtype)
