"""FLUX.2 [klein] as a fastflow Policy over diffusers' Flux2KleinPipeline components, with LoRA
(peft) or full fine-tuning.

Why klein as the second 2026 model (rather than Z-Image): its pipeline pads every prompt to a
fixed 512 tokens and attends to all of them (no mask), so every forward of a run has the same
shapes: a training micro-batch reproduces its rollout exactly, the prompt store holds fixed rows,
and rollouts can be captured as CUDA graphs; its CFG is the linear one (a GuidedVelocity combined
in float32 by the fused SDE step); and it is FLUX.1's family (packed latents, position ids).
Z-Image's transformer takes Python lists of per-prompt embeddings of their true lengths and pads
them inside per-sample loops, so a batch's shapes follow its prompts' token counts.

Conventions (diffusers' Flux2KleinPipeline; the public Flow-Factory klein recipe for LoRA):
- prompts: Qwen3's chat template (one user turn, thinking off) padded to
  ``max_sequence_length = 512`` tokens, the hidden states of layers 9, 18 and 27 concatenated per
  token (``[B, 512, 3 H]``: 7680 channels for klein-4B), through the pipeline's ``encode_prompt``;
  text ids ``(0, 0, 0, l)``, image ids ``(0, h, w, 0)``, as the pipeline makes them;
- CFG only for the base (undistilled) models, as the pipeline: ``guidance_scale > 1`` and not
  ``is_distilled`` runs one forward on ``[negative; prompt]`` (negative: the empty prompt) and
  returns a GuidedVelocity ``neg + w (cond - neg)``; the step-distilled klein-4B / 9B sample
  without CFG (their pipeline ignores the scale) and have no guidance embedding;
- latents are kept *packed*: the VAE's latents patchified 2 x 2 into channels, normalised by its
  batch-norm statistics, one token per patch: ``latent_shape = (seq, 4 C)`` with
  ``seq = (H / 16) * (W / 16)`` (``[1024, 128]`` at 512 px); ``decode`` unpacks by the ids,
  undoes the normalisation (``z * sqrt(var + eps) + mean``), unpatchifies and decodes;
- time grid: the pipeline's ``linspace(1, 1/n, n)`` shifted by the scheduler with FLUX.2's
  empirical ``mu = compute_empirical_mu(seq, n)`` (it depends on the step count as well as the
  resolution), final 0 appended; ``model.shift > 0`` replaces it by that static shift;
- the transformer gets ``timestep = (sigma * 1000) / 1000`` in float32 (it multiplies by 1000
  in the compute dtype itself);
- weights and prompts as for SD3 (fastflow.models.sd3);
- CUDA graphs: nothing in the transformer's forward copies host data to the device or syncs
  (FLUX.1's policy captures the same way), so rollouts are captured on one GPU; not yet captured
  on a GPU here (the CPU tests run the captured program's code in GraphedSampler's static mode);
- LoRA targets (Flow-Factory's klein default, r 64 / alpha 128): the double blocks' attention
  projections of both streams and both SwiGLU MLPs (``ff`` / ``ff_context`` ``linear_in`` and
  ``linear_out``), and the single blocks' fused ``attn.to_qkv_mlp_proj`` (their fused output
  projection ``attn.to_out`` is not adapted).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from fastflow import runtime
from fastflow.models.qwenimage import check_step_counts, scheduler_config_of, scheduler_sigmas
from fastflow.models.transformer_policy import TunedTransformerPolicy, _model_cfg, load_pipeline, parse_dtype, place
from fastflow.sde import GuidedVelocity

DEFAULT_PATH = "black-forest-labs/FLUX.2-klein-base-4B"
MAX_SEQUENCE_LENGTH = 512  # the pipeline's padded prompt length
TEXT_ENCODER_OUT_LAYERS = (9, 18, 27)  # the pipeline's default hidden-state layers
NEGATIVE_PROMPT = ""
PAPER_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                 "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.linear_in",
                 "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
                 "attn.to_qkv_mlp_proj"]


def compute_empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's shift ``mu`` (diffusers.pipelines.flux2.pipeline_flux2_klein)."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu as mu

    return mu(image_seq_len=image_seq_len, num_steps=num_steps)


class Flux2KleinPolicy(TunedTransformerPolicy):
    """Flux2KleinPipeline components as a Policy; see the module docstring."""

    pipeline_class_name = "Flux2KleinPipeline"

    def __init__(self, pipe, *, device, dtype: torch.dtype = torch.float32, finetune: str = "lora",
                 lora_rank: int = 64, lora_alpha: float = 128.0, lora_targets: Sequence[str] = (),
                 resolution: int = 512, shift: float = 0.0, compile: bool = False,
                 max_sequence_length: int = MAX_SEQUENCE_LENGTH,
                 text_encoder_out_layers: Sequence[int] = TEXT_ENCODER_OUT_LAYERS,
                 shard_later: bool = False):
        self.device = torch.device(device)
        self.dtype = dtype
        self.pipe = pipe
        factor = pipe.vae_scale_factor * 2  # VAE downsampling x 2 x 2 patches
        if resolution <= 0 or resolution % factor:
            raise ValueError(f"model.resolution must be a positive multiple of {factor}, got {resolution}")
        if shift < 0:
            raise ValueError(f"model.shift must be >= 0 (0 = FLUX.2's empirical shift), got {shift}")
        layers = pipe.text_encoder.config.num_hidden_layers
        if any(not 0 <= k <= layers for k in text_encoder_out_layers):
            raise ValueError(f"text_encoder_out_layers {tuple(text_encoder_out_layers)}: the text encoder "
                             f"has hidden states 0..{layers}")
        self.resolution = resolution
        self.shift = float(shift)
        self.max_sequence_length = max_sequence_length
        self.text_encoder_out_layers = tuple(text_encoder_out_layers)
        side = resolution // factor
        self._grid = (side, side)
        self.latent_shape = (side * side, pipe.transformer.config.in_channels)
        self.distilled = bool(getattr(pipe.config, "is_distilled", False))

        self._place_text_encoders()
        place(pipe.vae, self.device, torch.float32).requires_grad_(False).eval()
        self._setup_transformer(pipe.transformer, finetune=finetune, lora_rank=lora_rank,
                                lora_alpha=lora_alpha, targets=list(lora_targets) or PAPER_TARGETS,
                                compile=compile, shard_later=shard_later)
        grid = torch.zeros(1, 1, side, side)
        self._img_ids = pipe._prepare_latent_ids(grid)[0].to(self.device)  # [seq, 4]
        self._txt_ids = pipe._prepare_text_ids(torch.zeros(1, max_sequence_length, 1))[0].to(self.device)
        self._neg_embeds = self._encode([NEGATIVE_PROMPT])["prompt_embeds"]
        self._sigmas: dict[int, Tensor] = {}

    # -- prompts ---------------------------------------------------------------------------
    def text_encoders(self) -> list[torch.nn.Module]:
        return [e for e in (self.pipe.text_encoder,) if e is not None]

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """``{"prompt_embeds": [B, 512, 3 H]}`` (cached)."""
        return self._cache(prompts)

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, _ = self.pipe.encode_prompt(prompt=list(prompts), device=self.encoder_device,
                                            num_images_per_prompt=1,
                                            max_sequence_length=self.max_sequence_length,
                                            text_encoder_out_layers=self.text_encoder_out_layers)
        return {"prompt_embeds": embeds.to(self.device, self.dtype)}

    # -- the flow --------------------------------------------------------------------------
    def sigmas(self, num_steps: int) -> Tensor:
        """The pipeline's sigmas for ``num_steps`` at this resolution, ``[num_steps + 1]``, final 0."""
        if num_steps not in self._sigmas:
            mu = compute_empirical_mu(self.latent_shape[0], num_steps)
            self._sigmas[num_steps] = scheduler_sigmas(self.pipe.scheduler.config, num_steps, mu, self.shift)
        return self._sigmas[num_steps].clone()

    @property
    def cfg(self) -> bool:
        """Whether ``guidance_scale > 1`` runs CFG (the base models; the distilled ones never)."""
        return not self.distilled

    def velocity(self, latents: Tensor, sigma: Tensor, cond, *, guidance_scale: float):
        """The transformer's velocity on packed latents ``[B, seq, C]`` (model dtype); a
        GuidedVelocity from one forward over negative and prompt when CFG applies."""
        x = latents.to(self.dtype)
        batch = x.shape[0]
        t = sigma.to(device=x.device, dtype=torch.float32).reshape(-1).expand(batch)
        t = (t * 1000) / 1000  # the pipeline's timestep round trip, bit-for-bit
        embeds = cond["prompt_embeds"]
        guided = self.cfg and guidance_scale > 1.0
        if guided:
            x = torch.cat([x, x])
            t = torch.cat([t, t])
            embeds = torch.cat([self._neg_embeds.expand(batch, -1, -1), embeds])
        with runtime.compute_autocast(self.device, self.dtype):  # fp32 master weights compute in dtype
            out = self.tuning.active(hidden_states=x, timestep=t, guidance=None,
                                     encoder_hidden_states=embeds, txt_ids=self._txt_ids,
                                     img_ids=self._img_ids, return_dict=False)[0]
        if guided:
            uncond, cond_v = out.chunk(2)
            return GuidedVelocity(uncond, cond_v, guidance_scale)
        return out

    def unpack(self, latents: Tensor) -> Tensor:
        """Packed ``[B, seq, 4 C]`` -> normalised patch latents ``[B, 4 C, H / 16, W / 16]``."""
        ids = self._img_ids.unsqueeze(0).expand(latents.shape[0], -1, -1)
        return self.pipe._unpack_latents_with_ids(latents, ids, *self._grid)

    def vae_latents(self, latents: Tensor) -> Tensor:
        """Packed latents -> what the VAE decodes ``[B, C, H / 8, W / 8]`` (the pipeline's
        ``output_type="latent"``): unpacked, the batch-norm normalisation undone, unpatchified."""
        vae = self.pipe.vae
        z = self.unpack(latents.to(torch.float32))
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(z.device, z.dtype)
        return self.pipe._unpatchify_latents(z * std + mean)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """VAE decode of :meth:`vae_latents` to ``[B, 3, H, W]`` in [0, 1]."""
        images = self.pipe.vae.decode(self.vae_latents(latents), return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # -- training --------------------------------------------------------------------------
    def _blocks(self, transformer):
        return list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)


def build_policy(cfg, device) -> Flux2KleinPolicy:
    """The registry factory: load ``cfg.model.path`` (default FLUX.2-klein-base-4B) and wrap it."""
    from diffusers import Flux2KleinPipeline

    from fastflow.distributed import world_size_from_env
    from fastflow.parallel import will_shard

    m, targets = _model_cfg(cfg)
    dtype = parse_dtype(m.dtype)
    path = m.path or DEFAULT_PATH
    sched = scheduler_config_of(path)
    if sched is not None and m.shift >= 0:  # refuse a step count the scheduler cannot grid before loading
        seq = (m.resolution // 16) ** 2
        check_step_counts(cfg, lambda n: scheduler_sigmas(sched, n, compute_empirical_mu(seq, n), m.shift))
    pipe = load_pipeline(Flux2KleinPipeline, path, dtype)
    policy = Flux2KleinPolicy(pipe, device=device, dtype=dtype, finetune=m.finetune, lora_rank=m.lora_rank,
                              lora_alpha=m.lora_alpha, lora_targets=targets, resolution=m.resolution,
                              shift=m.shift, compile=getattr(m, "compile", False),
                              shard_later=will_shard(cfg, world_size_from_env()))
    check_step_counts(cfg, policy.sigmas)
    return policy
