"""The architectures the benches time: SD3.5-Medium's, FLUX.1-dev's, Qwen-Image's and FLUX.2
[klein] 4B's transformers with their real configs and random weights (nothing is downloaded), tiny
configs for CPU smoke runs, FLOP counts from a config, and Policy wrappers that run fastflow's own
velocity code (fastflow.models.sd3 / flux / qwenimage / flux2_klein) on a bare transformer (no
text encoders or VAE: the benches feed random prompt embeddings).

    spec = ARCHS["sd3.5-medium"]    # or "flux.1-dev", "qwen-image", "flux.2-klein-base-4b", "tiny-..."
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
# Qwen-Image transformer (Qwen/Qwen-Image, transformer/config.json): 60 double-stream blocks, 20B.
QWEN_IMAGE = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                  num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False,
                  axes_dims_rope=(16, 56, 56))
# FLUX.2 [klein] 4B transformer (black-forest-labs/FLUX.2-klein-base-4B; the distilled klein-4B has
# the same): 5 double + 20 single blocks, prompt embeddings of 3 x 2560 (Qwen3-4B layers 9/18/27).
FLUX2_KLEIN_4B = dict(patch_size=1, in_channels=128, out_channels=None, num_layers=5, num_single_layers=20,
                      attention_head_dim=128, num_attention_heads=24, joint_attention_dim=7680,
                      timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32),
                      rope_theta=2000, guidance_embeds=False)
TINY_QWENIMAGE = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8,
                      num_attention_heads=2, joint_attention_dim=32, guidance_embeds=False,
                      axes_dims_rope=(2, 2, 4))
TINY_FLUX2_KLEIN = dict(patch_size=1, in_channels=16, out_channels=None, num_layers=1, num_single_layers=1,
                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=48,
                        timestep_guidance_channels=32, mlp_ratio=3.0, axes_dims_rope=(2, 2, 2, 2),
                        rope_theta=2000, guidance_embeds=False)


@dataclass(frozen=True)
class Arch:
    """One benchmarked architecture and its Flow-GRPO rollout settings (FLOW_GRPO.md section 6).

    family: "sd3" | "flux" | "qwenimage" | "flux2_klein"; resolution in pixels; latent_side =
    resolution / 8 (the VAE factor); text_tokens: prompt tokens the transformer sees (SD3: 77 CLIP +
    128 T5; FLUX: 128 T5, the public code's max_sequence_length; Qwen-Image: the run's fixed text
    length, which fastflow sets from the prompt lists (128 here stands for typical lists; PickScore's
    longest prompts take it to about 464); klein: its fixed 512); steps / guidance / noise_level of
    training rollouts; lora_targets: the public recipe's LoRA target modules; lora_rank.
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
        """True when the rollout runs classifier-free guidance (a doubled batch): SD3, Qwen-Image's
        true CFG and klein's base models; FLUX.1 is guidance-distilled."""
        return self.family in ("sd3", "qwenimage", "flux2_klein") and self.guidance > 1.0

    @property
    def image_tokens(self) -> int:
        """Image tokens per sample: patches of the latent grid (the others pack 2 x 2 latent patches)."""
        p = self.config["patch_size"] if self.family == "sd3" else 2
        return (self.latent_side // p) ** 2

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """The Policy's per-sample latent shape (packed ``[tokens, 4 C]`` but for SD3)."""
        if self.family == "sd3":
            return (self.config["in_channels"], self.latent_side, self.latent_side)
        return (self.image_tokens, self.config["in_channels"])


SD3_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
               "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")
FLUX_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj",
                "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")
QWENIMAGE_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                     "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj",
                     "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")
FLUX2_KLEIN_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                       "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.linear_in",
                       "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
                       "attn.to_qkv_mlp_proj")

ARCHS = {
    "sd3.5-medium": Arch("sd3.5-medium", "sd3", SD35_MEDIUM, 512, 77 + 128, 10, 4.5, 0.7, 32, SD3_TARGETS),
    "flux.1-dev": Arch("flux.1-dev", "flux", FLUX1_DEV, 512, 128, 6, 3.5, 0.9, 64, FLUX_TARGETS),
    "tiny-sd3": Arch("tiny-sd3", "sd3", TINY_SD3, 64, 12, 3, 4.5, 0.7, 4, SD3_TARGETS),
    "tiny-flux": Arch("tiny-flux", "flux", TINY_FLUX, 64, 8, 3, 3.5, 0.9, 4, FLUX_TARGETS),
    # the public Qwen-Image recipe: 10 steps, true CFG 4 (noise 1.2 there, 1.0 here: fastflow's cap)
    "qwen-image": Arch("qwen-image", "qwenimage", QWEN_IMAGE, 512, 128, 10, 4.0, 1.0, 64,
                       QWENIMAGE_TARGETS),
    # the public klein-base recipe: 8 steps, CFG 4, noise 0.7 (384 px there; 512 here as the others)
    "flux.2-klein-base-4b": Arch("flux.2-klein-base-4b", "flux2_klein", FLUX2_KLEIN_4B, 512, 512, 8,
                                 4.0, 0.7, 64, FLUX2_KLEIN_TARGETS),
    "tiny-qwenimage": Arch("tiny-qwenimage", "qwenimage", TINY_QWENIMAGE, 64, 8, 3, 4.0, 1.0, 4,
                           QWENIMAGE_TARGETS),
    "tiny-flux2-klein": Arch("tiny-flux2-klein", "flux2_klein", TINY_FLUX2_KLEIN, 64, 16, 3, 4.0, 0.7,
                             4, FLUX2_KLEIN_TARGETS),
}
#: the tiny stand-in of each real architecture (CPU smoke runs)
TINY = {"sd3.5-medium": "tiny-sd3", "flux.1-dev": "tiny-flux", "qwen-image": "tiny-qwenimage",
        "flux.2-klein-base-4b": "tiny-flux2-klein"}


TRANSFORMER_CLASS = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel",
                     "qwenimage": "QwenImageTransformer2DModel", "flux2_klein": "Flux2Transformer2DModel"}


def build_transformer(arch: Arch, device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """The diffusers transformer of ``arch`` with random weights, created directly on ``device``
    in ``dtype`` (a 12B FLUX never exists in float32 or on the host)."""
    import diffusers

    cls = getattr(diffusers, TRANSFORMER_CLASS[arch.family])
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
    elif arch.family == "qwenimage":
        p, cin, cout = c["patch_size"], c["in_channels"], c["out_channels"] or c["in_channels"]
        macs += n_img * cin * d + n_txt * c["joint_attention_dim"] * d  # img_in, txt_in
        macs += 256 * d + d * d                                         # timestep embedding
        for _ in range(c["num_layers"]):                                # double-stream blocks
            macs += 2 * d * 6 * d                                       # img_mod, txt_mod
            macs += n * 4 * d * d + att * 2 * n * n * d + n * 8 * d * d  # q/k/v/out, attention, MLP
        macs += 2 * d * d + n_img * d * p * p * cout                    # norm_out, proj_out
    elif arch.family == "flux2_klein":
        cin = c["in_channels"]
        cout = c.get("out_channels") or cin
        h = int(d * c.get("mlp_ratio", 3.0))                            # SwiGLU hidden width
        tg = c.get("timestep_guidance_channels", 256)
        macs += n_img * cin * d + n_txt * c["joint_attention_dim"] * d  # x / context embedders
        macs += (2 if c.get("guidance_embeds") else 1) * (tg * d + d * d)  # time (+ guidance)
        macs += d * (6 + 6 + 3) * d                                     # shared modulations
        for _ in range(c["num_layers"]):                                # double-stream blocks
            macs += n * 4 * d * d + att * 2 * n * n * d + n * 3 * d * h  # q/k/v/out, attention, MLP
        for _ in range(c["num_single_layers"]):                         # single-stream blocks
            macs += n * d * (3 * d + 2 * h) + att * 2 * n * n * d + n * (d + h) * d
        macs += 2 * d * d + n_img * d * cout                            # norm_out, proj_out
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
    """Random prompt embeddings of the shapes the transformer reads (Qwen-Image: with an all-true
    mask, i.e. every prompt as long as the run's longest; klein: no pooled embedding)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    c = arch.config
    embeds = torch.randn(batch, arch.text_tokens, c["joint_attention_dim"], generator=g)
    out = {"prompt_embeds": embeds.to(device, dtype)}
    if arch.family in ("sd3", "flux"):
        pooled = torch.randn(batch, c["pooled_projection_dim"], generator=g)
        out["pooled_prompt_embeds"] = pooled.to(device, dtype)
    if arch.family == "qwenimage":
        out["prompt_embeds_mask"] = torch.ones(batch, arch.text_tokens, dtype=torch.bool, device=device)
    return out


def bench_policy(arch: Arch, transformer, *, device, dtype, finetune: str = "lora"):
    """A fastflow Policy over a bare transformer that runs fastflow.models.sd3 / flux / qwenimage /
    flux2_klein velocity code (the same method objects) with random negative-prompt embeddings.

    finetune: "lora" (the paper's targets and rank), "full" (frozen copy as reference) or "none"
    (no adapter: plain sampling)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fastflow.models.lora import Tuning

    if arch.family == "sd3":
        from fastflow.models.sd3 import SD3Policy as Base

        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    elif arch.family == "flux":
        from fastflow.models.flux import FluxPolicy as Base

        sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    elif arch.family == "qwenimage":
        from fastflow.models.qwenimage import QwenImagePolicy as Base

        sched = FlowMatchEulerDiscreteScheduler(  # Qwen/Qwen-Image's scheduler config
            shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
            max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")
    else:
        from fastflow.models.flux2_klein import Flux2KleinPolicy as Base

        sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)

    class BenchPolicy(Base):
        def __init__(self):  # noqa: D401 - deliberately skips Base.__init__ (no pipeline here)
            self.device, self.dtype = torch.device(device), dtype
            self.pipe = SimpleNamespace(scheduler=sched)
            self.shift = 3.0 if arch.family == "sd3" else 0.0
            self.resolution = arch.resolution
            self.latent_shape = arch.latent_shape
            self.transformer = transformer
            if finetune == "none":
                self.tuning = SimpleNamespace(active=transformer, named_trainable_parameters=dict,
                                              reference=None)
            else:
                self.tuning = Tuning(transformer, finetune=finetune, rank=arch.lora_rank,
                                     alpha=2.0 * arch.lora_rank, targets=list(arch.lora_targets))
            neg = random_cond(arch, 1, device, dtype, seed=12345)
            self._neg_embeds = neg["prompt_embeds"]
            self._neg_pooled = neg.get("pooled_prompt_embeds")
            self._neg_mask = neg.get("prompt_embeds_mask")
            self._sigmas = {}
            side = arch.latent_side // 2
            if arch.family == "flux":
                from diffusers import FluxPipeline

                self._img_ids = FluxPipeline._prepare_latent_image_ids(1, side, side, device, dtype)
            elif arch.family == "qwenimage":
                self._img_shapes = [(1, side, side)]
                self.text_len = arch.text_tokens
            elif arch.family == "flux2_klein":
                from diffusers import Flux2KleinPipeline

                self.distilled = False
                self._grid = (side, side)
                grid = torch.zeros(1, 1, side, side)
                self._img_ids = Flux2KleinPipeline._prepare_latent_ids(grid)[0].to(device)
                text = torch.zeros(1, arch.text_tokens, 1)
                self._txt_ids = Flux2KleinPipeline._prepare_text_ids(text)[0].to(device)

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
