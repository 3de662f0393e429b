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
from types import SimpleNamespace

import torch
from torch import nn

from fastflow.plan.arch import (Arch, PlanError, clip_config, default_targets, meta_diffusers,
                                meta_transformers, quiet, resolve_arch, reward_data)
from fastflow.plan.tensors import TensorSpec, count, dtype_name, placed, specs_of, sum_bytes


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

    @property
    def trainable(self) -> list[TensorSpec]:
        return [s for s in self.trained if s.trainable]


def _policy_class(kind: str):
    import importlib

    mod = importlib.import_module(f"fastflow.models.{kind}")
    return {"sd3": getattr(mod, "SD3Policy", None), "flux": getattr(mod, "FluxPolicy", None)}[kind]


def diffusers_layout(cfg, arch: Arch, shard: bool) -> Layout:
    """The sd3 / flux policy's tensors on the meta device, placed by the policy's own set-up code
    (TunedTransformerPolicy._place_text_encoders / _setup_transformer with a meta device), from
    components built as ``from_pretrained(dtype=model.dtype)`` builds them; ``shard``: the run
    uses FSDP2 (the network stays as loaded and FSDP2 casts the trained weights to float32)."""
    from fastflow.models.sd3 import MAX_SEQUENCE_LENGTH, place
    from fastflow.runtime import parse_dtype

    m = cfg.model
    dtype = parse_dtype(m.dtype)
    family = arch.family
    meta = torch.device("meta")
    tclass = arch.transformer.get("_class_name") or ("SD3Transformer2DModel" if family == "sd3"
                                                     else "FluxTransformer2DModel")
    with quiet():  # diffusers warns about .to(dtype) on models built without from_pretrained
        transformer = meta_diffusers(tclass, arch.transformer).to(dtype)
        encoders = {name: meta_transformers(cls, ecfg).to(dtype) for name, (cls, ecfg) in arch.text_encoders.items()}
        vae = meta_diffusers(arch.vae.get("_class_name", "AutoencoderKL"), arch.vae).to(dtype)
    targets = list(m.lora_targets) or default_targets(family)
    policy = object.__new__(_policy_class(family))  # its set-up methods only, on the meta device
    policy.device, policy.dtype = meta, dtype
    policy.pipe = SimpleNamespace(transformer=transformer, vae=vae, text_encoder=encoders.get("text_encoder"),
                                  text_encoder_2=encoders.get("text_encoder_2"),
                                  text_encoder_3=encoders.get("text_encoder_3"))
    with quiet(), meta:
        policy._place_text_encoders()
        place(vae, meta, torch.float32)
        policy._setup_transformer(transformer, finetune=m.finetune, lora_rank=m.lora_rank,
                                  lora_alpha=m.lora_alpha, targets=targets, compile=False, shard_later=shard)
    blocks = policy._blocks(transformer)
    params, buffers = specs_of(transformer, {id(b): i for i, b in enumerate(blocks)}, "transformer.")
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
    vsf = 2 ** (len(arch.vae.get("block_out_channels", [0])) - 1)  # the VAE's spatial factor
    res = m.resolution
    if family == "sd3":
        side = res // vsf
        patch = tc.get("patch_size", 2)
        latent = (tc.get("in_channels", 16), side, side)
        n_img = (side // patch) ** 2
        n_txt = arch.tokenizer_max_length + MAX_SEQUENCE_LENGTH  # CLIP tokens + T5 tokens
    else:  # FLUX packs 2 x 2 latent patches into tokens
        side = 2 * (res // (vsf * 2))
        n_img = (side // 2) ** 2
        latent = (n_img, tc.get("in_channels", 64))
        n_txt = MAX_SEQUENCE_LENGTH
    cond = {"prompt_embeds": ((n_txt, tc["joint_attention_dim"]), dtype),
            "pooled_prompt_embeds": ((tc["pooled_projection_dim"],), dtype)}
    return Layout(kind=family, trained=params, trained_buffers=buffers, reference=ref,
                  reference_buffers=ref_buffers, extra_frozen=[], encoders=enc_specs, vae=vps + vbs,
                  shardable=True, n_blocks=len(blocks), latent_shape=latent, cond_shapes=cond,
                  cfg_doubles=family == "sd3", image_tokens=n_img, text_tokens=n_txt, arch=arch,
                  targets=targets)


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


def build_layout(cfg, shard: bool) -> Layout:
    """The layout of ``cfg``'s policy (memoized: a pure function of the model settings)."""
    m = cfg.model
    key = json.dumps([m.kind, m.path, m.dtype, m.finetune, m.lora_rank, m.lora_alpha, list(m.lora_targets),
                      m.resolution, m.shift, shard], default=str)
    if key not in _LAYOUTS:
        kind = m.kind
        if kind in ("sd3", "flux"):
            _LAYOUTS[key] = diffusers_layout(cfg, resolve_arch(kind, m.path), shard)
        elif kind == "shapes":
            _LAYOUTS[key] = shapes_layout(cfg)
        elif kind == "toy":
            _LAYOUTS[key] = toy_layout(cfg)
        else:
            raise PlanError(f"model.kind {kind}: no memory plan for this model yet (planned: sd3, flux, "
                            f"shapes, toy)")
    return _LAYOUTS[key]


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
            size = sum_bytes([placed(s, dt) for s in ps + bs])
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
