"""Rollout throughput: fastflow's sampler (graph-captured on CUDA) against a pure-PyTorch eager
reference that follows the authors' sampler, on SD3.5-Medium's and FLUX.1-dev's transformers
(real configs, random weights).

    python bench/sampler_throughput.py                         # both models, batch 8/16/24, bf16
    python bench/sampler_throughput.py --models sd3.5-medium --batch-sizes 24 --mode compile
    python bench/sampler_throughput.py --device cpu            # tiny configs: proves it runs

SD3.5-M: 512 px (latents 16x64x64), 10 steps, CFG 4.5 (one forward over [uncond; cond]),
noise level 0.7. FLUX.1-dev: 512 px, 6 steps, guidance 3.5 through the guidance embedding, no
CFG, noise level 0.9. Both paths run the same LoRA-adapted transformer (rank and targets of the
paper) in bf16 under SDPA.

The reference ("authors"): per step a transformer forward on the bf16 latents, CFG combined in
bf16, then the SDE step and its log-prob in float32 in Python (FLOW_GRPO.md section 2), noise
from torch.randn. fastflow: fastflow.graphs.GraphedSampler (whole rollout captured as one CUDA
graphs, one per denoising step, fused SDE kernel, in-kernel Philox noise; ``--noise host`` draws
sample()'s per-sample noise instead) under the trainer's forward context,
fastflow.runtime.ForwardContext(device, bf16, attention="auto"): the kernels a training rollout
runs. The reference keeps the authors' defaults (bf16 weights and latents, default attention).

Printed per (model, batch, method): images/s, ms per denoising step, MFU against the measured
bf16 matmul rate (transformer FLOPs counted from the config, bench/models.py), peak GPU memory,
speedup over the reference, mean GPU utilisation and power (pynvml, when installed), and for
fastflow the step graphs captured for that batch (``captures``: one per denoising step, all during
the untimed warm-up; ``captures_timed`` counts any captured during the timed rollouts, which
should be none). Each row is appended to <out>/sampler_throughput-<device>.jsonl, with the
machine header, as soon as it is measured; ``--time-budget SECONDS`` starts no (model, batch,
method) that would end past the budget and lists what it skipped.
"""

from __future__ import annotations

import math
import os
import sys
import time

_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _BENCH_DIR)

import torch  # noqa: E402

import common  # noqa: E402
from models import (ARCHS, TINY, GpuMonitor, bench_policy, build_transformer,  # noqa: E402
                    peak_memory_gib, random_cond, reset_peak_memory,
                    rollout_flops, start_run)

from fastflow.graphs import GraphedSampler  # noqa: E402
from fastflow.runtime import ForwardContext  # noqa: E402

# bench/ leaves sys.path once common and models are imported: its kernels.py would otherwise
# shadow the ``kernels`` package that diffusers and bitsandbytes probe for.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _BENCH_DIR]

LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))


@torch.no_grad()
def reference_rollout(policy, arch, cond, x0: torch.Tensor, sigmas: torch.Tensor, *, steps: int,
                      guidance: float, noise_level: float, dtype: torch.dtype):
    """The authors' sampler, eagerly: returns (all latents [B, T+1, ...], log-probs [B, T])."""
    transformer = policy.transformer
    latents = x0.to(dtype)
    batch = latents.shape[0]
    known = arch.family in ("sd3", "flux")  # the authors' own forward; other models: the policy's
    if known:
        embeds, pooled = cond["prompt_embeds"], cond["pooled_prompt_embeds"]
        if arch.cfg:
            embeds = torch.cat([policy._neg_embeds.expand(batch, -1, -1), embeds])
            pooled = torch.cat([policy._neg_pooled.expand(batch, -1), pooled])
    all_latents, all_log_probs = [x0.float()], []
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        if not known:  # eager policy forward, CFG combined in the compute dtype, as the authors do
            out = policy.velocity(latents, sigma.expand(batch).to(latents.device), cond,
                                  guidance_scale=guidance)
            pred = out.combine(dtype) if hasattr(out, "combine") else out.to(dtype)
        elif arch.family == "sd3":
            inp = torch.cat([latents] * 2) if arch.cfg else latents
            t = (sigma * 1000).expand(inp.shape[0]).to(latents.device)
            pred = transformer(hidden_states=inp, timestep=t, encoder_hidden_states=embeds,
                               pooled_projections=pooled, return_dict=False)[0].to(dtype)
            if arch.cfg:
                uncond, text = pred.chunk(2)
                pred = uncond + guidance * (text - uncond)
        else:
            t = sigma.expand(batch).to(latents.device)
            g = torch.full((batch,), guidance, device=latents.device, dtype=torch.float32)
            txt_ids = torch.zeros(embeds.shape[1], 3, device=latents.device, dtype=dtype)
            pred = transformer(hidden_states=latents, timestep=t, guidance=g, pooled_projections=pooled,
                               encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=policy._img_ids,
                               return_dict=False)[0].to(dtype)
        # sde_step_with_logprob, float32
        x, v = latents.float(), pred.float()
        s, sn = sigma.to(x.device), sigma_next.to(x.device)
        dt = sn - s
        s_den = torch.where(s == 1, sigmas[1].to(x.device), s)
        std_t = torch.sqrt(s / (1 - s_den)) * noise_level
        mean = x * (1 + std_t**2 / (2 * s) * dt) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
        step_std = std_t * torch.sqrt(-dt)
        nxt = mean + step_std * torch.randn_like(x)
        lp = -((nxt.detach() - mean) ** 2) / (2 * step_std**2) - torch.log(step_std) - LOG_SQRT_2PI
        all_log_probs.append(lp.mean(dim=tuple(range(1, lp.ndim))))
        all_latents.append(nxt)
        latents = nxt.to(dtype)
    return torch.stack(all_latents, 1), torch.stack(all_log_probs, 1)


def timed(fn, device, repeats: int, warmup: int, on_warm=None):
    """(median seconds per call, GpuMonitor) of ``fn`` after ``warmup`` untimed calls;
    ``on_warm()`` runs between the warm-up and the timed calls."""
    for _ in range(warmup):
        fn()
    common.sync(device)
    if on_warm is not None:
        on_warm()
    times = []
    with GpuMonitor(device) as mon:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            common.sync(device)
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], mon


def run_model(arch, args, device, dtype, peak_tflops, writer, budget):
    """Every batch size and both methods for one architecture, each row written as it is measured;
    the model is built when its first (batch, method) starts, not at all when the budget skips them."""
    steps = args.steps or arch.steps
    forward = ForwardContext(device, dtype, "auto")  # what the trainer's rollout runs under
    built = None
    for batch in args.batch_sizes:
        ref_ips = None
        for method in ("reference", "fastflow"):
            if not budget.allows(f"{arch.name} b={batch} {method}"):
                continue
            if built is None:
                transformer = build_transformer(arch, device, dtype)
                policy = bench_policy(arch, transformer, device=device, dtype=dtype, finetune="lora")
                sigmas = policy.sigmas(steps).to(torch.float32)
                sampler = GraphedSampler(policy, mode=args.mode, noise=args.noise)
                built = (transformer, policy, sampler)
                budget.setup_done()
            row = measure(arch, args, device, dtype, peak_tflops, policy, sampler, sigmas, forward,
                          batch=batch, method=method, steps=steps, ref_ips=ref_ips)
            writer.write(row)
            budget.done()
            if method == "reference" and row.get("images_per_s"):
                ref_ips = row["images_per_s"]
    del built


def measure(arch, args, device, dtype, peak_tflops, policy, sampler, sigmas, forward, *, batch,
            method, steps, ref_ips):
    """One (batch, method): its row (an error row when it runs out of memory)."""
    cond = random_cond(arch, batch, device, dtype, seed=batch)
    x0 = torch.randn(batch, *arch.latent_shape, device=device)
    seeds = torch.arange(batch) if args.noise == "host" else None
    gen = torch.Generator(device=device).manual_seed(0)
    if method == "reference":
        def fn():
            return reference_rollout(policy, arch, cond, x0, sigmas, steps=steps,
                                     guidance=arch.guidance, noise_level=arch.noise_level, dtype=dtype)
    else:
        def fn():
            return sampler(cond, num_steps=steps, guidance_scale=arch.guidance,
                           noise_level=arch.noise_level, seeds=seeds,
                           generator=None if seeds is not None else gen, autocast=forward, device=device)
    flops = rollout_flops(arch, batch, steps)
    row = dict(model=arch.name, method=method, batch=batch, steps=steps, cfg=arch.cfg,
               guidance=arch.guidance, resolution=arch.resolution, dtype=str(dtype),
               tiny=args.tiny, flops_per_rollout=flops, matmul_tflops=peak_tflops)
    if method == "fastflow":
        row.update(noise=args.noise, mode=args.mode, attention=forward.attention)
    reset_peak_memory(device)
    before = sampler.captures
    warm = {}
    try:
        sec, mon = timed(fn, device, args.repeats, args.warmup,
                         on_warm=lambda: warm.setdefault("captures", sampler.captures))
    except torch.cuda.OutOfMemoryError:
        row["error"] = "out of memory"
        print(f"{arch.name:14s} b={batch:3d} {method:9s} out of memory")
        return row
    ips = batch / sec
    row.update(images_per_s=ips, ms_per_step=sec * 1e3 / steps, seconds_per_rollout=sec,
               mfu=flops / sec / (peak_tflops * 1e12), peak_mem_gib=peak_memory_gib(device),
               gpu_util=mon.util, power_w=mon.power_w)
    extra = ""
    if method == "fastflow":
        # Step graphs are captured per (batch shape, denoising step): the warm-up captures this
        # batch's `steps` graphs; a capture during the timed calls would be timed with them.
        row.update(path=sampler.last_path, fallback_reason=sampler.last_reason,
                   captures=sampler.captures - before,
                   captures_timed=sampler.captures - warm["captures"],
                   speedup=ips / ref_ips if ref_ips else None)
        speed = f"{row['speedup']:.2f}x" if row["speedup"] else "-"
        extra = f" speedup {speed} path={sampler.last_path} graphs={row['captures']}"
        if row["captures_timed"]:
            extra += f" ({row['captures_timed']} captured while timed)"
    mem = f"{row['peak_mem_gib']:.1f} GiB" if row["peak_mem_gib"] is not None else "-"
    util = f" util {mon.util:.0f}% {mon.power_w:.0f} W" if mon.util is not None else ""
    print(f"{arch.name:14s} b={batch:3d} {method:9s} {ips:8.2f} img/s {row['ms_per_step']:8.1f} "
          f"ms/step  MFU {100 * row['mfu']:5.1f}%  peak {mem}{util}{extra}")
    return row


def main(argv=None) -> int:
    ap = common.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(ap)
    ap.add_argument("--models", default="sd3.5-medium,flux.1-dev",
                    help="comma list of " + ", ".join(a for a in ARCHS if not a.startswith("tiny")))
    ap.add_argument("--batch-sizes", default=None, help="comma list (default 8,16,24; tiny: 2)")
    ap.add_argument("--steps", type=int, default=0, help="denoising steps (default: the model's)")
    ap.add_argument("--tiny", action="store_true", help="tiny configs (forced on a CPU)")
    ap.add_argument("--mode", default="graph", choices=["graph", "compile", "static", "eager"])
    ap.add_argument("--noise", default="philox", choices=["philox", "host"])
    ap.add_argument("--repeats", type=int, default=0, help="timed rollouts (default 5; tiny 2)")
    ap.add_argument("--warmup", type=int, default=0, help="untimed rollouts (default 2; tiny 1)")
    args = ap.parse_args(argv)

    device = common.check_common_arguments(ap, args)
    args.tiny = args.tiny or device.type != "cuda"
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in names:
        if m not in ARCHS or m.startswith("tiny"):
            ap.error(f"--models: unknown model {m!r}; known: sd3.5-medium, flux.1-dev")
    if args.batch_sizes:
        try:
            args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
        except ValueError:
            ap.error(f"--batch-sizes must be integers, got {args.batch_sizes!r}")
        if any(b < 1 for b in args.batch_sizes):
            ap.error(f"--batch-sizes must be >= 1, got {args.batch_sizes}")
    else:
        args.batch_sizes = [2] if args.tiny else [8, 16, 24]
    for name in ("steps", "repeats", "warmup"):
        if getattr(args, name) < 0:
            ap.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    args.repeats = args.repeats or (2 if args.tiny else 5)
    args.warmup = args.warmup or (1 if args.tiny else 2)
    if args.noise == "philox" and device.type != "cuda":
        args.noise = "host"  # in-kernel noise needs the fused kernels; the CPU runs eagerly
    budget = common.TimeBudget(args.time_budget)
    info, dtype, peak = start_run(device, args.out)
    writer = common.RowWriter("sampler_throughput", info)
    if budget.banner():
        print(budget.banner())
    for name in names:
        arch = ARCHS[TINY[name]] if args.tiny else ARCHS[name]
        run_model(arch, args, device, dtype, peak, writer, budget)
    if budget.report():
        print(budget.report())
    print(writer.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
