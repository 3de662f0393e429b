"""Shared helpers of tests/test_models_sd3.py and tests/test_models_flux.py: a config for a tiny
saved pipeline, and a few real Flow-GRPO iterations (rollout -> per-step loss -> optimizer step)
run inline with fastflow.rollout and fastflow.ops."""

from __future__ import annotations

import torch

from fastflow import ops
from fastflow.config import config_from_dict
from fastflow.rollout import recompute_step, sample


def tiny_cfg(kind: str, path: str, **model):
    """A full fastflow Config for ``kind`` at ``path`` with tiny-model settings (32 px, rank 4)."""
    fields = dict(kind=kind, path=path, dtype="float32", finetune="lora", lora_rank=4,
                  lora_alpha=8.0, resolution=32)
    fields.update(model)
    return config_from_dict({"model": fields})


def rollout(policy, prompts, *, steps=3, guidance_scale=4.5, noise_level=0.7, seed=0):
    """A recorded SDE rollout of ``prompts`` (one sample each)."""
    cond = policy.encode_prompts(prompts)
    gen = torch.Generator().manual_seed(seed)
    return sample(policy, cond, num_steps=steps, guidance_scale=guidance_scale,
                  noise_level=noise_level, generator=gen, device="cpu")


def step_loss(policy, traj, j, advantages, *, guidance_scale, noise_level, beta=0.04,
              clip_range=1e-4):
    """fastflow.ops.grpo_step_loss at recorded step ``j`` (policy and reference recomputed)."""
    v = recompute_step(policy, traj, j, guidance_scale=guidance_scale)
    with torch.no_grad():
        v_ref = recompute_step(policy, traj, j, guidance_scale=guidance_scale, reference=True)
    return ops.grpo_step_loss(traj.latents[:, j], traj.next_latents[:, j], v, traj.sigmas[j],
                              traj.sigmas_next[j], traj.log_probs[:, j], advantages,
                              noise_level=noise_level, clip_range=clip_range, beta=beta,
                              velocity_ref=v_ref, sigma_guard=traj.sigma_guard)


def train(policy, traj, advantages, *, guidance_scale, noise_level, optimizer_steps=2, lr=1e-2):
    """A few optimizer steps on ``traj``; returns the stats of the very first (on-policy) pass per
    recorded step. A large lr and clip range so the LoRA moves measurably in two steps."""
    params = list(policy.named_trainable_parameters().values())
    opt = torch.optim.Adam(params, lr=lr)
    first = []
    for it in range(optimizer_steps):
        opt.zero_grad(set_to_none=True)
        for j in range(traj.num_steps):
            loss, stats = step_loss(policy, traj, j, advantages, guidance_scale=guidance_scale,
                                    noise_level=noise_level, clip_range=10.0)
            loss.backward()
            if it == 0:
                first.append({k: float(v) for k, v in stats.items()})
        opt.step()
    return first
