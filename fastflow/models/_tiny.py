"""Tiny random SD3 and FLUX pipelines, built offline from configs, for tests and smoke runs.

They have the real components (CLIP-L/G or CLIP + T5 text encoders with their tokenizers, an
AutoencoderKL, the real transformer classes) at toy sizes with random weights, and are saved with
``save_pretrained`` so that fastflow.models.sd3 / flux load them through the same
``from_pretrained`` path users take with a hub id. Nothing is downloaded: the tokenizers are built
from an in-memory character vocabulary.

    path = save_tiny_sd3(tmp_dir)        # then cfg.model.path = path, cfg.model.kind = "sd3"
    path = save_tiny_flux(tmp_dir)
"""

from __future__ import annotations

import string
from pathlib import Path

import torch

_CHARS = string.ascii_lowercase + string.digits + "'\".,!?-"


def tiny_clip_tokenizer(max_length: int = 77):
    """A byte-level BPE CLIP tokenizer over single characters (no merges): every ASCII prompt
    tokenizes, one token per character."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_t5_tokenizer(max_length: int = 512):
    """A Unigram T5 tokenizer over single characters (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in _CHARS] + [("\u2581" + c, -2.5) for c in _CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _clip_text_config(hidden: int, projection: int, vocab: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=2, num_attention_heads=2, projection_dim=projection,
                          max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)


def _t5_encoder(d_model: int, vocab: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=vocab, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1,
                   num_heads=2, relative_attention_num_buckets=8, decoder_start_token_id=0)
    return T5EncoderModel(cfg)


def _tiny_vae(latent_channels: int, scaling: float, shift: float):
    from diffusers import AutoencoderKL

    # Two blocks -> vae_scale_factor 2: a 32 px image has 16 x 16 latents.
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                         layers_per_block=1, norm_num_groups=4, sample_size=32,
                         scaling_factor=scaling, shift_factor=shift,
                         use_quant_conv=False, use_post_quant_conv=False)


def tiny_sd3_pipeline(seed: int = 0):
    """A StableDiffusion3Pipeline with random toy-sized components (SD3.5's structure)."""
    from diffusers import (FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok = tiny_clip_tokenizer()
        t5_tok = tiny_t5_tokenizer()
        clip_l = CLIPTextModelWithProjection(_clip_text_config(32, 32, len(tok)))
        clip_g = CLIPTextModelWithProjection(_clip_text_config(32, 32, len(tok)))
        t5 = _t5_encoder(64, len(t5_tok))
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
            caption_projection_dim=16, pooled_projection_dim=64, pos_embed_max_size=16)
        vae = _tiny_vae(4, scaling=1.5305, shift=0.0609)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clip_l,
        tokenizer=tok, text_encoder_2=clip_g, tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=t5, tokenizer_3=t5_tok)


def tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True):
    """A FluxPipeline with random toy-sized components (FLUX.1-dev's structure and scheduler)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok = tiny_clip_tokenizer()
        t5_tok = tiny_t5_tokenizer()
        clip = CLIPTextModel(_clip_text_config(32, 32, len(tok)))
        t5 = _t5_encoder(32, len(t5_tok))
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
            guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8))
        vae = _tiny_vae(4, scaling=0.3611, shift=0.1159)
    # FLUX.1-dev's scheduler config: dynamic (resolution-dependent) shifting.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clip,
                        tokenizer=tok, text_encoder_2=t5, tokenizer_2=t5_tok)


def save_tiny_sd3(directory, seed: int = 0) -> str:
    """Build tiny_sd3_pipeline and ``save_pretrained`` it to ``directory``; returns the path."""
    path = Path(directory)
    tiny_sd3_pipeline(seed).save_pretrained(path)
    return str(path)


def save_tiny_flux(directory, seed: int = 0, guidance_embeds: bool = True) -> str:
    """Build tiny_flux_pipeline and ``save_pretrained`` it to ``directory``; returns the path."""
    path = Path(directory)
    tiny_flux_pipeline(seed, guidance_embeds).save_pretrained(path)
    return str(path)
