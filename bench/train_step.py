"""One Flow-GRPO training step on SD3.5-Medium's and FLUX.1-dev's transformers (real configs,
random weights): LoRA (peft, the paper's targets and rank) and full fine-tuning, with the fused
kernels (FASTFLOW_KERNELS=triton) against the PyTorch reference ops (FASTFLOW_KERNELS=torch).

    python bench/train_step.py                             # both models, lora + full, both kernels
    python bench/train_step.py --models sd3.5-medium --finetune lora --batch-size 8 --grad-ckpt
    python bench/train_step.py --device cpu                # tiny configs: proves it runs

A step is what fastflow.train does per optimizer step with gradient accumulation 1: for each
trained timestep of the rollout batch (floor(T * 0.99): 9 of 10 for SD3.5, 5 of 6 for FLUX) the
policy velocity (with CFG for SD3.5), the reference velocity under no_grad (KL on, beta 0.04),
fastflow.ops.grpo_step_loss and its backward; then gradient clipping at 1.0 and AdamW. The
rollout that feeds it is sampled once, untimed.

The rollout, the policy recompute and the reference forward all run under the trainer's forward
context, fastflow.runtime.ForwardContext(device, bf16, attention="auto"), as fastflow.train does;
``onpolicy_ratio_dev`` is max |ratio - 1| over the trained timesteps of the first (untimed) step,
before any update: the recompute reproducing the rollout's log-probs (kernel rounding only).

Printed per (model, finetune, kernels): seconds per step, MFU against the measured bf16 matmul rate
(FLOPs: bench/models.py train_step_flops), peak GPU memory. Each row is appended to
<out>/train_step-<device>.jsonl, with the machine header, as soon as it is measured. Out-of-memory
becomes a row with an error (full fine-tuning of FLUX's 12B weights does not fit one 80 GB GPU).
``--time-budget SECONDS`` starts no (model, finetune, kernels) that would end past the budget and
lists what it skipped.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from types import SimpleNamespace

_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _BENCH_DIR)

import torch  # noqa: E402

import common  # noqa: E402
from models import (ARCHS, TINY, bench_policy, build_transformer,  # noqa: E402
                    peak_memory_gib, random_cond, reset_peak_memory, start_run, train_step_flops)

from fastflow import ops  # noqa: E402
from fastflow.rollout import recompute_step, sample  # noqa: E402
from fastflow.runtime import ForwardContext  # noqa: E402

# bench/ leaves sys.path once common and models are imported: its kernels.py would otherwise
# shadow the ``kernels`` package that diffusers and bitsandbytes probe for.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _BENCH_DIR]

TIMESTEP_FRACTION = 0.99
BETA = 0.04
CLIP_RANGE = 1e-4


@contextlib.contextmanager
def kernels_env(choice: str):
    """FASTFLOW_KERNELS=choice within the block (fastflow.ops reads it at every call)."""
    prev = os.environ.get("FASTFLOW_KERNELS")
    os.environ["FASTFLOW_KERNELS"] = choice
    try:
        yield
    finally:
        if prev is None:
            os.environ.pop("FASTFLOW_KERNELS", None)
        else:
            os.environ["FASTFLOW_KERNELS"] = prev


def make_step(policy, arch, traj, advantages, optimizer, params, *, trained: int, forward):
    """The closure timing one optimizer step; returns the last loss. ``step(ratios)`` also appends
    each trained timestep's max |ratio - 1| (a device tensor, no sync) to the list ``ratios``."""

    def step(ratios=None):
        loss = None
        for j in range(trained):
            v = recompute_step(policy, traj, j, guidance_scale=arch.guidance, autocast=forward)
            with torch.no_grad():
                v_ref = recompute_step(policy, traj, j, guidance_scale=arch.guidance, autocast=forward,
                                       reference=True)
            loss, stats = ops.grpo_step_loss(
                traj.latents[:, j], traj.next_latents[:, j], v, traj.sigmas[j], traj.sigmas_next[j],
                traj.log_probs[:, j], advantages, noise_level=arch.noise_level,
                clip_range=CLIP_RANGE, beta=BETA, velocity_ref=v_ref, sigma_guard=traj.sigma_guard)
            if ratios is not None:
                ratios.append(torch.maximum((stats["ratio_max"] - 1).abs(), (stats["ratio_min"] - 1).abs()))
            (loss / trained).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def build_case(arch, finetune, args, device, dtype):
    """The policy, a sampled rollout batch, the optimizer and the step closure of one case."""
    transformer = build_transformer(arch, device, dtype)
    if args.grad_ckpt:
        transformer.enable_gradient_checkpointing()
    policy = bench_policy(arch, transformer, device=device, dtype=dtype, finetune=finetune)
    params = list(policy.named_trainable_parameters().values())
    trained = max(1, math.floor(arch.steps * TIMESTEP_FRACTION))
    forward = ForwardContext(device, dtype, "auto")  # fastflow.train's one context for every forward
    cond = random_cond(arch, args.batch_size, device, dtype)
    traj = sample(policy, cond, num_steps=arch.steps, guidance_scale=arch.guidance,
                  noise_level=arch.noise_level, seeds=torch.arange(args.batch_size), device=device,
                  autocast=forward)
    advantages = torch.randn(args.batch_size, device=device).clamp(-5, 5)
    lr = 3e-4 if finetune == "lora" else 1e-5
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8,
                                  **fused)
    step = make_step(policy, arch, traj, advantages, optimizer, params, trained=trained,
                     forward=forward)
    return SimpleNamespace(policy=policy, optimizer=optimizer, step=step, trained=trained,
                           attention=forward.attention,
                           flops=train_step_flops(arch, args.batch_size, trained, finetune, kl=True))


def run_case(arch, finetune, args, device, dtype, peak_tflops, writer, budget):
    """Both kernel paths for one (architecture, finetune), each row written as it is measured; the
    case is built when its first kernel path starts (not at all when the budget skips both)."""
    base = dict(model=arch.name, finetune=finetune, batch=args.batch_size, dtype=str(dtype),
                tiny=args.tiny, grad_ckpt=args.grad_ckpt, cfg=arch.cfg, beta=BETA,
                matmul_tflops=peak_tflops)
    case = None
    build_failed = False
    first = True  # no optimizer step yet: the first measured step is on-policy
    for choice in args.kernels:
        if not budget.allows(f"{arch.name} {finetune} {choice}"):
            continue
        if build_failed:
            writer.write(dict(base, kernels=choice, error="out of memory"))
            budget.done()
            continue
        if case is None:
            try:
                case = build_case(arch, finetune, args, device, dtype)
            except torch.cuda.OutOfMemoryError:
                build_failed = True
                print(f"{arch.name:14s} {finetune:5s} out of memory while building")
                writer.write(dict(base, kernels=choice, error="out of memory"))
                budget.done()
                continue
            budget.setup_done()
        writer.write(measure(case, base, choice, args, device, peak_tflops, on_policy=first))
        first = False
        budget.done()
    del case


def measure(case, base, choice, args, device, peak_tflops, *, on_policy: bool) -> dict:
    """Warm-up and timed steps with FASTFLOW_KERNELS=choice; the row."""
    row = dict(base, kernels=choice, trained_steps=case.trained, flops_per_step=case.flops,
               attention=case.attention, onpolicy_ratio_dev=None)
    ratios = [] if on_policy and args.warmup > 0 else None
    try:
        with kernels_env(choice):
            for i in range(args.warmup):
                case.step(ratios if i == 0 else None)
            common.sync(device)
            reset_peak_memory(device)
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                loss = case.step()
                common.sync(device)
                times.append(time.perf_counter() - t0)
    except torch.cuda.OutOfMemoryError:
        case.optimizer.zero_grad(set_to_none=True)
        row["error"] = "out of memory"
        print(f"{row['model']:14s} {row['finetune']:5s} {choice:6s} out of memory")
        return row
    sec = sorted(times)[len(times) // 2]
    if ratios:
        row["onpolicy_ratio_dev"] = float(torch.stack(ratios).max())
    row.update(seconds_per_step=sec, mfu=case.flops / sec / (peak_tflops * 1e12),
               peak_mem_gib=peak_memory_gib(device), loss_finite=bool(torch.isfinite(loss)))
    mem = f"{row['peak_mem_gib']:.1f} GiB" if row["peak_mem_gib"] is not None else "-"
    dev = f"  on-policy |ratio-1| {row['onpolicy_ratio_dev']:.1e}" if ratios else ""
    print(f"{row['model']:14s} {row['finetune']:5s} {choice:6s} {sec * 1e3:9.1f} ms/step  "
          f"MFU {100 * row['mfu']:5.1f}%  peak {mem}{dev}")
    return row


def main(argv=None) -> int:
    ap = common.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(ap)
    ap.add_argument("--models", default="sd3.5-medium,flux.1-dev",
                    help="comma list of sd3.5-medium, flux.1-dev")
    ap.add_argument("--finetune", default="lora,full", help="comma list of lora, full")
    ap.add_argument("--kernels", default=None, help="comma list of triton, torch "
                    "(default both on CUDA; torch on a CPU, where triton would be the interpreter)")
    ap.add_argument("--batch-size", type=int, default=0, help="rollout samples per step (default 8; tiny 2)")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in the transformer")
    ap.add_argument("--tiny", action="store_true", help="tiny configs (forced on a CPU)")
    ap.add_argument("--repeats", type=int, default=0, help="timed steps (default 3; tiny 1)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    args = ap.parse_args(argv)

    device = common.check_common_arguments(ap, args)
    args.tiny = args.tiny or device.type != "cuda"
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in names:
        if m not in TINY:
            ap.error(f"--models: unknown model {m!r}; known: {', '.join(TINY)}")
    finetunes = [f.strip() for f in args.finetune.split(",") if f.strip()]
    for f in finetunes:
        if f not in ("lora", "full"):
            ap.error(f"--finetune: unknown mode {f!r}; known: lora, full")
    default_kernels = "triton,torch" if device.type == "cuda" else "torch"
    args.kernels = [k.strip() for k in (args.kernels or default_kernels).split(",") if k.strip()]
    for k in args.kernels:
        if k not in ("triton", "torch"):
            ap.error(f"--kernels: unknown path {k!r}; known: triton, torch")
    for name in ("batch_size", "repeats", "warmup"):
        if getattr(args, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    args.batch_size = args.batch_size or (2 if args.tiny else 8)
    args.repeats = args.repeats or (1 if args.tiny else 3)
    budget = common.TimeBudget(args.time_budget)
    info, dtype, peak = start_run(device, args.out)
    writer = common.RowWriter("train_step", info)
    if budget.banner():
        print(budget.banner())
    for name in names:
        arch = ARCHS[TINY[name]] if args.tiny else ARCHS[name]
        for finetune in finetunes:
            run_case(arch, finetune, args, device, dtype, peak, writer, budget)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if budget.report():
        print(budget.report())
    print(writer.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
