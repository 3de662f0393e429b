"""The functions the sampler and the trainer call: fastflow.sde / fastflow.grpo, backed by the fused
Triton kernels (fastflow.kernels) when they can run, with identical signatures and results within
tolerance.

``FASTFLOW_KERNELS=triton|torch|auto`` (default auto) picks the path, read at each call:
auto -> Triton on CUDA tensors (when triton imports), the PyTorch reference elsewhere; triton on a
CPU tensor runs the kernels through Triton's interpreter (set TRITON_INTERPRET=1 before
fastflow.kernels is imported). float64 inputs always take the reference (the kernels compute in
float32).

Autograd: on the Triton path a call that needs gradients (grad mode on and a sample or velocity
that requires grad) runs the same kernel inside an autograd Function whose backward is the exact
derivative in PyTorch, so values are bitwise those of a no-grad call (a rollout's log-probs are
reproduced exactly) and gradients reach the sample and velocity through ``mean`` / ``log_prob``.
Training differentiates through grpo_step_loss, whose fused backward writes the velocity
gradients in one pass.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

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


def _kernels(device):
    """fastflow.kernels, checked usable on ``device`` (a clear error instead of a launch failure)."""
    if not _triton_available():
        raise RuntimeError("FASTFLOW_KERNELS=triton but triton is not installed "
                           "(pip install 'fastflow[kernels]')")
    from fastflow import kernels

    if device.type == "cpu" and not kernels.INTERPRETED:
        raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before "
                           "fastflow.kernels is first imported")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"the Triton kernels run on CUDA (or the CPU interpreter), not {device.type}")
    return kernels


def _parts(v) -> tuple[Tensor, ...]:
    return (v.uncond, v.cond) if isinstance(v, GuidedVelocity) else (v,)


def _use_triton(sample: Tensor, *velocities) -> bool:
    if backend(sample.device) != "triton":
        return False
    tensors = [sample] + [p for v in velocities if v is not None for p in _parts(v)]
    return all(t.dtype != torch.float64 for t in tensors)


def sde_step(sample, velocity, sigma, sigma_next, *, need_mean: bool = True, **kw) -> StepOutput:
    """fastflow.sde.sde_step (same arguments and result), fused on the Triton path.

    need_mean=False lets the fused path skip writing ``mean`` (it is then None): the rollout only
    needs prev_sample and log_prob. The reference path always returns it.
    """
    if _use_triton(sample, velocity):
        kernels = _kernels(sample.device)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (sample, *_parts(velocity))):
            return kernels.sde_step_differentiable(sample, velocity, sigma, sigma_next, **kw)
        return kernels.sde_step(sample, velocity, sigma, sigma_next, need_mean=need_mean, **kw)
    return _sde.sde_step(sample, velocity, sigma, sigma_next, **kw)


def sde_step_philox(sample, velocity, sigma, sigma_next, *, seed: Tensor, offset: Tensor, **kw) -> StepOutput:
    """A rollout step whose noise is drawn in-kernel by Philox from ``seed`` / ``offset``
    (one-element int64 tensors on the sample's device; ``offset`` advances by the sample's numel
    after each call, so a captured CUDA graph replays with fresh noise). Triton path only: the
    noise stream is Triton's Philox, which the reference cannot reproduce.
    """
    if backend(sample.device) != "triton":
        raise RuntimeError("sde_step_philox needs the Triton path (CUDA tensors, or "
                           "FASTFLOW_KERNELS=triton with the interpreter)")
    return _kernels(sample.device).sde_step(sample, velocity, sigma, sigma_next, seed=seed,
                                            offset=offset, **kw)


def kl_to_reference(mean, mean_ref, std):
    """fastflow.sde.kl_to_reference (the fused path computes KL inside grpo_step_loss)."""
    return _sde.kl_to_reference(mean, mean_ref, std)


def grpo_step_loss(sample, prev_sample, velocity, sigma, sigma_next, old_log_prob, advantages, **kw):
    """fastflow.grpo.grpo_step_loss (same arguments, loss and stats), fused on the Triton path:
    one pass over the latents forward, one backward; gradients reach the velocity tensors only."""
    if kw.get("beta", 0.0) > 0 and kw.get("velocity_ref") is None:  # both paths: never drop the KL silently
        raise ValueError("grpo_step_loss: beta > 0 needs velocity_ref (the reference model's velocity)")
    if _use_triton(sample, velocity, kw.get("velocity_ref")):
        return _kernels(sample.device).grpo_step_loss(sample, prev_sample, velocity, sigma,
                                                      sigma_next, old_log_prob, advantages, **kw)
    return _grpo.grpo_step_loss(sample, prev_sample, velocity, sigma, sigma_next, old_log_prob,
                                advantages, **kw)
