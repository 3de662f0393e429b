"""One plan, without advice: every part a rank holds (weights, gradients, optimizer state, EMA,
FSDP2 gathers, rollout storage, CUDA-graph buffers, activations, the CUDA context) and the
phases of an iteration that sum what is alive together (start-up, rollout, training,
evaluation, checkpoint). The peak phase is what must fit the GPU.

``device="cpu"`` counts what the trainer allocates on a CPU (no allocator rounding, no graphs,
no context): the form the tests compare with real allocations.
"""

from __future__ import annotations

import math

import torch

from fastflow.plan.activations import activations
from fastflow.plan.layout import Layout, build_layout, resolve_strategy, reward_models
from fastflow.plan.report import Part, Plan
from fastflow.plan.tensors import (MiB, adamw8bit_state_bytes, adamw_state_bytes, count, dtype_name, fmt,
                                   local_numel, padded_numel, round_up, sum_bytes)

CUDA_ROUND = 512      # the CUDA caching allocator hands out multiples of 512 bytes
CUDA_CONTEXT = 600 * MiB  # CUDA context + cuBLAS/cuDNN workspaces (estimate; not allocator memory)
DDP_BUCKET = 25 * MiB  # fastflow.parallel.sync_gradients_ bucket


def plan_once(cfg, derived, world: int, device: str, gpu_bytes, gpu_label, eval_pairs, rank: int = 0) -> Plan:
    """The plan of ``cfg`` (validated: ``derived``) at ``world`` ranks, for ``rank``'s shards."""
    from fastflow.runtime import parse_dtype

    m, s, t, dist = cfg.model, cfg.sample, cfg.train, cfg.distributed
    rnd = CUDA_ROUND if device == "cuda" else 1
    dtype = parse_dtype(m.dtype)
    # the layout depends on the strategy (FSDP2 keeps the network as loaded) and the strategy on
    # the layout (auto picks FSDP2 from the trainable share): decide unsharded, then rebuild
    # (an explicit FSDP2 run needs only the sharded one)
    explicit = world > 1 and cfg.distributed.strategy == "fsdp"
    layout = build_layout(cfg, shard=explicit)
    strategy = resolve_strategy(cfg, layout, world)
    shard = strategy == "fsdp"
    if shard and not explicit:
        layout = build_layout(cfg, shard=True)
    W = world if shard else 1
    offload = shard and dist.cpu_offload
    full = m.finetune == "full" or layout.kind == "toy"
    where = "host (cpu_offload)" if offload else ""
    parts: dict[str, Part] = {}

    def add(key, label, nbytes, how="exact", note=""):
        parts[key] = Part(key, label, int(nbytes), how, note)

    def shard_bytes(specs, dt=None):  # each tensor's padded FSDP2 shard (the whole tensor at W = 1)
        return sum(round_up(padded_numel(x, W) * (dt or x.dtype).itemsize, rnd) for x in specs)

    # -- weights
    trainable = layout.trainable
    frozen = [x for x in layout.trained if not x.trainable]
    tdt = trainable[0].dtype if trainable else torch.float32
    add("trainable", f"trainable weights: {'LoRA' if not full else 'all'} {dtype_name(tdt)} "
        f"({count(sum(x.numel for x in trainable))}{', sharded' if shard else ''})",
        0 if offload else shard_bytes(trainable), note=where)
    if frozen:
        what = "transformer base" if layout.diffusers else "base network"
        add("frozen", f"frozen: {what} {dtype_name(frozen[0].dtype)} ({count(sum(x.numel for x in frozen))}"
            f"{', sharded' if shard else ''})", 0 if offload else shard_bytes(frozen), note=where)
    if layout.trained_buffers:  # FSDP2 shards parameters only
        add("buffers", f"frozen: buffers, not sharded ({dtype_name(layout.trained_buffers[0].dtype)}, "
            f"{count(sum(x.numel for x in layout.trained_buffers))})", sum_bytes(layout.trained_buffers, rnd))
    if layout.reference:
        add("reference", f"frozen: KL reference copy {dtype_name(layout.reference[0].dtype)}"
            f"{' (sharded)' if shard else ''}",
            (0 if offload else shard_bytes(layout.reference)) + sum_bytes(layout.reference_buffers, rnd),
            note=where)
    elif layout.diffusers:
        add("reference", "frozen: KL reference = the base with the adapter disabled", 0)
    for label, specs in layout.extra_frozen:
        add(f"extra:{label}", f"frozen: {label}", sum_bytes(specs, rnd))
    enc_bytes = sum(sum_bytes(sp, rnd) for _, sp in layout.encoders)
    if layout.encoders:
        n_enc = sum(x.numel for _, sp in layout.encoders for x in sp if x.dtype.is_floating_point)
        names = "+".join(n.replace("text_encoder", "te") for n, _ in layout.encoders)
        kept = not m.offload_text_encoders
        add("encoders", f"frozen: text encoders {names} {dtype_name(dtype)} ({count(n_enc)})",
            enc_bytes if kept else 0,
            note="kept on the device" if kept else f"{fmt(enc_bytes)} at start-up, then offloaded")
    if layout.vae:
        add("vae", f"frozen: VAE float32 ({count(sum(x.numel for x in layout.vae if x.dtype.is_floating_point))})",
            sum_bytes(layout.vae, rnd))
    reward_transient = 0
    for i, (label, nbytes, how, info) in enumerate(reward_models(cfg, device)):
        add(f"reward{i}", f"frozen: {label}", nbytes, how)
        if info:  # a ViT forward's working set: a few [batch, tokens, width + mlp] tensors
            b = min(info["batch"], max(s.batch_size, cfg.eval.batch_size))
            reward_transient = max(reward_transient,
                                   4 * b * info["tokens"] * (info["width"] + info["mlp"]) * info["itemsize"])
    # -- gradients, optimizer, EMA (FSDP2: one padded gradient buffer per group; the optimizer
    # and the EMA hold this rank's unpadded local shards). A trained tensor no loss reaches holds
    # no gradient and no optimizer state (the EMA and the old policy copy it all the same).
    reached = [x for x in trainable if x.grad]
    if shard:
        per_group: dict[int, int] = {}
        for x in reached:
            per_group[x.group] = per_group.get(x.group, 0) + padded_numel(x, W) * x.dtype.itemsize
        grad_bytes = sum(round_up(b, rnd) for b in per_group.values())
        local = [local_numel(x, W, rank) for x in trainable]
        local_reached = [local_numel(x, W, rank) for x in reached]
    else:
        grad_bytes = sum_bytes(reached, rnd)
        local = [x.numel for x in trainable]
        local_reached = [x.numel for x in reached]
    unreached = len(trainable) - len(reached)
    add("grads", f"gradients {dtype_name(tdt)}", 0 if offload else grad_bytes,
        note=where or (f"{unreached} trained tensors no loss reaches hold none" if unreached else ""))
    if t.optimizer == "adamw8bit":
        # bitsandbytes decides 8-bit by the local shard's size: 4096 elements of the whole
        # tensor become 4096 / W per shard (fastflow.parallel keeps the rule across ranks)
        min8 = max(1, 4096 // W) if shard else 4096
        add("optimizer", "optimizer state: 8-bit AdamW (uint8 moments + block scales)",
            0 if offload else adamw8bit_state_bytes(local_reached, min8, rnd), note=where)
    else:
        add("optimizer", "optimizer state: AdamW (2 float32 moments + step)",
            0 if offload else adamw_state_bytes(local_reached, rnd), note=where)
    ema_bytes = sum(round_up(4 * n, rnd) for n in local) if t.ema else 0
    add("ema", "EMA of the trainable weights (float32)", 0 if offload else ema_bytes,
        note=where or ("" if t.ema else "train.ema off"))
    algorithm = getattr(t, "algorithm", "grpo")
    if algorithm == "nft":  # fastflow.objectives.nft.OldPolicy: the sampling policy's own weights
        add("old_policy", "old policy (DiffusionNFT): float32 copy of the trainable weights",
            0 if offload else sum(round_up(4 * n, rnd) for n in local), note=where)
    # -- FSDP2 gathers
    if shard:
        _fsdp_parts(layout, W, dtype.itemsize, rnd, add)
    ddp_bucket = min(DDP_BUCKET, grad_bytes) if strategy == "ddp" else 0
    if ddp_bucket:
        add("ddp", "DDP all-reduce bucket", ddp_bucket)
    # -- rollout storage: per sample, the recorded latents and next latents of every trained step,
    # their log-probs, the final latents, the prompt id and the prompt's conditioning
    n_rank = derived.images_per_rank
    lat = math.prod(layout.latent_shape)
    k_rec = s.window_size or s.train_steps
    cond_per = sum(math.prod(shape) * dt.itemsize for shape, dt in layout.cond_shapes.values())

    def storage(n):
        return 2 * n * k_rec * lat * 4 + n * k_rec * 4 + n * lat * 4 + n * 8 + n * cond_per
    per_call = storage(s.batch_size)
    store = storage(n_rank) + ((n_rank // s.batch_size) * 6 * rnd if rnd > 1 else 0)
    add("storage", f"rollout storage: {n_rank} samples x ({k_rec} steps x 2 latents + final) float32 + prompt embeddings",
        store, note="held 3x at the end of a rollout: the previous batch, the pieces and their concatenation")
    tb = derived.train_batch_size
    micro = storage(tb)
    add("microbatch", f"training micro-batch copy ({tb} samples)", micro)
    # -- CUDA graphs (off under FSDP2: its gathers cannot be captured)
    graphs = device == "cuda" and s.cuda_graph != "off" and not shard and layout.graphs
    if graphs:
        T = s.train_steps
        add("graph_buffers", f"CUDA-graph static buffers (rollout program, batch {s.batch_size}, {T} steps)",
            2 * s.batch_size * lat * 4 + 3 * T * s.batch_size * lat * 4 + T * s.batch_size * 4
            + s.batch_size * cond_per)
    # -- activations
    cfg_x = 2 if (layout.cfg_doubles and s.guidance_scale > 1.0) else 1
    eval_x = 2 if (layout.cfg_doubles and derived.eval_guidance_scale > 1.0) else 1
    eval_b = cfg.eval.batch_size if eval_pairs is None else max(1, min(cfg.eval.batch_size, -(-eval_pairs // world)))
    act = activations(cfg, layout, dtype, shard, full, (tb, cfg_x), (s.batch_size, cfg_x), (eval_b, eval_x),
                      graphs, rnd)
    ck = dist.activation_checkpointing
    train_act = act["train_ckpt" if ck else "train"]
    other = act["train" if ck else "train_ckpt"]
    ck_note = (f"{'without' if ck else 'with'} activation checkpointing: {fmt(other)}"
               if layout.diffusers else "activation checkpointing does not apply to this model")
    add("act_train", f"activations: training forward + backward, {tb * cfg_x} samples"
        f"{' (CFG x2)' if cfg_x == 2 else ''}{', checkpointed' if ck else ''}", train_act, "measured", note=ck_note)
    add("act_rollout", f"activations: rollout forward, {s.batch_size * cfg_x} samples (no grad)",
        act["rollout"], "measured")
    add("act_eval", f"activations: evaluation forward, {eval_b * eval_x} samples (no grad)", act["eval"], "measured")
    if act.get("casts"):
        add("casts", f"autocast {dtype_name(dtype)} copies of the float32 weights (held through a forward)",
            act["casts"], "measured", note="included in the activations above")
    vae_roll = vae_eval = 0
    if layout.vae:
        from fastflow.plan.measure import vae_decode_bytes

        px = m.resolution ** 2
        vae_roll = vae_decode_bytes(layout.arch.vae, s.batch_size, px)
        vae_eval = vae_decode_bytes(layout.arch.vae, eval_b, px)
        add("vae_decode", f"VAE decode of {s.batch_size} images at {m.resolution} px (evaluation: {eval_b})",
            vae_roll, "measured", note=f"evaluation {fmt(vae_eval)}")
    if reward_transient:
        add("reward_fwd", "reward model forward (largest batch)", reward_transient, "estimate")
    pool = act["rollout_core"] if graphs else 0
    if graphs:
        add("graph_pool", "CUDA-graph memory pool (a captured step's activations, kept)", pool, "measured")
    copy_t = sum_bytes(layout.transient_copy, rnd)
    if copy_t:
        add("merge_copy", "sampling(): deep copy of the adapted model while merging the LoRA", copy_t)
    ctx = CUDA_CONTEXT if device == "cuda" else 0
    if ctx:
        add("context", "CUDA context and library workspaces", ctx, "estimate")

    P = {k: v.bytes for k, v in parts.items()}
    phases, phase_parts = _phases(P, m, t, layout, shard, offload, enc_bytes, ctx, store, per_call, micro,
                                  train_act, act, graphs, pool, eval_b, lat, cond_per, vae_roll, vae_eval,
                                  reward_transient, copy_t, ddp_bucket, local_reached)
    header = _header(cfg, layout, world, strategy, tb, cfg_x, device, gpu_label, gpu_bytes)
    notes = _notes(cfg, layout, device, phases, P, local_reached, offload)
    return Plan(header, parts, phases, phase_parts, gpu_bytes, gpu_label, world, strategy, notes)


def _fsdp_parts(layout: Layout, W: int, itemsize: int, rnd: int, add) -> None:
    """FSDP2's unsharded buffers: in training the root and two blocks in flight (one computing,
    one prefetched) plus a block's unsharded gradients before their reduce-scatter; while
    sampling the whole network (fastflow.rollout gathers it once for every step)."""
    def unsharded(specs):
        return sum(round_up(padded_numel(x, W) * W * itemsize, rnd) for x in specs)
    by_group: dict[int, list] = {}
    for x in layout.trained:
        by_group.setdefault(x.group, []).append(x)
    block_full = max((unsharded(v) for g, v in by_group.items() if g >= 0), default=0)
    root_full = unsharded(by_group.get(-1, []))
    block_grad = max((sum(padded_numel(x, W) * W * (itemsize + 4) for x in v if x.trainable and x.grad)
                      for g, v in by_group.items() if g >= 0), default=0)
    ref_root = unsharded([x for x in layout.reference if x.group == -1])
    fsdp_train = root_full + max(ref_root + 2 * block_full if layout.reference else 0, 2 * block_full + block_grad)
    add("fsdp_gather", "FSDP2 gathers in training: root + 2 blocks in flight + a block's unsharded grads",
        fsdp_train, "estimate")
    add("fsdp_rollout", "FSDP2 gathers while sampling: the whole network in the compute dtype",
        unsharded(layout.trained))


def _phases(P, m, t, layout, shard, offload, enc_bytes, ctx, store, per_call, micro, train_act, act, graphs,
            pool, eval_b, lat, cond_per, vae_roll, vae_eval, reward_transient, copy_t, ddp_bucket, local):
    """What is alive together in each phase of an iteration (bytes, and the parts summed)."""
    static_keys = ["trainable", "frozen", "buffers", "reference", "vae", "ema", "old_policy", "context"] + \
        [k for k in P if k.startswith(("reward", "extra:")) and k != "reward_fwd"] + \
        (["encoders"] if not m.offload_text_encoders else [])
    static = sum(P.get(k, 0) for k in static_keys)
    graph_keep = P.get("graph_buffers", 0) + pool
    phases, parts = {}, {}
    if layout.encoders:  # start-up: the text encoders on the device while the prompt lists are encoded
        weights = ["trainable", "frozen", "buffers", "reference"]
        phases["start-up"] = enc_bytes + P.get("vae", 0) + ctx + (0 if shard else sum(P.get(k, 0) for k in weights))
        parts["start-up"] = ["encoders (all)", "vae"] + ([] if shard else weights)
    # rollout: the batch's forward (or the VAE decode, or the reward forward) next to the storage
    # of the batches so far; at its end the pieces and their concatenation are alive together
    ro_fwd = max(act["rollout"] + P.get("fsdp_rollout", 0), vae_roll, reward_transient, copy_t)
    phases["rollout"] = static + P["optimizer"] + graph_keep + max(2 * store + ro_fwd + per_call, 3 * store)
    parts["rollout"] = static_keys + ["optimizer", "storage x2-3", "act_rollout | vae_decode | reward_fwd",
                                      "fsdp_rollout", "graph_buffers", "graph_pool"]
    phases["training"] = (static + P["optimizer"] + P["grads"] + store + micro + train_act
                          + P.get("fsdp_gather", 0) + graph_keep + ddp_bucket)
    parts["training"] = static_keys + ["optimizer", "grads", "storage", "microbatch", "act_train",
                                       "fsdp_gather", "graph_buffers", "graph_pool", "ddp"]
    eval_prog = (2 * eval_b * lat * 4 + eval_b * cond_per + (act["eval_core"] if graphs else 0)) if graphs else 0
    ev_fwd = max(act["eval"] + P.get("fsdp_rollout", 0), vae_eval, reward_transient)
    # (EMA.applied keeps the current weights in host memory while the EMA weights evaluate)
    phases["evaluation"] = static + P["optimizer"] + store + graph_keep + eval_prog + ev_fwd
    parts["evaluation"] = static_keys + ["optimizer", "storage", "act_eval | vae | reward", "fsdp_rollout",
                                         "graph programs"]
    dequant = 8 * sum(local) if (t.optimizer == "adamw8bit" and not offload) else 0
    phases["checkpoint"] = static + P["optimizer"] + store + graph_keep + dequant
    parts["checkpoint"] = static_keys + ["optimizer", "storage"] + (["8-bit state dequantized (fp32)"] if dequant else [])
    return phases, parts


def _notes(cfg, layout, device, phases, P, local, offload) -> list[str]:
    m, t = cfg.model, cfg.train
    notes = []
    if t.optimizer == "adamw8bit" and not offload:
        notes.append(f"checkpoint: 8-bit AdamW state is dequantized to float32 on the device while saving "
                     f"(+{fmt(8 * sum(local))})")
    if layout.encoders and m.offload_text_encoders:
        notes.append("text encoders: on the device while the prompt lists are encoded (start-up), then in "
                     "host memory; prompts outside the lists are encoded on the CPU")
    if getattr(t, "algorithm", "grpo") != "grpo":
        notes.append(f"train.algorithm {t.algorithm}: rollout storage and training activations are planned as "
                     f"for grpo's per-step training (not yet compared with this algorithm's trainer)")
    if m.compile:
        notes.append("model.compile: activations are planned for eager mode (compiled graphs usually hold less)")
    notes += layout.notes
    if layout.diffusers and cfg.sample.cuda_graph != "off" and not layout.graphs:
        notes.append(f"CUDA graphs: the {m.kind} policy does not capture its rollout (it runs eagerly)")
    if layout.diffusers:
        notes.append("activations: measured on the CPU on copies of the architecture at a reduced width, "
                     "extrapolated (docs/memory.md)")
    if device == "cuda":
        notes.append(f"CUDA: {fmt(CUDA_CONTEXT)} assumed for the context and library workspaces; "
                     f"allocations rounded to {CUDA_ROUND} bytes")
    return notes


def _header(cfg, layout, world, strategy, tb, cfg_x, device, gpu_label, gpu_bytes) -> list[str]:
    m, s, t = cfg.model, cfg.sample, cfg.train
    what = m.kind + (f" ({layout.arch.source})" if layout.arch is not None else "")
    ft = (f"LoRA r {m.lora_rank} on {', '.join(layout.targets)}" if m.finetune == "lora" and layout.kind != "toy"
          else "full fine-tuning")
    gpu = f"{gpu_label} ({fmt(gpu_bytes)})" if gpu_bytes and gpu_label and "GiB" not in gpu_label else (gpu_label or device)
    return ["fastflow memory plan",
            f"  model: {what}",
            f"  training: {ft}; model.dtype {m.dtype}; train.optimizer {t.optimizer}; "
            f"activation checkpointing {'on' if cfg.distributed.activation_checkpointing else 'off'}",
            f"  ranks: {world} x {gpu}; distributed.strategy {cfg.distributed.strategy} -> "
            f"{strategy}{'; cpu_offload' if strategy == 'fsdp' and cfg.distributed.cpu_offload else ''}",
            f"  batch per rank: rollout {s.batch_size}, training {tb}"
            f"{' (CFG doubles both)' if cfg_x == 2 else ''}; resolution {m.resolution if layout.vae else '-'}; "
            f"latents {tuple(layout.latent_shape)}"]
