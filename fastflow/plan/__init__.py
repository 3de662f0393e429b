"""Per-rank memory plan of a run, made before anything loads: ``python -m fastflow.train CONFIG
--plan [--plan-gpus N] [--plan-gpu-memory 80GiB]``, and the check the trainer runs at start-up on
CUDA (docs/memory.md).

What a rank holds, from the model's own configuration (never from its weights), in three kinds:

- **exact**: weights, gradients, optimizer state, EMA, FSDP2 shards, rollout storage, built on the
  meta device by the policies' own set-up code (layout.py) and sized by tensors.py;
- **measured**: activations, from CPU profiler measurements of scaled copies of the architecture
  fitted per block kind (scaled.py, fit.py, measure.py, activations.py), kept in cache.py;
- **estimate**: the CUDA context, the FSDP2 gather schedule, reward model forwards.

The modules, one job each:

    arch.py         architectures: local configs, the shipped published ones, meta-device builds
    tensors.py      exact byte arithmetic: TensorSpec, FSDP2 chunks, optimizer states, sizes
    layout.py       what a rank's policy and reward models hold, tensor by tensor
    profiler.py     CPU peak / phase / saved-for-backward counters
    scaled.py       scaled copies of a transformer and their inputs
    fit.py          the transformer's fitted activation model
    measure.py      VAE decode, small networks, SDE step: measured as they are
    cache.py        measurements kept in memory, on disk and shipped (published/measured)
    activations.py  the activation parts of a plan from those models
    assemble.py     one plan: every part, the phases, the peak
    advice.py       re-plans with each setting that lowers the peak
    report.py       the plan as data and as text; the start-up refusal
    cli.py          --plan and the start-up check
    refresh.py      re-measures the shipped measurements (python -m fastflow.plan.refresh)
"""

from __future__ import annotations

from fastflow.plan.arch import Arch, PlanError, resolve_arch, shipped_archs
from fastflow.plan.assemble import plan_once
from fastflow.plan.cli import offline_copy, plan_command, startup_check
from fastflow.plan.layout import Layout, build_layout
from fastflow.plan.profiler import SavedTensors, peak_bytes
from fastflow.plan.report import Advice, Part, Plan
from fastflow.plan.tensors import (GiB, MiB, TensorSpec, adamw8bit_state_bytes, adamw_state_bytes, fmt,
                                   local_numel, padded_numel, parse_size)

__all__ = ["Advice", "Arch", "GiB", "Layout", "MiB", "Part", "Plan", "PlanError", "SavedTensors", "TensorSpec",
           "adamw8bit_state_bytes", "adamw_state_bytes", "build_layout", "fmt", "local_numel", "make_plan",
           "offline_copy", "padded_numel", "parse_size", "peak_bytes", "plan_command", "resolve_arch",
           "shipped_archs", "startup_check"]


def make_plan(cfg, world: int = 1, *, gpu_memory: int | None = None, gpu_label: str = "",
              device: str = "cuda", advice: bool = True, eval_pairs: int | None = None,
              rank: int = 0) -> Plan:
    """The per-rank memory plan of ``cfg`` at ``world`` ranks. ``device`` "cuda" plans a GPU run
    (allocator rounding, CUDA graphs, the context); "cpu" counts what the trainer allocates on a
    CPU (what the tests compare with real allocations). ``advice``: when it does not fit
    ``gpu_memory``, re-plan with the settings that lower it. ``rank``: whose shards (rank 0, the
    default, holds the largest). Raises ConfigError / PlanError (one line) on what it cannot plan."""
    from fastflow.config import validate

    def once(c, w, r=rank):
        return plan_once(c, validate(c, w), w, device, gpu_memory, gpu_label, eval_pairs, r)

    plan = once(cfg, world)
    if advice and not plan.fits:
        from fastflow.plan.advice import advise

        plan.advice, plan.combined = advise(cfg, world, device, gpu_memory, plan, eval_pairs,
                                            lambda c, w: once(c, w, 0))
    return plan
