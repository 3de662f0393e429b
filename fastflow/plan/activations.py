"""The activation parts of a plan: the largest training forward + backward (with and without
activation checkpointing), the no-grad rollout and evaluation forwards, and the autocast weight
copies a forward holds, assembled from the measured models (fit.py, measure.py) at the run's
batch, token counts, dtypes and LoRA rank.

How the pieces add up follows the trainer's order of events (fastflow.train.Trainer.train_on and
fastflow.rollout): what the forward saved waits for the backward while the KL reference's forward
runs; an eager autocast forward keeps its weight casts to its end; a captured CUDA graph casts one
weight at a time.
"""

from __future__ import annotations

import math

import torch

from fastflow.plan.fit import transformer_activations, transient_at, transients, wgrad_tmp
from fastflow.plan.layout import Layout
from fastflow.plan.measure import small_policy_activations, step_overhead
from fastflow.plan.tensors import round_up


def _block_cast_bytes(specs, dtype, rnd: int) -> dict[int, int]:
    """Bytes of the weight casts of each FSDP group (block) among ``specs``."""
    out: dict[int, int] = {}
    for x in specs:
        if x.group >= 0:
            out[x.group] = out.get(x.group, 0) + round_up(x.numel * dtype.itemsize, rnd)
    return out


def _cast_specs(model, layout: Layout) -> list:
    """The real model's parameters whose autocast copies a forward saves: the fit's names (per
    block kind, relative to the block) mapped onto each real block."""
    arch = layout.arch
    names = {x.name: x for x in layout.trained}
    variants = model.block_variants
    if arch.family in ("sd3", "qwenimage"):
        prefix = ["transformer_blocks"] * len(variants)
    else:
        n_double = variants.count("double")
        prefix = ["transformer_blocks"] * n_double + ["single_transformer_blocks"] * (len(variants) - n_double)
    out, index = [], {}
    for i, v in enumerate(model.block_keys()):
        pre = prefix[i]
        j = index.get(pre, 0)
        index[pre] = j + 1
        for n in model.casts.get(v, []):
            spec = names.get(f"transformer.{pre}.{j}.{n}")
            if spec is not None:
                out.append(spec)
    for n in model.casts.get("outside", []):
        spec = names.get(f"transformer.{n}")
        if spec is not None:
            out.append(spec)
    return out


def activations(cfg, layout: Layout, dtype, shard: bool, full: bool, train_b: tuple[int, int],
                roll_b: tuple[int, int], eval_b: tuple[int, int], graphs: bool, rnd: int) -> dict:
    """Activation bytes of the largest forward/backward and of the no-grad forwards; each batch is
    (samples, 2 when CFG doubles the forward else 1). Keys: train, train_ckpt, rollout, eval,
    rollout_core / eval_core (the transformer forward alone: what a CUDA graph's pool keeps),
    casts, residual (the saved-bytes fit's)."""
    m = cfg.model
    lat = math.prod(layout.latent_shape)
    over = step_overhead()
    beta = cfg.train.beta > 0
    b_train, b_roll, b_eval = (n * x for n, x in (train_b, roll_b, eval_b))
    loss = over["loss"] * lat * train_b[0]  # the per-step loss and its backward, in float32

    def step(b):  # the SDE step after a rollout forward (the forward's transients are gone by then)
        return over["step"] * lat * b[0] + b[0] * b[1] * lat * 4

    if layout.kind in ("shapes", "toy"):
        a = small_policy_activations(layout.kind, cfg)
        sv, bw, inf = (lambda B, k=k: a[k][0] * B + a[k][1] for k in ("saved", "backward", "inference"))
        train = sv(b_train) + max(bw(b_train), 0) + loss
        return {"train": int(train), "train_ckpt": int(train), "rollout": int(max(inf(b_roll), step(roll_b))),
                "eval": int(max(inf(b_eval), step(eval_b))), "rollout_core": int(inf(b_roll)),
                "eval_core": int(inf(b_eval)), "casts": 0, "residual": 0.0}
    arch = layout.arch
    lora = m.finetune == "lora"
    # trained weights as they compute: float32 master weights (one process / DDP), the compute
    # dtype under FSDP2 (gathered by the mixed-precision policy)
    tdt = dtype if shard else torch.float32
    model = transformer_activations(arch.family, arch.transformer, lora=lora, targets=layout.targets,
                                    dtype=dtype, trainable_dtype=tdt)
    ni, nt, r = layout.image_tokens, layout.text_tokens, m.lora_rank
    cast_specs = _cast_specs(model, layout)
    casts = sum(round_up(x.numel * dtype.itemsize, rnd) for x in cast_specs) if dtype != torch.float32 else 0
    wgrad = wgrad_tmp([(x.name, x.numel) for x in layout.trainable if x.grad], {x.name for x in cast_specs},
                      dtype) if full else 0
    itemsize = dtype.itemsize
    tr = transients(arch.family, arch.transformer, lora=lora, targets=layout.targets, dtype=dtype,
                    trainable_dtype=tdt, rank=r, ni=ni, nt=nt)
    saved = model.saved(b_train, ni, nt, r)

    cond_per = sum(math.prod(shape) * dt.itemsize for shape, dt in layout.cond_shapes.values())

    def inputs(b):  # the policy's inputs (latents cast, CFG copies, prompt embeddings) live through a forward
        B = b[0] * b[1]
        return (B + b[0]) * lat * itemsize + B * cond_per

    # the KL reference's forward, its own inputs with it
    t_ref = transient_at(tr["inference"], b_train) + inputs(train_b) if beta else 0
    # after the forward, everything saved (inputs a layer keeps included) waits for the backward;
    # then the reference forward, then the backward itself
    train = saved + casts + max(t_ref, transient_at(tr["backward"], b_train)) + wgrad + loss
    # checkpointed: the blocks' inputs stay; the forward's tail holds the cached weight casts,
    # the backward recomputes one block at a time (with that block's casts)
    held = model.held_with_checkpointing(b_train, ni, nt, r)
    block_casts = max(_block_cast_bytes(cast_specs, dtype, rnd).values(), default=0) if casts else 0
    train_ckpt = held + max(transient_at(tr["ckpt_forward"], b_train) + casts, t_ref,
                            transient_at(tr["ckpt_backward"], b_train) + block_casts) + wgrad + loss

    def nograd(b):
        core = transient_at(tr["inference"], b[0] * b[1])
        return core, max(core + inputs(b), step(b))
    roll_core, roll = nograd(roll_b)
    eval_core, ev = nograd(eval_b)
    # an eager forward under autocast keeps its casts of the float32 weights until it ends (a
    # captured graph casts with the cache off, one weight at a time)
    eager_casts = casts if not graphs else 0
    return {"train": int(train), "train_ckpt": int(train_ckpt), "rollout": int(roll + eager_casts),
            "eval": int(ev + eager_casts), "rollout_core": int(roll_core),
            "eval_core": int(eval_core), "casts": int(casts), "residual": model.fit_residual}

