"""The architectures the benches time: SD3.5-Medium's and FLUX.1-dev's transformers with their real
configs and random weights (nothing is downloaded), tiny configs for CPU smoke runs, FLOP counts
from a config, and Policy wrappers that run fastflow's own SD3 / FLUX velocity code on a bare
transformer (no text encoders or VAE: the benches feed random prompt embeddings).

    spec = ARCHS["sd3.5-medium"]                       # or "flux.1-dev", "tiny-sd3", "tiny-flux"
    model = build_transformer(spec, device, torch.bfloat16)
    flops = forward_flops(spec, batch=48)              # one transformer forward, matmul FLOPs
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import Tensor

# SD3.5-Medium transformer (stabilityai/stable-diffusion-3.5-medium, transformer/config.json).
SD35_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                   attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                   caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
                   dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
# FLUX.1-dev transformer (black-forest-labs/FLUX.1-dev, transformer/config.json).
FLUX1_DEV = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
                 attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                 pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
TINY_SD3 = dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=8,
                dual_attention_layers=(0,), qk_norm="rms_norm")
TINY_FLUX = dict(patch_size=1, in_channels=16, out_channels=None, num_layers=1, num_single_layers=1,
                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                 pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4))


@dataclass(frozen=True)
class Arch:
    """One benchmarked architecture and its Flow-GRPO rollout settings (FLOW_GRPO.md section 6).

    family: "sd3" | "flux"; resolution in pixels; latent_side = resolution / 8 (the VAE factor);
    text_tokens: prompt tokens the transformer sees (SD3: 77 CLIP + 128 T5; FLUX: 128 T5, the
    public code's max_sequence_length); steps / guidance / noise_level of training rollouts;
    lora_targets: the paper's LoRA target modules; lora_rank.
    """

    name: str
    family: str
    config: dict
    resolution: int
    text_tokens: int
    steps: int
    guidance: float
    noise_level: float
    lora_rank: int
    lora_targets: tuple = field(default_factory=tuple)

    @property
    def latent_side(self) -> int:
        return self.resolution // 8

    @property
    def cfg(self) -> bool:
        """True when the rollout runs classifier-free guidance (a doubled batch)."""
        return self.family == "sd3" and self.guidance > 1.0

    @property
    def image_tokens(self) -> int:
        """Image tokens per sample: patches of the latent grid (FLUX packs 2 x 2 latent patches)."""
        p = self.config["patch_size"] if self.family == "sd3" else 2
        return (self.latent_side // p) ** 2

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """The Policy's per-sample latent shape (FLUX: packed ``[tokens, 4 C]``)."""
        if self.family == "sd3":
            return (self.config["in_channels"], self.latent_side, self.latent_side)
        return (self.image_tokens, self.config["in_channels"])


SD3_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
               "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")
FLUX_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj",
                "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")

ARCHS = {
    "sd3.5-medium": Arch("sd3.5-medium", "sd3", SD35_MEDIUM, 512, 77 + 128, 10, 4.5, 0.7, 32, SD3_TARGETS),
    "flux.1-dev": Arch("flux.1-dev", "flux", FLUX1_DEV, 512, 128, 6, 3.5, 0.9, 64, FLUX_TARGETS),
    "tiny-sd3": Arch("tiny-sd3", "sd3", TINY_SD3, 64, 12, 3, 4.5, 0.7, 4, SD3_TARGETS),
    "tiny-flux": Arch("tiny-flux", "flux", TINY_FLUX, 64, 8, 3, 3.5, 0.9, 4, FLUX_TARGETS),
}
#: the tiny stand-in of each real architecture (CPU smoke runs)
TINY = {"sd3.5-medium": "tiny-sd3", "flux.1-dev": "tiny-flux"}


def build_transformer(arch: Arch, device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """The diffusers transformer of ``arch`` with random weights, created directly on ``device``
    in ``dtype`` (a 12B FLUX never exists in float32 or on the host)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = SD3Transformer2DModel if arch.family == "sd3" else FluxTransformer2DModel
    prev = torch.get_default_dtype()
    torch.manual_seed(seed)
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            model = cls(**arch.config)
    finally:
        torch.set_default_dtype(prev)
    return model.to(device=device, dtype=dtype).eval()


def forward_flops(arch: Arch, batch: int, *, attention: bool = True) -> int:
    """Matmul FLOPs (2 per multiply-add) of one transformer forward over ``batch`` samples,
    counted from the config: every Linear / patch projection and both attention matmuls
    (``4 L_q L_k D`` per attention). Element-wise work (norms, RoPE, activations) is left out, as
    in the usual MFU convention. tests/test_bench_smoke.py checks it against
    torch.utils.flop_counter on the tiny configs. attention=False leaves out the attention matmuls.
    """
    c = arch.config
    d = c["num_attention_heads"] * c["attention_head_dim"]
    n_img, n_txt = arch.image_tokens, arch.text_tokens
    n = n_img + n_txt
    att = 1 if attention else 0
    macs = 0
    if arch.family == "sd3":
        p, cin, cout = c["patch_size"], c["in_channels"], c["out_channels"] or c["in_channels"]
        cap = c["caption_projection_dim"]
        macs += n_img * cin * p * p * d                              # patch embedding
        macs += n_txt * c["joint_attention_dim"] * cap               # context embedder
        macs += 256 * d + d * d + c["pooled_projection_dim"] * d + d * d  # time + pooled text
        dual = set(c.get("dual_attention_layers") or ())
        for i in range(c["num_layers"]):
            last = i == c["num_layers"] - 1                            # context_pre_only
            macs += d * (9 * d if i in dual else 6 * d)                # norm1 modulation
            macs += d * (2 * d if last else 6 * d)                     # norm1_context
            macs += n_img * 4 * d * d                                  # q, k, v, out (image)
            macs += n_txt * (3 * d * d + (0 if last else d * d))      # add q, k, v (+ to_add_out)
            macs += att * 2 * n * n * d                                # QK^T and AV
            macs += n_img * 8 * d * d                                  # image MLP (4x)
            macs += 0 if last else n_txt * 8 * d * d                   # context MLP
            if i in dual:                                              # image self-attention
                macs += n_img * 4 * d * d + att * 2 * n_img * n_img * d
        macs += 2 * d * d + n_img * d * p * p * cout                   # norm_out, proj_out
    else:
        cin = c["in_channels"]
        cout = c.get("out_channels") or cin
        macs += n_img * cin * d + n_txt * c["joint_attention_dim"] * d  # x / context embedders
        macs += 2 * (256 * d + d * d) if c.get("guidance_embeds") else 256 * d + d * d
        macs += c["pooled_projection_dim"] * d + d * d
        for _ in range(c["num_layers"]):                                # double-stream blocks
            macs += 2 * d * 6 * d                                       # both norm1 modulations
            macs += n * 4 * d * d + att * 2 * n * n * d + n * 8 * d * d
        for _ in range(c["num_single_layers"]):                         # single-stream blocks
            macs += d * 3 * d                                           # modulation
            macs += n * (3 * d * d + 4 * d * d + 5 * d * d) + att * 2 * n * n * d
        macs += 2 * d * d + n_img * d * cout                            # norm_out, proj_out
    return 2 * macs * batch


def rollout_flops(arch: Arch, batch: int, steps: int) -> int:
    """Transformer FLOPs of one rollout of ``batch`` images (CFG doubles the forward batch)."""
    return steps * forward_flops(arch, batch * (2 if arch.cfg else 1))


def train_step_flops(arch: Arch, batch: int, trained_steps: int, finetune: str, kl: bool) -> int:
    """Transformer FLOPs of one Flow-GRPO step: per trained timestep a policy forward, its
    backward (activation gradients = 1 forward; full fine-tuning adds the weight gradients = 1
    more) and, with KL, a reference forward. LoRA's own small matmuls are not counted."""
    f = forward_flops(arch, batch * (2 if arch.cfg else 1))
    per = f + (2 * f if finetune == "full" else f) + (f if kl else 0)
    return trained_steps * per


def random_cond(arch: Arch, batch: int, device, dtype, seed: int = 0) -> dict[str, Tensor]:
    """Random prompt embeddings of the shapes the transformer reads."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    c = arch.config
    embeds = torch.randn(batch, arch.text_tokens, c["joint_attention_dim"], generator=g)
    pooled = torch.randn(batch, c["pooled_projection_dim"], generator=g)
    return {"prompt_embeds": embeds.to(device, dtype), "pooled_prompt_embeds": pooled.to(device, dtype)}


def bench_policy(arch: Arch, transformer, *, device, dtype, finetune: str = "lora"):
    """A fastflow Policy over a bare transformer that runs fastflow.models.sd3 / flux velocity code
    (the same method objects) with random negative-prompt embeddings.

    finetune: "lora" (the paper's targets and rank), "full" (frozen copy as reference) or "none"
    (no adapter: plain sampling)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fastflow.models.lora import Tuning

    if arch.family == "sd3":
        from fastflow.models.sd3 import SD3Policy as Base

        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    else:
        from fastflow.models.flux import FluxPolicy as Base

        sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)

    class BenchPolicy(Base):
        def __init__(self):  # noqa: D401 - deliberately skips Base.__init__ (no pipeline here)
            self.device, self.dtype = torch.device(device), dtype
            self.pipe = SimpleNamespace(scheduler=sched)
            self.shift = 3.0 if arch.family == "sd3" else 0.0
            self.latent_shape = arch.latent_shape
            self.transformer = transformer
            if finetune == "none":
                self.tuning = SimpleNamespace(active=transformer, named_trainable_parameters=dict,
                                              reference=None)
            else:
                self.tuning = Tuning(transformer, finetune=finetune, rank=arch.lora_rank,
                                     alpha=2.0 * arch.lora_rank, targets=list(arch.lora_targets))
            neg = random_cond(arch, 1, device, dtype, seed=12345)
            self._neg_embeds, self._neg_pooled = neg["prompt_embeds"], neg["pooled_prompt_embeds"]
            self._sigmas = {}
            if arch.family == "flux":
                from diffusers import FluxPipeline

                side = arch.latent_side // 2
                self._img_ids = FluxPipeline._prepare_latent_image_ids(1, side, side, device, dtype)

    return BenchPolicy()


def measured_matmul_tflops(device: torch.device, dtype: torch.dtype | None = None) -> float:
    """The device's measured dense matmul rate in TFLOP/s (bf16 8192^3 on CUDA; a small float32
    product on a CPU, where the number only fills the column)."""
    from common import time_ms

    if device.type == "cuda":
        n, dtype = 8192, dtype or torch.bfloat16
    else:
        n, dtype = 256, dtype or torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: a @ b, device, warmup=3, reps=10)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def start_run(device: torch.device, out: str | None):
    """The preamble both benches share: results folder, compute dtype, machine header, the CPU
    banner and the measured matmul rate. Returns (header info, dtype, peak TFLOP/s)."""
    from pathlib import Path

    import common

    if out:
        common.RESULTS = Path(out)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    info = common.header(device)
    if device.type != "cuda":
        print("# CPU run with tiny configs: it proves the script works; the numbers mean nothing.")
    peak = measured_matmul_tflops(device)
    print(f"# measured {'bf16' if device.type == 'cuda' else 'fp32'} matmul rate: {peak:.1f} TFLOP/s")
    return info, dtype, peak


class GpuMonitor:
    """Mean GPU utilisation (%) and power (W) over a ``with`` block, sampled by nvidia-ml-py
    (pynvml) every 50 ms; both None when pynvml or a GPU is missing."""

    def __init__(self, device: torch.device, period_s: float = 0.05):
        self.device, self.period = device, period_s
        self.util: float | None = None
        self.power_w: float | None = None
        self._handle = None
        if device.type == "cuda":
            try:
                import pynvml

                pynvml.nvmlInit()
                index = device.index if device.index is not None else torch.cuda.current_device()
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                self._nvml = pynvml
            except Exception:  # noqa: BLE001 - no NVML: the columns stay empty
                self._handle = None

    def __enter__(self):
        self._samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        if self._handle is not None:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def _poll(self):
        while not self._stop.is_set():
            try:
                u = self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu
                p = self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0
                self._samples.append((float(u), p))
            except Exception:  # noqa: BLE001
                return
            time.sleep(self.period)

    def __exit__(self, *exc):
        self._stop.set()
        if self._handle is not None:
            self._thread.join()
            if self._samples:
                self.util = sum(s[0] for s in self._samples) / len(self._samples)
                self.power_w = sum(s[1] for s in self._samples) / len(self._samples)
        return False


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated GPU memory since the last reset, GiB (None on a CPU)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
