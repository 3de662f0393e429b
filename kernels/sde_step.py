"""Fused rollout step: one pass reads the velocity (CFG halves combined in float32 registers, or the
combined tensor), the sample and the noise (a tensor, or Philox drawn in-kernel from a seed and an
offset held in device tensors), and writes the next sample, the per-sample log-prob and, only when
asked, the mean. Same math as fastflow.sde.sde_step (kinds sde / cps / ode).

sde_step is forward only; sde_step_differentiable wraps the same kernel with an autograd Function
(PyTorch backward) for callers that need gradients through mean / log_prob. Training
differentiates through fastflow.ops.grpo_step_loss (kernels/grpo_loss.py, fused backward).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastflow.sde import GuidedVelocity, StepOutput

from . import specs
from ._common import (PerSample, as_float32, check_guard, geometry, launch_finalize, load_velocity,
                      rows, sigma_args, step_coefs, step_mean, velocity_dtype)
from .specs import KIND_IDS, NOISE_GIVEN_NEXT, NOISE_PHILOX, NOISE_TENSOR


@triton.jit(do_not_specialize=["sig_s", "nxt_s", "grd_s"])
def _sde_step_kernel(x_ptr, sx, u_ptr, su, c_ptr, sc, w, n_ptr, sn_, y_ptr, sy, seed_ptr, off_ptr,
                     out_ptr, mean_ptr, part_ptr,
                     sig_ptr, sig_s, sig_v, nxt_ptr, nxt_s, nxt_v, grd_ptr, grd_s, grd_v, a, sin_a,
                     N, C, KIND: tl.constexpr, CFG: tl.constexpr, NOISE: tl.constexpr,
                     WRITE_OUT: tl.constexpr, WRITE_MEAN: tl.constexpr,
                     BLOCK: tl.constexpr, ITERS: tl.constexpr):
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    b64 = b.to(tl.int64)
    s, sn, dt, std_t, step_std, k1, k2 = step_coefs(b, sig_ptr, sig_s, sig_v, nxt_ptr, nxt_s, nxt_v,
                                                    grd_ptr, grd_s, grd_v, a, sin_a, KIND)
    if NOISE == 1:
        seed = tl.load(seed_ptr)
        base = tl.load(off_ptr) + b64 * N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for it in range(ITERS):
        idx = (chunk * ITERS + it) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < N
        x = tl.load(x_ptr + b64 * sx + idx, mask=mask, other=0.0).to(tl.float32)
        v = load_velocity(u_ptr + b64 * su, c_ptr + b64 * sc, idx, mask, w, CFG)
        m = step_mean(x, v, s, sn, dt, k1, k2, KIND)
        if KIND == 2:
            nxt = m
        elif NOISE == 0:
            eps = tl.load(n_ptr + b64 * sn_ + idx, mask=mask, other=0.0).to(tl.float32)
            nxt = m + step_std * eps
        elif NOISE == 1:
            eps = tl.randn(seed, base + idx)
            nxt = m + step_std * eps
        else:
            nxt = tl.load(y_ptr + b64 * sy + idx, mask=mask, other=0.0).to(tl.float32)
        if KIND != 2:
            d = tl.where(mask, nxt - m, 0.0)
            acc += d * d
        if WRITE_OUT:
            tl.store(out_ptr + b64 * N + idx, nxt, mask=mask)
        if WRITE_MEAN:
            tl.store(mean_ptr + b64 * N + idx, m, mask=mask)
    if KIND != 2:
        tl.store(part_ptr + b64 * C + chunk, tl.sum(acc, axis=0))


def _velocity_parts(velocity, shape):
    """(u, c, scale, cfg) views with batch strides; checks the shapes against the sample's."""
    if isinstance(velocity, GuidedVelocity):
        parts, scale, cfg = (velocity.uncond, velocity.cond), float(velocity.scale), True
    else:
        parts, scale, cfg = (velocity,), 0.0, False
    for p in parts:
        if tuple(p.shape) != tuple(shape):
            raise ValueError(f"velocity shape {tuple(p.shape)} != sample shape {tuple(shape)}")
    parts = velocity_dtype(parts)
    u = rows(parts[0])
    c = rows(parts[1]) if cfg else u
    return u, c, scale, cfg


def sde_step(sample: Tensor, velocity, sigma, sigma_next, *, noise_level: float, kind: str = "sde",
             noise: Tensor | None = None, prev_sample: Tensor | None = None, sigma_guard=None,
             generator: torch.Generator | None = None, seed: Tensor | None = None,
             offset: Tensor | None = None, need_mean: bool = True) -> StepOutput:
    """fastflow.sde.sde_step as one fused kernel (float32 math; no autograd).

    Noise: ``noise`` when given; else Philox from ``seed`` / ``offset`` (int64 device tensors of
    one element; element ``i`` of sample ``b`` uses counter ``offset + b * N + i``, and ``offset``
    is advanced by ``B * N`` in place afterwards, so a CUDA graph replays with fresh noise); else a
    ``torch.randn`` draw from ``generator``. need_mean=False skips writing the mean (StepOutput.mean
    is then None): the rollout does not need it.

    sigma, sigma_next, sigma_guard: python floats (passed to the kernel by value), or tensors
    broadcastable as ``[B]``; float32 tensors on the sample's device are read in place (no copy,
    no sync).
    """
    if kind not in KIND_IDS:
        raise ValueError(f"kind must be one of {tuple(KIND_IDS)}, got {kind!r}")
    if sample.dtype == torch.float64:
        raise ValueError("the fused sde_step computes in float32; float64 inputs use fastflow.sde")
    batch, shape, dev = sample.shape[0], tuple(sample.shape), sample.device
    n = math.prod(shape[1:])
    block, iters, chunks = geometry(n)
    specs.check_grid(batch, chunks, "sde_step")
    (u, su), (c, sc), scale, cfg = _velocity_parts(velocity, shape)
    check_guard(kind, sigma, sigma_guard)
    kind_id = KIND_IDS[kind]
    x, sx = rows(as_float32(sample))

    noise_mode, nz, snz, y, sy, prev = NOISE_TENSOR, None, 0, None, 0, None
    if prev_sample is not None:
        if tuple(prev_sample.shape) != shape:
            raise ValueError(f"prev_sample shape {tuple(prev_sample.shape)} != sample shape {shape}")
        noise_mode = NOISE_GIVEN_NEXT
        prev = as_float32(prev_sample.detach())
        y, sy = rows(prev)
    elif kind != "ode":
        if noise is None and seed is None:
            noise = torch.randn(shape, generator=generator, dtype=torch.float32, device=dev)
        if noise is not None:
            if tuple(noise.shape) != shape:
                raise ValueError(f"noise shape {tuple(noise.shape)} != sample shape {shape}")
            nz, snz = rows(as_float32(noise))
        else:
            if offset is None:
                raise ValueError("sde_step: Philox noise needs both seed and offset tensors")
            for name, t in (("seed", seed), ("offset", offset)):
                if not isinstance(t, Tensor) or t.numel() != 1 or t.dtype != torch.int64 \
                        or t.device != dev:
                    raise ValueError(f"sde_step: {name} must be a one-element int64 tensor on {dev}")
            noise_mode = NOISE_PHILOX

    write_out = noise_mode != NOISE_GIVEN_NEXT
    if kind == "ode" and not write_out and not need_mean:  # nothing for a kernel to compute
        return StepOutput(prev, None, None, torch.zeros(batch, dtype=torch.float32, device=dev))
    out = torch.empty(shape, dtype=torch.float32, device=dev) if write_out else None
    mean = torch.empty(shape, dtype=torch.float32, device=dev) if need_mean else None
    part = torch.empty((batch, chunks), dtype=torch.float32, device=dev)
    # Unused pointer slots get a float32 buffer: the constexpr branches never read them.
    sig = PerSample(sigma, batch, dev, "sigma", part)
    nxt = PerSample(sigma_next, batch, dev, "sigma_next", part)
    grd = PerSample(sigma_guard, batch, dev, "sigma_guard", part) if sigma_guard is not None else sig
    sin_a = math.sin(noise_level * math.pi / 2)
    sigmas = sigma_args(sig, nxt, grd, float(noise_level), sin_a)
    philox = noise_mode == NOISE_PHILOX
    specs.SDE_STEP.launch(
        _sde_step_kernel, (batch, chunks),
        x_ptr=x, sx=sx, u_ptr=u, su=su, c_ptr=c, sc=sc, w=scale,
        n_ptr=nz if nz is not None else part, sn_=snz, y_ptr=y if y is not None else part, sy=sy,
        seed_ptr=seed if philox else part, off_ptr=offset if philox else part,
        out_ptr=out if out is not None else part, mean_ptr=mean if mean is not None else part,
        part_ptr=part, **sigmas, N=n, C=chunks,
        KIND=kind_id, CFG=cfg, NOISE=noise_mode, WRITE_MEAN=need_mean)
    if philox:
        offset.add_(batch * n)
    prev = out if write_out else prev
    std = torch.empty(batch, dtype=torch.float32, device=dev)
    if kind == "ode":
        std.zero_()
        return StepOutput(prev, None, mean, std)
    log_prob = torch.empty(batch, dtype=torch.float32, device=dev)
    launch_finalize(part, None, log_prob, None, std, sigmas, n, chunks, kind_id)
    return StepOutput(prev, log_prob, mean, std)


def _coef_tensors(kind, sigma, sigma_next, sigma_guard, noise_level, batch, ndim, device):
    """Per-sample (d mean/d x, d mean/d v, transition std) as float32 [B, 1, ...] for backward."""
    def col(value, name):
        return PerSample(value, batch, device, name, None).column(batch, ndim, device)

    s, sn = col(sigma, "sigma"), col(sigma_next, "sigma_next")
    dt = sn - s
    if kind == "sde":
        g = col(sigma_guard, "sigma_guard") if sigma_guard is not None else s
        std_t = noise_level * torch.sqrt(s / (1 - torch.where(s == 1, g, s)))
        dmdx = 1 + std_t**2 / (2 * s) * dt
        dmdv = (1 + std_t**2 * (1 - s) / (2 * s)) * dt
        return dmdx, dmdv, std_t * torch.sqrt(-dt)
    if kind == "cps":
        std_t = sn * math.sin(noise_level * math.pi / 2)
        r = torch.sqrt(sn**2 - std_t**2)
        return (1 - sn) + r, -(1 - sn) * s + r * (1 - s), std_t
    return torch.ones_like(s), dt, torch.zeros_like(s)


class SdeStepFunction(torch.autograd.Function):
    """The fused step with gradients: forward values are the kernel's (bitwise those of a
    no-grad call), backward is the exact derivative of the reference math, in PyTorch (this is
    not the training hot path: training differentiates through grpo_step_loss)."""

    @staticmethod
    def forward(ctx, x, u, c, velocity_scale, kw):
        velocity = GuidedVelocity(u, c, velocity_scale) if c is not None else u
        out = sde_step(x, velocity, need_mean=True, **kw)
        ctx.kw, ctx.scale, ctx.cfg = kw, velocity_scale, c is not None
        ctx.dtypes = (x.dtype, u.dtype, c.dtype if c is not None else None)
        ctx.save_for_backward(out.prev_sample, out.mean)
        lp = out.log_prob if out.log_prob is not None else out.std.new_zeros(0)
        ctx.mark_non_differentiable(out.std)
        return out.prev_sample, lp, out.mean, out.std

    @staticmethod
    def backward(ctx, g_prev, g_lp, g_mean, _g_std):
        prev, mean = ctx.saved_tensors
        kw = ctx.kw
        batch, ndim = mean.shape[0], mean.ndim
        dmdx, dmdv, step_std = _coef_tensors(kw["kind"], kw["sigma"], kw["sigma_next"],
                                             kw.get("sigma_guard"), kw["noise_level"], batch, ndim,
                                             mean.device)
        gm = torch.zeros_like(mean)
        if g_mean is not None:
            gm = gm + g_mean
        if g_prev is not None and kw.get("prev_sample") is None:
            gm = gm + g_prev  # sampled: prev = mean + step_std * eps
        if g_lp is not None and g_lp.numel():
            n = mean[0].numel()
            glp = g_lp.reshape(batch, *([1] * (ndim - 1)))
            scale = 1 / (step_std**2 * n) if kw["kind"] == "sde" else 2.0 / n
            gm = gm + glp * (prev - mean) * scale
        gv = gm * dmdv
        gx = (gm * dmdx).to(ctx.dtypes[0])
        if ctx.cfg:
            return gx, (gv * (1 - ctx.scale)).to(ctx.dtypes[1]), (gv * ctx.scale).to(ctx.dtypes[2]), None, None
        return gx, gv.to(ctx.dtypes[1]), None, None, None


def sde_step_differentiable(sample: Tensor, velocity, sigma, sigma_next, **kw) -> StepOutput:
    """sde_step whose prev_sample / log_prob / mean carry gradients to the sample and velocity
    (sigma tensors and a given prev_sample are constants). need_mean is ignored (always kept)."""
    kw.pop("need_mean", None)
    kw.update(sigma=sigma, sigma_next=sigma_next)
    kw.setdefault("kind", "sde")
    if isinstance(velocity, GuidedVelocity):
        u, c, scale = velocity.uncond, velocity.cond, float(velocity.scale)
    else:
        u, c, scale = velocity, None, 0.0
    prev, lp, mean, std = SdeStepFunction.apply(sample, u, c, scale, kw)
    return StepOutput(prev, lp if kw["kind"] != "ode" else None, mean, std)
