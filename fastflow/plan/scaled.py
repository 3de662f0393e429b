"""Scaled copies of a transformer, to measure activations on a CPU: the same diffusers block
classes and LoRA targets as the real architecture, every width divided by one factor, one block
of each kind, zero weights (their values do not change memory), and inputs at any batch and
token counts.

Why scaled copies: a published transformer does not fit a laptop's memory, and its activations
are sums of per-block terms linear in the width, the batch and the token counts (fit.py), so
small copies at two or three widths determine them.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from fastflow.plan.arch import TRANSFORMER_CLASS, clean, meta_diffusers, quiet


def variant_keys(family: str, config: dict) -> list[str]:
    """The kind of each block of the real transformer, in forward order: SD3's blocks differ by
    dual attention and by the last one (no context output); Qwen-Image's last block's text output
    is discarded (what it computes for it is freed and gets no gradient); FLUX.1 and FLUX.2 have
    double and single blocks."""
    if family == "sd3":
        n = config.get("num_layers", 18)
        dual = set(config.get("dual_attention_layers") or ())
        return [("last" if i == n - 1 else "") + ("dual" if i in dual else "") or "plain" for i in range(n)]
    if family == "qwenimage":
        n = config.get("num_layers", 60)
        return ["plain"] * (n - 1) + ["last"]
    if family == "flux2_klein":
        return ["double"] * config.get("num_layers", 8) + ["single"] * config.get("num_single_layers", 48)
    return ["double"] * config.get("num_layers", 19) + ["single"] * config.get("num_single_layers", 38)


_DEFAULT_ROPE = {"flux": (16, 56, 56), "qwenimage": (16, 56, 56), "flux2_klein": (32, 32, 32, 32)}


def head_dims(family: str) -> tuple[int, int]:
    """The two head dimensions the saved-bytes fit measures at: small, and every rotary axis of
    the copy at least 2 wide (FLUX.2's four axes need 8)."""
    return (8, 16) if family in ("qwenimage", "flux2_klein") else (4, 8)


def scaled_blocks(variants: list[str]) -> tuple[list[str], list[str]]:
    """The blocks of a scaled copy: (fit keys, block kinds). The first block is measured on its
    own ("first": under LoRA its input does not require grad, so it saves less than the others),
    then one block of each kind that follows it, in the real order (SD3's last block last)."""
    kinds = list(dict.fromkeys(variants[1:]))
    kinds = [k for k in kinds if not k.startswith("last")] + [k for k in kinds if k.startswith("last")]
    return ["first"] + kinds, [variants[0]] + kinds


def _rope_axes(config: dict, head_dim: int, family: str = "flux") -> tuple[int, ...]:
    """The rotary axes for ``head_dim`` (FLUX.1, Qwen-Image, FLUX.2): the published shares, each
    even, summing to it."""
    axes = config.get("axes_dims_rope", _DEFAULT_ROPE[family])
    dims = [max(2, 2 * round(head_dim * a / sum(axes) / 2)) for a in axes]
    dims[-1] = head_dim - sum(dims[:-1])
    if dims[-1] < 2 or dims[-1] % 2:
        dims = [2] * (len(axes) - 1) + [head_dim - 2 * (len(axes) - 1)]
    return tuple(dims)


def scaled_config(family: str, config: dict, head_dim: int, variants: list[str]) -> tuple[dict, float, list[str]]:
    """A copy of ``config`` with the head dimension ``head_dim`` (heads kept), every other width
    scaled by the same factor and the blocks of scaled_blocks; returns (config, scale, fit keys)."""
    c = clean(config)
    s = head_dim / c["attention_head_dim"]
    out = dict(c)
    out["attention_head_dim"] = head_dim
    for key in ("joint_attention_dim", "pooled_projection_dim"):
        if key in c:
            out[key] = max(1, round(c[key] * s))
    keys, kinds = scaled_blocks(variants)
    if family == "sd3":
        inner = c["num_attention_heads"] * c["attention_head_dim"]
        out["caption_projection_dim"] = max(1, round(c.get("caption_projection_dim", inner) * s))
        out["num_layers"] = len(kinds)
        out["dual_attention_layers"] = tuple(i for i, k in enumerate(kinds) if k.endswith("dual"))
        out["pos_embed_max_size"] = 16
        out["sample_size"] = 16
        return out, s, keys
    out["axes_dims_rope"] = _rope_axes(c, head_dim, family)
    if family == "qwenimage":
        out["num_layers"] = len(kinds)
        return out, s, keys
    out["num_layers"] = kinds.count("double")
    out["num_single_layers"] = kinds.count("single")
    return out, s, keys


def transient_config(family: str, config: dict, variants: list[str], width: int) -> tuple[dict, float]:
    """A copy with two heads of ``width / 2`` (a working set does not depend on the head count:
    the attention kernels never hold a score matrix), other widths scaled alike, one block per
    kind; returns (config, width scale)."""
    c = clean(config)
    inner = c["num_attention_heads"] * c["attention_head_dim"]
    s = width / inner
    scfg, _, _ = scaled_config(family, config, max(1, round(c["attention_head_dim"] * s)), variants)
    scfg["num_attention_heads"] = 2
    scfg["attention_head_dim"] = width // 2
    if family == "sd3":
        scfg["caption_projection_dim"] = width
    else:
        scfg["axes_dims_rope"] = _rope_axes(c, width // 2, family)
    for key in ("joint_attention_dim", "pooled_projection_dim"):
        if key in c:
            scfg[key] = max(1, round(c[key] * s))
    return scfg, s


def build_scaled(family: str, config: dict, lora: bool, rank: int, alpha_ratio: float, targets: list[str],
                 trainable_dtype: torch.dtype, dtype: torch.dtype) -> nn.Module:
    """The scaled transformer on the CPU, weights zero, with LoRA (adapter in ``trainable_dtype``
    on a base in ``dtype``) or every weight trainable in ``trainable_dtype``, as the policies
    place them (float32 master weights in one process, the compute dtype gathered by FSDP2)."""
    from fastflow.models.lora import apply_lora

    model = meta_diffusers(TRANSFORMER_CLASS[family], config).to_empty(device="cpu")
    if family == "qwenimage":  # its rotary tables are plain attributes, not buffers: made again here
        from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

        pe = model.pos_embed
        model.pos_embed = QwenEmbedRope(theta=pe.theta, axes_dim=list(pe.axes_dim), scale_rope=pe.scale_rope)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.dtype.is_floating_point:
                t.zero_()
    with quiet():
        model.to(dtype=dtype)
    if lora:
        with quiet():
            apply_lora(model, rank=rank, alpha=alpha_ratio * rank, targets=targets)
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.data = torch.zeros_like(p.data, dtype=trainable_dtype)
    else:
        for p in model.parameters():
            p.data = p.data.to(trainable_dtype)
        model.requires_grad_(True)
    return model


def scaled_inputs(family: str, config: dict, B: int, ni: int, nt: int, dtype: torch.dtype,
                  device: str = "cpu") -> dict:
    """The transformer's keyword inputs for ``B`` samples of ``ni`` image and ``nt`` text tokens, as
    the family's policy passes them (Qwen-Image: a text mask with the last quarter padding, as a
    run's prompts padded to its text length; FLUX.2: 4-axis position ids)."""
    side = int(round(math.sqrt(ni)))
    if side * side != ni:
        raise ValueError(f"image tokens must be a square, got {ni}")
    with torch.device("cpu"):
        kw = _inputs(family, config, B, side, ni, nt, dtype)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def _inputs(family, config, B, side, ni, nt, dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(B, nt, config["joint_attention_dim"], generator=g).to(dtype)
    t = torch.rand(B, generator=g) * 1000
    if family == "sd3":
        pooled = torch.randn(B, config["pooled_projection_dim"], generator=g).to(dtype)
        p = config.get("patch_size", 2)
        x = torch.randn(B, config.get("in_channels", 16), side * p, side * p, generator=g).to(dtype)
        return dict(hidden_states=x, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled,
                    return_dict=False)
    x = torch.randn(B, ni, config.get("in_channels", 64), generator=g).to(dtype)
    if family == "qwenimage":
        mask = torch.ones(B, nt, dtype=torch.bool)
        mask[:, nt - nt // 4:] = False
        return dict(hidden_states=x, timestep=t / 1000, encoder_hidden_states=embeds,
                    encoder_hidden_states_mask=mask, img_shapes=[(1, side, side)] * B, return_dict=False)
    if family == "flux2_klein":
        from diffusers import Flux2KleinPipeline

        img_ids = Flux2KleinPipeline._prepare_latent_ids(torch.zeros(1, 1, side, side))[0]
        txt_ids = Flux2KleinPipeline._prepare_text_ids(torch.zeros(1, nt, 1))[0]
        return dict(hidden_states=x, timestep=t / 1000, encoder_hidden_states=embeds, txt_ids=txt_ids,
                    img_ids=img_ids, guidance=None, return_dict=False)
    from diffusers import FluxPipeline

    pooled = torch.randn(B, config["pooled_projection_dim"], generator=g).to(dtype)
    img_ids = FluxPipeline._prepare_latent_image_ids(1, side, side, "cpu", dtype)
    kw = dict(hidden_states=x, timestep=t / 1000, encoder_hidden_states=embeds, pooled_projections=pooled,
              txt_ids=torch.zeros(nt, 3, dtype=dtype), img_ids=img_ids, return_dict=False)
    if config.get("guidance_embeds"):
        kw["guidance"] = torch.full((B,), 3.5)
    return kw


def forward(model: nn.Module, kw: dict, dtype: torch.dtype, cache: bool = True) -> torch.Tensor:
    """One forward under the trainer's autocast (none in float32). ``cache``: autocast keeps its
    weight casts until the region ends (eager forwards); a captured graph casts with it off."""
    ctx = (torch.autocast("cpu", dtype=dtype, cache_enabled=cache) if dtype != torch.float32
           else contextlib.nullcontext())
    with ctx:
        return model(**kw)[0]
