"""Activations of the parts measured as they are (or with channels scaled), not through the
transformer fit: the VAE decode, the small shapes / toy networks, and the SDE step and GRPO loss
of fastflow.ops per latent element. Each is a CPU profiler peak at two sizes, linear from there.
"""

from __future__ import annotations

import math

import torch

from fastflow.plan.arch import clean, meta_diffusers
from fastflow.plan.cache import cached
from fastflow.plan.fit import _Threads, lstsq
from fastflow.plan.profiler import SavedTensors, peak_bytes


def measure_vae_decode(config: dict) -> dict:
    """Peak bytes of a float32 VAE decode per decoded pixel: {"per_pixel", "constant"}. Channels
    are divided by a factor that keeps them multiples of the group norm's groups (the architecture
    otherwise as configured), measured at two latent sizes and two widths, and extrapolated
    linearly in the width (a decode's working set is a few feature maps of the widest stage).
    Qwen-Image's Wan-style 3D VAE (AutoencoderKLQwenImage: channels ``base_dim`` x ``dim_mult``,
    causal 3D convolutions) decodes one frame and is measured at its own width, at latent sides 16
    and 32: the CPU picks other 3D convolution algorithms for small inputs and narrow copies
    (twice the bytes per pixel at side 8), so neither a narrow copy nor a small latent
    extrapolates."""
    c = clean(config)
    wan = "base_dim" in c
    if wan:
        chans = [c["base_dim"] * u for u in c.get("dim_mult", [1, 2, 4, 4])]
        scales = [1.0]
        vsf = 2 ** len(c.get("temperal_downsample", [False, True, True]))
        z_ch = c.get("z_dim", 16)
    else:
        chans = list(c.get("block_out_channels", [64]))
        groups = c.get("norm_num_groups", 32)
        scales = [f for f in (1 / 8, 1 / 4, 1 / 2, 1)
                  if all((ch * f) % groups == 0 and ch * f >= groups for ch in chans)]
        vsf = 2 ** (len(chans) - 1)
        z_ch = c.get("latent_channels", 4)
    sides = (16, 32) if wan else (8, 16)
    if math.prod(chans) and sum(chans) * max(chans) < 2e5:  # a small VAE: measure it as it is
        scales = [1.0]
    scales = scales[:2] if len(scales) >= 2 else scales
    rows, ys = [], []
    with _Threads():
        for f in scales:
            cf = c if wan else dict(c, block_out_channels=[int(ch * f) for ch in chans])
            vae = meta_diffusers(config.get("_class_name", "AutoencoderKL"), cf).to_empty(device="cpu")
            with torch.no_grad():
                for t in [*vae.parameters(), *vae.buffers()]:
                    if t.dtype.is_floating_point:
                        t.zero_()
                for side in sides:
                    z = torch.zeros(1, z_ch, 1, side, side) if wan else torch.zeros(1, z_ch, side, side)
                    px = (side * vsf) ** 2
                    ys.append(peak_bytes(lambda: vae.decode(z, return_dict=False)[0]))
                    rows.append([px * f, px, 1.0] if len(scales) > 1 else [px, 1.0])
    coef = lstsq(rows, ys)[0]
    if len(scales) > 1:
        return {"per_pixel": coef[0] + coef[1], "constant": coef[2]}
    return {"per_pixel": coef[0], "constant": coef[1]}


def vae_decode_bytes(config: dict, images: int, pixels: int) -> int:
    v = cached("vae", {"config": clean(config)}, lambda: measure_vae_decode(config))
    return int(max(images * pixels * v["per_pixel"] + v["constant"], 0))


def measure_small_policy(kind: str, cfg) -> dict:
    """Activations of the shapes / toy networks, measured at their real size on the CPU (they are
    small): saved bytes, training-step and no-grad forward peaks, per sample, from two batches."""
    with _Threads():
        if kind == "shapes":
            from safetensors import safe_open

            from fastflow.shapes.model import ModelConfig, ShapesFlowModel
            from fastflow.shapes.policy import ShapesPolicy, resolve_weights

            with safe_open(str(resolve_weights(cfg.model.path)), framework="pt") as f:  # the header only
                mcfg = ModelConfig.from_json((f.metadata() or {})["fastflow_shapes_config"])
            torch.manual_seed(0)
            policy = ShapesPolicy(ShapesFlowModel(mcfg), finetune=cfg.model.finetune, lora_rank=cfg.model.lora_rank,
                                  lora_alpha=cfg.model.lora_alpha, lora_targets=list(cfg.model.lora_targets))
            net = policy.model

            def call(B):
                ids = policy._uncond["ids"].expand(B, -1)
                mask = policy._uncond["mask"].expand(B, -1)
                x = torch.randn(B, 3, 32, 32)
                s = torch.rand(B)
                return lambda: policy._active.velocity(x, s, ids, mask)
        else:
            from fastflow.models.toy import ToyPolicy

            policy = ToyPolicy()
            net = policy.net

            def call(B):
                x = torch.randn(B, *policy.latent_shape)
                s = torch.rand(B)
                tok = torch.zeros(B, dtype=torch.long)
                return lambda: policy._active(x, s, tok)
        counter = SavedTensors(net, [])
        out = {}
        for B in (2, 4):
            fn = call(B)
            o = fn()
            o.float().square().mean().backward()  # gradients exist, as from the second step on
            del o
            per, _, _ = counter(fn)
            saved = sum(per.values())

            def step():
                v = fn()
                with torch.no_grad(), policy.reference():
                    r = fn()
                (v.float() - r.float()).square().mean().backward()
            train = peak_bytes(step)
            with torch.no_grad():
                inf = peak_bytes(fn)
            out[B] = (saved, max(train - saved, 0), inf)
    res = {}
    for i, name in enumerate(("saved", "backward", "inference")):
        a = (out[4][i] - out[2][i]) / 2
        res[name] = [a, out[2][i] - 2 * a]
    return res


def small_policy_activations(kind: str, cfg) -> dict:
    key = {"kind": kind, "finetune": cfg.model.finetune, "rank": cfg.model.lora_rank,
           "targets": list(cfg.model.lora_targets), "path": str(cfg.model.path)}
    return cached("policy", key, lambda: measure_small_policy(kind, cfg))


def measure_step_overhead() -> dict:
    """Bytes per latent element per sample of the SDE step of a rollout and of the per-step GRPO
    loss with its backward (fastflow.ops on the PyTorch path, guided velocity, KL term)."""
    from fastflow import ops
    from fastflow.sde import GuidedVelocity

    n = 4096
    res = {}
    for B in (2, 4):
        x = torch.randn(B, n)
        nxt = torch.randn(B, n)
        s, s2 = torch.full((B,), 0.8), torch.full((B,), 0.7)
        lp = torch.zeros(B)
        adv = torch.randn(B)
        u = torch.randn(B, n, requires_grad=True)
        c = torch.randn(B, n, requires_grad=True)

        def loss():
            v = GuidedVelocity(u, c, 4.5)
            ref = GuidedVelocity(u.detach(), c.detach(), 4.5)
            out, _ = ops.grpo_step_loss(x, nxt, v, s, s2, lp, adv, noise_level=0.7, clip_range=1e-4,
                                        beta=0.04, velocity_ref=ref, sigma_guard=0.9)
            out.backward()

        def step():
            ops.sde_step(x, GuidedVelocity(u.detach(), c.detach(), 4.5), s, s2, noise_level=0.7,
                         kind="sde", noise=torch.randn(B, n), sigma_guard=0.9, need_mean=False)
        res[B] = (peak_bytes(loss), peak_bytes(step))
    return {"loss": (res[4][0] - res[2][0]) / (2 * n), "step": (res[4][1] - res[2][1]) / (2 * n)}


def step_overhead() -> dict:
    return cached("step", {"v": 1}, measure_step_overhead)
