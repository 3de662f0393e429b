"""The readable pure-PyTorch reference of Flow-GRPO's sampler math (FLOW_GRPO.md sections 1-2).

Every Triton kernel in fastflow.kernels is tested against this module, and the trainer reaches it
through fastflow.ops. Conventions follow the authors' public code exactly:

- rectified flow ``x_t = (1 - t) x_0 + t eps``, the model predicts ``v ~ eps - x_0``;
- sigmas descend from 1 to 0 (diffusers' FlowMatchEulerDiscreteScheduler), ``dt < 0``;
- all step math in float32 (or float64 when the inputs are float64), whatever the model's dtype;
- log-probs are *averaged* over the non-batch dimensions, not summed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Union

import numpy as np
import torch
from torch import Tensor

KINDS = ("sde", "cps", "ode")
_LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))

Scalar = Union[float, Tensor]


class StepOutput(NamedTuple):
    """One denoising transition.

    prev_sample: the next (less noisy) state ``x_{t+dt}``, float32 (float64 for float64 inputs).
    log_prob:    ``[B]`` Gaussian log-density of ``prev_sample`` given the sample, averaged over
                 non-batch dims; ``None`` for the ODE kind (a deterministic step has none).
    mean:        the transition mean, same shape as the sample (gradients flow through it).
    std:         ``[B]`` the diffusion coefficient ``std_t`` of the public code (for "sde":
                 ``a * sqrt(sigma / (1 - sigma))``, *before* the ``sqrt(-dt)`` factor; for "cps":
                 ``sigma_next * sin(a pi / 2)``; zeros for "ode"). kl_to_reference divides by it.
    """

    prev_sample: Tensor
    log_prob: Tensor | None
    mean: Tensor
    std: Tensor


@dataclass
class GuidedVelocity:
    """A classifier-free-guided velocity kept as its two halves.

    The combination ``uncond + scale * (cond - uncond)`` is done in float32 by whoever consumes it
    (the reference here, or a fused kernel in registers), so the model's bf16 outputs never meet a
    bf16 subtraction and the CFG combine costs no extra pass over memory.
    """

    uncond: Tensor
    cond: Tensor
    scale: float

    def combine(self, dtype: torch.dtype = torch.float32) -> Tensor:
        u = self.uncond.to(dtype)
        return u + self.scale * (self.cond.to(dtype) - u)

    @property
    def shape(self) -> torch.Size:
        return self.cond.shape


Velocity = Union[Tensor, GuidedVelocity]


def flow_sigmas(num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> Tensor:
    """The sigma grid of diffusers' FlowMatchEulerDiscreteScheduler (static shift), ``[num_steps + 1]``.

    Descending, ``sigmas[0] == 1`` and ``sigmas[-1] == 0``; bit-for-bit the scheduler's float32
    values (tests/test_sde.py compares with diffusers for many step counts and shifts).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    n = num_train_timesteps
    # Scheduler __init__: training sigmas, shifted; it keeps their max/min as float32 tensors.
    train_t = np.linspace(1, n, n, dtype=np.float32)[::-1].copy()
    train_s = torch.from_numpy(train_t / n).to(torch.float32)
    train_s = shift * train_s / (1 + (shift - 1) * train_s)
    sigma_max, sigma_min = train_s[0].item(), train_s[-1].item()
    # set_timesteps: evenly spaced timesteps between the extreme sigmas, then the shift again.
    timesteps = np.linspace(sigma_max * n, sigma_min * n, num_steps)
    sigmas = timesteps / n
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    sigmas = torch.from_numpy(sigmas).to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float32)])


def _math_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _per_sample(value: Scalar, batch: int, ndim: int, dtype: torch.dtype, device) -> Tensor:
    """A python float or a tensor broadcastable to [B] -> tensor [B, 1, ..., 1] for broadcasting."""
    if not isinstance(value, Tensor):  # filled on the device: no host-to-device copy (and sync)
        return torch.full((batch, *([1] * (ndim - 1))), float(value), dtype=dtype, device=device)
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if t.ndim > 1:
        t = t.reshape(-1)
    t = t.expand(batch) if t.ndim == 0 or t.shape[0] == 1 else t
    if t.shape[0] != batch:
        raise ValueError(f"sigma has {t.shape[0]} entries for a batch of {batch}")
    return t.reshape(batch, *([1] * (ndim - 1)))


def _mean_over_dims(x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(1, x.ndim))) if x.ndim > 1 else x


def sde_step(
    sample: Tensor,
    velocity: Velocity,
    sigma: Scalar,
    sigma_next: Scalar,
    *,
    noise_level: float,
    kind: str = "sde",
    noise: Tensor | None = None,
    prev_sample: Tensor | None = None,
    sigma_guard: Scalar | None = None,
    generator: torch.Generator | None = None,
) -> StepOutput:
    """One Euler-Maruyama step of the marginal-preserving SDE, with its Gaussian log-prob.

    sample, velocity: ``[B, ...]`` any dtype (the math runs in float32, float64 stays float64).
    sigma, sigma_next: python floats or tensors broadcastable as ``[B]``; ``sigma_next < sigma``.
    noise_level: ``a`` of ``std_t = a sqrt(t / (1 - t))`` ("sde") or of ``sin(a pi / 2)`` ("cps").
    prev_sample: given -> its log-prob is evaluated (training pass) instead of sampling; it is
        treated as a constant (detached).
    noise: given -> used as ``eps`` instead of drawing it (from ``generator`` when given).
    sigma_guard: stands in for sigma in ``1 / (1 - sigma)`` where sigma == 1 (pass the grid's
        ``sigmas[1]``); required when any sigma == 1 for kind "sde".
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if isinstance(velocity, GuidedVelocity):
        velocity = velocity.combine(_math_dtype(sample))
    if velocity.shape != sample.shape:
        raise ValueError(f"velocity shape {tuple(velocity.shape)} != sample shape {tuple(sample.shape)}")
    dtype = _math_dtype(sample)
    x = sample.to(dtype)
    v = velocity.to(dtype)
    batch, ndim, dev = x.shape[0], x.ndim, x.device
    s = _per_sample(sigma, batch, ndim, dtype, dev)
    s_next = _per_sample(sigma_next, batch, ndim, dtype, dev)
    dt = s_next - s

    if kind == "ode":
        mean = x + v * dt
        return StepOutput(mean if prev_sample is None else prev_sample.to(dtype), None, mean,
                          torch.zeros(batch, dtype=dtype, device=dev))

    if kind == "sde":
        at_one = s == 1
        if sigma_guard is not None:  # no host sync: the guard stands in wherever sigma == 1
            s_den = torch.where(at_one, _per_sample(sigma_guard, batch, ndim, dtype, dev), s)
        elif bool(at_one.any()):
            raise ValueError("sde_step: sigma == 1 needs sigma_guard (the grid's sigmas[1]) "
                             "to stand in for sigma in 1/(1 - sigma)")
        else:
            s_den = s
        std_t = noise_level * torch.sqrt(s / (1 - s_den))
        mean = (x * (1 + std_t**2 / (2 * s) * dt)
                + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt)
        step_std = std_t * torch.sqrt(-dt)
    else:  # cps: coefficient-preserving sampling
        std_t = s_next * math.sin(noise_level * math.pi / 2)
        x0_hat = x - s * v
        x1_hat = x + (1 - s) * v
        mean = (1 - s_next) * x0_hat + torch.sqrt(s_next**2 - std_t**2) * x1_hat
        step_std = std_t

    if prev_sample is None:
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, dtype=dtype, device=dev)
        prev_sample = mean + step_std * noise.to(dtype)
    else:
        prev_sample = prev_sample.to(dtype)
    target = prev_sample.detach()

    if kind == "sde":
        log_prob = -((target - mean) ** 2) / (2 * step_std**2) - torch.log(step_std) - _LOG_SQRT_2PI
    else:
        log_prob = -((target - mean) ** 2)  # the public code drops the constants for "cps"
    return StepOutput(prev_sample, _mean_over_dims(log_prob), mean, std_t.reshape(batch))


def kl_to_reference(mean: Tensor, mean_ref: Tensor, std: Tensor | float) -> Tensor:
    """``[B]``: ``mean_over_dims((mean - mean_ref)^2) / (2 std^2)``, the public code's KL.

    ``std`` is StepOutput.std (the diffusion coefficient std_t, not the transition std), so this
    equals the exact Gaussian KL of the two transitions times ``|dt|``; FLOW_GRPO.md's beta values
    are tuned to this form.
    """
    dtype = _math_dtype(mean)
    diff2 = _mean_over_dims((mean.to(dtype) - mean_ref.to(dtype)) ** 2)
    std = torch.as_tensor(std, dtype=dtype, device=mean.device).reshape(-1)
    return diff2 / (2 * std**2)
