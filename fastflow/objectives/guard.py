"""GRPO-Guard (Wang et al., "GRPO-Guard: Mitigating Implicit Over-Optimization in Flow Matching
via Regulated Clipping", arXiv 2510.22319): Flow-GRPO with a regulated importance ratio, as
Flow-Factory's GRPO-Guard trainer computes it (the ratio normalisation and the per-step gradient
reweighting in one expression).

For the SDE transition ``x' ~ N(mu, s^2)`` (``s = std_t sqrt(-dt)``, the transition std) the
log-ratio of Flow-GRPO, averaged over the latent elements, is

    log p - log p_old = mean[(x' - mu_old)^2 - (x' - mu)^2] / (2 s^2)
                      = mean[eps (mu - mu_old)] / s  -  mean[(mu - mu_old)^2] / (2 s^2)

with ``x' = mu_old + s eps``: a noise term and a term that is always negative, so the ratio's
distribution is shifted below 1 and the clip acts lopsidedly, and its scale grows as ``1/s``,
so the steps with the least noise dominate the gradient. GRPO-Guard uses

    log ratio_guard = s (log p - log p_old) + mean[(mu - mu_old)^2] / (2 s) = mean[eps (mu - mu_old)]

which removes the bias (normalisation) and multiplies each step's gradient by ``s``
(reweighting), then the usual clipped surrogate and KL. On-policy ``mu == mu_old`` and the guard
ratio is exactly 1. Defined for ``sample.kind = "sde"`` (the Flow-GRPO SDE) only, as in
Flow-Factory.
"""

from __future__ import annotations

import torch
from torch import Tensor


def transition_std(std_t: Tensor, sigma, sigma_next) -> Tensor:
    """``[B]`` the SDE transition std ``std_t sqrt(sigma - sigma_next)`` (StepOutput.std is std_t)."""
    dt = torch.as_tensor(sigma, dtype=std_t.dtype, device=std_t.device) - torch.as_tensor(
        sigma_next, dtype=std_t.dtype, device=std_t.device)
    return std_t * torch.sqrt(dt.reshape(-1))


def guard_log_ratio(log_prob: Tensor, old_log_prob: Tensor, mean: Tensor, old_mean: Tensor, step_std: Tensor) -> Tensor:
    """``[B]``: ``s (log_prob - old_log_prob) + mean_over_dims((mean - old_mean)^2) / (2 s)``."""
    s = step_std.to(log_prob.dtype)
    mse = ((mean - old_mean.detach().to(mean.dtype)) ** 2).mean(dim=tuple(range(1, mean.ndim)))
    return s * (log_prob - old_log_prob.detach().to(log_prob.dtype)) + mse.to(log_prob.dtype) / (2 * s)


def guard_step_loss(sample: Tensor, prev_sample: Tensor, velocity, sigma, sigma_next, old_log_prob: Tensor,
                    advantages: Tensor, *, noise_level: float, clip_range: float, old_mean: Tensor | None = None,
                    beta: float = 0.0, velocity_ref=None, sigma_guard=None) -> tuple[Tensor, dict[str, Tensor]]:
    """One trained SDE step's GRPO-Guard loss: clipped surrogate on the guard ratio + beta KL.

    Arguments as fastflow.grpo.grpo_step_loss, plus ``old_mean`` (the sampling policy's transition
    mean at ``sample``; None = on-policy, the current mean detached). Stats as grpo_step_loss's
    (ratio_* and clipfrac of the guard ratio) plus ``guard/raw_log_ratio`` (the unregulated one).
    """
    from fastflow.sde import kl_to_reference, sde_step

    if beta > 0 and velocity_ref is None:
        raise ValueError("guard_step_loss: beta > 0 needs velocity_ref (the reference model's velocity)")
    out = sde_step(sample, velocity, sigma, sigma_next, noise_level=noise_level, kind="sde",
                   prev_sample=prev_sample, sigma_guard=sigma_guard)
    s = transition_std(out.std, sigma, sigma_next)
    mu_old = out.mean.detach() if old_mean is None else old_mean
    log_ratio = guard_log_ratio(out.log_prob, old_log_prob, out.mean, mu_old, s)
    ratio = torch.exp(log_ratio)
    adv = advantages.detach().to(ratio.dtype)
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
    with torch.no_grad():
        stats = {"clipfrac": ((ratio - 1).abs() > clip_range).float().mean(),
                 "approx_kl": 0.5 * (log_ratio ** 2).mean(), "ratio_mean": ratio.mean(),
                 "ratio_min": ratio.min(), "ratio_max": ratio.max(),
                 "guard/raw_log_ratio": (out.log_prob - old_log_prob.to(out.log_prob.dtype)).mean()}
    if beta > 0:
        with torch.no_grad():
            ref = sde_step(sample, velocity_ref, sigma, sigma_next, noise_level=noise_level, kind="sde",
                           prev_sample=prev_sample, sigma_guard=sigma_guard)
        kl = kl_to_reference(out.mean, ref.mean, out.std)
        loss = loss + beta * kl.mean()
        stats["kl"] = kl.detach().mean()
    else:
        stats["kl"] = torch.zeros((), device=loss.device)
    stats["log_prob"] = out.log_prob.detach().mean()
    return loss, stats


def guard_loss_reference(x: Tensor, x_next: Tensor, mean: Tensor, old_mean: Tensor, step_std: Tensor,
                         old_log_prob: Tensor, advantages: Tensor, *, clip_range: float) -> Tensor:
    """The clipped GRPO-Guard surrogate in float64, sample by sample, from the Gaussian densities
    written out (``mean`` differentiable; for tests). ``x`` is unused by the math and kept so the
    signature reads like the step it checks."""
    del x
    n = mean.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for i in range(n):
        s = float(step_std[i])
        m, t = mean[i].double(), x_next[i].double()
        logp = (-(t - m) ** 2 / (2 * s * s) - torch.log(torch.tensor(s, dtype=torch.float64))
                - 0.5 * torch.log(torch.tensor(2 * torch.pi, dtype=torch.float64))).mean()
        lr = s * (logp - float(old_log_prob[i])) + ((m - old_mean[i].double()) ** 2).mean() / (2 * s)
        ratio = torch.exp(lr)
        a = float(advantages[i])
        total = total + torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_range, 1 + clip_range)) / n
    return total
