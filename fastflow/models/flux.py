"""FLUX.1 (dev) as a fastflow Policy over diffusers' FluxPipeline components, with LoRA (peft) or
full fine-tuning.

Conventions (diffusers' FluxPipeline and the authors' public code):
- latents are kept *packed*: ``latent_shape = (seq, C * 4)`` with ``seq = (H / 16) * (W / 16)``
  tokens of 2 x 2 latent patches (``[1024, 64]`` at 512 px), exactly what the transformer reads;
  the sampler integrates them directly (Gaussian noise is invariant to the packing permutation, and
  log-probs average over all elements either way); ``decode`` unpacks;
- guidance-distilled: no CFG, ``guidance_scale`` goes to the guidance embedding and velocity
  returns a plain Tensor (a model without guidance embeds, e.g. schnell, ignores it);
- prompts: CLIP pooled output + T5 hidden states with ``max_sequence_length = 128`` (the public
  code's value), through the pipeline's ``encode_prompt``; text ids are zeros, image ids the
  pipeline's (row, column) latent ids;
- time grid: the pipeline's ``linspace(1, 1/n, n)`` shifted by the scheduler with dynamic shifting,
  ``mu = calculate_shift(seq, ...)`` from the scheduler config, final 0 appended: bit-for-bit the
  pipeline's sigmas. model.shift > 0 replaces dynamic shifting by that static shift;
- the transformer gets ``timestep = (sigma * 1000) / 1000`` (the pipeline's round trip);
- weights and prompts as for SD3 (fastflow.models.sd3): fp32 master weights for full fine-tuning,
  prompt lists encoded once, text encoders offloaded after;
- LoRA targets (public code, r 64): the double blocks' joint-attention projections and both MLPs,
  the single blocks' q/k/v.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from fastflow import runtime
from fastflow.models.sd3 import MAX_SEQUENCE_LENGTH
from fastflow.models.transformer_policy import (TunedTransformerPolicy, _model_cfg, calculate_shift,  # noqa: F401
                                                load_pipeline, parse_dtype, place)

DEFAULT_PATH = "black-forest-labs/FLUX.1-dev"
PAPER_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                 "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj",
                 "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]


class FluxPolicy(TunedTransformerPolicy):
    """FluxPipeline components as a Policy; see the module docstring."""

    def __init__(self, pipe, *, device, dtype: torch.dtype = torch.float32, finetune: str = "lora",
                 lora_rank: int = 64, lora_alpha: float = 128.0, lora_targets: Sequence[str] = (),
                 resolution: int = 512, shift: float = 0.0, compile: bool = False,
                 max_sequence_length: int = MAX_SEQUENCE_LENGTH, shard_later: bool = False):
        self.device = torch.device(device)
        self.dtype = dtype
        self.pipe = pipe
        factor = pipe.vae_scale_factor * 2
        if resolution <= 0 or resolution % factor:
            raise ValueError(f"model.resolution must be a positive multiple of {factor}, got {resolution}")
        if shift < 0:
            raise ValueError(f"model.shift must be >= 0 (0 = FLUX's dynamic shift), got {shift}")
        self.resolution = resolution
        self.shift = float(shift)
        self.max_sequence_length = max_sequence_length
        # The pipeline's latent grid: H / vae_scale_factor rounded to even, then 2 x 2 packing.
        side = 2 * (resolution // factor)
        self._grid = (side // 2, side // 2)
        self.latent_shape = (self._grid[0] * self._grid[1], pipe.transformer.config.in_channels)

        self._place_text_encoders()
        place(pipe.vae, self.device, torch.float32).requires_grad_(False).eval()
        self._setup_transformer(pipe.transformer, finetune=finetune, lora_rank=lora_rank,
                                lora_alpha=lora_alpha, targets=list(lora_targets) or PAPER_TARGETS,
                                compile=compile, shard_later=shard_later)
        self._img_ids = pipe._prepare_latent_image_ids(1, *self._grid, self.device, dtype)
        self._sigmas: dict[int, Tensor] = {}

    # -- prompts ---------------------------------------------------------------------------
    def text_encoders(self) -> list[torch.nn.Module]:
        return [e for e in (self.pipe.text_encoder, self.pipe.text_encoder_2) if e is not None]

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """``{"prompt_embeds": [B, 128, D_t5], "pooled_prompt_embeds": [B, D_clip]}`` (cached)."""
        return self._cache(prompts)

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.encoder_device, num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds.to(self.device, self.dtype),
                "pooled_prompt_embeds": pooled.to(self.device, self.dtype)}

    # -- the flow --------------------------------------------------------------------------
    def sigmas(self, num_steps: int) -> Tensor:
        """The pipeline's sigmas for ``num_steps`` at this resolution, ``[num_steps + 1]``, final 0."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if num_steps not in self._sigmas:
            from diffusers import FlowMatchEulerDiscreteScheduler

            config = dict(self.pipe.scheduler.config)
            grid = np.linspace(1.0, 1 / num_steps, num_steps)
            if self.shift:
                config.update(use_dynamic_shifting=False, shift=self.shift)
            # A fresh scheduler from the pipeline's config runs set_timesteps exactly as the
            # pipeline does (its shifting, terminal stretch and dtype steps included).
            sched = FlowMatchEulerDiscreteScheduler.from_config(config)
            mu = None
            if sched.config.use_dynamic_shifting:
                c = sched.config
                mu = calculate_shift(self.latent_shape[0], c.get("base_image_seq_len", 256),
                                     c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5),
                                     c.get("max_shift", 1.15))
            sched.set_timesteps(sigmas=grid, mu=mu)
            self._sigmas[num_steps] = sched.sigmas.to(torch.float32).cpu()
        return self._sigmas[num_steps].clone()

    def velocity(self, latents: Tensor, sigma: Tensor, cond, *, guidance_scale: float) -> Tensor:
        """The transformer's velocity on packed latents ``[B, seq, C]`` (model dtype); the
        guidance scale goes to the guidance embedding (no CFG)."""
        x = latents.to(self.dtype)
        batch = x.shape[0]
        t = sigma.to(device=x.device, dtype=torch.float32).reshape(-1).expand(batch)
        t = (t * 1000) / 1000  # the pipeline's timestep round trip, bit-for-bit
        guidance = None
        if self.tuning.active.config.guidance_embeds:
            guidance = torch.full((batch,), float(guidance_scale), dtype=torch.float32, device=x.device)
        embeds = cond["prompt_embeds"]
        txt_ids = torch.zeros(embeds.shape[1], 3, dtype=self.dtype, device=x.device)
        with runtime.compute_autocast(self.device, self.dtype):  # fp32 master weights compute in dtype
            return self.tuning.active(hidden_states=x, timestep=t, guidance=guidance,
                                      pooled_projections=cond["pooled_prompt_embeds"],
                                      encoder_hidden_states=embeds, txt_ids=txt_ids,
                                      img_ids=self._img_ids, return_dict=False)[0]

    def unpack(self, latents: Tensor) -> Tensor:
        """Packed ``[B, seq, C * 4]`` -> VAE latents ``[B, C, H / 8, W / 8]``."""
        return self.pipe._unpack_latents(latents, self.resolution, self.resolution,
                                         self.pipe.vae_scale_factor)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Unpack, undo the VAE scaling/shift, decode to ``[B, 3, H, W]`` in [0, 1]."""
        vae = self.pipe.vae
        z = self.unpack(latents.to(torch.float32))
        z = z / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # -- training --------------------------------------------------------------------------
    pipeline_class_name = "FluxPipeline"

    def _blocks(self, transformer):
        return list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)


def build_policy(cfg, device) -> FluxPolicy:
    """The registry factory: load ``cfg.model.path`` (default FLUX.1-dev) and wrap it."""
    from diffusers import FluxPipeline

    from fastflow.distributed import world_size_from_env
    from fastflow.parallel import will_shard

    m, targets = _model_cfg(cfg)
    dtype = parse_dtype(m.dtype)
    pipe = load_pipeline(FluxPipeline, m.path or DEFAULT_PATH, dtype)
    return FluxPolicy(pipe, device=device, dtype=dtype, finetune=m.finetune, lora_rank=m.lora_rank,
                      lora_alpha=m.lora_alpha, lora_targets=targets, resolution=m.resolution,
                      shift=m.shift, compile=getattr(m, "compile", False),
                      shard_later=will_shard(cfg, world_size_from_env()))
