"""Shared pieces of the fused SDE kernels: the per-sample step coefficients and transition mean (one
definition, so the rollout kernel and the training kernel compute bit-identical means and
log-probs), the fixed reduction geometry, and host-side argument normalisation.

Batch invariance: every per-sample reduction runs over chunks of a fixed size (specs.CHUNK, never
depending on the batch, never autotuned), each chunk is summed by one program in a fixed order, and
the chunk partials of a sample are summed by one program in a fixed order. No atomics.

Launch geometry: the batch on grid axis 0 (up to 2**31 - 1 samples), a sample's chunks on axis 1
(up to 65,535 chunks, 268 million elements); specs.check_grid gives the error past either.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .specs import BLOCK, BLOCK_C, CHUNK, FINALIZE, ITERS, KIND_IDS, NUM_WARPS  # noqa: F401

#: True when the kernels below were built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

LOG_SQRT_2PI = tl.constexpr(math.log(math.sqrt(2 * math.pi)))


def geometry(n: int) -> tuple[int, int, int]:
    """(BLOCK, ITERS, CHUNKS) for a per-sample size ``n``: a program sums BLOCK * ITERS elements.

    The same for every ``n`` but the chunk count, shared by the rollout and training kernels, so a
    sample's log-prob is the same sum in the same order whatever the batch and whichever kernel
    computes it.
    """
    if n < 1:
        raise ValueError(f"each sample needs at least one element, got {n}")
    return BLOCK, ITERS, -(-n // CHUNK)


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


def as_float32(t: Tensor) -> Tensor:
    """``t`` in float32 (itself when it already is: no copy). The kernels load latents, noise and
    next samples as float32 (kernels/specs.py); the sampler and the trainer keep them in float32."""
    return t if t.dtype == torch.float32 else t.to(torch.float32)


_VELOCITY_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def velocity_dtype(parts):
    """The velocity tensors (one, or both CFG halves) in one dtype the kernels take: as they are
    when they share a dtype of float32 / bfloat16 / float16, else all in float32 (exact for 16-bit
    halves; the math is float32 either way)."""
    dtypes = {p.dtype for p in parts}
    if len(dtypes) == 1 and dtypes.pop() in _VELOCITY_DTYPES:
        return tuple(parts)
    return tuple(as_float32(p) for p in parts)


class PerSample:
    """A per-sample scalar argument as the kernels take it: (pointer, stride, value).

    A float32 tensor on the device is passed as it is (no copy, no sync): sample ``b`` reads
    ``ptr[b * stride]`` (stride 0 for one element). A python float, or a one-element tensor held
    on another device than the launch (read on the host without touching the launch device), is
    passed by value: ``stride`` -1 and ``ptr`` any float32 tensor, never read. Other tensors are
    converted to float32 on the device once.
    """

    __slots__ = ("ptr", "stride", "value", "tensor")

    def __init__(self, value, batch: int, device, name: str, dummy: Tensor):
        if isinstance(value, Tensor):
            t = value.detach()
            if t.numel() == 1 and t.device != torch.device(device) and t.device.type == "cpu":
                value = float(t.reshape(()).to(torch.float32))
            else:
                t = t.to(device=device, dtype=torch.float32).reshape(-1)
                if t.shape[0] not in (1, batch):
                    raise ValueError(f"{name} has {t.shape[0]} entries for a batch of {batch}")
                self.ptr, self.stride, self.value, self.tensor = \
                    t, (0 if t.shape[0] == 1 else t.stride(0)), 0.0, t
                return
        self.ptr, self.stride, self.value, self.tensor = dummy, -1, float(value), None

    def args(self, prefix: str) -> dict:
        """The kernel arguments ``{prefix}_ptr``, ``{prefix}_s``, ``{prefix}_v``."""
        return {f"{prefix}_ptr": self.ptr, f"{prefix}_s": self.stride, f"{prefix}_v": self.value}

    def column(self, batch: int, ndim: int, device) -> Tensor:
        """As a float32 [B, 1, ...] tensor (the autograd backward's PyTorch math)."""
        t = self.tensor if self.tensor is not None else \
            torch.full((1,), self.value, dtype=torch.float32, device=device)
        return t.expand(batch).reshape(batch, *([1] * (ndim - 1)))


def sigma_args(sig: PerSample, nxt: PerSample, grd: PerSample, a: float, sin_a: float) -> dict:
    """The per-sample step arguments every kernel takes (see step_coefs)."""
    return {**sig.args("sig"), **nxt.args("nxt"), **grd.args("grd"), "a": a, "sin_a": sin_a}


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
def load_per_sample(b, ptr, stride, value):
    """Sample ``b``'s scalar: ``ptr[b * stride]``, or ``value`` where ``stride`` < 0 (see PerSample)."""
    given = stride >= 0
    t = tl.load(ptr + b * stride, mask=given, other=0.0)
    return tl.where(given, t, value)


@triton.jit
def step_coefs(b, sig_ptr, sig_s, sig_v, nxt_ptr, nxt_s, nxt_v, grd_ptr, grd_s, grd_v, a, sin_a,
               KIND: tl.constexpr):
    """Per-sample scalars (s, sn, dt, std_t, step_std, k1, k2) of the reference's step math.

    sde: mean = x * k1 + (v * k2) * dt with dt = sn - s; cps: k1 = sqrt(sn^2 - std_t^2).
    Divisions and square roots are the correctly rounded ones (the GPU's default ``/`` and
    ``sqrt`` are approximate), so on a GPU these match the reference's IEEE float32 values.
    """
    s = load_per_sample(b, sig_ptr, sig_s, sig_v)
    sn = load_per_sample(b, nxt_ptr, nxt_s, nxt_v)
    dt = sn - s
    if KIND == 0:
        g = load_per_sample(b, grd_ptr, grd_s, grd_v)
        s_den = tl.where(s == 1.0, g, s)
        std_t = a * tl.sqrt_rn(tl.div_rn(s, 1.0 - s_den))
        std2 = std_t * std_t
        k1 = 1.0 + tl.div_rn(std2, 2.0 * s) * dt
        k2 = 1.0 + tl.div_rn(std2 * (1.0 - s), 2.0 * s)
        step_std = std_t * tl.sqrt_rn(-dt)
    elif KIND == 1:
        std_t = sn * sin_a
        k1 = tl.sqrt_rn(sn * sn - std_t * std_t)
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


@triton.jit(do_not_specialize=["sig_s", "nxt_s", "grd_s"])
def finalize_kernel(part_lp_ptr, part_kl_ptr, lp_ptr, kl_ptr, std_ptr,
                    sig_ptr, sig_s, sig_v, nxt_ptr, nxt_s, nxt_v, grd_ptr, grd_s, grd_v, a, sin_a,
                    N, C, KIND: tl.constexpr, HAS_KL: tl.constexpr, BLOCK_C: tl.constexpr):
    """One program per sample: sums its chunk partials in a fixed order -> log_prob, KL, std_t."""
    b = tl.program_id(0)
    s, sn, dt, std_t, step_std, k1, k2 = step_coefs(b, sig_ptr, sig_s, sig_v, nxt_ptr, nxt_s, nxt_v,
                                                    grd_ptr, grd_s, grd_v, a, sin_a, KIND)
    n = N * 1.0
    offs = tl.arange(0, BLOCK_C)
    row = b.to(tl.int64) * C
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(0, C, BLOCK_C):
        m = start + offs < C
        acc += tl.load(part_lp_ptr + row + start + offs, mask=m, other=0.0)
    sq = tl.div_rn(tl.sum(acc, axis=0), n)
    if KIND == 0:
        lp = -tl.div_rn(sq, 2.0 * step_std * step_std) - tl.log(step_std) - LOG_SQRT_2PI
    else:
        lp = -sq
    tl.store(lp_ptr + b, lp)
    tl.store(std_ptr + b, std_t)
    if HAS_KL:
        acc2 = tl.zeros([BLOCK_C], dtype=tl.float32)
        for start in range(0, C, BLOCK_C):
            m = start + offs < C
            acc2 += tl.load(part_kl_ptr + row + start + offs, mask=m, other=0.0)
        d2 = tl.div_rn(tl.sum(acc2, axis=0), n)
        tl.store(kl_ptr + b, tl.div_rn(d2, 2.0 * std_t * std_t))


def launch_finalize(part_lp, part_kl, log_prob, kl, std, sigmas: dict, n, chunks, kind_id):
    """Launch finalize_kernel over the batch (``sigmas``: sigma_args(...))."""
    batch = log_prob.shape[0]
    FINALIZE.launch(
        finalize_kernel, (batch,),
        part_lp_ptr=part_lp, part_kl_ptr=part_kl if part_kl is not None else part_lp,
        lp_ptr=log_prob, kl_ptr=kl if kl is not None else log_prob, std_ptr=std,
        **sigmas, N=n, C=chunks, KIND=kind_id, HAS_KL=part_kl is not None)
