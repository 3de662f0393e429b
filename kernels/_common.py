"""Shared pieces of the fused SDE kernels: the per-sample step coefficients and transition mean (one
definition, so the rollout kernel and the training kernel compute bit-identical means and
log-probs), the fixed reduction geometry, and host-side argument normalisation.

Batch invariance: every per-sample reduction runs over chunks whose size depends only on the
per-sample element count N (never on the batch size, never autotuned), each chunk is summed by
one program in a fixed order, and the chunk partials of a sample are summed by one program in a
fixed order. No atomics.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

#: True when the kernels below were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

KIND_IDS = {"sde": 0, "cps": 1, "ode": 2}
LOG_SQRT_2PI = tl.constexpr(math.log(math.sqrt(2 * math.pi)))
#: Warps of every kernel that reduces; fixed because tl.sum's order follows the thread layout.
NUM_WARPS = 4


def geometry(n: int) -> tuple[int, int, int]:
    """(BLOCK, ITERS, CHUNKS) for a per-sample size ``n``: a program sums BLOCK * ITERS elements.

    A function of ``n`` alone, shared by the rollout and training kernels, so a sample's log-prob
    is the same sum in the same order whatever the batch and whichever kernel computes it.
    """
    if n < 1:
        raise ValueError(f"each sample needs at least one element, got {n}")
    block = min(1024, triton.next_power_of_2(n))
    iters = min(4, triton.cdiv(n, block))
    return block, iters, triton.cdiv(n, block * iters)


def rows(t: Tensor) -> tuple[Tensor, int]:
    """``t`` ([B, ...]) and its batch stride, such that each sample is a contiguous run of memory.

    Slices like ``trajectory.latents[:, j]`` keep their batch stride (no copy); anything else whose
    samples are not contiguous is copied once with .contiguous().
    """
    if t.ndim == 0:
        raise ValueError("expected a batched tensor [B, ...], got a 0-d tensor")
    inner = t.shape[1:]
    expect, acc = [], 1
    for size in reversed(inner):
        expect.append(acc)
        acc *= size
    expect = tuple(reversed(expect))
    ok = all(st == e for st, e, size in zip(t.stride()[1:], expect, inner) if size != 1)
    if not ok:
        t = t.contiguous()
    return t, (t.stride(0) if t.shape[0] > 1 else acc)


def per_sample(value, batch: int, device, name: str) -> tuple[Tensor, int]:
    """A python float or a tensor broadcastable as ``[B]`` -> (float32 device tensor, stride)."""
    if isinstance(value, Tensor):
        t = value.detach().to(device=device, dtype=torch.float32).reshape(-1)
    else:
        t = torch.full((1,), float(value), dtype=torch.float32, device=device)
    if t.shape[0] == 1:
        return t, 0
    if t.shape[0] != batch:
        raise ValueError(f"{name} has {t.shape[0]} entries for a batch of {batch}")
    return t, t.stride(0)


def check_guard(kind: str, sigma, sigma_guard) -> None:
    """The reference's error for sigma == 1 without a guard (a device sync only when guard is None)."""
    if kind != "sde" or sigma_guard is not None:
        return
    at_one = bool((sigma == 1).any()) if isinstance(sigma, Tensor) else float(sigma) == 1.0
    if at_one:
        raise ValueError("sde_step: sigma == 1 needs sigma_guard (the grid's sigmas[1]) "
                         "to stand in for sigma in 1/(1 - sigma)")


# ----------------------------------------------------------------------------------------------
# Device helpers (inlined into each kernel).
# ----------------------------------------------------------------------------------------------


@triton.jit
def step_coefs(b, sig_ptr, sig_s, nxt_ptr, nxt_s, grd_ptr, grd_s, a, sin_a, KIND: tl.constexpr):
    """Per-sample scalars (s, sn, std_t, step_std, k1, k2) of the reference's step math.

    sde: mean = x * k1 + (v * k2) * dt with dt = sn - s; cps: k1 = sqrt(sn^2 - std_t^2).
    """
    s = tl.load(sig_ptr + b * sig_s).to(tl.float32)
    sn = tl.load(nxt_ptr + b * nxt_s).to(tl.float32)
    dt = sn - s
    if KIND == 0:
        g = tl.load(grd_ptr + b * grd_s).to(tl.float32)
        s_den = tl.where(s == 1.0, g, s)
        std_t = a * tl.sqrt(s / (1.0 - s_den))
        std2 = std_t * std_t
        k1 = 1.0 + std2 / (2.0 * s) * dt
        k2 = 1.0 + std2 * (1.0 - s) / (2.0 * s)
        step_std = std_t * tl.sqrt(-dt)
    elif KIND == 1:
        std_t = sn * sin_a
        k1 = tl.sqrt(sn * sn - std_t * std_t)
        k2 = dt
        step_std = std_t
    else:
        std_t = dt * 0.0
        k1 = dt
        k2 = dt
        step_std = std_t
    return s, sn, dt, std_t, step_std, k1, k2


@triton.jit
def load_velocity(u_ptr, c_ptr, idx, mask, w, CFG: tl.constexpr):
    """The velocity in float32: ``u + w (c - u)`` of the CFG halves, or the combined tensor."""
    u = tl.load(u_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if CFG:
        c = tl.load(c_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        u = u + w * (c - u)
    return u


@triton.jit
def step_mean(x, v, s, sn, dt, k1, k2, KIND: tl.constexpr):
    """The transition mean, in the reference's operation order."""
    if KIND == 0:
        m = x * k1 + v * k2 * dt
    elif KIND == 1:
        m = (1.0 - sn) * (x - s * v) + k1 * (x + (1.0 - s) * v)
    else:
        m = x + v * dt
    return m


@triton.jit
def mean_grad(s, sn, dt, k1, k2, KIND: tl.constexpr):
    """d mean / d v (a per-sample scalar)."""
    if KIND == 0:
        d = k2 * dt
    else:
        d = -(1.0 - sn) * s + k1 * (1.0 - s)
    return d


@triton.jit
def finalize_kernel(part_lp_ptr, part_kl_ptr, lp_ptr, kl_ptr, std_ptr,
                    sig_ptr, sig_s, nxt_ptr, nxt_s, grd_ptr, grd_s, a, sin_a, N, C,
                    KIND: tl.constexpr, HAS_KL: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program per sample: sums its chunk partials in a fixed order -> log_prob, KL, std_t."""
    b = tl.program_id(0)
    s, sn, dt, std_t, step_std, k1, k2 = step_coefs(b, sig_ptr, sig_s, nxt_ptr, nxt_s, grd_ptr,
                                                    grd_s, a, sin_a, KIND)
    n = N * 1.0
    offs = tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, C, BLOCK_C):
        m = start + offs < C
        acc += tl.load(part_lp_ptr + b * C + start + offs, mask=m, other=0.0)
    sq = tl.sum(acc, axis=0) / n
    if KIND == 0:
        lp = -sq / (2.0 * step_std * step_std) - tl.log(step_std) - LOG_SQRT_2PI
    else:
        lp = -sq
    tl.store(lp_ptr + b, lp)
    tl.store(std_ptr + b, std_t)
    if HAS_KL:
        acc2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        for start in range(0, C, BLOCK_C):
            m = start + offs < C
            acc2 += tl.load(part_kl_ptr + b * C + start + offs, mask=m, other=0.0)
        d2 = tl.sum(acc2, axis=0) / n
        tl.store(kl_ptr + b, d2 / (2.0 * std_t * std_t))


def launch_finalize(part_lp, part_kl, log_prob, kl, std, sig, nxt, grd, a, sin_a, n, chunks, kind_id):
    """Launch finalize_kernel over the batch (sig/nxt/grd are (tensor, stride) pairs)."""
    batch = log_prob.shape[0]
    block_c = min(1024, triton.next_power_of_2(chunks))
    finalize_kernel[(batch,)](
        part_lp, part_kl if part_kl is not None else part_lp, log_prob,
        kl if kl is not None else log_prob, std,
        sig[0], sig[1], nxt[0], nxt[1], grd[0], grd[1], a, sin_a, n, chunks,
        KIND=kind_id, HAS_KL=part_kl is not None, BLOCK_C=block_c, num_warps=NUM_WARPS)
