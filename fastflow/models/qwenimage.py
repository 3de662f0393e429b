"""Qwen-Image as a fastflow Policy over diffusers' QwenImagePipeline components, with LoRA (peft)
or full fine-tuning.

Conventions (diffusers' QwenImagePipeline and the authors' public Qwen-Image trainer):
- prompts: Qwen2.5-VL's last hidden states through the pipeline's own ``encode_prompt``: its chat
  template (a system prompt asking to describe the image), of which the first
  ``prompt_template_encode_start_idx`` (34) tokens are dropped, and at most
  ``max_sequence_length = 512`` tokens kept. The pipeline pads each batch to its longest prompt
  with a mask; here every prompt is padded to one **fixed** length ``text_len`` with its mask
  (``{"prompt_embeds": [B, text_len, D], "prompt_embeds_mask": [B, text_len]}``), so a training
  micro-batch, however its samples were drawn, runs exactly the shapes of the rollout that made
  them, and the prompt store holds fixed-size rows. ``cache_prompts`` sets ``text_len`` from the
  run's prompt lists: the longest prompt (with the negative), rounded up to a multiple of 16,
  at most 512; before it (or without it) prompts are padded to 512. A prompt outside the lists
  that is longer than ``text_len`` is cut there (logged once);
- true CFG as the pipeline does it: the negative prompt is ``" "`` (the public trainer's; the
  pipeline runs no CFG without a negative prompt), one transformer forward on
  ``[negative; prompt]`` and the combination ``comb = neg + w (cond - neg)`` rescaled per token to
  the conditional prediction's norm, ``comb * |cond| / |comb|`` (norms over the channels). The
  rescale is not linear in the halves, so velocity combines them itself, in float32, and returns a
  plain Tensor (the pipeline combines in the model dtype). ``guidance_scale <= 1``: no CFG;
- latents are kept *packed* as the transformer reads them: ``latent_shape = (seq, 4 z)`` with
  ``seq = (H / 16) * (W / 16)`` (``[1024, 64]`` at 512 px); ``decode`` unpacks, undoes the VAE's
  per-channel normalisation (``z * std + mean``, written as the pipeline writes it) and decodes
  the single frame of the Wan-style 3D VAE;
- time grid: the pipeline's ``linspace(1, 1/n, n)`` shifted by the scheduler with its dynamic
  (resolution-dependent, exponential) shift ``mu = calculate_shift(seq, ...)`` from the scheduler
  config and its terminal stretch (Qwen-Image: ``shift_terminal = 0.02``), final 0 appended: a
  fresh scheduler from the pipeline's config runs ``set_timesteps`` exactly as the pipeline does.
  ``model.shift > 0`` replaces dynamic shifting by that static shift;
- the transformer gets ``timestep = (sigma * 1000) / 1000`` (the pipeline's round trip) in
  float32; it casts it to the compute dtype itself;
- weights and prompts as for SD3 (fastflow.models.sd3): fp32 master weights for full fine-tuning,
  prompt lists encoded once, the text encoder offloaded after;
- LoRA targets (the public Qwen-Image trainer, r 64 / alpha 128): every block's joint-attention
  projections of both streams and both MLPs (``img_mlp``, ``txt_mlp``).

CUDA graphs: not supported (``supports_cuda_graphs = False``, so the rollout runs eagerly, decided
before any capture, and ``sample.cuda_graph = "required"`` stops at start-up). Every forward of a
run has the same shapes, but diffusers' QwenImageTransformer2DModel makes a device tensor from a
Python int in every masked forward (``compute_text_seq_len_from_mask``: ``torch.as_tensor(
text_seq_len, device=...)``), a blocking host-to-device copy that stream capture forbids. At 20B
parameters the launch overhead a graph removes is a negligible share of a step.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from fastflow import runtime
from fastflow.models.transformer_policy import (TunedTransformerPolicy, _model_cfg, calculate_shift,
                                                load_pipeline, parse_dtype, place)

log = logging.getLogger("fastflow.models.qwenimage")

DEFAULT_PATH = "Qwen/Qwen-Image"
MAX_SEQUENCE_LENGTH = 512  # the pipeline's default, and the public trainer's
NEGATIVE_PROMPT = " "
TEXT_LEN_MULTIPLE = 16
PAPER_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                 "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj",
                 "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]


def scheduler_sigmas(scheduler_config, num_steps: int, mu: float | None, shift: float = 0.0) -> Tensor:
    """``[num_steps + 1]`` float32 sigmas, final 0, that a pipeline with this scheduler config
    uses for ``num_steps`` steps: a fresh FlowMatchEulerDiscreteScheduler from the config runs
    ``set_timesteps(sigmas=linspace(1, 1/n, n), mu=mu)`` as the pipeline does (its shifting,
    terminal stretch and dtype steps included). ``shift > 0``: that static shift instead of the
    dynamic one."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    config = dict(scheduler_config)
    if shift:
        config.update(use_dynamic_shifting=False, shift=shift)
    sched = FlowMatchEulerDiscreteScheduler.from_config(config)
    grid = np.linspace(1.0, 1 / num_steps, num_steps)
    with np.errstate(invalid="ignore", divide="ignore"):  # reported below, in one line
        sched.set_timesteps(sigmas=grid, mu=mu if sched.config.use_dynamic_shifting else None)
    sigmas = sched.sigmas.to(torch.float32).cpu()
    if not torch.isfinite(sigmas).all():  # e.g. a terminal stretch (shift_terminal) of a 1-step grid
        raise ValueError(f"the model's scheduler gives non-finite sigmas for {num_steps} step(s) "
                         f"(shift_terminal {config.get('shift_terminal')}): use more steps")
    return sigmas


def scheduler_config_of(path: str):
    """The scheduler config saved with a pipeline at ``path`` (a hub id or a directory), read
    before the weights are loaded; None when it cannot be read (a single weights file, no copy)."""
    try:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.load_config(path, subfolder="scheduler")
    except Exception:  # noqa: BLE001 - loading the pipeline reports a bad path in one line
        return None


def check_step_counts(cfg, sigmas) -> None:
    """One line naming sample.train_steps / eval_steps when ``sigmas(n)`` refuses that count."""
    for key in ("train_steps", "eval_steps"):
        n = getattr(cfg.sample, key)
        try:
            sigmas(n)
        except ValueError as e:
            raise ValueError(f"sample.{key} = {n}: {e}") from None


class QwenImagePolicy(TunedTransformerPolicy):
    """QwenImagePipeline components as a Policy; see the module docstring."""

    pipeline_class_name = "QwenImagePipeline"
    supports_cuda_graphs = False  # the transformer copies a host int to the device per forward

    def __init__(self, pipe, *, device, dtype: torch.dtype = torch.float32, finetune: str = "lora",
                 lora_rank: int = 64, lora_alpha: float = 128.0, lora_targets: Sequence[str] = (),
                 resolution: int = 512, shift: float = 0.0, compile: bool = False,
                 max_sequence_length: int = MAX_SEQUENCE_LENGTH, shard_later: bool = False):
        self.device = torch.device(device)
        self.dtype = dtype
        self.pipe = pipe
        factor = pipe.vae_scale_factor * 2  # VAE downsampling x 2 x 2 packing
        if resolution <= 0 or resolution % factor:
            raise ValueError(f"model.resolution must be a positive multiple of {factor}, got {resolution}")
        if shift < 0:
            raise ValueError(f"model.shift must be >= 0 (0 = Qwen-Image's dynamic shift), got {shift}")
        if not 1 <= max_sequence_length <= 1024:
            raise ValueError(f"max_sequence_length must be in [1, 1024] (the pipeline's limit), got "
                             f"{max_sequence_length}")
        self.resolution = resolution
        self.shift = float(shift)
        self.max_sequence_length = max_sequence_length
        side = resolution // factor
        self._img_shapes = [(1, side, side)]
        self.latent_shape = (side * side, pipe.transformer.config.in_channels)
        self.text_len = max_sequence_length
        self._warned_cut = False

        self._place_text_encoders()
        place(pipe.vae, self.device, torch.float32).requires_grad_(False).eval()
        self._setup_transformer(pipe.transformer, finetune=finetune, lora_rank=lora_rank,
                                lora_alpha=lora_alpha, targets=list(lora_targets) or PAPER_TARGETS,
                                compile=compile, shard_later=shard_later)
        self._encode_negative()
        self._sigmas: dict[int, Tensor] = {}

    # -- prompts ---------------------------------------------------------------------------
    def text_encoders(self) -> list[torch.nn.Module]:
        return [e for e in (self.pipe.text_encoder,) if e is not None]

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """``{"prompt_embeds": [B, text_len, D], "prompt_embeds_mask": [B, text_len] bool}``."""
        return self._cache(prompts)

    def prompt_lengths(self, prompts: Sequence[str]) -> list[int]:
        """Tokens each prompt keeps after the template's dropped ones (tokenizer only), as the
        pipeline counts them: truncated at ``tokenizer_max_length``, then at max_sequence_length."""
        pipe = self.pipe
        drop = pipe.prompt_template_encode_start_idx
        ids = pipe.tokenizer([pipe.prompt_template_encode.format(p) for p in prompts],
                             max_length=pipe.tokenizer_max_length + drop, truncation=True).input_ids
        return [min(max(len(i) - drop, 0), self.max_sequence_length) for i in ids]

    def set_text_len(self, text_len: int) -> None:
        """Pad (and cut) every prompt to ``text_len`` tokens from now on; forgets the prompts
        encoded at another length and encodes the negative again."""
        if not 1 <= text_len <= self.max_sequence_length:
            raise ValueError(f"text_len must be in [1, {self.max_sequence_length}], got {text_len}")
        if text_len == self.text_len:
            return
        from fastflow.models.prompt_cache import PromptCache

        self.text_len = text_len
        self._cache = PromptCache(self._encode, self.device)
        self._encode_negative()

    def fit_prompts(self, texts) -> None:
        """Fix ``text_len`` to the longest of ``texts`` (and the negative), rounded up to a multiple
        of 16, at most max_sequence_length: what a run's prompt lists give it. The evaluation CLI
        calls it with the run's lists, so that it pads prompts as the run did."""
        longest = max(self.prompt_lengths([NEGATIVE_PROMPT, *dict.fromkeys(texts)]))
        m = TEXT_LEN_MULTIPLE
        self.set_text_len(min(self.max_sequence_length, max(m, -(-longest // m) * m)))

    def cache_prompts(self, texts, **kwargs) -> None:
        """As TunedTransformerPolicy.cache_prompts, after fit_prompts(texts)."""
        texts = list(dict.fromkeys(texts))
        self.fit_prompts(texts)
        super().cache_prompts(texts, **kwargs)

    def _encode_negative(self) -> None:
        neg = self._encode([NEGATIVE_PROMPT])
        self._neg_embeds, self._neg_mask = neg["prompt_embeds"], neg["prompt_embeds_mask"]

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> dict[str, Tensor]:
        embeds, mask = self.pipe.encode_prompt(prompt=list(prompts), device=self.encoder_device,
                                               num_images_per_prompt=1,
                                               max_sequence_length=self.max_sequence_length)
        batch, length = embeds.shape[:2]
        mask = (torch.ones(batch, length, dtype=torch.bool, device=embeds.device) if mask is None
                else mask.to(torch.bool))
        n = self.text_len
        if length > n:
            if bool(mask[:, n:].any()) and not self._warned_cut:
                self._warned_cut = True
                log.warning("a prompt longer than the run's text length (%d tokens, set from its prompt "
                            "lists) is cut there", n)
            embeds, mask = embeds[:, :n], mask[:, :n]
        elif length < n:
            embeds = torch.cat([embeds, embeds.new_zeros(batch, n - length, embeds.shape[2])], 1)
            mask = torch.cat([mask, mask.new_zeros(batch, n - length)], 1)
        return {"prompt_embeds": embeds.to(self.device, self.dtype),
                "prompt_embeds_mask": mask.to(self.device)}

    # -- the flow --------------------------------------------------------------------------
    def sigmas(self, num_steps: int) -> Tensor:
        """The pipeline's sigmas for ``num_steps`` at this resolution, ``[num_steps + 1]``, final 0."""
        if num_steps not in self._sigmas:
            c = self.pipe.scheduler.config
            mu = calculate_shift(self.latent_shape[0], c.get("base_image_seq_len", 256),
                                 c.get("max_image_seq_len", 4096), c.get("base_shift", 0.5),
                                 c.get("max_shift", 1.15))
            self._sigmas[num_steps] = scheduler_sigmas(c, num_steps, mu, self.shift)
        return self._sigmas[num_steps].clone()

    def velocity(self, latents: Tensor, sigma: Tensor, cond, *, guidance_scale: float) -> Tensor:
        """The transformer's velocity on packed latents ``[B, seq, C]``; with ``guidance_scale > 1``
        Qwen-Image's norm-rescaled true CFG (float32) from one forward over negative and prompt."""
        x = latents.to(self.dtype)
        batch = x.shape[0]
        t = sigma.to(device=x.device, dtype=torch.float32).reshape(-1).expand(batch)
        t = (t * 1000) / 1000  # the pipeline's timestep round trip, bit-for-bit
        embeds, mask = cond["prompt_embeds"], cond["prompt_embeds_mask"]
        guided = guidance_scale > 1.0
        if guided:
            x = torch.cat([x, x])
            t = torch.cat([t, t])
            embeds = torch.cat([self._neg_embeds.expand(batch, -1, -1), embeds])
            mask = torch.cat([self._neg_mask.expand(batch, -1), mask])
        with runtime.compute_autocast(self.device, self.dtype):  # fp32 master weights compute in dtype
            out = self.tuning.active(hidden_states=x, timestep=t, encoder_hidden_states=embeds,
                                     encoder_hidden_states_mask=mask,
                                     img_shapes=self._img_shapes * x.shape[0], return_dict=False)[0]
        if not guided:
            return out
        uncond, cond_v = out.float().chunk(2)
        comb = uncond + guidance_scale * (cond_v - uncond)
        return comb * (cond_v.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))

    def unpack(self, latents: Tensor) -> Tensor:
        """Packed ``[B, seq, C * 4]`` -> VAE latents ``[B, C, 1, H / f, W / f]``."""
        return self.pipe._unpack_latents(latents, self.resolution, self.resolution,
                                         self.pipe.vae_scale_factor)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Unpack, undo the VAE's latent normalisation, decode the frame to ``[B, 3, H, W]`` in [0, 1]."""
        vae = self.pipe.vae
        z = self.unpack(latents.to(torch.float32))
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(z.device, z.dtype)
        images = vae.decode(z / inv_std + mean, return_dict=False)[0][:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # -- training --------------------------------------------------------------------------
    def _blocks(self, transformer):
        return list(transformer.transformer_blocks)


def build_policy(cfg, device) -> QwenImagePolicy:
    """The registry factory: load ``cfg.model.path`` (default Qwen/Qwen-Image) and wrap it."""
    from diffusers import QwenImagePipeline

    from fastflow.distributed import world_size_from_env
    from fastflow.parallel import will_shard

    m, targets = _model_cfg(cfg)
    dtype = parse_dtype(m.dtype)
    path = m.path or DEFAULT_PATH
    sched = scheduler_config_of(path)
    if sched is not None and m.shift >= 0:  # a step count it cannot grid: refused before loading 20B
        seq = (m.resolution // 16) ** 2
        mu = calculate_shift(seq, sched.get("base_image_seq_len", 256), sched.get("max_image_seq_len", 4096),
                             sched.get("base_shift", 0.5), sched.get("max_shift", 1.15))
        check_step_counts(cfg, lambda n: scheduler_sigmas(sched, n, mu, m.shift))
    pipe = load_pipeline(QwenImagePipeline, path, dtype)
    policy = QwenImagePolicy(pipe, device=device, dtype=dtype, finetune=m.finetune, lora_rank=m.lora_rank,
                             lora_alpha=m.lora_alpha, lora_targets=targets, resolution=m.resolution,
                             shift=m.shift, compile=getattr(m, "compile", False),
                             shard_later=will_shard(cfg, world_size_from_env()))
    check_step_counts(cfg, policy.sigmas)
    return policy
