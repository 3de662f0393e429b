"""The real SD3.5-Medium, FLUX.1-dev, Qwen-Image and FLUX.2 [klein] transformers through the real
trainer, once, on a CPU.

    python bench/real_arch_smoke.py --out DIR                  # every case, real widths (~40 min on 2 cores)
    python bench/real_arch_smoke.py --mode tiny --out DIR      # the same path at toy widths (seconds)
    python bench/real_arch_smoke.py --cases sd3-lora,flux-full --out DIR

Each case builds a diffusers pipeline around the published transformer config (random weights,
nothing downloaded): SD3.5-Medium's SD3Transformer2DModel (24 layers, width 1536, dual attention in
layers 0-12, qk RMS norm), FLUX.1-dev's FluxTransformer2DModel at its real width (3072 = 24 heads
x 128) with fewer blocks, Qwen-Image's QwenImageTransformer2DModel (60 blocks at width 3072) with
fewer blocks and FLUX.2 [klein] base-4B's Flux2Transformer2DModel (5 double + 20 single blocks at
width 3072; LoRA at full depth); tiny text encoders with the real output widths (SD3: CLIP-L 768 +
CLIP-G 1280, pooled 2048, T5 4096; FLUX: CLIP pooled 768, T5 4096; Qwen-Image: a 2-layer
Qwen2.5-VL with hidden size 3584; klein: a 36-layer Qwen3 with hidden size 2560, of which the
pipeline stacks layers 9, 18 and 27 into 7680 channels) and a small VAE with the real latent
channels and 8x downsampling (SD3.5 / FLUX.1: AutoencoderKL, 16 channels; Qwen-Image:
AutoencoderKLQwenImage, 16 channels and its published latent statistics; klein: AutoencoderKLFlux2,
32 channels). The pipeline is saved with ``save_pretrained`` and the trainer loads it through
``from_pretrained`` (model.path = that folder), exactly as a hub id.

Then one full Flow-GRPO iteration through ``fastflow.train.Trainer.run`` in its own process (so each
case's peak RSS is its own): rollout, rewards, one optimizer step, the final checkpoint, the final
evaluation and the export (``run_dir/final``). After the run the export is compared with the
trainer's (EMA) weights, and a second fresh process reloads it with the stock diffusers API
(``<Pipeline>.load_lora_weights`` into a fresh pipeline, or ``<Transformer>.from_pretrained``) and
checks that the loaded weights equal the exported ones.

Memory per rank (bytes of tensors: trainable weights, their gradients, optimizer state, EMA, frozen
weights, buffers; activations and allocator overhead are not included) is measured after the
iteration at 1 rank and computed for 8 ranks: LoRA replicated (DDP, what ``strategy auto`` picks for
LoRA), full fine-tuning sharded by FSDP2, which splits dim 0 of every parameter into world-size
chunks, padded to a multiple of the world size (the per-rank figure is rank 0's chunk,
ceil(dim0 / W) rows, which is what every rank allocates). The same accounting is computed on the
meta device for the full-depth models (FLUX.1-dev's 12B, Qwen-Image's 20B, SD3.5-M and klein full
fine-tuning), and checked against every measured case at 1 rank.

Random weights at real widths: the numbers say whether the path runs and what it holds, not
anything about image quality. Not part of CI at real widths (about 40 minutes and 14 GiB on a
2-core CPU); the tiny mode is (tests/test_real_arch_smoke.py). Results: docs/scaling.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROG = "real_arch_smoke"
GIB = 2**30

# ------------------------------------------------------------------------------------- the cases

CASES = {
    # name: (family, finetune, optimizer, depth key)
    "sd3-lora": ("sd3", "lora", "adamw", "sd3_lora"),
    "sd3-full": ("sd3", "full", "adamw", "sd3_full"),
    "sd3-full-8bit": ("sd3", "full", "adamw8bit", "sd3_full"),
    "flux-lora": ("flux", "lora", "adamw", "flux_lora"),
    "flux-full": ("flux", "full", "adamw", "flux_full"),
    "flux-full-8bit": ("flux", "full", "adamw8bit", "flux_full"),
    "klein-lora": ("flux2_klein", "lora", "adamw", "klein_lora"),
    "klein-full": ("flux2_klein", "full", "adamw", "klein_full"),
    "klein-full-8bit": ("flux2_klein", "full", "adamw8bit", "klein_full"),
    "qwen-lora": ("qwenimage", "lora", "adamw", "qwen_lora"),
    "qwen-full": ("qwenimage", "full", "adamw", "qwen_full"),
    "qwen-full-8bit": ("qwenimage", "full", "adamw8bit", "qwen_full"),
}
FAMILIES = ("sd3", "flux", "qwenimage", "flux2_klein")
# The paper's LoRA settings (FLOW_GRPO.md): SD3.5 r 32 alpha 64, FLUX r 64 alpha 128; the public
# Qwen-Image trainer's and Flow-Factory's klein recipe: r 64 alpha 128.
LORA = {"sd3": (32, 64.0), "flux": (64, 128.0), "qwenimage": (64, 128.0), "flux2_klein": (64, 128.0)}
LR = {"lora": 3e-4, "full": 1e-5}
# Qwen-Image: true CFG 4 (the public recipe); klein base: CFG 4 (Flow-Factory's klein-base recipe).
GUIDANCE = {"sd3": 4.5, "flux": 3.5, "qwenimage": 4.0, "flux2_klein": 4.0}
TRAIN_PROMPTS = ["a red cube", "a blue ball"]
EVAL_PROMPTS = ["a green cat"]
# The real VAEs' latent scaling (SD3.5 / FLUX.1 vae/config.json); Qwen-Image's VAE normalises by
# per-channel statistics (AutoencoderKLQwenImage's defaults are the published ones) and klein's by
# its batch-norm running statistics (random here, as every weight).
VAE_SCALING = {"sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}
# Cases that recompute each block's activations in backward (distributed.activation_checkpointing;
# --activation-checkpointing): klein attends over its 512 padded text tokens in all 25 blocks, and
# their saved activations would not fit next to the 7.2 GiB bf16 base under the per-case limit.
ACTIVATION_CHECKPOINTING = ("klein-lora",)


class BadInput(Exception):
    """A mistake on the command line: one line, exit 2, before anything heavy."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + error
        print(f"{PROG}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv):
    usage = "\n".join(line.strip() for line in __doc__.split("\n\n")[1].splitlines())
    ap = _Parser(prog="real_arch_smoke.py", description=__doc__.splitlines()[0],
                 formatter_class=argparse.RawDescriptionHelpFormatter,
                 epilog=usage + "\n\nCases: " + ", ".join(CASES) + ".")
    ap.add_argument("--mode", choices=("real", "tiny"), default="real",
                    help="real: the published widths; tiny: toy widths, the same code path (seconds)")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated cases (default: all)")
    ap.add_argument("--out", default="", help="folder for results.json and table.md (created)")
    ap.add_argument("--work-dir", default="", help="where pipelines and runs are written (default: a new "
                                                  "temporary folder, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (pipelines, runs)")
    ap.add_argument("--resolution", type=int, default=0, help="image side in px (default 128; tiny 32)")
    ap.add_argument("--sd3-lora-layers", type=int, default=24, help="SD3.5-M layers of the LoRA case")
    ap.add_argument("--sd3-full-layers", type=int, default=4,
                    help="SD3.5-M layers of the full fine-tuning cases (all 24 hold ~48 GiB of tensors)")
    ap.add_argument("--flux-lora-blocks", default="2,2", help="FLUX double,single blocks of the LoRA case")
    ap.add_argument("--flux-full-blocks", default="1,1", help="FLUX double,single blocks of the full cases")
    ap.add_argument("--klein-lora-blocks", default="5,20",
                    help="FLUX.2 [klein] 4B double,single blocks of the LoRA case (default: all)")
    ap.add_argument("--klein-full-blocks", default="1,1",
                    help="FLUX.2 [klein] 4B double,single blocks of the full fine-tuning cases")
    ap.add_argument("--qwen-lora-blocks", type=int, default=10,
                    help="Qwen-Image blocks (of 60) of the LoRA case")
    ap.add_argument("--qwen-full-blocks", type=int, default=1,
                    help="Qwen-Image blocks (of 60) of the full fine-tuning cases")
    ap.add_argument("--activation-checkpointing", default=",".join(ACTIVATION_CHECKPOINTING),
                    help="comma-separated cases that recompute block activations in backward "
                         "(distributed.activation_checkpointing), or 'none' (default: %(default)s)")
    ap.add_argument("--max-rss-gib", type=float, default=14.0,
                    help="kill a case whose resident memory passes this (GiB); also the free memory "
                         "a case waits for before it starts")
    ap.add_argument("--in-process", action="store_true",
                    help="run every step in this one process (quick, for the tiny-mode test; peak RSS is "
                         "then cumulative, not per case, and no memory limit is enforced)")
    ap.add_argument("--wait-memory-s", type=float, default=900.0,
                    help="how long a case waits for --max-rss-gib of available memory, then is skipped")
    return ap.parse_args(argv)


def _blocks(text: str, name: str, model: str = "FLUX.1-dev", most: tuple[int, int] = (19, 38)) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", text)
    if not m:
        raise BadInput(f"{name} must be DOUBLE,SINGLE (two integers), got {text!r}")
    d, s = int(m.group(1)), int(m.group(2))
    if d < 1 or s < 1 or d > most[0] or s > most[1]:
        raise BadInput(f"{name} {text!r}: {model} has 1..{most[0]} double and 1..{most[1]} single blocks")
    return d, s


def check_args(a) -> dict:
    """Everything the command line can get wrong, in one line, before anything heavy."""
    names = [c.strip() for c in a.cases.split(",") if c.strip()]
    bad = [c for c in names if c not in CASES]
    if not names or bad:
        raise BadInput(f"--cases: unknown case(s) {', '.join(bad) or '(none given)'}; known: {', '.join(CASES)}")
    res = a.resolution or (32 if a.mode == "tiny" else 128)
    if res < 16 or res % 16:
        raise BadInput(f"--resolution must be a positive multiple of 16, got {res}")
    if not 1 <= a.sd3_lora_layers <= 24:
        raise BadInput(f"--sd3-lora-layers must be in 1..24 (SD3.5-M has 24), got {a.sd3_lora_layers}")
    if not 1 <= a.sd3_full_layers <= 24:
        raise BadInput(f"--sd3-full-layers must be in 1..24 (SD3.5-M has 24), got {a.sd3_full_layers}")
    for flag in ("qwen_lora_blocks", "qwen_full_blocks"):
        if not 1 <= getattr(a, flag) <= 60:
            raise BadInput(f"--{flag.replace('_', '-')} must be in 1..60 (Qwen-Image has 60), got {getattr(a, flag)}")
    ckpt = [] if a.activation_checkpointing.strip() == "none" else \
        [c.strip() for c in a.activation_checkpointing.split(",") if c.strip()]
    bad = [c for c in ckpt if c not in CASES]
    if bad:
        raise BadInput(f"--activation-checkpointing: unknown case(s) {', '.join(bad)}; known: {', '.join(CASES)} "
                       f"(or 'none')")
    if not a.max_rss_gib > 0:
        raise BadInput(f"--max-rss-gib must be > 0, got {a.max_rss_gib}")
    if a.wait_memory_s < 0:
        raise BadInput(f"--wait-memory-s must be >= 0, got {a.wait_memory_s}")
    for flag in ("out", "work_dir"):
        p = getattr(a, flag)
        if p:
            p = Path(p).expanduser()
            if p.exists() and not p.is_dir():
                raise BadInput(f"--{flag.replace('_', '-')} {p}: exists and is not a folder")
            parent = p if p.exists() else _existing_parent(p)
            if not os.access(parent, os.W_OK):
                raise BadInput(f"--{flag.replace('_', '-')} {p}: {parent} is not writable")
    depth = {"sd3_lora": a.sd3_lora_layers, "sd3_full": a.sd3_full_layers,
             "flux_lora": _blocks(a.flux_lora_blocks, "--flux-lora-blocks"),
             "flux_full": _blocks(a.flux_full_blocks, "--flux-full-blocks"),
             "klein_lora": _blocks(a.klein_lora_blocks, "--klein-lora-blocks", "FLUX.2 [klein] 4B", (5, 20)),
             "klein_full": _blocks(a.klein_full_blocks, "--klein-full-blocks", "FLUX.2 [klein] 4B", (5, 20)),
             "qwen_lora": a.qwen_lora_blocks, "qwen_full": a.qwen_full_blocks}
    if importlib.util.find_spec("bitsandbytes") is None and any(CASES[c][2] == "adamw8bit" for c in names):
        raise BadInput("the 8-bit cases need bitsandbytes (pip install 'fastflow[bnb]'); leave them out of --cases")
    return {"cases": names, "resolution": res, "depth": depth, "checkpointing": set(ckpt)}


def _existing_parent(p: Path) -> Path:
    while not p.exists():
        p = p.parent
    return p


# ------------------------------------------------------------------------ configs and accounting

def _bench_module(name: str):
    """bench/<name>.py, loaded by path: putting bench/ on sys.path would shadow installed packages
    with the benches' names (bitsandbytes imports ``kernels``)."""
    key = f"fastflow_bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, HERE / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


def _bench_models():
    """bench/models.py: the published SD3.5-M / FLUX.1-dev / Qwen-Image / klein-4B configs."""
    return _bench_module("models")


def transformer_config(family: str, mode: str, depth) -> dict:
    """The transformer config of a case: the published one (or the tiny stand-in) at ``depth``
    (SD3, Qwen-Image: layers / blocks; FLUX, klein: (double, single) blocks)."""
    bm = _bench_models()
    if family == "sd3":
        c = dict(bm.SD35_MEDIUM if mode == "real" else bm.TINY_SD3)
        c["num_layers"] = depth
        c["dual_attention_layers"] = tuple(i for i in c["dual_attention_layers"] if i < depth)
        return c
    if family == "qwenimage":
        c = dict(bm.QWEN_IMAGE if mode == "real" else bm.TINY_QWENIMAGE)
        c["num_layers"] = depth
        return c
    if family == "flux2_klein":
        c = dict(bm.FLUX2_KLEIN_4B if mode == "real" else bm.TINY_FLUX2_KLEIN)
        c["num_layers"], c["num_single_layers"] = depth
        return c
    c = dict(bm.FLUX1_DEV if mode == "real" else bm.TINY_FLUX)
    c["num_layers"], c["num_single_layers"] = depth
    c["in_channels"] = 64  # 16 latent channels x 2 x 2 packing, as FLUX.1
    return c


FULL_DEPTH = {"sd3": 24, "flux": (19, 38), "qwenimage": 60, "flux2_klein": (5, 20)}
TINY_DEPTH = {"sd3": 2, "flux": (1, 1), "qwenimage": 2, "flux2_klein": (1, 1)}


def full_config(family: str, mode: str) -> dict:
    """The whole published transformer (tiny mode: its stand-in)."""
    return transformer_config(family, mode, (FULL_DEPTH if mode == "real" else TINY_DEPTH)[family])


def latent_channels(family: str, tconf: dict) -> int:
    """Channels of the VAE's latents: the transformer reads them packed 2 x 2 (FLUX, klein; Qwen-Image
    patchifies by 2 and predicts ``out_channels`` per patch element)."""
    if family == "sd3":
        return tconf["in_channels"]
    if family == "qwenimage":
        return tconf["out_channels"]
    return tconf["in_channels"] // 4


def encoder_widths(family: str, tconf: dict) -> dict:
    """Text encoder output widths the transformer reads: SD3 concatenates CLIP-L and CLIP-G
    (768 + 1280 = 2048 pooled, hidden states padded to T5's 4096); FLUX pools CLIP (768) and reads
    T5 (4096); Qwen-Image reads Qwen2.5-VL's last hidden state (3584); klein stacks three hidden
    states of Qwen3 per token (3 x 2560 = 7680)."""
    joint = tconf["joint_attention_dim"]
    if family == "qwenimage":
        return {"qwen2_5_vl": joint}
    if family == "flux2_klein":
        return {"qwen3": joint // 3}
    pooled = tconf["pooled_projection_dim"]
    if family == "sd3":
        clip_l = pooled * 3 // 8  # 768 of 2048
        return {"clip_l": clip_l, "clip_g": pooled - clip_l, "t5": joint}
    return {"clip": pooled, "t5": joint}


def _lora_shapes(model, targets, rank):
    """The LoRA tensors peft adds for ``targets`` (its matching rule: a Linear whose name equals a
    target or ends with "." + target): A [r, in] and B [out, r] per matched Linear, no bias."""
    import torch

    out = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            out += [(name + ".lora_A", (rank, m.in_features)), (name + ".lora_B", (m.out_features, rank))]
    return out


def never_get_a_gradient(family: str, tconf: dict) -> tuple[str, ...]:
    """Name prefixes of transformer weights (and of their LoRA) that no loss reaches: Qwen-Image's
    last block computes a text-stream output that QwenImageTransformer2DModel.forward discards, so
    that block's text MLP and text attention output projection get no gradient (the optimizer skips
    them; they keep their initial values)."""
    if family == "qwenimage":
        last = f"transformer_blocks.{tconf['num_layers'] - 1}."
        return (last + "attn.to_add_out.", last + "txt_mlp.")
    return ()


def _shard_numel(shape, world: int) -> int:
    """Elements of rank 0's FSDP2 shard (dim 0 in world-size chunks, padded: ceil(dim0 / W) rows)."""
    if world == 1 or not shape:
        return math.prod(shape)
    return math.ceil(shape[0] / world) * math.prod(shape[1:])


def _adam8_bytes(numel: int, min_8bit: int) -> int:
    """bitsandbytes AdamW8bit state of one tensor: two uint8 moments + one fp32 absmax per 256
    elements each; tensors under ``min_8bit`` elements keep two fp32 moments."""
    if numel < min_8bit:
        return 8 * numel
    return 2 * numel + 2 * 4 * math.ceil(numel / 256)


def account(family: str, tconf: dict, finetune: str, optimizer: str, world: int, *,
            ema: bool = True, targets=None, rank: int = 0) -> dict:
    """Per-rank tensor bytes of a run, computed on the meta device from the config, following what
    fastflow does: LoRA keeps the frozen base and its buffers in bf16 and the adapter (its grads,
    AdamW state, EMA) in fp32, replicated on every rank (DDP). Full fine-tuning keeps fp32 master
    weights, grads, state and EMA, and a frozen reference copy (matrices in bf16, vectors in fp32
    like the policy's); the buffers stay as loaded (bf16), in the policy and in the reference; under
    FSDP2 every parameter (trained and reference) is sharded while buffers stay replicated.
    Trained weights that no loss reaches (:func:`never_get_a_gradient`) hold no gradient and no
    optimizer state."""
    import diffusers
    import torch

    cls = getattr(diffusers, TRANSFORMER_CLASS[family])
    with torch.device("meta"):
        model = cls(**tconf)
    base = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    bufs = [tuple(b.shape) for b in model.buffers()]
    fsdp = finetune == "full" and world > 1
    w = world if fsdp else 1  # LoRA: replicated (DDP)
    if finetune == "lora":
        named = _lora_shapes(model, targets, rank)
        frozen = {"base": 2 * sum(math.prod(s) for _, s in base), "reference": 0}
        buffer_bytes = 2 * sum(math.prod(s) for s in bufs)
    else:
        named = base
        frozen = {"base": 0, "reference": sum((2 if len(s) >= 2 else 4) * _shard_numel(s, w) for _, s in named)}
        buffer_bytes = 2 * 2 * sum(math.prod(s) for s in bufs)
    trained = [s for _, s in named]
    dead = never_get_a_gradient(family, tconf)
    local = [_shard_numel(s, w) for s in trained]
    stepped = [_shard_numel(s, w) for n, s in named if not n.startswith(dead)]  # tensors with a gradient
    if optimizer == "adamw":
        opt = sum(8 * n + 4 for n in stepped)  # exp_avg, exp_avg_sq (fp32) + a float32 step per tensor
    else:
        min_8bit = max(1, 4096 // w)  # fastflow.parallel.build_optimizer scales it to the shards
        opt = sum(_adam8_bytes(n, min_8bit) for n in stepped)
        if any(n >= min_8bit for n in stepped):
            opt += 2 * 256 * 4  # the two quantisation maps, shared by every tensor
    weights = 4 * sum(local)
    out = {"params": sum(math.prod(s) for _, s in base), "trainable": sum(math.prod(s) for s in trained),
           "buffer_elements": sum(math.prod(s) for s in bufs),
           "weights": weights, "grads": 4 * sum(stepped), "optimizer": opt, "ema": weights if ema else 0,
           "frozen_base": frozen["base"], "reference": frozen["reference"], "buffers": buffer_bytes}
    out["total"] = sum(out[k] for k in ("weights", "grads", "optimizer", "ema", "frozen_base",
                                        "reference", "buffers"))
    out["strategy"] = "none" if world == 1 else ("fsdp2" if fsdp else "ddp")
    return out


MEM_KEYS = ("weights", "grads", "optimizer", "ema", "frozen_base", "reference", "buffers")
TRANSFORMER_CLASS = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel",
                     "qwenimage": "QwenImageTransformer2DModel", "flux2_klein": "Flux2Transformer2DModel"}
PIPELINE_CLASS = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "qwenimage": "QwenImagePipeline",
                  "flux2_klein": "Flux2KleinPipeline"}


# -------------------------------------------------------------------------------- child: build

def child_build(spec: dict) -> dict:
    """Build a random pipeline for ``spec`` and save_pretrained it to spec["dir"]."""
    if spec["family"] in ("qwenimage", "flux2_klein"):
        return _build_qwen_family(spec)
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from fastflow.models._tiny import tiny_clip_tokenizer, tiny_t5_tokenizer

    family, tconf, widths = spec["family"], spec["config"], spec["widths"]
    t0 = time.perf_counter()
    tok, t5_tok = tiny_clip_tokenizer(), tiny_t5_tokenizer()

    def clip(cls, width):
        # two small layers at the real output width (hidden size = projection = width)
        heads = 8 if width % 64 == 0 else 2
        return cls(CLIPTextConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=max(64, width // 4),
                                  num_hidden_layers=2, num_attention_heads=heads, projection_dim=width,
                                  max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))

    def t5(width):
        return T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=width, d_kv=8, d_ff=max(64, width // 16),
                                       num_layers=1, num_heads=2, relative_attention_num_buckets=8,
                                       decoder_start_token_id=0))

    prev = torch.get_default_dtype()
    torch.manual_seed(spec["seed"])
    try:
        torch.set_default_dtype(torch.bfloat16)  # a 2.5B transformer never exists in fp32 here
        if family == "sd3":
            from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

            transformer = SD3Transformer2DModel(**tconf)
            encoders = dict(text_encoder=clip(CLIPTextModelWithProjection, widths["clip_l"]), tokenizer=tok,
                            text_encoder_2=clip(CLIPTextModelWithProjection, widths["clip_g"]),
                            tokenizer_2=tiny_clip_tokenizer(), text_encoder_3=t5(widths["t5"]),
                            tokenizer_3=t5_tok)
        else:
            from diffusers import FluxPipeline, FluxTransformer2DModel

            transformer = FluxTransformer2DModel(**tconf)
            encoders = dict(text_encoder=clip(CLIPTextModel, widths["clip"]), tokenizer=tok,
                            text_encoder_2=t5(widths["t5"]), tokenizer_2=t5_tok)
    finally:
        torch.set_default_dtype(prev)
    scale, shift = VAE_SCALING[family]
    # Four blocks: 8x downsampling like the real VAEs, the real 16 latent channels, toy widths.
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
                        sample_size=spec["resolution"], scaling_factor=scale, shift_factor=shift,
                        use_quant_conv=False, use_post_quant_conv=False)
    if family == "sd3":
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=sched, vae=vae, **encoders)
    else:  # FLUX.1-dev's scheduler: dynamic (resolution-dependent) shifting
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                                max_image_seq_len=4096)
        pipe = FluxPipeline(transformer=transformer, scheduler=sched, vae=vae, **encoders)
    return _save(pipe, spec, t0)


def _save(pipe, spec: dict, t0: float, **kwargs) -> dict:
    n_params = sum(p.numel() for p in pipe.transformer.parameters())
    t1 = time.perf_counter()
    pipe.save_pretrained(spec["dir"], **kwargs)
    size = sum(f.stat().st_size for f in Path(spec["dir"]).rglob("*") if f.is_file())
    return {"transformer_params": n_params, "build_s": t1 - t0, "save_s": time.perf_counter() - t1,
            "disk_bytes": size}


# Weight files of at most this size: diffusers loads a sharded checkpoint one file at a time, so a
# process loading the 7.2 GiB klein transformer holds one shard's file pages next to the weights,
# not the whole file's (the published checkpoints are sharded too).
SHARD_SIZE = "2GB"


def _qwen25_vl(hidden: int, vocab: int):
    """A Qwen2.5-VL (the class QwenImagePipeline loads) with 2 text layers at ``hidden`` and a
    1-block vision tower projecting to it; at 3584 the heads are Qwen2.5-VL-7B's (28 x 128, 4 KV
    heads, M-RoPE sections 16/24/24), with a small MLP."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    heads = hidden // 128 if hidden % 128 == 0 else 2
    head_dim = hidden // heads
    section = ([16, 24, 24] if head_dim == 128 else
               [head_dim // 4, head_dim // 8, head_dim // 2 - head_dim // 4 - head_dim // 8])
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": hidden, "intermediate_size": max(64, hidden // 16), "num_hidden_layers": 2,
                     "num_attention_heads": heads, "num_key_value_heads": 4 if heads % 4 == 0 else 1,
                     "vocab_size": vocab, "max_position_embeddings": 2048, "rope_theta": 1000000.0,
                     "bos_token_id": None, "eos_token_id": 0, "pad_token_id": 0,
                     "rope_scaling": {"mrope_section": section, "rope_type": "default", "type": "default"}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": hidden},
        vocab_size=vocab, image_token_id=vocab - 1, video_token_id=vocab - 2,
        vision_start_token_id=vocab - 3, vision_end_token_id=vocab - 4)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _qwen3(hidden: int, vocab: int):
    """A Qwen3 causal LM (what Flux2KleinPipeline loads) with Qwen3-4B's 36 layers at ``hidden``
    (the pipeline reads the hidden states of layers 9, 18 and 27), each a toy attention (2 heads
    of 8) and MLP."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return Qwen3ForCausalLM(Qwen3Config(
        hidden_size=hidden, intermediate_size=max(32, hidden // 16), num_hidden_layers=36,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, vocab_size=vocab,
        max_position_embeddings=1024, bos_token_id=None, eos_token_id=0, pad_token_id=0,
        tie_word_embeddings=True)).eval()


def _build_qwen_family(spec: dict) -> dict:
    """Qwen-Image / FLUX.2 [klein]: the published transformer config at the case's depth, a tiny
    Qwen-family text encoder with the real output width, the in-memory Qwen tokenizer
    (fastflow.models._tiny), a small VAE of the real class with the real latent channels and 8x
    downsampling, and the published scheduler config."""
    import diffusers
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fastflow.models._tiny import _QWEN3_CHAT_TEMPLATE, tiny_qwen_tokenizer

    family, tconf, widths = spec["family"], spec["config"], spec["widths"]
    t0 = time.perf_counter()
    channels = latent_channels(family, tconf)
    tok = tiny_qwen_tokenizer(_QWEN3_CHAT_TEMPLATE if family == "flux2_klein" else None)
    prev = torch.get_default_dtype()
    torch.manual_seed(spec["seed"])
    try:
        torch.set_default_dtype(torch.bfloat16)  # a 4B transformer never exists in fp32 here
        transformer = getattr(diffusers, TRANSFORMER_CLASS[family])(**tconf)
        if family == "qwenimage":
            text_encoder = _qwen25_vl(widths["qwen2_5_vl"], len(tok) + 4)
        else:
            text_encoder = _qwen3(widths["qwen3"], len(tok))
    finally:
        torch.set_default_dtype(prev)
    if family == "qwenimage":
        import inspect

        from diffusers import AutoencoderKLQwenImage

        # Three down blocks (8x), 16 latent channels with the published latent statistics (the
        # class's defaults); toy widths. Tiny mode: the first statistics for its fewer channels.
        published = inspect.signature(AutoencoderKLQwenImage.__init__).parameters
        vae = AutoencoderKLQwenImage(base_dim=8, z_dim=channels, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                     temperal_downsample=[False, True, True],
                                     latents_mean=list(published["latents_mean"].default[:channels]),
                                     latents_std=list(published["latents_std"].default[:channels]))
        # Qwen/Qwen-Image's scheduler_config.json
        sched = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
            base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
        pipe = diffusers.QwenImagePipeline(scheduler=sched, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                                           transformer=transformer)
    else:
        from diffusers import AutoencoderKLFlux2

        vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                                 up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16),
                                 layers_per_block=1, latent_channels=channels, norm_num_groups=4,
                                 sample_size=spec["resolution"], use_quant_conv=False, use_post_quant_conv=False)
        stats = torch.Generator().manual_seed(spec["seed"] + 1)
        with torch.no_grad():  # the latents are normalised by these: make them matter
            vae.bn.running_mean.copy_(0.3 * torch.randn(vae.bn.running_mean.shape, generator=stats))
            vae.bn.running_var.copy_(1.0 + torch.rand(vae.bn.running_var.shape, generator=stats))
        # FLUX.2's scheduler config (the pipeline computes mu from the image size and step count)
        sched = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096, time_shift_type="exponential")
        pipe = diffusers.Flux2KleinPipeline(scheduler=sched, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                                            transformer=transformer, is_distilled=False)
    return _save(pipe, spec, t0, max_shard_size=SHARD_SIZE)


# -------------------------------------------------------------------------------- child: train

def trainer_args(spec: dict) -> list[str]:
    """The trainer's command-line overrides of a case (python -m fastflow.train takes the same)."""
    fam, ft = spec["family"], spec["finetune"]
    r, alpha = LORA[fam]
    return ["--model.kind", fam, "--model.path", spec["pipeline"], "--model.dtype", "bfloat16",
            "--model.finetune", ft, "--model.lora_rank", str(r), "--model.lora_alpha", str(alpha),
            "--model.resolution", str(spec["resolution"]), "--reward.weights", "{toy_color=1.0}",
            "--data.train_prompts", spec["train_prompts"], "--data.eval_prompts", spec["eval_prompts"],
            "--data.prompt_cache", spec["prompt_cache"],
            "--sample.group_size", "2", "--sample.prompts_per_iter", "1", "--sample.batch_size", "2",
            "--sample.train_steps", "2", "--sample.eval_steps", "2", "--sample.window_size", "0",
            "--sample.guidance_scale", str(GUIDANCE[fam]),
            "--train.optimizer", spec["optimizer"], "--train.lr", str(LR[ft]), "--train.batch_size", "0",
            "--train.optimizer_steps", "1",
            # The protocol of the measured rows (docs/scaling.md), pinned over each kind's recipe
            # defaults (fastflow/presets.py: Qwen-Image trains without EMA or KL at noise 1.2):
            "--train.beta", "0.04", "--train.ema", "true", "--train.ema_every", "1", "--train.ema_decay", "0.9",
            "--train.timestep_fraction", "1.0", "--sample.noise_level", "0.7", "--sample.window_start", "0",
            "--sample.shared_initial_noise", "true", "--run.seed", "0",
            "--run.iterations", "1", "--run.max_minutes", "0", "--run.device", "cpu",
            "--run.output_dir", spec["runs"], "--run.name", spec["case"],
            "--eval.every", "0", "--eval.seeds", "1", "--eval.min_category_images", "0", "--eval.batch_size", "1",
            "--checkpoint.every", "0", "--log.progress", "false", "--log.tensorboard", "false",
            "--distributed.strategy", "none"] + (
                ["--distributed.activation_checkpointing", "true"] if spec.get("activation_checkpointing") else [])


def _vm(key: str) -> int:
    """/proc/self/status ``key`` (VmHWM, VmRSS) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child_train(spec: dict) -> dict:
    import torch
    from safetensors import safe_open

    from fastflow import parallel
    from fastflow import train as train_mod
    from fastflow.config import load_config, validate
    from fastflow.distributed import DistInfo

    case = spec["case"]
    say = lambda msg: print(f"[{case}] {msg}", flush=True)  # noqa: E731
    cfg = load_config(None, trainer_args(spec))
    derived = validate(cfg, 1)
    t0 = time.perf_counter()
    say("loading the pipeline and building the trainer")
    trainer = train_mod.Trainer(cfg, derived, DistInfo(0, 1, 0, torch.device("cpu")))
    t_init = time.perf_counter() - t0
    hwm_init = _vm("VmHWM")
    params = list(trainer.params.values())
    opt = trainer.optimizer
    at_step: dict = {}
    inner_step = opt.step

    def step_and_measure(*a, **kw):  # grads exist only here: the trainer drops them after the step
        at_step.update(parallel.training_memory(params, opt))
        at_step["rss_before_step"] = _vm("VmRSS")
        out = inner_step(*a, **kw)
        at_step["optimizer"] = parallel.optimizer_state_bytes(opt)
        at_step["rss_after_step"] = _vm("VmRSS")
        return out

    opt.step = step_and_measure
    say(f"trainer ready in {t_init:.0f} s (peak RSS so far {hwm_init / GIB:.2f} GiB); one iteration: "
        f"rollout, train, checkpoint, evaluation, export")
    t1 = time.perf_counter()
    trainer.run()
    t_run = time.perf_counter() - t1
    hwm = _vm("VmHWM")
    say(f"iteration done in {t_run:.0f} s (peak RSS {hwm / GIB:.2f} GiB)")

    policy = trainer.policy
    tr = policy.transformer
    ref = policy.tuning.ref_transformer
    tb = parallel.tensor_bytes
    trainable = {id(p) for p in params}
    measured = {
        "weights": tb(params), "grads": at_step.get("grads", 0), "optimizer": at_step.get("optimizer", 0),
        "ema": tb(trainer.ema.shadow.values()) if trainer.ema is not None else 0,
        "frozen_base": tb(p for p in tr.parameters() if id(p) not in trainable),
        "reference": tb(ref.parameters()) if ref is not None else 0,
        "buffers": tb(tr.buffers()) + (tb(ref.buffers()) if ref is not None else 0),
    }
    measured["total"] = sum(measured[k] for k in MEM_KEYS)
    counts = {"params": sum(p.numel() for p in tr.parameters() if id(p) not in trainable)
              + (sum(p.numel() for p in params) if spec["finetune"] == "full" else 0),
              "trainable": sum(p.numel() for p in params),
              "buffer_elements": sum(b.numel() for b in tr.buffers())}
    dtypes = {"trainable": sorted({str(p.dtype) for p in params}),
              "frozen": sorted({str(p.dtype) for p in tr.parameters() if id(p) not in trainable}
                               | ({str(p.dtype) for p in ref.parameters()} if ref is not None else set())),
              "optimizer_state": sorted({str(v.dtype) for st in opt.state.values() for v in st.values()
                                         if isinstance(v, torch.Tensor)})}
    rows = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    it1 = next(r for r in rows if r.get("iteration") == 1 and "loss" in r)
    fin = next((r for r in rows if r.get("final")), {})
    keep = ("loss", "kl", "clipfrac", "onpolicy/clipfrac", "onpolicy/ratio_dev_max", "reward_mean",
            "grad_norm", "skipped_steps", "skipped_optimizer_steps", "optimizer_steps",
            "time/rollout_s", "time/train_s")
    metrics = {k: it1.get(k) for k in keep}
    metrics["eval/time_s"] = fin.get("eval/time_s")

    # The export against the trainer's final (EMA) weights, tensor by tensor.
    final = trainer.run_dir / "final"
    shadow = trainer.ema.shadow if trainer.ema is not None else {n: p.detach() for n, p in trainer.params.items()}
    if spec["finetune"] == "lora":
        to_param = lambda k: re.sub(r"\.lora_([AB])\.weight$", r".lora_\1.default.weight", k)  # noqa: E731
    else:
        to_param = lambda k: "transformer." + k  # noqa: E731
    files = _export_files(final, spec["finetune"])
    equal, compared, keys, moved = bool(files), 0, set(), 0
    for path in files:
        with safe_open(str(path), "pt") as f:
            for k in f.keys():
                v = f.get_tensor(k)
                n = to_param(k)
                if n in shadow:
                    keys.add(n)
                    compared += 1
                    equal &= bool(torch.equal(v, shadow[n].to(v.dtype)))
                    if spec["finetune"] == "lora" and ".lora_B." in n:
                        moved += int(v.count_nonzero())  # B starts at 0: non-zero only after an update
    path = files[0] if len(files) == 1 else final / "transformer"
    export = {"path": str(path.relative_to(trainer.run_dir)), "files": len(files),
              "file_bytes": sum(f.stat().st_size for f in files),
              "tensors": compared, "covers_all_trainable": keys == set(shadow),
              "equals_trainer_ema": equal, "lora_B_nonzero": moved if spec["finetune"] == "lora" else None}
    say(f"export {export['path']}: {compared} tensors, equal to the trainer's EMA weights: {equal}")
    return {"init_s": t_init, "run_s": t_run, "peak_rss_init": hwm_init, "peak_rss": hwm,
            "rss_at_step": {k: at_step.get(k) for k in ("rss_before_step", "rss_after_step")},
            "measured": measured, "counts": counts, "dtypes": dtypes, "metrics": metrics, "export": export,
            "run_dir": str(trainer.run_dir)}


def _export_files(final: Path, finetune: str) -> list[Path]:
    """The weight files of an export: the LoRA file, or the transformer's file (or its shards)."""
    if finetune == "lora":
        return [final / "pytorch_lora_weights.safetensors"]
    return sorted((final / "transformer").glob("*.safetensors"))


# ------------------------------------------------------------------------------- child: reload

def child_verify(spec: dict) -> dict:
    """Reload the export with the stock diffusers API in a fresh process and compare."""
    import diffusers
    import torch
    from safetensors.torch import load_file

    final = Path(spec["run_dir"]) / "final"
    t0 = time.perf_counter()
    if spec["finetune"] == "lora":
        cls = getattr(diffusers, PIPELINE_CLASS[spec["family"]])
        from fastflow.models.sd3 import _dtype_kwarg  # dtype= or torch_dtype=, by diffusers release

        pipe = cls.from_pretrained(spec["pipeline"], **{_dtype_kwarg(): torch.bfloat16})
        pipe.load_lora_weights(str(final))  # the folder the trainer wrote
        exported = load_file(str(final / "pytorch_lora_weights.safetensors"))
        loaded = {}
        for name, p in pipe.transformer.named_parameters():
            m = re.fullmatch(r"(.*)\.lora_([AB])\.([^.]+)\.weight", name)
            if m:
                loaded[f"transformer.{m.group(1)}.lora_{m.group(2)}.weight"] = p.detach()
        scales = {v for mod in pipe.transformer.modules() for v in getattr(mod, "scaling", {}).values()}
        r, alpha = LORA[spec["family"]]
        out = {"api": f"{cls.__name__}.load_lora_weights",
               "loaded_dtype": sorted({str(v.dtype) for v in loaded.values()}),
               "lora_scale_ok": scales == {alpha / r}, "lora_scales": sorted(scales)}
    else:
        cls = getattr(diffusers, TRANSFORMER_CLASS[spec["family"]])
        model = cls.from_pretrained(str(final / "transformer"))
        exported = {}
        for f in _export_files(final, "full"):  # one file, or the shards of a large transformer
            exported.update(load_file(str(f)))
        loaded = {n: t.detach() for n, t in model.state_dict().items()}
        out = {"api": f"{cls.__name__}.from_pretrained", "loaded_dtype": sorted({str(v.dtype) for v in loaded.values()})}
    same_keys = set(loaded) == set(exported)
    # Compared in the dtype the stock loader keeps (bf16 adapters would be a cast of the fp32 file).
    equal = same_keys and all(torch.equal(loaded[k], exported[k].to(loaded[k].dtype)) for k in exported)
    out.update(tensors=len(exported), same_keys=same_keys, equal=bool(equal),
               missing=sorted(set(exported) - set(loaded))[:3], unexpected=sorted(set(loaded) - set(exported))[:3],
               verify_s=time.perf_counter() - t0, peak_rss=_vm("VmHWM"))
    print(f"[{spec['case']}] reloaded with {out['api']}: {len(exported)} tensors, equal: {out['equal']}", flush=True)
    return out


# ------------------------------------------------------------------------------- the parent side

def _mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def _rss_of(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_child(kind: str, spec: dict, work: Path, limit_bytes: int, in_process: bool = False) -> tuple[dict | None, str]:
    """Run one step in a fresh process (its peak RSS is its own); kill it if its resident memory
    passes ``limit_bytes``. Returns (result, error line). ``in_process``: call it here instead."""
    if in_process:
        _quiet()
        try:
            return json.loads(json.dumps(STEPS[kind](spec), default=str)), ""
        except Exception as e:  # noqa: BLE001 - reported in the table like a failed process
            import traceback

            traceback.print_exc()
            return None, f"the {kind} step failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    spec_path = work / f"spec-{kind}-{spec.get('case', spec.get('name'))}.json"
    out_path = spec_path.with_suffix(".out.json")
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1", DIFFUSERS_VERBOSITY="error",
               TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "_child", kind, str(spec_path),
                             str(out_path)], env=env)
    killed = {"peak": 0, "over": False}

    def watch():
        while proc.poll() is None:
            rss = _rss_of(proc.pid)
            killed["peak"] = max(killed["peak"], rss)
            if rss > limit_bytes:
                killed["over"] = True
                proc.send_signal(signal.SIGKILL)
                return
            time.sleep(0.25)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    rc = proc.wait()
    th.join()
    if killed["over"]:
        return None, f"killed: resident memory passed --max-rss-gib {limit_bytes / GIB:.1f}"
    if rc != 0 or not out_path.is_file():
        return None, f"the {kind} process exited with status {rc} (its output above)"
    return json.loads(out_path.read_text()), ""


def wait_for_memory(need: int, wait_s: float) -> tuple[bool, int]:
    """Wait until ``need`` bytes are available (other work shares the machine)."""
    deadline = time.monotonic() + wait_s
    while True:
        avail = _mem_available()
        if avail >= need or time.monotonic() >= deadline:
            return avail >= need, avail
        print(f"# waiting for memory: {avail / GIB:.1f} GiB available, {need / GIB:.1f} GiB wanted", flush=True)
        time.sleep(15)


def disk_estimate(plan: list[dict]) -> int:
    """Bytes the largest pipeline + run of the plan writes (pipelines in bf16; a full fine-tuning
    run writes fp32 weights, EMA and AdamW moments into its checkpoint and fp32 weights into its
    export: 20 bytes per parameter), with 20% and 1 GiB of headroom."""
    worst = 0
    for p in plan:
        n = p["transformer_params"]
        run = 20 * n if p["finetune"] == "full" else 0
        worst = max(worst, 2 * n + run)
    return int(worst * 1.2) + GIB


def fmt_bytes(b) -> str:
    if b is None:
        return "-"
    if b >= GIB:
        return f"{b / GIB:.2f} GiB"
    if b >= 2**20:
        return f"{b / 2**20:.1f} MiB"
    if b >= 1024:
        return f"{b / 1024:.1f} KiB"
    return f"{b} B"


def fmt_count(n) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return str(n)


def depth_label(family: str, depth) -> str:
    if family == "sd3":
        return f"{depth} layers"
    if family == "qwenimage":
        return f"{depth} block{'s' if depth != 1 else ''}"
    return f"{depth[0]} double + {depth[1]} single"


def tables(results: dict) -> str:
    """The markdown tables: the measured runs, then memory per rank (measured and computed)."""
    lines = ["| case | transformer | params | trainable | wall: load + iteration | rollout / train | "
             "RSS at the step (before / after) | peak RSS | on-policy clipfrac / KL | loss finite | "
             "export == trainer's EMA weights | stock reload == export |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in results["cases"]:
        if c.get("error"):
            lines.append(f"| {c['case']} | {c['depth_label']} | | | | | | | | | | {c['error']} |")
            continue
        t, m, v = c["train"], c["train"]["metrics"], c["verify"]
        loss, st = m.get("loss"), t["rss_at_step"]
        finite = loss is not None and math.isfinite(loss) and not m.get("skipped_steps")
        if v:
            cast = "" if v["loaded_dtype"] == t["dtypes"]["trainable"] else \
                f", as {'/'.join(d.replace('torch.', '') for d in v['loaded_dtype'])}"
            reload = f"{'yes' if v['equal'] else 'NO'} ({v['api']}{cast})"
        else:
            reload = c.get("verify_error", "NO")
        lines.append(
            f"| {c['case']} | {c['depth_label']} | {fmt_count(t['counts']['params'])} | "
            f"{fmt_count(t['counts']['trainable'])} | {t['init_s']:.0f} s + {t['run_s']:.0f} s | "
            f"{m['time/rollout_s']:.0f} s / {m['time/train_s']:.0f} s | "
            f"{fmt_bytes(st.get('rss_before_step'))} / {fmt_bytes(st.get('rss_after_step'))} | "
            f"{t['peak_rss'] / GIB:.2f} GiB | {m.get('onpolicy/clipfrac')} / {_num(m.get('kl'))} | "
            f"{'yes' if finite else 'NO'} | "
            f"{'yes' if t['export']['equals_trainer_ema'] and t['export']['covers_all_trainable'] else 'NO'} | "
            f"{reload} |")
    lines += ["", "Memory per rank (tensor bytes; activations, gathered FSDP blocks and allocator overhead "
              "not included):", "",
              "| model | depth | fine-tuning | ranks | strategy | how | weights | grads | optimizer | EMA | "
              "frozen base | reference | buffers | total |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["memory"]:
        lines.append(f"| {r['model']} | {r['depth']} | {r['finetune']} | {r['ranks']} | {r['strategy']} | {r['how']} | "
                     + " | ".join(fmt_bytes(r[k]) for k in MEM_KEYS + ("total",)) + " |")
    return "\n".join(lines) + "\n"


def _num(x) -> str:
    return "-" if x is None else f"{x:.2g}"


def ft_label(finetune: str, optimizer: str) -> str:
    if finetune == "lora":
        return "LoRA, AdamW"
    return "full, AdamW" if optimizer == "adamw" else "full, 8-bit AdamW"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        return child_main(argv[1:])
    a = parse_args(argv)
    try:
        plan_args = check_args(a)
    except BadInput as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2

    out = Path(a.out).expanduser() if a.out else None
    if out is not None:
        try:  # now, not after tens of minutes of work
            out.mkdir(parents=True, exist_ok=True)
            (out / ".write-test").write_text("")
            (out / ".write-test").unlink()
        except OSError as e:
            print(f"{PROG}: --out {a.out}: cannot write there ({e.strerror or e})", file=sys.stderr)
            return 2
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # see _bench_module
    if importlib.util.find_spec("fastflow") is None:  # a checkout without the editable install
        sys.path.append(str(ROOT))
    _quiet()
    import torch

    mode, res = a.mode, plan_args["resolution"]
    names = plan_args["cases"]
    limit = int(a.max_rss_gib * GIB)
    # Group the cases by pipeline so each is built once and removed after its last case.
    plan = []
    for name in names:
        fam, ft, optim, dkey = CASES[name]
        depth = plan_args["depth"][dkey]
        tconf = transformer_config(fam, mode, depth)
        plan.append({"case": name, "family": fam, "finetune": ft, "optimizer": optim, "depth": depth,
                     "config": tconf, "pipe_key": f"{fam}-{depth_slug(fam, depth)}"})
    counts = {}
    for p in plan:
        if p["pipe_key"] not in counts:
            counts[p["pipe_key"]] = account(p["family"], p["config"], "full", "adamw", 1)["params"]
        p["transformer_params"] = counts[p["pipe_key"]]
    order = list(dict.fromkeys(p["pipe_key"] for p in plan))
    plan.sort(key=lambda p: order.index(p["pipe_key"]))

    work = Path(a.work_dir).expanduser() if a.work_dir else Path(tempfile.mkdtemp(prefix="fastflow-real-arch-"))
    work.mkdir(parents=True, exist_ok=True)
    need = disk_estimate(plan)
    free = shutil.disk_usage(work).free
    if free < need:
        print(f"{PROG}: {work} has {free / GIB:.1f} GiB free; the largest case needs about {need / GIB:.1f} GiB "
              f"(--work-dir elsewhere, or fewer --cases)", file=sys.stderr)
        if not a.work_dir:
            shutil.rmtree(work, ignore_errors=True)
        return 2

    info = _bench_module("common").header(torch.device("cpu"))  # machine, versions, commit, date
    print(f"# mode {mode}, {res} px, work folder {work} ({free / GIB:.0f} GiB free, about {need / GIB:.1f} GiB "
          f"needed), memory available {_mem_available() / GIB:.1f} GiB, per-case limit {a.max_rss_gib} GiB",
          flush=True)
    (work / "train.txt").write_text("\n".join(TRAIN_PROMPTS) + "\n")
    (work / "eval.txt").write_text("\n".join(EVAL_PROMPTS) + "\n")
    results = {"info": info, "mode": mode, "resolution": res, "command": "python bench/real_arch_smoke.py "
               + " ".join(argv), "cases": [], "memory": [], "pipelines": {}}
    failures = 0
    t_all = time.perf_counter()
    try:
        for i, p in enumerate(plan):
            fam, name = p["family"], p["case"]
            label = depth_label(fam, p["depth"])
            print(f"\n## [{i + 1}/{len(plan)}] {name}: {fam} {label}, {ft_label(p['finetune'], p['optimizer'])}",
                  flush=True)
            entry = {"case": name, "family": fam, "finetune": p["finetune"], "optimizer": p["optimizer"],
                     "depth": p["depth"], "depth_label": label, "config": p["config"]}
            results["cases"].append(entry)
            ok, avail = wait_for_memory(limit, a.wait_memory_s)
            print(f"# memory available: {avail / GIB:.1f} GiB", flush=True)
            if not ok:
                entry["error"] = f"skipped: only {avail / GIB:.1f} GiB available"
                failures += 1
                continue
            pipe_dir = work / "pipelines" / p["pipe_key"]
            if p["pipe_key"] not in results["pipelines"]:
                print(f"# building and saving the {p['pipe_key']} pipeline ({fmt_count(p['transformer_params'])} "
                      f"transformer parameters, random bf16 weights)", flush=True)
                spec = {"name": p["pipe_key"], "family": fam, "config": p["config"],
                        "widths": encoder_widths(fam, p["config"]), "resolution": res, "seed": 0,
                        "dir": str(pipe_dir)}
                built, err = run_child("build", spec, work, limit, a.in_process)
                results["pipelines"][p["pipe_key"]] = built or {"error": err}
                if built:
                    print(f"# saved in {built['build_s'] + built['save_s']:.0f} s, "
                          f"{built['disk_bytes'] / GIB:.2f} GiB on disk", flush=True)
            if "error" in results["pipelines"][p["pipe_key"]]:
                entry["error"] = "pipeline: " + results["pipelines"][p["pipe_key"]]["error"]
                failures += 1
                continue
            spec = {"case": name, "family": fam, "finetune": p["finetune"], "optimizer": p["optimizer"],
                    "pipeline": str(pipe_dir), "resolution": res, "train_prompts": str(work / "train.txt"),
                    "eval_prompts": str(work / "eval.txt"), "prompt_cache": str(work / "cache"),
                    "runs": str(work / "runs"), "activation_checkpointing": name in plan_args["checkpointing"]}
            entry["trainer_args"] = trainer_args(spec)
            t0 = time.perf_counter()
            trained, err = run_child("train", spec, work, limit, a.in_process)
            entry["wall_s"] = time.perf_counter() - t0
            if trained is None:
                entry["error"] = err
                failures += 1
            else:
                entry["train"] = trained
                spec["run_dir"] = trained["run_dir"]
                verified, err = run_child("verify", spec, work, limit, a.in_process)
                entry["verify"] = verified
                if verified is None:
                    entry["verify_error"] = err
                bad = (not verified or not verified["equal"] or not trained["export"]["equals_trainer_ema"]
                       or not trained["export"]["covers_all_trainable"]
                       or (verified and verified.get("lora_scale_ok") is False))
                failures += int(bool(bad))
                add_memory_rows(results, p, entry, mode)
                shutil.rmtree(trained["run_dir"], ignore_errors=True)
            if out is not None:  # kept as the run goes: a later case may not finish
                save_results(out, results, tables(results))
            rest = [q for q in plan[i + 1:] if q["pipe_key"] == p["pipe_key"]]
            if not rest:
                shutil.rmtree(pipe_dir, ignore_errors=True)
        # The full-depth models, computed on the meta device (no memory): what a real run holds.
        for fam in FAMILIES:
            conf = full_config(fam, mode)
            full_depth = (FULL_DEPTH if mode == "real" else TINY_DEPTH)[fam]
            for ft, optim in (("lora", "adamw"), ("full", "adamw"), ("full", "adamw8bit")):
                for world in (1, 8):
                    r, _ = LORA[fam]
                    acc = account(fam, conf, ft, optim, world, targets=lora_targets(fam), rank=r)
                    results["memory"].append({"model": model_label(fam, mode), "depth": depth_label(fam, full_depth) + " (full)",
                                              "finetune": ft_label(ft, optim), "ranks": world, "how": "computed", **acc})
    finally:
        if not a.keep:
            shutil.rmtree(work / "pipelines", ignore_errors=True)
            shutil.rmtree(work / "runs", ignore_errors=True)
            if not a.work_dir:
                shutil.rmtree(work, ignore_errors=True)
    results["total_s"] = time.perf_counter() - t_all
    table = tables(results)
    print("\n" + table)
    for c in results["cases"]:
        chk = c.get("check")
        if chk is not None:
            print(f"# {c['case']}: computed accounting at 1 rank {'matches' if not chk else 'DIFFERS from'} "
                  f"the measured bytes{'' if not chk else ': ' + json.dumps(chk)}")
    if out is not None:
        save_results(out, results, table)
        print(f"# wrote {out / 'results.json'} and {out / 'table.md'}")
    print(f"# {len(plan) - failures}/{len(plan)} cases passed in {results['total_s'] / 60:.1f} min")
    return 0 if failures == 0 else 1


def save_results(out: Path, results: dict, table: str) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "table.md").write_text(table)


def depth_slug(family: str, depth) -> str:
    if family == "sd3":
        return f"{depth}l"
    if family == "qwenimage":
        return f"{depth}b"
    return f"{depth[0]}d{depth[1]}s"


def lora_targets(family: str) -> list[str]:
    """The targets fastflow's policy of ``family`` adapts by default (the public recipes')."""
    return list(importlib.import_module(f"fastflow.models.{family}").PAPER_TARGETS)


MODEL_NAMES = {"sd3": "SD3.5-Medium", "flux": "FLUX.1-dev", "qwenimage": "Qwen-Image",
               "flux2_klein": "FLUX.2 [klein] base-4B"}


def model_label(family: str, mode: str) -> str:
    return MODEL_NAMES[family] if mode == "real" else f"tiny {family}"


def add_memory_rows(results: dict, p: dict, entry: dict, mode: str) -> None:
    """The measured case at 1 rank, the same computed at 1 rank (checked against it) and at 8."""
    fam, ft, optim = p["family"], p["finetune"], p["optimizer"]
    r, _ = LORA[fam]
    meas = entry["train"]["measured"]
    base = {"model": model_label(fam, mode), "depth": depth_label(fam, p["depth"]), "finetune": ft_label(ft, optim)}
    results["memory"].append({**base, "ranks": 1, "strategy": "none", "how": "measured", **meas})
    calc1 = account(fam, p["config"], ft, optim, 1, targets=lora_targets(fam), rank=r)
    diff = {k: [meas[k], calc1[k]] for k in MEM_KEYS if meas[k] != calc1[k]}
    for k in ("params", "trainable"):
        if entry["train"]["counts"][k] != calc1[k]:
            diff[k] = [entry["train"]["counts"][k], calc1[k]]
    entry["check"] = diff
    calc8 = account(fam, p["config"], ft, optim, 8, targets=lora_targets(fam), rank=r)
    results["memory"].append({**base, "ranks": 8, "how": "computed", **calc8})


# ------------------------------------------------------------------------------- child entry

def child_main(argv) -> int:
    kind, spec_path, out_path = argv
    # bench/ (this script's folder, first on sys.path) holds modules named like installed packages
    # (kernels.py: bitsandbytes imports ``kernels``); fastflow comes from the install, or the checkout.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    if importlib.util.find_spec("fastflow") is None:
        sys.path.append(str(ROOT))
    _quiet()
    spec = json.loads(Path(spec_path).read_text())
    result = STEPS[kind](spec)
    Path(out_path).write_text(json.dumps(result, default=str))
    return 0


def _quiet() -> None:
    import logging

    # bitsandbytes warns at import on CPUs with AVX-512 BF16 that its optional 4-bit GEMM kernel
    # (a separate package) is missing; 8-bit AdamW does not use it.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from diffusers.utils import logging as dlog

    dlog.disable_progress_bar()  # "Loading pipeline components" bars, one per load


STEPS = {"build": child_build, "train": child_train, "verify": child_verify}

if __name__ == "__main__":
    sys.exit(main())
