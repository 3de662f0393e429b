"""Fused Flow-GRPO training objective for one timestep (fastflow.grpo.grpo_step_loss).

Forward, one pass over the latents: reads the stored sample, the stored next sample, the policy
velocity (CFG halves or combined) and, when beta > 0, the reference velocity; writes per-chunk
partial sums of ``(next - mean)^2`` and ``(mean - mean_ref)^2``. A per-sample program turns them
into log_prob and KL (batch invariant, see kernels/_common.py), and a one-program kernel computes
the clipped-ratio loss, the KL term, the stats and ``d loss / d log_prob`` for the backward.
Backward, one pass: recomputes the means and writes the velocity gradient(s) (both CFG halves).
No gradient reaches the samples or the reference velocity, as in training.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastflow.sde import GuidedVelocity

from . import specs
from ._common import (PerSample, as_float32, check_guard, geometry, launch_finalize, load_velocity,
                      mean_grad, rows, sigma_args, step_coefs, step_mean, velocity_dtype)
from .specs import BLOCK_B, KIND_IDS, MAX_BATCH  # noqa: F401  (MAX_BATCH: the batch limit)

#: Order of the stats buffer written by the loss kernel.
STATS = ("loss", "clipfrac", "approx_kl", "ratio_mean", "ratio_min", "ratio_max", "kl", "log_prob")


@triton.jit(do_not_specialize=["sig_s", "nxt_s", "grd_s"])
def _fwd_kernel(x_ptr, sx, y_ptr, sy, u_ptr, su, c_ptr, sc, w, ru_ptr, sru, rc_ptr, src, wr,
                part_lp_ptr, part_kl_ptr,
                sig_ptr, sig_s, sig_v, nxt_ptr, nxt_s, nxt_v, grd_ptr, grd_s, grd_v, a, sin_a, N, C,
                KIND: tl.constexpr, CFG: tl.constexpr, REF_CFG: tl.constexpr, HAS_KL: tl.constexpr,
                BLOCK: tl.constexpr, ITERS: tl.constexpr):
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    b64 = b.to(tl.int64)
    s, sn, dt, std_t, step_std, k1, k2 = step_coefs(b, sig_ptr, sig_s, sig_v, nxt_ptr, nxt_s, nxt_v,
                                                    grd_ptr, grd_s, grd_v, a, sin_a, KIND)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    acc_kl = tl.zeros([BLOCK], dtype=tl.float32)
    for it in range(ITERS):
        idx = (chunk * ITERS + it) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < N
        x = tl.load(x_ptr + b64 * sx + idx, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + b64 * sy + idx, mask=mask, other=0.0).to(tl.float32)
        v = load_velocity(u_ptr + b64 * su, c_ptr + b64 * sc, idx, mask, w, CFG)
        m = step_mean(x, v, s, sn, dt, k1, k2, KIND)
        d = tl.where(mask, y - m, 0.0)
        acc += d * d
        if HAS_KL:
            vr = load_velocity(ru_ptr + b64 * sru, rc_ptr + b64 * src, idx, mask, wr, REF_CFG)
            mr = step_mean(x, vr, s, sn, dt, k1, k2, KIND)
            e = tl.where(mask, m - mr, 0.0)
            acc_kl += e * e
    tl.store(part_lp_ptr + b64 * C + chunk, tl.sum(acc, axis=0))
    if HAS_KL:
        tl.store(part_kl_ptr + b64 * C + chunk, tl.sum(acc_kl, axis=0))


@triton.jit
def _loss_kernel(lp_ptr, kl_ptr, old_ptr, adv_ptr, dlp_ptr, loss_ptr, stats_ptr, B, lo, hi, clip, beta,
                 HAS_KL: tl.constexpr, BLOCK_B: tl.constexpr):
    """One program: the clipped surrogate over the batch, its stats and d loss / d log_prob.

    The batch is read BLOCK_B samples at a time into per-lane accumulators, summed once at the end:
    a fixed order for a given batch size, and any batch size in one program."""
    offs = tl.arange(0, BLOCK_B)
    nb = B * 1.0
    s_loss = tl.zeros([BLOCK_B], dtype=tl.float32)
    s_clip = tl.zeros([BLOCK_B], dtype=tl.float32)
    s_d2 = tl.zeros([BLOCK_B], dtype=tl.float32)
    s_ratio = tl.zeros([BLOCK_B], dtype=tl.float32)
    s_lp = tl.zeros([BLOCK_B], dtype=tl.float32)
    s_kl = tl.zeros([BLOCK_B], dtype=tl.float32)
    r_min = tl.full([BLOCK_B], float("inf"), dtype=tl.float32)
    r_max = tl.full([BLOCK_B], -float("inf"), dtype=tl.float32)
    for start in range(0, B, BLOCK_B):
        i = start + offs
        m = i < B
        lp = tl.load(lp_ptr + i, mask=m, other=0.0)
        old = tl.load(old_ptr + i, mask=m, other=0.0)
        adv = tl.load(adv_ptr + i, mask=m, other=0.0)
        diff = lp - old
        ratio = tl.exp(diff)
        unclipped = -adv * ratio
        clipped = -adv * tl.minimum(tl.maximum(ratio, lo), hi)
        s_loss += tl.where(m, tl.maximum(unclipped, clipped), 0.0)
        # max() passes the gradient to the unclipped branch when it wins or ties (inside the clip
        # range the two are equal and clamp passes it too); the clipped branch alone carries none.
        tl.store(dlp_ptr + i, tl.div_rn(tl.where(unclipped >= clipped, -adv * ratio, 0.0), nb),
                 mask=m)
        s_clip += tl.where(m & (tl.abs(ratio - 1.0) > clip), 1.0, 0.0)
        s_d2 += tl.where(m, diff * diff, 0.0)
        s_ratio += tl.where(m, ratio, 0.0)
        r_min = tl.minimum(r_min, tl.where(m, ratio, float("inf")))
        r_max = tl.maximum(r_max, tl.where(m, ratio, -float("inf")))
        s_lp += lp
        if HAS_KL:
            s_kl += tl.load(kl_ptr + i, mask=m, other=0.0)
    loss = tl.div_rn(tl.sum(s_loss, axis=0), nb)
    if HAS_KL:
        kl = tl.div_rn(tl.sum(s_kl, axis=0), nb)
        loss = loss + beta * kl
    else:
        kl = nb * 0.0
    tl.store(loss_ptr, loss)
    tl.store(stats_ptr + 0, loss)
    tl.store(stats_ptr + 1, tl.div_rn(tl.sum(s_clip, axis=0), nb))
    tl.store(stats_ptr + 2, 0.5 * tl.div_rn(tl.sum(s_d2, axis=0), nb))
    tl.store(stats_ptr + 3, tl.div_rn(tl.sum(s_ratio, axis=0), nb))
    tl.store(stats_ptr + 4, tl.min(r_min, axis=0))
    tl.store(stats_ptr + 5, tl.max(r_max, axis=0))
    tl.store(stats_ptr + 6, kl)
    tl.store(stats_ptr + 7, tl.div_rn(tl.sum(s_lp, axis=0), nb))


@triton.jit(do_not_specialize=["sig_s", "nxt_s", "grd_s"])
def _bwd_kernel(x_ptr, sx, y_ptr, sy, u_ptr, su, c_ptr, sc, w, ru_ptr, sru, rc_ptr, src, wr,
                du_ptr, dc_ptr, dlp_ptr, g_ptr, kl_coef,
                sig_ptr, sig_s, sig_v, nxt_ptr, nxt_s, nxt_v, grd_ptr, grd_s, grd_v, a, sin_a, N,
                KIND: tl.constexpr, CFG: tl.constexpr, REF_CFG: tl.constexpr, HAS_KL: tl.constexpr,
                BLOCK: tl.constexpr, ITERS: tl.constexpr):
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    b64 = b.to(tl.int64)
    s, sn, dt, std_t, step_std, k1, k2 = step_coefs(b, sig_ptr, sig_s, sig_v, nxt_ptr, nxt_s, nxt_v,
                                                    grd_ptr, grd_s, grd_v, a, sin_a, KIND)
    n = N * 1.0
    g = tl.load(g_ptr).to(tl.float32)
    # d loss / d mean_e = glp * (y - m) * c_lp + gkl * (m - m_ref) * c_kl
    glp = tl.load(dlp_ptr + b) * g
    if KIND == 0:
        c_lp = tl.div_rn(glp, step_std * step_std * n)
    else:
        c_lp = tl.div_rn(glp * 2.0, n)
    c_kl = tl.div_rn(kl_coef * g, n * std_t * std_t)
    dmdv = mean_grad(s, sn, dt, k1, k2, KIND)
    for it in range(ITERS):
        idx = (chunk * ITERS + it) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < N
        x = tl.load(x_ptr + b64 * sx + idx, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + b64 * sy + idx, mask=mask, other=0.0).to(tl.float32)
        v = load_velocity(u_ptr + b64 * su, c_ptr + b64 * sc, idx, mask, w, CFG)
        m = step_mean(x, v, s, sn, dt, k1, k2, KIND)
        gm = (y - m) * c_lp
        if HAS_KL:
            vr = load_velocity(ru_ptr + b64 * sru, rc_ptr + b64 * src, idx, mask, wr, REF_CFG)
            mr = step_mean(x, vr, s, sn, dt, k1, k2, KIND)
            gm += (m - mr) * c_kl
        dv = gm * dmdv
        if CFG:
            tl.store(du_ptr + b64 * N + idx, (dv * (1.0 - w)).to(du_ptr.dtype.element_ty), mask=mask)
            tl.store(dc_ptr + b64 * N + idx, (dv * w).to(dc_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(du_ptr + b64 * N + idx, dv.to(du_ptr.dtype.element_ty), mask=mask)


def _parts(velocity, shape, what):
    if isinstance(velocity, GuidedVelocity):
        parts, scale = (velocity.uncond, velocity.cond), float(velocity.scale)
    elif isinstance(velocity, Tensor):
        parts, scale = (velocity,), 0.0
    else:
        raise TypeError(f"{what} must be a Tensor or a GuidedVelocity, got {type(velocity).__name__}")
    for p in parts:
        if tuple(p.shape) != tuple(shape):
            raise ValueError(f"{what} shape {tuple(p.shape)} != sample shape {tuple(shape)}")
    return parts, scale


class _GrpoStepLoss(torch.autograd.Function):
    """Inputs: u, c (policy velocity halves; c is None without CFG), then everything else as a
    plain config. Outputs: the loss (differentiable) and the stats buffer (not)."""

    @staticmethod
    def forward(ctx, u, c, cfg):
        parts = velocity_dtype((u, c) if c is not None else (u,))
        ku, kc = parts[0], parts[-1]
        (uu, su), (cc, sc) = rows(ku), rows(kc)
        x, sx = cfg["x"]
        y, sy = cfg["y"]
        (ru, sru), (rc, src) = cfg["ref"]
        batch, n, dev = x.shape[0], cfg["n"], x.device
        _, _, chunks = geometry(n)
        has_kl, kind_id, sigmas = cfg["has_kl"], cfg["kind_id"], cfg["sigmas"]
        part_lp = torch.empty((batch, chunks), dtype=torch.float32, device=dev)
        part_kl = torch.empty((batch, chunks), dtype=torch.float32, device=dev) if has_kl else None
        specs.GRPO_FWD.launch(
            _fwd_kernel, (batch, chunks),
            x_ptr=x, sx=sx, y_ptr=y, sy=sy, u_ptr=uu, su=su, c_ptr=cc, sc=sc, w=cfg["w"],
            ru_ptr=ru, sru=sru, rc_ptr=rc, src=src, wr=cfg["wr"],
            part_lp_ptr=part_lp, part_kl_ptr=part_kl if has_kl else part_lp, **sigmas,
            N=n, C=chunks, KIND=kind_id, CFG=c is not None, REF_CFG=cfg["ref_cfg"], HAS_KL=has_kl)
        log_prob = torch.empty(batch, dtype=torch.float32, device=dev)
        kl = torch.empty(batch, dtype=torch.float32, device=dev) if has_kl else None
        std = torch.empty(batch, dtype=torch.float32, device=dev)
        launch_finalize(part_lp, part_kl, log_prob, kl, std, sigmas, n, chunks, kind_id)
        dlp = torch.empty(batch, dtype=torch.float32, device=dev)
        stats = torch.empty(len(STATS), dtype=torch.float32, device=dev)
        clip = cfg["clip"]
        loss = torch.empty((), dtype=torch.float32, device=dev)
        specs.GRPO_LOSS.launch(
            _loss_kernel, (1,),
            lp_ptr=log_prob, kl_ptr=kl if has_kl else log_prob, old_ptr=cfg["old"],
            adv_ptr=cfg["adv"], dlp_ptr=dlp, loss_ptr=loss, stats_ptr=stats, B=batch,
            lo=1.0 - clip, hi=1.0 + clip, clip=clip, beta=cfg["beta"], HAS_KL=has_kl)
        ctx.cfg = cfg
        ctx.cfg_flag = c is not None
        ctx.dtypes = (u.dtype, c.dtype if c is not None else None)
        ctx.save_for_backward(ku, kc, dlp)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        u, c, dlp = ctx.saved_tensors
        cfg, has_cfg = ctx.cfg, ctx.cfg_flag
        x, sx = cfg["x"]
        y, sy = cfg["y"]
        (uu, su), (cc, sc) = rows(u), rows(c)
        (ru, sru), (rc, src) = cfg["ref"]
        batch, n = x.shape[0], cfg["n"]
        _, _, chunks = geometry(n)
        du = torch.empty(u.shape, dtype=u.dtype, device=u.device)
        dc = torch.empty(c.shape, dtype=c.dtype, device=c.device) if has_cfg else du
        g = as_float32(grad_loss.detach()).reshape(1)
        specs.GRPO_BWD.launch(
            _bwd_kernel, (batch, chunks),
            x_ptr=x, sx=sx, y_ptr=y, sy=sy, u_ptr=uu, su=su, c_ptr=cc, sc=sc, w=cfg["w"],
            ru_ptr=ru, sru=sru, rc_ptr=rc, src=src, wr=cfg["wr"],
            du_ptr=du, dc_ptr=dc, dlp_ptr=dlp, g_ptr=g,
            kl_coef=cfg["beta"] / batch if cfg["has_kl"] else 0.0, **cfg["sigmas"], N=n,
            KIND=cfg["kind_id"], CFG=has_cfg, REF_CFG=cfg["ref_cfg"], HAS_KL=cfg["has_kl"])
        du = du.to(ctx.dtypes[0])
        return du, (dc.to(ctx.dtypes[1]) if has_cfg else None), None


def grpo_step_loss(sample: Tensor, prev_sample: Tensor, velocity, sigma, sigma_next,
                   old_log_prob: Tensor, advantages: Tensor, *, noise_level: float,
                   clip_range: float, beta: float = 0.0, velocity_ref=None, kind: str = "sde",
                   sigma_guard=None) -> tuple[Tensor, dict[str, Tensor]]:
    """fastflow.grpo.grpo_step_loss fused: same signature, loss and stats; gradients reach the
    policy velocity (or both GuidedVelocity halves) only. Sigmas as in sde_step: python floats by
    value, float32 device tensors in place."""
    if kind not in KIND_IDS:
        raise ValueError(f"kind must be one of {tuple(KIND_IDS)}, got {kind!r}")
    if kind == "ode":
        raise ValueError("grpo_step_loss: kind 'ode' has no log-prob; only SDE steps are trained")
    if sample.dtype == torch.float64:
        raise ValueError("the fused grpo_step_loss computes in float32; float64 uses fastflow.grpo")
    shape, batch, dev = tuple(sample.shape), sample.shape[0], sample.device
    if tuple(prev_sample.shape) != shape:
        raise ValueError(f"prev_sample shape {tuple(prev_sample.shape)} != sample shape {shape}")
    n = math.prod(shape[1:])
    specs.check_grid(batch, geometry(n)[2], "grpo_step_loss")
    parts, scale = _parts(velocity, shape, "velocity")
    if tuple(old_log_prob.shape) != (batch,) or tuple(advantages.shape) != (batch,):
        raise ValueError(f"shapes differ: log_prob {(batch,)}, old_log_prob "
                         f"{tuple(old_log_prob.shape)}, advantages {tuple(advantages.shape)}")
    check_guard(kind, sigma, sigma_guard)
    x_rows = rows(as_float32(sample.detach()))
    has_kl = velocity_ref is not None and beta > 0
    if has_kl:
        rparts, rscale = _parts(velocity_ref, shape, "velocity_ref")
        rparts = velocity_dtype([p.detach() for p in rparts])
        ref_rows = (rows(rparts[0]), rows(rparts[-1]))
    else:
        rscale, ref_rows = 0.0, (x_rows, x_rows)
    old = as_float32(old_log_prob.detach().to(device=dev)).contiguous()
    sig = PerSample(sigma, batch, dev, "sigma", old)
    nxt = PerSample(sigma_next, batch, dev, "sigma_next", old)
    grd = PerSample(sigma_guard, batch, dev, "sigma_guard", old) if sigma_guard is not None else sig
    cfg = {
        "x": x_rows, "y": rows(as_float32(prev_sample.detach())), "ref": ref_rows,
        "w": scale, "wr": rscale, "ref_cfg": has_kl and len(rparts) == 2,
        "n": n, "has_kl": has_kl, "kind_id": KIND_IDS[kind],
        "sigmas": sigma_args(sig, nxt, grd, float(noise_level), math.sin(noise_level * math.pi / 2)),
        "old": old,
        "adv": as_float32(advantages.detach().to(device=dev)).contiguous(),
        "clip": float(clip_range), "beta": float(beta),
    }
    loss, stats = _GrpoStepLoss.apply(parts[0], parts[1] if len(parts) == 2 else None, cfg)
    return loss, {k: stats[i] for i, k in enumerate(STATS) if k != "loss"}
