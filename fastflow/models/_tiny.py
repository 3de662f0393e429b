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
        # SD3.5's own features at toy size: a dual-attention (attn2) block and RMS qk norms.
        transformer = SD3Transformer2DModel(
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
            caption_projection_dim=16, pooled_projection_dim=64, pos_embed_max_size=16,
            dual_attention_layers=(0,), qk_norm="rms_norm")
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


# ------------------------------------------------------------------ Qwen-family tokenizers

def _byte_level_chars() -> dict[int, str]:
    """GPT-2's byte -> printable-character table, which Qwen's byte-level BPE uses."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
                 + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


# The words of Qwen-Image's system prompt, so that it tokenizes into the same 34 tokens as with the
# real Qwen2.5 tokenizer (the pipeline drops exactly that many), plus the chat roles.
_QWEN_WORDS = ("system", "user", "assistant", "Describe") + tuple(
    " " + w for w in ("the image by detailing color shape size texture quantity text spatial "
                      "relationships of objects and background").split())
_QWEN_SPECIAL = ("<|im_start|>", "<|im_end|>", "<think>", "</think>")
# Qwen3's chat template renders one user turn, with add_generation_prompt and enable_thinking
# False, as below (an empty think block opens the answer); FLUX.2 [klein]'s pipeline applies it.
_QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}")


def tiny_qwen_tokenizer(chat_template: str | None = None):
    """A byte-level BPE Qwen2 tokenizer built in memory: every byte is a token, the words of
    Qwen-Image's prompt template are single tokens (chains of merges), ``<|endoftext|>`` (id 0)
    pads, ``<|im_start|>`` / ``<|im_end|>`` / ``<think>`` / ``</think>`` are special tokens."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    table = _byte_level_chars()
    vocab = {"<|endoftext|>": 0}
    for c in table.values():
        vocab.setdefault(c, len(vocab))
    merges = []
    for word in _QWEN_WORDS:
        w = "".join(table[b] for b in word.encode())
        for i in range(1, len(w)):
            if w[:i + 1] not in vocab:
                merges.append((w[:i], w[i]))
                vocab[w[:i + 1]] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768)
    tok.add_tokens([AddedToken(t, special=True) for t in _QWEN_SPECIAL], special_tokens=True)
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def _qwen25_vl_text_encoder(hidden: int, vocab: int):
    """A Qwen2.5-VL (the class Qwen-Image's pipeline loads) with a 2-layer text model and a
    1-block vision tower, from a config."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    head_dim = hidden // 2
    # M-RoPE splits half the head dimension over (time, height, width)
    section = [head_dim // 4, head_dim // 8, head_dim // 2 - head_dim // 4 - head_dim // 8]
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": vocab,
                     "max_position_embeddings": 2048, "rope_theta": 1000000.0, "bos_token_id": None,
                     "eos_token_id": 0, "pad_token_id": 0,
                     "rope_scaling": {"mrope_section": section, "rope_type": "default", "type": "default"}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": hidden},
        vocab_size=vocab, image_token_id=vocab - 1, video_token_id=vocab - 2,
        vision_start_token_id=vocab - 3, vision_end_token_id=vocab - 4)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwenimage_pipeline(seed: int = 0):
    """A QwenImagePipeline with random toy-sized components: a Qwen2.5-VL text encoder (hidden 32),
    the in-memory Qwen tokenizer, a 2-block QwenImageTransformer2DModel and a Wan-style
    AutoencoderKLQwenImage with spatial factor 4 and non-trivial latent statistics; the
    scheduler is Qwen-Image's own (dynamic exponential shift, terminal 0.02)."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok = tiny_qwen_tokenizer()
        text_encoder = _qwen25_vl_text_encoder(32, len(tok) + 4)
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, guidance_embeds=False, axes_dims_rope=(8, 4, 4))
        stats = torch.Generator().manual_seed(seed + 1)
        vae = AutoencoderKLQwenImage(
            base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True],
            latents_mean=(0.3 * torch.randn(4, generator=stats)).tolist(),
            latents_std=(1.0 + 0.5 * torch.rand(4, generator=stats)).tolist())
    # Qwen/Qwen-Image's scheduler_config.json
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
    return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                             transformer=transformer)


def tiny_flux2_klein_pipeline(seed: int = 0, distilled: bool = False):
    """A Flux2KleinPipeline with random toy-sized components: a 28-layer Qwen3 text encoder
    (hidden 16, so the pipeline's hidden-state layers 9, 18, 27 exist; 3 x 16 = 48 channels of
    prompt embedding), the in-memory Qwen tokenizer with Qwen3's chat template, a 1 + 1 block
    Flux2Transformer2DModel and an AutoencoderKLFlux2 with random batch-norm statistics.
    ``distilled``: the step-distilled variant (FLUX.2-klein-4B, no CFG) instead of the base one."""
    from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline,
                           Flux2Transformer2DModel)
    from transformers import Qwen3Config, Qwen3ForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok = tiny_qwen_tokenizer(_QWEN3_CHAT_TEMPLATE)
        text_encoder = Qwen3ForCausalLM(Qwen3Config(
            hidden_size=16, intermediate_size=32, num_hidden_layers=28, num_attention_heads=2,
            num_key_value_heads=1, head_dim=8, vocab_size=len(tok), max_position_embeddings=1024,
            bos_token_id=None, eos_token_id=0, pad_token_id=0, tie_word_embeddings=True)).eval()
        transformer = Flux2Transformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=48, timestep_guidance_channels=32,
            axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)
        vae = AutoencoderKLFlux2(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
            latent_channels=4, norm_num_groups=4, sample_size=32, use_quant_conv=False,
            use_post_quant_conv=False)
        with torch.no_grad():  # latents are normalised by these statistics: make them matter
            vae.bn.running_mean.copy_(0.3 * torch.randn(16))
            vae.bn.running_var.copy_(1.0 + torch.rand(16))
    # FLUX.2's scheduler config (the pipeline computes mu from the image size and step count)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")
    return Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                              transformer=transformer, is_distilled=distilled)


def save_tiny_qwenimage(directory, seed: int = 0) -> str:
    """Build tiny_qwenimage_pipeline and ``save_pretrained`` it to ``directory``; returns the path."""
    path = Path(directory)
    tiny_qwenimage_pipeline(seed).save_pretrained(path)
    return str(path)


def save_tiny_flux2_klein(directory, seed: int = 0, distilled: bool = False) -> str:
    """Build tiny_flux2_klein_pipeline and ``save_pretrained`` it to ``directory``; returns the path."""
    path = Path(directory)
    tiny_flux2_klein_pipeline(seed, distilled).save_pretrained(path)
    return str(path)
