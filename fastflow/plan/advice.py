"""Advice for a run that does not fit: each setting that can lower a rank's peak is planned again
with exactly its overrides (so what the advice says it saves is what the plan of that command
line says), plus more GPUs; when no single setting fits, a greedy combination.
"""

from __future__ import annotations

import copy

from fastflow.plan.arch import DIFFUSERS_KINDS, PlanError
from fastflow.plan.report import Advice, Plan


def _candidates(cfg, world: int, device: str, base: Plan) -> list[tuple[str, list[str]]]:
    """Settings that may lower a rank's peak at the same number of GPUs: (label, overrides)."""
    from fastflow.config import ConfigError, apply_overrides, validate

    m, s, t, d = cfg.model, cfg.sample, cfg.train, cfg.distributed
    out: list[tuple[str, list[str]]] = []
    shardable = m.kind in (*DIFFUSERS_KINDS, "toy")
    if not d.activation_checkpointing and m.kind in DIFFUSERS_KINDS:
        out.append(("--distributed.activation_checkpointing true", ["--distributed.activation_checkpointing", "true"]))
    if t.optimizer == "adamw":
        out.append(("--train.optimizer adamw8bit", ["--train.optimizer", "adamw8bit"]))
    if m.kind in DIFFUSERS_KINDS and not m.offload_text_encoders:
        out.append(("--model.offload_text_encoders true", ["--model.offload_text_encoders", "true"]))
    if world > 1 and shardable and base.strategy != "fsdp":
        out.append(("--distributed.strategy fsdp", ["--distributed.strategy", "fsdp"]))
    if world > 1 and shardable and not d.cpu_offload:
        ov = ["--distributed.cpu_offload", "true"] + ([] if base.strategy == "fsdp" else ["--distributed.strategy", "fsdp"])
        out.append((" ".join(ov), ov))
    if device == "cuda" and s.cuda_graph != "off":
        out.append(("--sample.cuda_graph off", ["--sample.cuda_graph", "off"]))
    if cfg.reward.device == "" and any(k.startswith("reward") and k != "reward_fwd" and p.bytes
                                       for k, p in base.parts.items()):
        out.append(("--reward.device cpu", ["--reward.device", "cpu"]))

    def first_valid(sizes, make):  # the largest smaller batch the config accepts
        for b in sizes:
            ov = make(b)
            try:
                validate(apply_overrides(copy.deepcopy(cfg), ov), world)
            except ConfigError:
                continue
            return b, ov
        return None

    tb = validate(cfg, world).train_batch_size
    hit = first_valid(range(tb - 1, 0, -1), lambda b: ["--train.batch_size", str(b)])
    if hit:
        out.append((f"--train.batch_size {hit[0]}", hit[1]))
    # a smaller rollout batch; the training batch pinned where it followed the rollout batch
    hit = first_valid(range(s.batch_size - 1, 0, -1),
                      lambda b: ["--sample.batch_size", str(b)] + ([] if t.batch_size else ["--train.batch_size", str(tb)]))
    if hit:
        out.append((f"--sample.batch_size {hit[0]}", hit[1]))
    if cfg.eval.batch_size > 1:
        b = max(1, cfg.eval.batch_size // 2)
        out.append((f"--eval.batch_size {b}", ["--eval.batch_size", str(b)]))
    return out


def _more_gpus(cfg, world: int) -> list[int]:
    """Larger world sizes the batch splits over (up to 64 GPUs): each doubling's first valid size."""
    from fastflow.config import ConfigError, validate

    valid = []
    for w in range(world + 1, 65):
        try:
            validate(cfg, w)
        except ConfigError:
            continue
        valid.append(w)
    picked, last = [], world
    for w in valid:
        if w >= 2 * last:
            picked.append(w)
            last = w
    return picked


def advise(cfg, world: int, device: str, gpu_bytes: int | None, base: Plan, eval_pairs,
           replan_fn) -> tuple[list[Advice], Advice | None]:
    """Re-plan (``replan_fn(cfg, world)``: a plan without advice) with each setting that can lower
    the peak and keep those that do, best first (for more GPUs, the fewest that fit); when none
    fits alone, the fewest GPUs at which a greedy combination fits (or the best one found)."""
    from fastflow.config import ConfigError, apply_overrides

    def replan(c, w):
        try:
            return replan_fn(c, w)
        except (ConfigError, PlanError, ValueError):
            return None  # a combination the config refuses is no advice

    cands = _candidates(cfg, world, device, base)
    out: list[Advice] = []
    for label, ov in cands:
        p = replan(apply_overrides(copy.deepcopy(cfg), ov), world)
        if p is not None and p.peak < base.peak:
            out.append(Advice(label, p.peak, base.peak - p.peak, p.fits, list(ov), world))
    worlds = _more_gpus(cfg, world)
    best_w = None
    for w in worlds:
        p = replan(cfg, w)
        if p is None or p.peak >= base.peak:
            continue
        best_w = Advice(f"{w} GPUs (torchrun --nproc_per_node, or nodes)", p.peak, base.peak - p.peak, p.fits, [], w)
        if p.fits:
            break
    if best_w is not None:
        out.append(best_w)
    out.sort(key=lambda a: (not a.fits, a.peak))
    if not out or any(a.fits for a in out):
        return out, None
    useful = [(label, ov) for label, ov in cands if label in {a.setting for a in out}]
    best = None
    for w in [world] + worlds:
        c, chosen = copy.deepcopy(cfg), []
        remaining = list(useful)
        plan_w = replan(c, w)
        if plan_w is None:
            continue
        peak, fits = plan_w.peak, plan_w.fits
        while remaining and not fits:  # greedily add the setting that lowers the peak most
            step = None
            for label, ov in remaining:
                p = replan(apply_overrides(copy.deepcopy(c), ov), w)
                if p is not None and p.peak < peak and (step is None or p.peak < step[0]):
                    step = (p.peak, p.fits, label, ov)
            if step is None:
                break
            peak, fits, label, ov = step
            c = apply_overrides(c, ov)
            chosen.append((label, ov))
            remaining = [x for x in remaining if x[0] != label]
        labels = [x[0] for x in chosen] + ([f"{w} GPUs"] if w != world else [])
        cand = Advice(" + ".join(labels) or f"{w} GPUs", peak, base.peak - peak, fits,
                      [tok for x in chosen for tok in x[1]], w)
        if best is None or (cand.fits and not best.fits) or (cand.fits == best.fits and cand.peak < best.peak):
            best = cand
        if fits:
            break
    return out, best
