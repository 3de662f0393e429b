"""Group-relative advantages and the clipped policy loss (FLOW_GRPO.md sections 4-5), reference form.

The fused Triton versions (fastflow.kernels, through fastflow.ops) are tested against these.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _group_index(group_ids, n: int, device) -> tuple[Tensor, int]:
    ids = torch.as_tensor(group_ids, device=device).reshape(-1)
    if ids.shape[0] != n:
        raise ValueError(f"group_ids has {ids.shape[0]} entries for {n} rewards")
    _, inverse = torch.unique(ids, return_inverse=True)
    return inverse, int(inverse.max().item()) + 1 if n else 0


def _group_moments(rewards: Tensor, inverse: Tensor, groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-group count, mean and population std (numpy's np.std, ddof=0, as the public code)."""
    count = torch.zeros(groups, dtype=rewards.dtype, device=rewards.device).index_add_(
        0, inverse, torch.ones_like(rewards))
    mean = torch.zeros_like(count).index_add_(0, inverse, rewards) / count
    # sum / count of equal float64 values is not always exactly the value (3 x 0.1): use the value
    # itself for all-equal groups, so they get exactly zero std (zero_std_ratio) and advantages.
    lo = torch.full_like(count, float("inf")).scatter_reduce_(0, inverse, rewards, "amin")
    hi = torch.full_like(count, float("-inf")).scatter_reduce_(0, inverse, rewards, "amax")
    mean = torch.where(lo == hi, hi, mean)
    centered = rewards - mean[inverse]
    var = torch.zeros_like(count).index_add_(0, inverse, centered**2) / count
    return count, mean, var.sqrt()


def group_advantages(rewards: Tensor, group_ids, *, global_std: bool, eps: float = 1e-4,
                     clip: float = 5.0) -> Tensor:
    """``A_i = clip((r_i - mean_group(i)) / (std + eps), -clip, clip)``.

    rewards: ``[N]`` of every sample of every group (gather across ranks first).
    group_ids: ``[N]`` any ids (e.g. prompt indices); samples with equal ids form a group.
    global_std: divide by the std of all N rewards (every SD3.5 config of the paper) instead of
        each group's own std. Groups whose rewards are all equal get zero advantages either way.
    """
    r = torch.as_tensor(rewards).to(torch.float64).reshape(-1)
    inverse, groups = _group_index(group_ids, r.shape[0], r.device)
    _, mean, std = _group_moments(r, inverse, groups)
    denom = r.std(unbiased=False) if global_std else std[inverse]
    adv = (r - mean[inverse]) / (denom + eps)
    return adv.clamp(-clip, clip).to(torch.float32)


def group_stats(rewards: Tensor, group_ids) -> dict[str, float]:
    """Statistics of the groups: ``zero_std_ratio`` (fraction of groups with all-equal rewards, which
    carry no policy gradient), mean within-group reward std and the number of groups."""
    r = torch.as_tensor(rewards).to(torch.float64).reshape(-1)
    inverse, groups = _group_index(group_ids, r.shape[0], r.device)
    _, _, std = _group_moments(r, inverse, groups)
    return {
        "zero_std_ratio": float((std == 0).to(torch.float64).mean()),
        "group_std_mean": float(std.mean()),
        "num_groups": float(groups),
    }


def clipped_policy_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, *,
                        clip_range: float) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO-style clipped surrogate, averaged over the batch.

    ``ratio = exp(log_prob - old_log_prob)``;
    ``loss = mean(max(-A ratio, -A clip(ratio, 1 - clip_range, 1 + clip_range)))``.
    Returns the loss (differentiable through log_prob) and detached stats: clipfrac (fraction with
    ``|ratio - 1| > clip_range``), approx_kl (``0.5 mean(dlogp^2)``), ratio_mean/min/max.
    """
    if log_prob.shape != old_log_prob.shape or log_prob.shape != advantages.shape:
        raise ValueError(f"shapes differ: log_prob {tuple(log_prob.shape)}, old_log_prob "
                         f"{tuple(old_log_prob.shape)}, advantages {tuple(advantages.shape)}")
    old = old_log_prob.detach().to(log_prob.dtype)
    adv = advantages.detach().to(log_prob.dtype)
    diff = log_prob - old
    ratio = torch.exp(diff)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "clipfrac": ((ratio - 1.0).abs() > clip_range).to(torch.float32).mean(),
            "approx_kl": 0.5 * (diff**2).mean(),
            "ratio_mean": ratio.mean(),
            "ratio_min": ratio.min(),
            "ratio_max": ratio.max(),
        }
    return loss, stats


def grpo_step_loss(sample: Tensor, prev_sample: Tensor, velocity, sigma, sigma_next,
                   old_log_prob: Tensor, advantages: Tensor, *, noise_level: float,
                   clip_range: float, beta: float = 0.0, velocity_ref=None, kind: str = "sde",
                   sigma_guard=None) -> tuple[Tensor, dict[str, Tensor]]:
    """The whole per-timestep training objective of FLOW_GRPO.md section 5, composed from the
    reference pieces: ``L = clipped_policy_loss + beta * mean(KL)``.

    velocity / velocity_ref: the policy's and the reference model's velocity at ``sample`` (a
    Tensor or a GuidedVelocity); velocity_ref may be None when ``beta == 0``.
    Stats add ``kl`` (mean per-sample KL, 0 without a reference) and ``log_prob`` (mean).
    The fused kernel (fastflow.ops) computes the same in one pass over the latents.
    """
    from fastflow.sde import kl_to_reference, sde_step

    if beta > 0 and velocity_ref is None:
        raise ValueError("grpo_step_loss: beta > 0 needs velocity_ref (the reference model's velocity)")
    out = sde_step(sample, velocity, sigma, sigma_next, noise_level=noise_level, kind=kind,
                   prev_sample=prev_sample, sigma_guard=sigma_guard)
    if out.log_prob is None:
        raise ValueError("grpo_step_loss: kind 'ode' has no log-prob; only SDE steps are trained")
    loss, stats = clipped_policy_loss(out.log_prob, old_log_prob, advantages, clip_range=clip_range)
    if beta > 0:
        with torch.no_grad():
            ref = sde_step(sample, velocity_ref, sigma, sigma_next, noise_level=noise_level,
                           kind=kind, prev_sample=prev_sample, sigma_guard=sigma_guard)
        kl = kl_to_reference(out.mean, ref.mean, out.std)
        loss = loss + beta * kl.mean()
        stats["kl"] = kl.detach().mean()
    else:
        stats["kl"] = torch.zeros((), device=loss.device)
    stats["log_prob"] = out.log_prob.detach().mean()
    return loss, stats
