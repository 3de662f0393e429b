"""The plan's two entry points in the trainer: ``--plan`` (print the plan and exit: 0 fits, 1 does
not, 2 bad input in one line) and the start-up check of a CUDA run (refuse, before anything
loads, a run that cannot fit, with advice in a few lines).

Both plan offline: prompt files that are not here (a prompt set not fetched yet) are left out,
since they only size the evaluation batch.
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from pathlib import Path

import torch

from fastflow.plan.arch import PlanError
from fastflow.plan.tensors import GiB, parse_size

log = logging.getLogger("fastflow.plan")


def eval_pairs(cfg) -> int | None:
    """Evaluation (prompt, seed) pairs when the prompt list can be read (fastflow.evaluate): with
    fewer pairs than eval.batch_size per rank, the evaluation batch is smaller."""
    from fastflow.data import load_prompts
    from fastflow.evaluate import seeds_per_prompt

    path = cfg.data.eval_prompts
    try:
        if path:
            prompts = load_prompts(path)  # (a SET:FILE name resolves to the fetched prompt set)
        elif cfg.model.kind == "shapes":
            from fastflow.shapes.policy import default_prompts
            prompts = default_prompts("eval")
        else:
            return None
    except (OSError, ValueError):
        return None
    if cfg.eval.max_prompts:
        prompts = prompts[: cfg.eval.max_prompts]
    cats = [str(p.metadata.get("category") or p.metadata.get("tag") or "all") for p in prompts]
    return sum(seeds_per_prompt(cats, cfg.eval.seeds, cfg.eval.min_category_images))


def offline_copy(cfg):
    """``cfg`` with the prompt files that are not here left out, and what was left out. A
    ``SET:FILE`` name (fastflow.prompt_sets) counts as here once it is fetched and matches its pin."""
    from fastflow import prompt_sets

    c = copy.deepcopy(cfg)
    missing = []
    for key in ("train_prompts", "eval_prompts"):
        p = getattr(c.data, key)
        try:
            here = bool(p) and Path(prompt_sets.resolve(p)).is_file()
        except (ValueError, OSError):  # not fetched (FileNotFoundError), unknown set, bad checksum
            here = False
        if p and not here:
            setattr(c.data, key, "")
            missing.append(f"data.{key} {p}")
    return c, missing


def gpu_memory(text: str | None) -> tuple[int, str]:
    """The memory to plan against: ``--plan-gpu-memory``, else this machine's GPU, else 80 GiB."""
    if text:
        return parse_size(text), f"GPU {text}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return int(props.total_memory), props.name
    return 80 * GiB, "80 GiB assumed: --plan-gpu-memory SIZE"


def plan_command(args, gpus: int | None, gpu_mem: str | None) -> int:
    """``--plan``: print the plan; exit 0 when it fits, 1 when it does not, 2 on bad input."""
    from fastflow.config import ConfigError
    from fastflow.plan import make_plan

    world = gpus or int(os.environ.get("WORLD_SIZE", "1") or 1)
    try:
        mem, label = gpu_memory(gpu_mem)
        cfg, missing = offline_copy(args.config)
        plan = make_plan(cfg, world, gpu_memory=mem, gpu_label=label, device="cuda", eval_pairs=eval_pairs(cfg))
    except (ConfigError, PlanError, ValueError, FileNotFoundError) as e:
        msg = " ".join(str(e).split())
        print(f"fastflow: {msg if msg.startswith(('config:', 'plan:')) else 'plan: ' + msg}", file=sys.stderr)
        return 2
    if missing:
        plan.notes.append("not read (missing here): " + ", ".join(missing) + "; the evaluation batch is "
                          "taken as eval.batch_size")
    print(plan.render())
    return 0 if plan.fits else 1


def startup_check(cfg, world: int, local_rank: int = 0) -> str | None:
    """The trainer's check before anything loads, on CUDA runs only (a CPU run's memory is the
    host's): the refusal text when the run cannot fit this GPU, else None. Every rank plans the
    same config against its own GPU, so identical GPUs give every rank the same decision. A model
    the plan cannot describe is let through (logged): the plan is advice, not a gate on models."""
    from fastflow.config import ConfigError
    from fastflow.distributed import pick_device
    from fastflow.plan import make_plan

    if pick_device(cfg.run.device).type != "cuda":
        return None
    props = torch.cuda.get_device_properties(local_rank)
    try:
        c, _ = offline_copy(cfg)
        plan = make_plan(c, world, gpu_memory=int(props.total_memory), gpu_label=props.name,
                         device="cuda", eval_pairs=eval_pairs(c))
    except (PlanError, ImportError) as e:
        log.info("memory plan skipped: %s", e)
        return None
    except ConfigError:
        raise
    if plan.fits:
        log.info("memory plan: %s", plan.verdict())
        return None
    return plan.refusal()
