"""SD3 / SD3.5 as a fastflow Policy (fastflow.rollout.Policy) over diffusers'
StableDiffusion3Pipeline components, with LoRA (peft) or full fine-tuning.

Conventions (FLOW_GRPO.md and the authors' public code):
- prompts: CLIP-L + CLIP-G (penultimate hidden states, 77 tokens, pooled projections) + T5 with
  ``max_sequence_length = 128`` (the public code's value; diffusers' default is 256), through the
  pipeline's own ``encode_prompt``; embeddings are cached per prompt, the empty prompt (the CFG
  negative) is encoded once;
- CFG: ``velocity`` runs ONE transformer forward on ``[uncond; cond]`` and returns a
  GuidedVelocity, combined in float32 by the SDE step;
- timestep given to the transformer = ``sigma * 1000``; ``sigmas(n) = flow_sigmas(n, shift)``,
  shift = model.shift or the scheduler's (3.0 for SD3.5);
- the transformer runs in model.dtype (bf16/fp16/fp32), LoRA weights in float32, text encoders in
  model.dtype, the VAE in float32 (as the public code: decoded images feed the rewards);
- LoRA targets (paper): the joint-attention projections of every block's ``attn``.

Also home of the small helpers the FLUX policy shares (dtype names, the prompt cache, loading).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Callable, Sequence


import torch
from torch import Tensor

from fastflow.models.lora import TunedTransformerPolicy, Tuning
from fastflow.sde import GuidedVelocity, flow_sigmas

DEFAULT_PATH = "stabilityai/stable-diffusion-3.5-medium"
MAX_SEQUENCE_LENGTH = 128
PAPER_TARGETS = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                 "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> torch.bfloat16 (model.dtype's allowed names)."""
    if name not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def load_pipeline(pipeline_cls, path: str, dtype: torch.dtype):
    """``pipeline_cls.from_pretrained(path)`` (hub id or local directory) or ``from_single_file``
    for a single weights file; a failure becomes one line naming model.path."""
    try:
        if os.path.isfile(path):
            return pipeline_cls.from_single_file(path, torch_dtype=dtype)
        return pipeline_cls.from_pretrained(path, dtype=dtype)
    except Exception as e:  # noqa: BLE001 - re-raised with the config key that caused it
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"model.path {path!r}: cannot load a {pipeline_cls.__name__}: {first}") from e


def place(module: torch.nn.Module, device, dtype: torch.dtype) -> torch.nn.Module:
    """Move ``module`` to ``device`` and cast it to ``dtype`` only when it is not already in it
    (diffusers warns on every cast, even a no-op one)."""
    module.to(device)
    if any(p.dtype != dtype for p in module.parameters()):
        module.to(dtype=dtype)
    return module


class PromptCache:
    """Per-prompt conditioning, computed in batches for the prompts not seen yet.

    ``encode(list_of_prompts) -> dict of batch-first tensors``; each prompt's row is kept (least
    recently used evicted past ``max_size``) so a prompt is encoded once per run in practice.
    Rows do not depend on the batch they were encoded in (every tokenizer pads to a fixed length).
    """

    def __init__(self, encode: Callable[[list[str]], dict[str, Tensor]], max_size: int = 4096,
                 chunk: int = 32):
        self._encode = encode
        self._rows: OrderedDict[str, dict[str, Tensor]] = OrderedDict()
        self.max_size = max_size
        self.chunk = chunk

    def __call__(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        prompts = list(prompts)
        if not prompts:
            raise ValueError("encode_prompts: empty prompt list")
        missing = list(dict.fromkeys(p for p in prompts if p not in self._rows))
        for i in range(0, len(missing), self.chunk):
            part = missing[i:i + self.chunk]
            out = self._encode(part)
            for j, p in enumerate(part):
                self._rows[p] = {k: v[j] for k, v in out.items()}
        rows = []
        for p in prompts:
            self._rows.move_to_end(p)
            rows.append(self._rows[p])
        result = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        while len(self._rows) > self.max_size:
            self._rows.popitem(last=False)
        return result


def _model_cfg(cfg):
    m = cfg.model
    targets = list(getattr(m, "lora_targets", []) or [])
    return m, targets


class SD3Policy(TunedTransformerPolicy):
    """StableDiffusion3Pipeline components as a Policy; see the module docstring."""

    def __init__(self, pipe, *, device, dtype: torch.dtype = torch.float32, finetune: str = "lora",
                 lora_rank: int = 32, lora_alpha: float = 64.0, lora_targets: Sequence[str] = (),
                 resolution: int = 512, shift: float = 0.0, compile: bool = False,
                 max_sequence_length: int = MAX_SEQUENCE_LENGTH):
        self.device = torch.device(device)
        self.dtype = dtype
        self.pipe = pipe
        factor = pipe.vae_scale_factor * pipe.transformer.config.patch_size
        if resolution <= 0 or resolution % factor:
            raise ValueError(f"model.resolution must be a positive multiple of {factor}, got {resolution}")
        self.resolution = resolution
        self.shift = float(shift) if shift else float(pipe.scheduler.config.get("shift", 1.0))
        if self.shift <= 0:
            raise ValueError(f"model.shift must be >= 0, got {shift}")
        self.max_sequence_length = max_sequence_length
        side = resolution // pipe.vae_scale_factor
        self.latent_shape = (pipe.transformer.config.in_channels, side, side)

        for enc in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3):
            if enc is not None:
                place(enc, self.device, dtype).requires_grad_(False).eval()
        place(pipe.vae, self.device, torch.float32).requires_grad_(False).eval()
        self.transformer = place(pipe.transformer, self.device, dtype)
        self.tuning = Tuning(self.transformer, finetune=finetune, rank=lora_rank, alpha=lora_alpha,
                             targets=list(lora_targets) or PAPER_TARGETS)
        if compile:
            self.transformer.compile()
            if self.tuning.ref_transformer is not None:
                self.tuning.ref_transformer.compile()
        self._cache = PromptCache(self._encode)
        neg = self._encode([""])
        self._neg_embeds, self._neg_pooled = neg["prompt_embeds"], neg["pooled_prompt_embeds"]

    # -- prompts ---------------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """``{"prompt_embeds": [B, 77 + 128, D], "pooled_prompt_embeds": [B, P]}`` (cached)."""
        return self._cache(prompts)

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device,
            num_images_per_prompt=1, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds.to(self.dtype), "pooled_prompt_embeds": pooled.to(self.dtype)}

    # -- the flow --------------------------------------------------------------------------
    def sigmas(self, num_steps: int) -> Tensor:
        """``flow_sigmas(num_steps, shift)``: the scheduler's grid, ``[num_steps + 1]`` ending in 0."""
        return flow_sigmas(num_steps, self.shift, self.pipe.scheduler.config.num_train_timesteps)

    def velocity(self, latents: Tensor, sigma: Tensor, cond, *, guidance_scale: float):
        """The transformer's velocity (model dtype); with ``guidance_scale > 1`` a GuidedVelocity
        from one batched forward over the negative and the prompt conditioning."""
        x = latents.to(self.dtype)
        t = sigma.to(device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0]) * 1000
        embeds, pooled = cond["prompt_embeds"], cond["pooled_prompt_embeds"]
        batch = x.shape[0]
        if guidance_scale > 1.0:
            x = torch.cat([x, x])
            t = torch.cat([t, t])
            embeds = torch.cat([self._neg_embeds.expand(batch, -1, -1), embeds])
            pooled = torch.cat([self._neg_pooled.expand(batch, -1), pooled])
        out = self.tuning.active(hidden_states=x, timestep=t, encoder_hidden_states=embeds,
                                 pooled_projections=pooled, return_dict=False)[0]
        if guidance_scale > 1.0:
            uncond, cond_v = out.chunk(2)
            return GuidedVelocity(uncond, cond_v, guidance_scale)
        return out

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """VAE decode (undoing the scaling and shift factors) to ``[B, 3, H, W]`` in [0, 1]."""
        vae = self.pipe.vae
        z = latents.to(torch.float32) / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # -- training --------------------------------------------------------------------------
    pipeline_class_name = "StableDiffusion3Pipeline"

    def _blocks(self, transformer):
        return list(transformer.transformer_blocks)


def build_policy(cfg, device) -> SD3Policy:
    """The registry factory: load ``cfg.model.path`` (default SD3.5-Medium) and wrap it."""
    from diffusers import StableDiffusion3Pipeline

    m, targets = _model_cfg(cfg)
    dtype = parse_dtype(m.dtype)
    pipe = load_pipeline(StableDiffusion3Pipeline, m.path or DEFAULT_PATH, dtype)
    return SD3Policy(pipe, device=device, dtype=dtype, finetune=m.finetune, lora_rank=m.lora_rank,
                     lora_alpha=m.lora_alpha, lora_targets=targets, resolution=m.resolution,
                     shift=m.shift, compile=getattr(m, "compile", False))
