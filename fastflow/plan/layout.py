"""What a rank's policy holds, tensor by tensor: the policy built on the meta device by its own
set-up code (placement, casts, LoRA, the full fine-tuning reference), the in-process reward
models, and the distributed strategy the trainer would pick for it.

Using the policies' own set-up methods (not a copy of their rules) is what keeps the exact parts
exact when those rules change.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from fastflow.plan.arch import (DIFFUSERS_KINDS, TRANSFORMER_CLASS, Arch, PlanError, clip_config, default_targets,
                                meta_diffusers, meta_transformers, quiet, resolve_arch, reward_data, skip_init)
from fastflow.plan.tensors import TensorSpec, count, dtype_name, specs_of, sum_bytes


@dataclass
class Layout:
    """What a rank's policy holds, by role, as TensorSpecs (dtype as placed on the device)."""

    kind: str
    trained: list[TensorSpec]            # the trained network's parameters (trainable and frozen)
    trained_buffers: list[TensorSpec]
    reference: list[TensorSpec]          # a separate frozen KL reference copy (full fine-tuning)
    reference_buffers: list[TensorSpec]
    extra_frozen: list[tuple[str, list[TensorSpec]]]   # e.g. the shapes sampling copy
    encoders: list[tuple[str, list[TensorSpec]]]       # text encoders (params + buffers)
    vae: list[TensorSpec]
    shardable: bool                      # has parallel_modules (FSDP2 possible)
    n_blocks: int
    latent_shape: tuple[int, ...]
    cond_shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]  # per-sample conditioning
    cfg_doubles: bool                    # CFG runs one forward over [uncond; cond]
    image_tokens: int = 0
    text_tokens: int = 0
    arch: Arch | None = None
    targets: list[str] = field(default_factory=list)
    transient_copy: list[TensorSpec] = field(default_factory=list)  # made while entering sampling
    graphs: bool = True                  # the policy can capture its rollout as CUDA graphs
    notes: list[str] = field(default_factory=list)

    @property
    def diffusers(self) -> bool:
        return self.kind in DIFFUSERS_KINDS

    @property
    def trainable(self) -> list[TensorSpec]:
        return [s for s in self.trained if s.trainable]


_POLICY_CLASSES = {"sd3": "SD3Policy", "flux": "FluxPolicy", "qwenimage": "QwenImagePolicy",
                   "flux2_klein": "Flux2KleinPolicy"}


def _policy_class(kind: str):
    import importlib

    return getattr(importlib.import_module(f"fastflow.models.{kind}"), _POLICY_CLASSES[kind])


def _block_prefixes(module: nn.Module, blocks: list[nn.Module]) -> list[str]:
    """Each block's parameter-name prefix within ``module`` (e.g. ``transformer_blocks.3.``)."""
    names = {id(m): n for n, m in module.named_modules()}
    return [names[id(b)] + "." for b in blocks]


_NO_GRAD: dict[str, frozenset] = {}


def gradient_free(family: str, config: dict, lora: bool, targets: list[str], rank: int,
                  real_prefixes: list[str]) -> frozenset:
    """Names of the trained parameters (within the transformer) that no loss reaches, found by
    autograd on the meta device: a copy of the transformer at its real widths with one block of
    each kind (scaled.scaled_blocks), LoRA as the policy attaches it, one forward and backward.
    What gets no gradient in a copy's block gets none in every real block of that kind."""
    from fastflow.models.lora import apply_lora
    from fastflow.plan.arch import TRANSFORMER_CLASS, clean, transformer_blocks
    from fastflow.plan.scaled import scaled_blocks, scaled_config, scaled_inputs, variant_keys

    key = json.dumps([family, clean(config), lora, sorted(targets), rank, real_prefixes], sort_keys=True, default=str)
    if key in _NO_GRAD:
        return _NO_GRAD[key]
    variants = variant_keys(family, config)
    rcfg, _, fit_keys = scaled_config(family, config, config["attention_head_dim"], variants)
    meta = torch.device("meta")
    with quiet(), skip_init():
        model = meta_diffusers(TRANSFORMER_CLASS[family], rcfg)
        with meta:
            if lora:
                apply_lora(model, rank=rank, alpha=2.0 * rank, targets=targets)
            else:
                model.requires_grad_(True)
        out = model(**scaled_inputs(family, rcfg, 1, 4, 3, torch.float32, device="meta"))[0]
        out.float().sum().backward()
    copy_prefixes = _block_prefixes(model, transformer_blocks(family, model))
    real_keys = ["first"] + variants[1:]
    names = set()
    for n, p in model.named_parameters():
        if not p.requires_grad or p.grad is not None:
            continue
        j = next((j for j, pre in enumerate(copy_prefixes) if n.startswith(pre)), None)
        if j is None:
            names.add(n)
            continue
        rel = n[len(copy_prefixes[j]):]
        names |= {pre + rel for pre, k in zip(real_prefixes, real_keys) if k == fit_keys[j]}
    _NO_GRAD[key] = frozenset(names)
    return _NO_GRAD[key]


def qwen_text_len(cfg, arch: Arch) -> tuple[int, str]:
    """Qwen-Image's text length, as QwenImagePolicy.fit_prompts sets it from the run's prompt
    lists (the longest, the negative prompt included, rounded up to 16, at most 512), with the
    pipeline's tokenizer when the model folder has one and the prompt files are here; else the
    most it can be (512). Returns (tokens, how)."""
    from fastflow.models.qwenimage import MAX_SEQUENCE_LENGTH, QwenImagePolicy

    most = (MAX_SEQUENCE_LENGTH, f"{MAX_SEQUENCE_LENGTH} text tokens, the most (the run pads its prompts to the "
                                 f"longest of its lists, rounded up to 16)")
    tok_dir = Path(arch.root) / "tokenizer" if arch.root else None
    paths = [cfg.data.train_prompts, cfg.data.eval_prompts]
    if tok_dir is None or not tok_dir.is_dir() or not all(paths):
        return most
    from diffusers import QwenImagePipeline
    from transformers import AutoTokenizer

    from fastflow.data import load_prompts

    try:
        texts = [p.text for p in load_prompts(paths[0])]
        ev = load_prompts(paths[1])
    except (OSError, ValueError):
        return most
    if cfg.eval.max_prompts:
        ev = ev[: cfg.eval.max_prompts]
    texts += [p.text for p in ev]
    with quiet():
        pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, transformer=None,
                                 tokenizer=AutoTokenizer.from_pretrained(str(tok_dir)))
    pol = object.__new__(QwenImagePolicy)  # its prompt-length rule only
    pol.pipe, pol.max_sequence_length, pol.text_len = pipe, MAX_SEQUENCE_LENGTH, MAX_SEQUENCE_LENGTH
    pol.set_text_len = lambda n: setattr(pol, "text_len", n)
    QwenImagePolicy.fit_prompts(pol, texts)
    return pol.text_len, f"{pol.text_len} text tokens (the longest prompt of the run's lists, rounded up to 16)"


def diffusers_layout(cfg, arch: Arch, shard: bool) -> Layout:
    """A diffusers policy's tensors (sd3, flux, qwenimage, flux2_klein) on the meta device, placed
    by the policy's own set-up code (TunedTransformerPolicy._place_text_encoders /
    _setup_transformer with a meta device), from components built as
    ``from_pretrained(dtype=model.dtype)`` builds them; ``shard``: the run uses FSDP2 (the network
    stays as loaded and FSDP2 casts the trained weights to float32)."""
    from fastflow.models.sd3 import MAX_SEQUENCE_LENGTH, place
    from fastflow.runtime import parse_dtype

    m = cfg.model
    dtype = parse_dtype(m.dtype)
    family = arch.family
    meta = torch.device("meta")
    tclass = arch.transformer.get("_class_name") or TRANSFORMER_CLASS[family]
    with quiet():  # diffusers warns about .to(dtype) on models built without from_pretrained
        transformer = meta_diffusers(tclass, arch.transformer).to(dtype)
        encoders = {name: meta_transformers(cls, ecfg, dtype) for name, (cls, ecfg) in arch.text_encoders.items()}
        vae = meta_diffusers(arch.vae.get("_class_name", "AutoencoderKL"), arch.vae).to(dtype)
    targets = list(m.lora_targets) or default_targets(family)
    policy = object.__new__(_policy_class(family))  # its set-up methods only, on the meta device
    policy.device, policy.dtype = meta, dtype
    policy.pipe = SimpleNamespace(transformer=transformer, vae=vae, text_encoder=encoders.get("text_encoder"),
                                  text_encoder_2=encoders.get("text_encoder_2"),
                                  text_encoder_3=encoders.get("text_encoder_3"))
    with quiet(), meta, skip_init():
        policy._place_text_encoders()
        place(vae, meta, torch.float32)
        policy._setup_transformer(transformer, finetune=m.finetune, lora_rank=m.lora_rank,
                                  lora_alpha=m.lora_alpha, targets=targets, compile=False, shard_later=shard)
    blocks = policy._blocks(transformer)
    params, buffers = specs_of(transformer, {id(b): i for i, b in enumerate(blocks)}, "transformer.")
    no_grad = gradient_free(family, arch.transformer, m.finetune == "lora", targets, m.lora_rank,
                            _block_prefixes(transformer, blocks))
    params = [dataclasses.replace(x, grad=False) if x.trainable and x.name[len("transformer."):] in no_grad else x
              for x in params]
    if shard:  # fastflow.parallel.apply_fsdp(master_dtype=float32) casts the trained parameters
        params = [dataclasses.replace(x, dtype=torch.float32) if x.trainable else x for x in params]
    ref, ref_buffers = [], []
    if m.finetune == "full":
        rt = policy.tuning.ref_transformer
        ref, ref_buffers = specs_of(rt, {id(b): i for i, b in enumerate(policy._blocks(rt))}, "reference.")
    enc_specs = []
    for name, enc in encoders.items():
        ps, bs = specs_of(enc)
        enc_specs.append((name, ps + bs))
    vps, vbs = specs_of(vae)
    tc = arch.transformer
    res = m.resolution
    notes = []
    cfg_doubles = True
    if family == "sd3":
        vsf = 2 ** (len(arch.vae.get("block_out_channels", [0])) - 1)  # the VAE's spatial factor
        side = res // vsf
        patch = tc.get("patch_size", 2)
        latent = (tc.get("in_channels", 16), side, side)
        n_img = (side // patch) ** 2
        n_txt = arch.tokenizer_max_length + MAX_SEQUENCE_LENGTH  # CLIP tokens + T5 tokens
    elif family == "flux":  # FLUX packs 2 x 2 latent patches into tokens
        vsf = 2 ** (len(arch.vae.get("block_out_channels", [0])) - 1)
        side = 2 * (res // (vsf * 2))
        n_img = (side // 2) ** 2
        latent = (n_img, tc.get("in_channels", 64))
        n_txt = MAX_SEQUENCE_LENGTH
        cfg_doubles = False  # guidance-distilled: the scale goes to the guidance embedding
    else:  # Qwen-Image, FLUX.2 [klein]: packed latents of (H / 16) x (W / 16) tokens
        vsf = (2 ** len(arch.vae.get("temperal_downsample", [False, True, True])) if family == "qwenimage"
               else 2 ** (len(arch.vae.get("block_out_channels", [0])) - 1))
        side = res // (vsf * 2)
        n_img = side * side
        latent = (n_img, tc.get("in_channels", 64 if family == "qwenimage" else 128))
        if family == "qwenimage":  # the run's text length: set by build_layout (with_text_len)
            from fastflow.models.qwenimage import MAX_SEQUENCE_LENGTH as n_txt
        else:
            from fastflow.models.flux2_klein import MAX_SEQUENCE_LENGTH as n_txt
            cfg_doubles = not arch.distilled  # the step-distilled klein runs no CFG
    cond = {"prompt_embeds": ((n_txt, tc["joint_attention_dim"]), dtype)}
    if "pooled_projection_dim" in tc and family in ("sd3", "flux"):
        cond["pooled_prompt_embeds"] = ((tc["pooled_projection_dim"],), dtype)
    if family == "qwenimage":
        cond["prompt_embeds_mask"] = ((n_txt,), torch.bool)
    return Layout(kind=family, trained=params, trained_buffers=buffers, reference=ref,
                  reference_buffers=ref_buffers, extra_frozen=[], encoders=enc_specs, vae=vps + vbs,
                  shardable=True, n_blocks=len(blocks), latent_shape=latent, cond_shapes=cond,
                  cfg_doubles=cfg_doubles, image_tokens=n_img, text_tokens=n_txt, arch=arch,
                  targets=targets, graphs=getattr(type(policy), "supports_cuda_graphs", True), notes=notes)


def shapes_layout(cfg) -> Layout:
    """The shapes policy (fastflow.shapes.policy.ShapesPolicy) built on the meta device: the trained
    model (LoRA or full), its frozen reference copy and, for LoRA, the merged sampling copy that the
    first rollout creates (and the deep copy made while merging)."""
    from safetensors import safe_open

    from fastflow.shapes.model import ModelConfig, ShapesFlowModel
    from fastflow.shapes.policy import DEFAULT_LORA_TARGETS, DEFAULT_SHIFT, ShapesPolicy, resolve_weights

    path = resolve_weights(cfg.model.path)
    with safe_open(str(path), framework="pt") as f:  # the header only: the config, no weights
        meta = f.metadata() or {}
    if "fastflow_shapes_config" not in meta:
        raise PlanError(f"model.path {path}: not a fastflow shapes model")
    mcfg = ModelConfig.from_json(meta["fastflow_shapes_config"])
    with torch.device("meta"):
        policy = ShapesPolicy(ShapesFlowModel(mcfg), finetune=cfg.model.finetune, lora_rank=cfg.model.lora_rank,
                              lora_alpha=cfg.model.lora_alpha, lora_targets=list(cfg.model.lora_targets),
                              shift=cfg.model.shift or DEFAULT_SHIFT, device="meta")
        sampling = ShapesFlowModel(mcfg) if cfg.model.finetune == "lora" else None
    params, buffers = specs_of(policy.model)
    rp, rb = specs_of(policy._ref_model)
    extra = [("reference copy (float32)", rp + rb)]
    transient: list[TensorSpec] = []
    if sampling is not None:
        sp, sb = specs_of(sampling)
        extra.append(("sampling copy, LoRA merged (float32)", sp + sb))
        transient = params + buffers  # _merged_state deep-copies the adapted model to merge it
    return Layout(kind="shapes", trained=params, trained_buffers=buffers, reference=[],
                  reference_buffers=[], extra_frozen=extra, encoders=[], vae=[], shardable=False,
                  n_blocks=0, latent_shape=tuple(policy.latent_shape),
                  cond_shapes={k: (tuple(v.shape[1:]), v.dtype) for k, v in policy._uncond.items()},
                  cfg_doubles=True, targets=list(cfg.model.lora_targets) or list(DEFAULT_LORA_TARGETS),
                  transient_copy=transient)


def toy_layout(cfg) -> Layout:
    """The toy policy (fastflow.models.toy): full fine-tuning of a small MLP, a frozen copy."""
    from fastflow.models.toy import ToyPolicy

    pol = ToyPolicy(shift=1.0, seed=0, device="meta")
    blocks = [m for m in pol.net.net if isinstance(m, nn.Linear)]
    params, buffers = specs_of(pol.net, {id(b): i for i, b in enumerate(blocks)}, "net.")
    ref = [dataclasses.replace(s, trainable=False) for s in params]
    return Layout(kind="toy", trained=params, trained_buffers=buffers, reference=ref,
                  reference_buffers=list(buffers), extra_frozen=[], encoders=[], vae=[],
                  shardable=True, n_blocks=len(blocks), latent_shape=tuple(pol.latent_shape),
                  cond_shapes={"token": ((), torch.int64)}, cfg_doubles=True)


_LAYOUTS: dict[str, Layout] = {}  # the advice re-plans many variants of one model: build it once
_INVARIANT: dict[str, bool] = {}


def _probe_specs(cfg, arch: Arch, shard: bool) -> list:
    """The transformer's and the reference's tensors (name, shape, dtype, trainable) as the
    policy's _setup_transformer places them, with FSDP2's float32 cast of the trained ones when
    ``shard``, on a copy with one block of each kind at the real widths."""
    from fastflow.plan.scaled import scaled_config, variant_keys
    from fastflow.runtime import parse_dtype

    m = cfg.model
    dtype = parse_dtype(m.dtype)
    rcfg, _, _ = scaled_config(arch.family, arch.transformer, arch.transformer["attention_head_dim"],
                               variant_keys(arch.family, arch.transformer))
    meta = torch.device("meta")
    with quiet():
        transformer = meta_diffusers(TRANSFORMER_CLASS[arch.family], rcfg).to(dtype)
    policy = object.__new__(_policy_class(arch.family))
    policy.device, policy.dtype = meta, dtype
    with quiet(), meta, skip_init():
        policy._setup_transformer(transformer, finetune=m.finetune, lora_rank=m.lora_rank, lora_alpha=m.lora_alpha,
                                  targets=list(m.lora_targets) or default_targets(arch.family), compile=False,
                                  shard_later=shard)
    ps, bs = specs_of(transformer)
    if shard:
        ps = [dataclasses.replace(x, dtype=torch.float32) if x.trainable else x for x in ps]
    ref = policy.tuning.ref_transformer
    rs = [*specs_of(ref)[0], *specs_of(ref)[1]] if ref is not None else []
    return [(x.name, x.shape, x.dtype, x.trainable) for x in [*ps, *bs, *rs]]


def _shard_invariant(cfg, arch: Arch) -> bool:
    """Whether the policy's set-up for an FSDP2 run, followed by FSDP2's float32 cast of the trained
    tensors, leaves the same tensors as its one-process set-up (then the full-depth model need not
    be set up twice): checked on one-block-per-kind copies at the real widths, by the policy's own
    code."""
    m = cfg.model
    key = json.dumps([arch.family, arch.transformer, m.dtype, m.finetune, m.lora_rank, m.lora_alpha,
                      list(m.lora_targets)], sort_keys=True, default=str)
    if key not in _INVARIANT:
        _INVARIANT[key] = _probe_specs(cfg, arch, False) == _probe_specs(cfg, arch, True)
    return _INVARIANT[key]


def build_layout(cfg, shard: bool) -> Layout:
    """The layout of ``cfg``'s policy (memoized: a pure function of the model settings)."""
    m = cfg.model
    key = json.dumps([m.kind, m.path, m.dtype, m.finetune, m.lora_rank, m.lora_alpha, list(m.lora_targets),
                      m.resolution, m.shift, shard], default=str)
    if key not in _LAYOUTS:
        kind = m.kind
        other = json.dumps([*json.loads(key)[:-1], not shard], default=str)
        if kind in DIFFUSERS_KINDS and other in _LAYOUTS and _shard_invariant(cfg, _LAYOUTS[other].arch):
            _LAYOUTS[key] = _LAYOUTS[other]  # placed alike, FSDP2's cast included: the same tensors
        elif kind in DIFFUSERS_KINDS:
            _LAYOUTS[key] = diffusers_layout(cfg, resolve_arch(kind, m.path), shard)
        elif kind == "shapes":
            _LAYOUTS[key] = shapes_layout(cfg)
        elif kind == "toy":
            _LAYOUTS[key] = toy_layout(cfg)
        else:
            raise PlanError(f"model.kind {kind}: no memory plan for this model yet (planned: "
                            f"{', '.join(DIFFUSERS_KINDS)}, shapes, toy)")
    layout = _LAYOUTS[key]
    return with_text_len(cfg, layout) if m.kind == "qwenimage" else layout


_TEXT_LENS: dict[str, tuple[int, str]] = {}


def with_text_len(cfg, layout: Layout) -> Layout:
    """A Qwen-Image layout at the run's text length (qwen_text_len), which sizes the prompt
    embeddings, their mask and the text tokens of every forward."""
    key = json.dumps([layout.arch.root, cfg.data.train_prompts, cfg.data.eval_prompts, cfg.eval.max_prompts])
    if key not in _TEXT_LENS:
        _TEXT_LENS[key] = qwen_text_len(cfg, layout.arch)
    n_txt, how = _TEXT_LENS[key]
    cond = dict(layout.cond_shapes)
    cond["prompt_embeds"] = ((n_txt, cond["prompt_embeds"][0][1]), cond["prompt_embeds"][1])
    cond["prompt_embeds_mask"] = ((n_txt,), torch.bool)
    return dataclasses.replace(layout, text_tokens=n_txt, cond_shapes=cond,
                               notes=[*layout.notes, f"Qwen-Image prompts: {how}"])


def resolve_strategy(cfg, layout: Layout, world: int) -> str:
    """fastflow.parallel.resolve_strategy from the layout (no policy needed)."""
    strategy = cfg.distributed.strategy
    if world == 1:
        return "none"
    if strategy == "none":
        raise PlanError(f"distributed.strategy none runs a single process, but the plan is for {world} GPUs")
    if strategy == "fsdp" and not layout.shardable:
        raise PlanError(f"distributed.strategy fsdp: the {layout.kind} policy cannot be sharded; use ddp")
    if strategy != "auto":
        return strategy
    if not layout.shardable:
        return "ddp"
    from fastflow.parallel import _FULL_FINETUNE_SHARE

    total = sum(s.numel for s in layout.trained)
    trained = sum(s.numel for s in layout.trainable)
    return "fsdp" if total and trained / total > _FULL_FINETUNE_SHARE else "ddp"


# ------------------------------------------------------------------------------------ rewards

_CLIP_DEFAULTS = {"pickscore": "yuvalkirstain/PickScore_v1", "clipscore": "openai/clip-vit-large-patch14",
                  "aesthetic": "openai/clip-vit-large-patch14", "geneval": "openai/clip-vit-large-patch14"}
_CLIPS: dict[str, tuple] = {}  # meta CLIP inventories by config (ViT-H takes a second to build)


def _clip_specs(config_json: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
    if config_json not in _CLIPS:
        _CLIPS[config_json] = specs_of(meta_transformers("CLIPModel", json.loads(config_json)))
    return _CLIPS[config_json]


def reward_models(cfg, device: str) -> list[tuple[str, int, str, dict]]:
    """In-process reward models on ``device``'s kind: (label, bytes, how, forward info). CLIP
    models are exact (built on the meta device from their config, cast as fastflow.rewards._clip
    casts them); the detector and ImageReward are parameter counts (estimates)."""
    from fastflow.rewards._clip import resolve_dtype

    data = reward_data()
    out = []
    on_device = device == "cuda"
    for name in cfg.reward.weights:
        opts = cfg.reward.options.get(name, {}) if isinstance(cfg.reward.options.get(name), dict) else {}
        dev = str(opts.get("device") or cfg.reward.device or ("cuda" if on_device else "cpu"))
        if (dev.startswith("cuda")) != on_device and device == "cuda":
            continue  # runs on the host: not this GPU's memory
        if name in _CLIP_DEFAULTS:
            model_id = str(opts.get("model") or opts.get("clip") or _CLIP_DEFAULTS[name])
            ccfg = clip_config(model_id, data)
            dt = resolve_dtype("float32" if name == "geneval" else opts.get("dtype", "auto"), dev)
            if ccfg is None:
                out.append((f"reward {name}: {model_id} (unknown config, not counted)", 0, "estimate", {}))
                continue
            ps, bs = _clip_specs(json.dumps(ccfg["config"], sort_keys=True))
            size = sum(s.numel * (dt if s.dtype.is_floating_point else s.dtype).itemsize for s in ps + bs)  # placed
            vc = ccfg["config"]["vision_config"]
            info = {"tokens": (vc["image_size"] // vc["patch_size"]) ** 2 + 1, "width": vc["hidden_size"],
                    "mlp": vc["intermediate_size"], "itemsize": dt.itemsize,
                    "batch": int(opts.get("batch_size", 32))}
            out.append((f"reward {name}: {ccfg['name']} {dtype_name(dt)} ({count(sum(s.numel for s in ps))})",
                        size, "exact", info))
            if name == "aesthetic":
                from fastflow.rewards.aesthetic import AestheticMLP

                with torch.device("meta"):
                    head = AestheticMLP()
                out.append((f"reward {name}: MLP head float32", sum_bytes(specs_of(head)[0]), "exact", {}))
            if name == "geneval":
                d = data["other_models"]["geneval.detector"]
                out.append((f"reward {name}: {d['name']}", d["params"] * 4, "estimate", {}))
        elif name == "imagereward":
            d = data["other_models"]["imagereward"]
            out.append((f"reward {name}: {d['name']}", d["params"] * 4, "estimate", {}))
    return out
