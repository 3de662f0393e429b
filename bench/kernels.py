"""Benchmark of the fused Triton kernels against the eager PyTorch reference and torch.compile of it.

    python bench/kernels.py                  # every case on the default device
    python bench/kernels.py --cases sd35     # one size; --reps N, --no-compile, --device cpu
    python bench/kernels.py --out DIR --time-budget 40    # rows into DIR, stop starting ops after 40 s

Ops (CFG halves in bf16, latents in float32, as in a real run):
  rollout        one SDE rollout step from a noise tensor (next sample + log-prob)
  rollout_philox the same with Philox noise drawn in-kernel (reference: torch.randn + step)
  train_fwd      grpo_step_loss forward with the reference velocity (beta > 0)
  train_fwd_bwd  the same plus backward to both velocity halves

Achieved GB/s counts each input read once and each output written once; "%copy" is that over the
device's measured copy bandwidth. On CUDA inputs are flushed from L2 before every timed call.
Goals on an H100: >= 80% of copy bandwidth at the large size, >= 5x eager at the SD3.5 size.
On a CPU only the eager reference runs, on small sizes (the kernels would run in the interpreter,
which says nothing about speed). Rows are appended to <out>/kernels-<device>.jsonl (--out, default
bench/results) as each op of a case is measured; --time-budget SECONDS starts no (case, op) that
would end past the budget and lists what it skipped.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _BENCH_DIR)

import torch  # noqa: E402

import common  # noqa: E402
from common import copy_bandwidth_gbps, header, time_ms  # noqa: E402
from fastflow import grpo, sde  # noqa: E402
from fastflow.sde import GuidedVelocity  # noqa: E402

# bench/ leaves sys.path once common is imported: this file would otherwise stand in for the
# ``kernels`` package that diffusers and bitsandbytes probe for.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _BENCH_DIR]

# name -> (batch, latent shape)
GPU_CASES = {
    "sd35": (24, (16, 64, 64)),      # SD3.5-M 512 px rollout group
    "flux": (12, (16, 128, 128)),    # FLUX 1024 px latents
    "large": (256, (16, 128, 128)),  # 268 MB per float32 tensor: far past L2 (50 MB on H100)
}
CPU_CASES = {"tiny": (4, (4, 16, 16)), "small": (8, (16, 32, 32))}
CFG_SCALE, NOISE_LEVEL, GUARD = 4.5, 0.7, 0.96

# Bytes per latent element moved by each op (fp32 latents / noise / outputs, bf16 velocity halves).
BYTES = {
    "rollout": 4 + 2 + 2 + 4 + 4,            # x, u, c, noise -> next
    "rollout_philox": 4 + 2 + 2 + 4,         # x, u, c -> next
    "train_fwd": 4 + 4 + 2 + 2 + 2 + 2,      # x, next, u, c, ref u, ref c
    "train_fwd_bwd": 2 * 16 + 2 + 2,         # forward reads, backward reads again + du, dc
}


def make_inputs(batch, shape, device):
    g = torch.Generator(device=device).manual_seed(0)
    full = (batch, *shape)

    def rnd(dtype=torch.float32):
        return torch.randn(full, generator=g, device=device, dtype=torch.float32).to(dtype)

    return {
        "x": rnd(), "y": rnd(), "noise": rnd(),
        "u": rnd(torch.bfloat16), "c": rnd(torch.bfloat16),
        "ru": rnd(torch.bfloat16), "rc": rnd(torch.bfloat16),
        # trainable copies of the policy halves (the rollout ops use u, c without autograd)
        "ug": rnd(torch.bfloat16).requires_grad_(), "cg": rnd(torch.bfloat16).requires_grad_(),
        "s": torch.full((batch,), 0.8, device=device), "sn": torch.full((batch,), 0.7, device=device),
        "old": torch.full((batch,), -1.0, device=device),
        "adv": torch.randn(batch, generator=g, device=device),
    }


def reference_fns(t):
    """op -> callable with the eager reference, each returning what a caller would keep."""
    @torch.no_grad()
    def rollout(noise=True):
        out = sde.sde_step(t["x"], GuidedVelocity(t["u"], t["c"], CFG_SCALE), t["s"], t["sn"],
                           noise_level=NOISE_LEVEL, noise=t["noise"] if noise else None,
                           sigma_guard=GUARD)
        return out.prev_sample, out.log_prob

    def train(backward):
        u, c = t["ug"], t["cg"]
        loss, _ = grpo.grpo_step_loss(t["x"], t["y"], GuidedVelocity(u, c, CFG_SCALE), t["s"],
                                      t["sn"], t["old"], t["adv"], noise_level=NOISE_LEVEL,
                                      clip_range=1e-4, beta=0.04, sigma_guard=GUARD,
                                      velocity_ref=GuidedVelocity(t["ru"], t["rc"], CFG_SCALE))
        if backward:
            loss.backward()
            u.grad = c.grad = None
        return loss

    return {"rollout": lambda: rollout(True), "rollout_philox": lambda: rollout(False),
            "train_fwd": lambda: train(False), "train_fwd_bwd": lambda: train(True)}


def fused_fns(t, kernels):
    seed = torch.tensor([7], dtype=torch.int64, device=t["x"].device)
    offset = torch.zeros(1, dtype=torch.int64, device=t["x"].device)

    @torch.no_grad()
    def rollout(philox):
        kw = dict(seed=seed, offset=offset) if philox else dict(noise=t["noise"])
        out = kernels.sde_step(t["x"], GuidedVelocity(t["u"], t["c"], CFG_SCALE), t["s"], t["sn"],
                               noise_level=NOISE_LEVEL, sigma_guard=GUARD, need_mean=False, **kw)
        return out.prev_sample, out.log_prob

    def train(backward):
        u, c = t["ug"], t["cg"]
        loss, _ = kernels.grpo_step_loss(t["x"], t["y"], GuidedVelocity(u, c, CFG_SCALE), t["s"],
                                         t["sn"], t["old"], t["adv"], noise_level=NOISE_LEVEL,
                                         clip_range=1e-4, beta=0.04, sigma_guard=GUARD,
                                         velocity_ref=GuidedVelocity(t["ru"], t["rc"], CFG_SCALE))
        if backward:
            loss.backward()
            u.grad = c.grad = None
        return loss

    return {"rollout": lambda: rollout(False), "rollout_philox": lambda: rollout(True),
            "train_fwd": lambda: train(False), "train_fwd_bwd": lambda: train(True)}


def compiled_fns(t):
    """torch.compile of the reference, per op (compiled lazily at the first call)."""
    return {op: torch.compile(fn, dynamic=False) for op, fn in reference_fns(t).items()}


def main(argv=None) -> int:
    p = common.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_arguments(p)
    p.add_argument("--cases", nargs="*", help="case names (default: all for the device)")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    args = p.parse_args(argv)
    device = common.check_common_arguments(p, args)
    gpu = device.type == "cuda"
    cases = GPU_CASES if gpu else CPU_CASES
    unknown = set(args.cases or []) - set(cases)
    if unknown:
        p.error(f"unknown case(s) {sorted(unknown)} for {device.type}; have {sorted(cases)}")
    if args.reps is not None and args.reps < 1:
        p.error(f"--reps must be >= 1, got {args.reps}")
    names = args.cases or list(cases)
    reps = args.reps or (20 if gpu else 3)
    budget = common.TimeBudget(args.time_budget)
    info = header(device)
    writer = common.RowWriter("kernels", info)
    if budget.banner():
        print(budget.banner())
    if gpu:
        from fastflow import kernels
        copy_bw = copy_bandwidth_gbps(device, 1 << 30)
        print(f"# measured copy bandwidth: {copy_bw:.0f} GB/s")
    else:
        kernels, copy_bw = None, None
        print("# no CUDA device: timing the eager PyTorch reference only, on small sizes "
              "(the Triton kernels and torch.compile are GPU measurements)")
    flush = (256 << 20) if gpu else 0

    def fmt(v, spec):
        return format(v, spec) if v is not None else "-"

    print(f"{'op':<15} {'case':<6} {'impl':<8} {'ms':>9} {'GB/s':>8} {'%copy':>6} {'x eager':>8} {'x compile':>9}")
    for name in names:
        batch, shape = cases[name]
        numel = batch * math.prod(shape)
        t = impls = None  # inputs are made when the first op of the case starts
        for op in BYTES:
            if not budget.allows(f"{name}/{op}"):
                continue
            if t is None:
                t = make_inputs(batch, shape, device)
                impls = {"eager": reference_fns(t)}
                if gpu and not args.no_compile:
                    impls["compile"] = compiled_fns(t)
                if gpu:
                    impls["triton"] = fused_fns(t, kernels)
            ms = {}
            for impl, fns in impls.items():
                try:
                    ms[impl] = time_ms(fns[op], device, warmup=3 if gpu else 1, reps=reps,
                                       flush_bytes=flush)
                except Exception as e:  # keep the other rows when one impl fails (e.g. compile)
                    print(f"# {op} {name} {impl}: failed: {type(e).__name__}: {str(e).splitlines()[0]}")
            for impl, m in ms.items():
                gbps = BYTES[op] * numel / (m * 1e-3) / 1e9
                row = {"op": op, "case": name, "impl": impl, "batch": batch, "shape": list(shape),
                       "ms": m, "gbps": gbps,
                       "frac_copy_bw": gbps / copy_bw if copy_bw else None,
                       "speedup_vs_eager": ms["eager"] / m if "eager" in ms else None,
                       "speedup_vs_compile": ms["compile"] / m if "compile" in ms else None}
                writer.write(row)
                print(f"{op:<15} {name:<6} {impl:<8} {m:9.3f} {gbps:8.1f} "
                      f"{fmt(row['frac_copy_bw'] and 100 * row['frac_copy_bw'], '6.1f')} "
                      f"{fmt(row['speedup_vs_eager'], '8.2f')} {fmt(row['speedup_vs_compile'], '9.2f')}")
            budget.done()
        del t, impls
    if budget.report():
        print(budget.report())
    print(writer.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
