"""Advantage Weighted Matching (Xue et al., "Advantage Weighted Matching: Aligning RL with
Pretraining in Diffusion Models", arXiv 2509.25050), as Flow-Factory's AWM trainer computes it.

The flow-matching error plays the log-likelihood: on the forward process (fastflow.objectives.
forward) the per-sample log-probability of the trained velocity is

    log p = -w(t) * mean (v(x_t, t) - (eps - x_0))^2          (w = 1, or t with weighting "t")

or, with weighting "ghuber" (the published AWM run's generalised Huber, power ``q`` in (0, 1]),

    log p = -t * ((e + 1e-10)^q - 1e-10^q) / q,    e = mean (v(x_t, t) - (eps - x_0))^2

whose gradient is ``t e^(q - 1)`` times the squared error's: large errors count less (q = 1 is the
"t" weighting).

and the policy loss is PPO's clipped surrogate on ``ratio = exp(log p - log p_old)`` with the
group-relative advantage, ``log p_old`` that of the sampling policy at the same ``x_t``:

    L = mean max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)) + kl_beta * mean ||v - v_ref||^2
        + ema_kl_beta * mean ||v - v_ema||^2

On-policy (the iteration's gradients all taken before its first optimizer step, the default)
``log p_old`` is the detached ``log p`` itself: the ratio is exactly 1 and the gradient is the
advantage-weighted flow-matching gradient ``mean_i A_i grad ||v_i - (eps_i - x0_i)||^2 w``:
pretraining's loss, weighted by the advantage. Training is CFG-free (the conditional velocity).
"""

from __future__ import annotations

import torch
from torch import Tensor

WEIGHTINGS = ("uniform", "t", "ghuber")
#: Flow-Factory's ghuber offset: keeps the power's gradient finite at a zero error
GHUBER_EPS = 1e-10


def awm_log_prob(v: Tensor, target: Tensor, t: Tensor, weighting: str = "uniform", power: float = 0.25) -> Tensor:
    """``[B]`` the weighted log-likelihood of each sample (float32 or wider): ``-w(t) e`` with ``e`` the
    mean squared error over its elements, or the ghuber form (module docstring; ``power`` = q)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    dtype = torch.promote_types(v.dtype, torch.float32)
    err = ((v.to(dtype) - target.to(dtype)) ** 2).mean(dim=tuple(range(1, v.ndim)))
    if weighting == "uniform":
        return -err
    if weighting == "t":
        return -err * t.to(dtype)
    return -((err + GHUBER_EPS) ** power - GHUBER_EPS ** power) * t.to(dtype) / power


def _velocity_kl(v: Tensor, other: Tensor, dtype: torch.dtype) -> Tensor:
    """``[B]`` the v-based KL ``mean |v - other|^2`` (``other`` detached)."""
    return ((v.to(dtype) - other.detach().to(dtype)) ** 2).mean(dim=tuple(range(1, v.ndim)))


def awm_loss(v: Tensor, x0: Tensor, noise: Tensor, t: Tensor, advantages: Tensor, *, clip_range: float,
             old_log_prob: Tensor | None = None, weighting: str = "uniform", power: float = 0.25,
             v_ref: Tensor | None = None, kl_beta: float = 0.0, v_ema: Tensor | None = None,
             ema_kl_beta: float = 0.0) -> tuple[Tensor, dict[str, Tensor]]:
    """The AWM loss of one batch at one training time per sample (``x_t = (1 - t) x0 + t noise``).

    old_log_prob: ``[B]`` the sampling policy's :func:`awm_log_prob` at the same ``x_t``; None =
    on-policy (the detached current value). v_ema: the EMA policy's velocity at the same ``x_t``
    (the published run's KL to an EMA policy, weight ``ema_kl_beta``). Stats as the GRPO loss's
    (clipfrac, approx_kl, ratio_mean/min/max) plus ``kl``, ``awm/ema_kl`` (with v_ema) and
    ``awm/fm_error`` (the unweighted flow-matching error).
    """
    if kl_beta > 0 and v_ref is None:
        raise ValueError("awm_loss: kl_beta > 0 needs v_ref (the reference model's velocity)")
    if ema_kl_beta > 0 and v_ema is None:
        raise ValueError("awm_loss: ema_kl_beta > 0 needs v_ema (the EMA policy's velocity)")
    target = noise - x0
    lp = awm_log_prob(v, target, t, weighting, power)
    old = lp.detach() if old_log_prob is None else old_log_prob.detach().to(lp.dtype)
    adv = advantages.detach().to(lp.dtype)
    diff = lp - old
    ratio = torch.exp(diff)
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
    with torch.no_grad():
        stats = {"clipfrac": ((ratio - 1).abs() > clip_range).float().mean(), "approx_kl": 0.5 * (diff ** 2).mean(),
                 "ratio_mean": ratio.mean(), "ratio_min": ratio.min(), "ratio_max": ratio.max(),
                 "awm/fm_error": awm_log_prob(v.detach(), target, t, "uniform").neg().mean()}
    if kl_beta > 0:
        kl = _velocity_kl(v, v_ref, lp.dtype)
        loss = loss + kl_beta * kl.mean()
        stats["kl"] = kl.detach().mean()
    else:
        stats["kl"] = torch.zeros((), device=v.device)
    if ema_kl_beta > 0:
        ema_kl = _velocity_kl(v, v_ema, lp.dtype)
        loss = loss + ema_kl_beta * ema_kl.mean()
        stats["awm/ema_kl"] = ema_kl.detach().mean()
    return loss, stats


def awm_loss_reference(v, x0, noise, t, advantages, *, clip_range, old_log_prob=None, weighting="uniform",
                       power=0.25, v_ref=None, kl_beta=0.0, v_ema=None, ema_kl_beta=0.0) -> Tensor:
    """The same loss in float64, sample by sample (for tests)."""
    n = v.shape[0]
    total = torch.zeros((), dtype=torch.float64)
    for i in range(n):
        vi = v[i].double()
        e = ((vi - (noise[i].double() - x0[i].double())) ** 2).mean()
        if weighting == "ghuber":
            lp = -float(t[i]) * ((e + 1e-10) ** power - 1e-10 ** power) / power
        else:
            lp = -(float(t[i]) if weighting == "t" else 1.0) * e
        lp_old = lp.detach() if old_log_prob is None else torch.tensor(float(old_log_prob[i]), dtype=torch.float64)
        ratio = torch.exp(lp - lp_old)
        a = float(advantages[i])
        total = total + torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_range, 1 + clip_range)) / n
        if kl_beta > 0:
            total = total + kl_beta * ((vi - v_ref[i].double().detach()) ** 2).mean() / n
        if ema_kl_beta > 0:
            total = total + ema_kl_beta * ((vi - v_ema[i].double().detach()) ** 2).mean() / n
    return total
