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
- compute in model.dtype (bf16/fp16/fp32): LoRA keeps the frozen base transformer in it and the
  LoRA weights in float32; full fine-tuning keeps float32 master weights (autocast computes in
  model.dtype; under FSDP2, MixedPrecisionPolicy gathers them in it) and a frozen reference copy
  in model.dtype. Text encoders in model.dtype, the VAE in float32 (as the public code: decoded
  images feed the rewards);
- prompt lists are encoded once (``cache_prompts``: over the ranks, into an on-disk store), after
  which the text encoders may leave the device (model.offload_text_encoders);
- LoRA targets (paper): the joint-attention projections of every block's ``attn``.

The helpers the diffusers policies share (loading, placement) live in
fastflow.models.transformer_policy.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from fastflow import runtime
from fastflow.models.transformer_policy import (  # noqa: F401  (load_pipeline ... re-exported)
    TunedTransformerPolicy, _dtype_kwarg, _model_cfg, load_pipeline, parse_dtype, place)
from fastflow.sde import GuidedVelocity, flow_sigmas

DEFAULT_PATH = "stabilityai/stable-diffusion-3.5-medium"
MAX_SEQUENCE_LENGTH = 128
PAPER_TARGETS = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                 "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"]


class SD3Policy(TunedTransformerPolicy):
    """StableDiffusion3Pipeline components as a Policy; see the module docstring."""

    def __init__(self, pipe, *, device, dtype: torch.dtype = torch.float32, finetune: str = "lora",
                 lora_rank: int = 32, lora_alpha: float = 64.0, lora_targets: Sequence[str] = (),
                 resolution: int = 512, shift: float = 0.0, compile: bool = False,
                 max_sequence_length: int = MAX_SEQUENCE_LENGTH, shard_later: bool = False):
        self.device = torch.device(device)
        self.dtype = dtype
        self.pipe = pipe
        factor = pipe.vae_scale_factor * pipe.transformer.config.patch_size
        if resolution <= 0 or resolution % factor:
            raise ValueError(f"model.resolution must be a positive multiple of {factor}, got {resolution}")
        self.resolution = resolution
        if shift < 0:
            raise ValueError(f"model.shift must be >= 0 (0 = the scheduler's), got {shift}")
        self.shift = float(shift) if shift else float(pipe.scheduler.config.get("shift", 1.0))
        if self.shift <= 0:
            raise ValueError(f"model.shift: the scheduler's shift must be > 0, got {self.shift}")
        self.max_sequence_length = max_sequence_length
        side = resolution // pipe.vae_scale_factor
        self.latent_shape = (pipe.transformer.config.in_channels, side, side)

        self._place_text_encoders()
        place(pipe.vae, self.device, torch.float32).requires_grad_(False).eval()
        self._setup_transformer(pipe.transformer, finetune=finetune, lora_rank=lora_rank,
                                lora_alpha=lora_alpha, targets=list(lora_targets) or PAPER_TARGETS,
                                compile=compile, shard_later=shard_later)
        neg = self._encode([""])
        self._neg_embeds, self._neg_pooled = neg["prompt_embeds"], neg["pooled_prompt_embeds"]

    # -- prompts ---------------------------------------------------------------------------
    def text_encoders(self) -> list[torch.nn.Module]:
        return [e for e in (self.pipe.text_encoder, self.pipe.text_encoder_2, self.pipe.text_encoder_3)
                if e is not None]

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """``{"prompt_embeds": [B, 77 + 128, D], "pooled_prompt_embeds": [B, P]}`` (cached)."""
        return self._cache(prompts)

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.encoder_device,
            num_images_per_prompt=1, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds.to(self.device, self.dtype),
                "pooled_prompt_embeds": pooled.to(self.device, self.dtype)}

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
        with runtime.compute_autocast(self.device, self.dtype):  # fp32 master weights compute in dtype
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

    from fastflow.distributed import world_size_from_env
    from fastflow.parallel import will_shard

    m, targets = _model_cfg(cfg)
    dtype = parse_dtype(m.dtype)
    pipe = load_pipeline(StableDiffusion3Pipeline, m.path or DEFAULT_PATH, dtype)
    return SD3Policy(pipe, device=device, dtype=dtype, finetune=m.finetune, lora_rank=m.lora_rank,
                     lora_alpha=m.lora_alpha, lora_targets=targets, resolution=m.resolution,
                     shift=m.shift, compile=getattr(m, "compile", False),
                     shard_later=will_shard(cfg, world_size_from_env()))
