"""Flow-GRPO training loop: ``python -m fastflow.train [CONFIG.toml] [--resume [PATH]] [--section.key V ...]``.

One loop for every model (toy, shapes, SD3, FLUX): per iteration
  1. pick ``prompts_per_iter`` prompts, ``group_size`` samples each, spread over the ranks;
  2. rollout with the reduced-step SDE, recording log-probs (fastflow.rollout.sample);
  3. rewards (a worker thread scores batch k while batch k+1 samples), gathered over ranks;
  4. group-relative advantages (fastflow.grpo.group_advantages);
  5. one inner epoch over the trained timesteps: clipped loss + beta * KL (fastflow.ops), gradient
     accumulation, grad-norm clip, AdamW, EMA every ``ema_every`` optimizer steps;
  6. periodic evaluation with the ODE at the full step count (EMA weights), logging, checkpoints.

Randomness is stateless: every draw of iteration ``it`` comes from generators seeded by
(seed, it, ...) and every sample's noise from (seed, it, its global index), so a resumed run
continues exactly as an uninterrupted one and a sample's images do not depend on the number of
ranks or its batch.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastflow import ops
from fastflow.checkpoint import (check_checkpoint, is_sharded_checkpoint, latest_checkpoint, load_checkpoint,
                                 load_optimizer_state_by_name, load_sharded_checkpoint,
                                 optimizer_state_by_name, save_checkpoint, save_sharded_checkpoint)
from fastflow.config import ConfigError, parse_cli, to_toml, validate
from fastflow.data import Prompt, load_prompts
from fastflow.distributed import (DistInfo, all_gather_cat, all_reduce_sum_, broadcast_str, init_distributed,
                                  launch_local, local_cpu_ranks, pick_device, shutdown, under_launcher,
                                  world_size_from_env)
from fastflow import parallel
from fastflow.ema import EMA
from fastflow import evaluation
from fastflow.evaluation import GroupDiversity, format_eval_table, prompt_category  # noqa: F401
from fastflow.grids import GRID_PER_CATEGORY, save_before_after, save_grid  # noqa: F401
from fastflow.seeding import (_EVAL_NOISE, _FM, _GLOBAL, _GROUP_NOISE, _NOISE, _PROMPTS,  # noqa: F401
                              _SHUFFLE, derive_seed, generator)
from fastflow.evaluation import seeds_per_prompt
from fastflow.logs import setup_logging
from fastflow.lr_schedule import lr_at
from fastflow.graphs import GraphedSampler
from fastflow.grpo import group_advantages, group_stats
from fastflow.metrics import MetricsLogger, check_wandb, headline, plot_curves
from fastflow.models import build_policy
from fastflow.objectives import FLOW_MATCHING, awm, forward as fm_forward, guard, nft
from fastflow.prompt_sampler import PromptSampler
from fastflow.rewards import WeightedReward
from fastflow.rewards.async_pool import AsyncReward
from fastflow.rewards.remote import check_served_rewards
from fastflow.models.prompt_cache import default_cache_dir
from fastflow.rollout import Trajectory, index_cond, recompute_step, sample, sde_window
from fastflow.runtime import forward_context

log = logging.getLogger("fastflow.train")


@dataclass
class RolloutBatch:
    traj: Trajectory
    rewards: Tensor            # [n] this rank's total rewards
    parts: dict[str, Tensor]   # component rewards
    group_ids: Tensor          # [n] prompt slot within the iteration (the group)
    prompts: list[Prompt]
    prompt_index: Tensor       # [P] index into the training prompts of each slot (all ranks)


# ---------------------------------------------------------------------------------- the trainer

class Trainer:
    def __init__(self, cfg, derived, info: DistInfo, resume: str | None = None):
        self.cfg, self.derived, self.info = cfg, derived, info
        self.device = info.device
        resumed_dir, self._resume_from = resolve_resume(resume, cfg)  # one line, before anything loads
        # rank 0 picks the directory (it may be a fresh "-N" name) and tells the others
        self.run_dir = Path(broadcast_str(str(resumed_dir or self._fresh_run_dir()) if info.is_main else "", info))
        self.stop_requested = False  # a signal reached this rank
        self.stop_agreed = False  # some rank's stop request, as every rank knows it (_agreed_stop)
        self.budget_spent = False  # run.max_minutes reached (the run ends with its final evaluation)
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_config(self.run_dir, cfg, self._resume_from)
        self.logger = MetricsLogger(self.run_dir, enabled=info.is_main, tensorboard=cfg.log.tensorboard,
                                    config=cfg)  # wandb too with log.wandb (a resumed run continues its wandb run)

        torch.manual_seed(derive_seed(cfg.run.seed, _GLOBAL))
        self.policy = build_policy(cfg, self.device)
        self.train_prompts = load_prompt_split(cfg, self.policy, "train")
        self.eval_prompts = load_prompt_split(cfg, self.policy, "eval")
        if cfg.eval.max_prompts:
            self.eval_prompts = self.eval_prompts[: cfg.eval.max_prompts]
        self._cache_prompts()  # before sharding: the encoders may leave the device first
        self.strategy, self._sharded_roots = self._parallelize()
        self.params = self.policy.named_trainable_parameters()  # after sharding: the DTensor params
        if not self.params:
            raise ValueError("the policy has no trainable parameters")
        self.optimizer = build_optimizer(cfg, list(self.params.values()))
        self.ema = EMA(self.params, cfg.train.ema_decay, cfg.train.ema_every) if cfg.train.ema else None
        # DiffusionNFT's old (sampling) policy: rollouts and v_old use it (docs/algorithms.md)
        self.old_policy = nft.OldPolicy(self.params) if cfg.train.algorithm == "nft" else None
        self.reward = WeightedReward(cfg.reward.weights, cfg.reward.device or str(self.device), cfg.reward.options)
        self.reward_pool = AsyncReward(self.reward)  # scores batch k while batch k+1 samples
        self.prompt_sampler = PromptSampler(
            len(self.train_prompts), cfg.sample.prompt_sampling, cfg.sample.prompt_floor,
            categories=([prompt_category(self.policy, p) for p in self.train_prompts]
                        if cfg.sample.prompt_sampling == "category" else None))  # only category mode reads them
        self.eval_seed_counts = seeds_per_prompt([prompt_category(self.policy, p) for p in self.eval_prompts],
                                                 cfg.eval.seeds, cfg.eval.min_category_images)
        # One forward context (autocast dtype + attention kernels) for the rollout, the training
        # recompute and the KL reference: the recorded log-probs are then reproduced bit for bit
        # on the first, on-policy pass (logged as onpolicy/*).
        self.forward = forward_context(cfg, self.device)
        self._warn_kernel_choices()
        # CUDA: the rollout is captured once per shape and replayed; elsewhere (or when capture
        # fails) GraphedSampler runs the eager sampler and logs why, once.
        # Decided before anything is captured: under FSDP2 the weights are re-gathered into new
        # memory every rollout, so the sampler runs eagerly (or, when required, refuses now).
        self._sample = functools.partial(sample, self.policy)
        if cfg.sample.cuda_graph != "off":
            sampler = GraphedSampler(self.policy, mode=cfg.sample.cuda_graph_mode,
                                     sharded=self.strategy == "fsdp",
                                     required=cfg.sample.cuda_graph == "required")
            sampler.check(self.device)
            self._sample = sampler
        self.iteration = 0
        self.optimizer_steps = 0
        self.grids: dict[str, dict] = {}  # per-category eval images of the tagged evals
        if self._resume_from is not None:
            self._resume(self._resume_from)
        elif resume == "auto" and info.is_main:
            print(f"fastflow: --resume: no checkpoint under {cfg.run.output_dir}/{cfg.run.name}[-N]; "
                  f"starting fresh in {self.run_dir}", file=sys.stderr)

    # ------------------------------------------------------------------ set-up helpers
    def _fresh_run_dir(self) -> Path:
        base = Path(self.cfg.run.output_dir) / self.cfg.run.name
        if not base.exists() or not any(base.iterdir()):
            return base
        # Never write a fresh run over an old one: pick the next free name.
        n = 1
        while (base.parent / f"{base.name}-{n}").exists():
            n += 1
        new = base.parent / f"{base.name}-{n}"
        if self.info.is_main:
            print(f"fastflow: {base} holds an earlier run; writing this one to {new} "
                  f"(use --resume to continue the earlier one)", file=sys.stderr)
        return new

    def _warn_kernel_choices(self) -> None:
        """Settings under which the first training pass may not reproduce the rollout's log-probs
        bit for bit on a GPU (GEMM and attention kernels are chosen by shape and by graph), said
        once at start-up; onpolicy/ratio_dev_max then shows by how much."""
        cfg = self.cfg
        if self.device.type != "cuda" or not self.info.is_main:
            return
        if self.derived.train_batch_size != cfg.sample.batch_size:
            log.warning("train.batch_size (%d) != sample.batch_size (%d): kernels picked by shape may differ "
                        "between rollout and training, so on-policy ratios may deviate from 1 by rounding "
                        "(watch onpolicy/ratio_dev_max against train.clip_range %g)",
                        self.derived.train_batch_size, cfg.sample.batch_size, cfg.train.clip_range)
        if cfg.model.compile:
            log.warning("model.compile: the rollout (no grad) and the training pass (grad) compile to different "
                        "graphs whose fusions may round differently (watch onpolicy/ratio_dev_max)")

    def _cache_prompts(self) -> None:
        """Encode the fixed prompt lists once, over the ranks (policies with ``cache_prompts``:
        sd3, flux), then let the text encoders leave the device (model.offload_text_encoders)."""
        if not hasattr(self.policy, "cache_prompts"):
            return
        texts = [p.text for p in self.train_prompts] + [p.text for p in self.eval_prompts]
        where = self.cfg.data.prompt_cache
        cache_dir = None if where == "off" else (Path(where).expanduser() if where else default_cache_dir()) / "prompts"
        self.policy.cache_prompts(texts, cache_dir=cache_dir, info=self.info,
                                  offload=self.cfg.model.offload_text_encoders,
                                  progress=self.info.is_main and self.cfg.log.progress)

    def _parallelize(self) -> tuple[str, list[torch.nn.Module]]:
        """Apply distributed.strategy to the policy's networks; returns (strategy, FSDP roots)."""
        dc = self.cfg.distributed
        strategy = parallel.resolve_strategy(dc.strategy, self.policy, self.info.world_size)
        mods = parallel.policy_modules(self.policy)
        if dc.activation_checkpointing and mods is not None:
            parallel.apply_activation_checkpointing(mods[1])
        roots: list[torch.nn.Module] = []
        if strategy == "fsdp":
            dtype = getattr(torch, self.cfg.model.dtype)
            ref = getattr(self.policy, "reference_modules", lambda: None)()  # None: no frozen copy
            # The trained network keeps float32 master shards (bf16 gathers for compute, fp32
            # gradient reduction); the frozen reference is sharded as it is (the compute dtype).
            nets = [(mods, torch.float32)] + ([(ref, None)] if ref is not None else [])
            for (root, blocks), master in nets:  # the reference too: no second full copy per rank
                parallel.apply_fsdp(root, list(blocks), param_dtype=dtype, cpu_offload=dc.cpu_offload,
                                    reshard_after_forward=dc.reshard_after_forward, master_dtype=master)
                roots.append(root)
        elif mods is not None:  # a policy that left its network on the host for FSDP
            # (parallel.will_shard) is placed here; trained weights are float32 master weights
            for p in mods[0].parameters():
                if p.requires_grad and p.dtype != torch.float32:
                    p.data = p.data.float()
            mods[0].to(self.device)
        # The full fine-tuning reference: filled now (its shards only, under FSDP), from the base
        # weights, before a resumed checkpoint or an optimizer step can change them.
        if hasattr(self.policy, "materialize_reference"):
            self.policy.materialize_reference()
        if strategy == "ddp":  # replicas must start equal (e.g. a randomly initialised LoRA)
            parallel.broadcast_params_(self.policy.named_trainable_parameters().values(), self.info)
        if self.info.is_main and self.info.enabled:
            print(f"fastflow: {self.info.world_size} ranks, distributed.strategy {strategy}", file=sys.stderr)
        return strategy, roots

    def _sampling(self) -> contextlib.ExitStack:
        """The weights a rollout / evaluation samples with: FSDP gathers each block once per
        rollout instead of once per denoising step; a policy with a ``sampling()`` hook may swap
        in a faster gradient-free equivalent (the shapes policy merges its LoRA)."""
        stack = contextlib.ExitStack()
        if self._sharded_roots:
            stack.enter_context(parallel.gathered_for_rollout(self._sharded_roots,
                                                              self.cfg.distributed.reshard_after_forward))
        if hasattr(self.policy, "sampling"):
            stack.enter_context(self.policy.sampling())
        return stack

    def _resume(self, path: Path) -> None:
        if is_sharded_checkpoint(path):  # written by several ranks; read at any world size
            opt_state = optimizer_state_by_name(self.optimizer, self.params)
            ema = self.ema.state_dict() if self.ema is not None else None
            st = load_sharded_checkpoint(path, trainable=self.params, optimizer_state=opt_state, ema=ema,
                                         old_policy=self.old_policy.state_dict() if self.old_policy else None)
            load_optimizer_state_by_name(self.optimizer, self.params, opt_state)
            if ema is not None:
                self.ema.optimizer_steps = int(st.get("ema_optimizer_steps", 0))
        else:
            ck = load_checkpoint(path, map_location="cpu")
            with torch.no_grad():
                for n, p in self.params.items():
                    if n not in ck["trainable"]:
                        raise ValueError(f"checkpoint {path} lacks parameter {n}")
                    p.copy_(_placed_like(p, ck["trainable"][n]))
            if "param_groups" in ck["optimizer"]:  # an optimizer-native state dict
                self.optimizer.load_state_dict(ck["optimizer"])
            else:
                load_optimizer_state_by_name(self.optimizer, self.params, ck["optimizer"])
            st = ck["state"]
            if self.ema is not None and ck["ema"] is not None:
                self.ema.load_state_dict({n: _placed_like(self.ema.shadow[n], v) for n, v in ck["ema"].items()
                                          if n in self.ema.shadow}, st.get("ema_optimizer_steps", 0))
            if self.old_policy is not None:
                if ck["old_policy"] is None:
                    raise ValueError(f"checkpoint {path} holds no old policy (train.algorithm nft needs one)")
                self.old_policy.load_state_dict({n: _placed_like(self.old_policy.shadow[n], v)
                                                 for n, v in ck["old_policy"].items()})
        self.iteration = int(st["iteration"])
        if "prompt_sampler" in st:
            self.prompt_sampler.load_state_dict(st["prompt_sampler"])
        self.optimizer_steps = int(st.get("optimizer_steps", 0))
        self.logger.truncate_after(self.iteration)
        if self.info.is_main:
            print(f"fastflow: resumed from {path} at iteration {self.iteration}", file=sys.stderr)

    def save(self) -> Path | None:
        path = None
        state = {"optimizer_steps": self.optimizer_steps,
                 "ema_optimizer_steps": self.ema.optimizer_steps if self.ema else 0,
                 "prompt_sampler": self.prompt_sampler.state_dict()}
        old = self.old_policy.state_dict() if self.old_policy is not None else None
        if self.info.enabled:  # every rank writes its shards (DCP), rank 0 commits the folder
            return save_sharded_checkpoint(
                self.run_dir, self.iteration, self.info, trainable=self.params,
                optimizer_state=optimizer_state_by_name(self.optimizer, self.params),
                ema=self.ema.state_dict() if self.ema is not None else None, state=state,
                keep=self.cfg.checkpoint.keep, old_policy=old)
        if self.info.is_main:
            path = save_checkpoint(
                self.run_dir, self.iteration,
                trainable={n: p for n, p in self.params.items()},
                optimizer_state=optimizer_state_by_name(self.optimizer, self.params),
                ema=self.ema.state_dict() if self.ema is not None else None,
                state=state,
                keep=self.cfg.checkpoint.keep, old_policy=old)
        return path

    # ------------------------------------------------------------------ one iteration
    def rollout(self, it: int) -> RolloutBatch:
        cfg, d, info = self.cfg, self.derived, self.info
        s = cfg.sample
        g = generator(cfg.run.seed, it, _PROMPTS)  # identical on every rank
        P, G = s.prompts_per_iter, s.group_size
        slots = self.prompt_sampler.draw(P, g)                   # [P] training prompt of each group
        group_of = torch.arange(P).repeat_interleave(G)          # [P*G] group (slot) of each sample
        order = torch.randperm(P * G, generator=g)               # groups spread over ranks
        mine = order[info.rank * d.images_per_rank:(info.rank + 1) * d.images_per_rank]
        window = None
        if s.window_size:
            start = s.window_start if s.window_start >= 0 else int(
                torch.randint(s.train_steps - s.window_size + 1, (1,), generator=g))
            window = sde_window(s.train_steps, s.window_size, start)

        trajs, futures, prompts_all = [], [], []
        old = self.old_policy.applied() if self.old_policy is not None else contextlib.nullcontext()
        with old, self._sampling():  # nft: the old policy samples
            for batch in mine.split(s.batch_size):
                prompts = [self.train_prompts[int(slots[group_of[i]])] for i in batch]
                texts = [p.text for p in prompts]
                cond = self.policy.encode_prompts(texts)
                seeds = torch.tensor([derive_seed(cfg.run.seed, it, _NOISE, int(i)) for i in batch])
                latents = None
                if s.shared_initial_noise:  # a group's images differ only by their SDE noise
                    latents = torch.stack([
                        torch.randn(tuple(self.policy.latent_shape), dtype=torch.float32,
                                    generator=generator(cfg.run.seed, it, _GROUP_NOISE, int(group_of[i])))
                        for i in batch]).to(self.device)
                traj = self._sample(cond, num_steps=s.train_steps, guidance_scale=s.guidance_scale,
                              noise_level=s.noise_level, kind=s.kind, seeds=seeds, window=window,
                              prompt_ids=group_of[batch], latents=latents, autocast=self.forward,
                              device=self.device)
                images = self.policy.decode(traj.final).float().cpu()
                # score this batch while the next one samples
                futures.append(self.reward_pool.submit(images, texts, [p.metadata for p in prompts]))
                trajs.append(traj)
                prompts_all += prompts
        results = [f.result() for f in futures]
        rewards = torch.cat([r[0] for r in results])
        parts = {k: torch.cat([r[1][k] for r in results]) for k in results[0][1]}
        return RolloutBatch(Trajectory.cat(trajs), rewards, parts, group_of[mine], prompts_all, slots)

    def advantages(self, rb: RolloutBatch) -> tuple[Tensor, dict[str, float]]:
        all_r = all_gather_cat(rb.rewards, self.info)
        all_g = all_gather_cat(rb.group_ids, self.info)
        adv_all = group_advantages(all_r, all_g, global_std=self.cfg.train.global_std,
                                   clip=self.cfg.train.adv_clip)
        n = rb.rewards.shape[0]
        adv = adv_all[self.info.rank * n:(self.info.rank + 1) * n]
        stats = group_stats(all_r, all_g)
        self.prompt_sampler.update(rb.prompt_index[all_g], all_r, all_g)
        stats.update(reward_mean=float(all_r.mean()), reward_std=float(all_r.std(unbiased=False)))
        for k, v in rb.parts.items():
            stats[f"reward/{k}"] = float(all_gather_cat(v, self.info).mean())
        return adv, stats

    def train_on(self, rb: RolloutBatch, adv: Tensor, it: int) -> dict[str, float]:
        cfg, d = self.cfg, self.derived
        s, t = cfg.sample, cfg.train
        if t.algorithm in FLOW_MATCHING:
            return self.train_flow_matching(rb, adv, it)
        traj = rb.traj
        k_train = d.trained_timesteps
        stats = StepStats(self.device)  # device-side sums: one host transfer per iteration
        params = list(self.params.values())
        steps_before = self.optimizer_steps
        adv_dev = adv.to(traj.latents.device)  # once: no host-to-device copy per micro-batch
        old_means = self._guard_old_means(traj) if t.guard and d.optimizer_steps_per_iter > 1 else None
        for epoch in range(t.inner_epochs):
            perm = torch.randperm(traj.batch_size, generator=generator(cfg.run.seed, it, _SHUFFLE, self.info.rank, epoch))
            batches = list(perm.to(traj.latents.device).split(d.train_batch_size))
            for b_i, idx in enumerate(batches):
                sub = traj.select(idx)
                a = adv_dev[idx]
                on_policy = self.optimizer_steps == steps_before  # no update yet: ratio must be 1
                for j in range(k_train):
                    v = recompute_step(self.policy, sub, j, guidance_scale=s.guidance_scale, autocast=self.forward)
                    v_ref = None
                    if t.beta > 0:
                        with torch.no_grad():
                            v_ref = recompute_step(self.policy, sub, j, guidance_scale=s.guidance_scale,
                                                   autocast=self.forward, reference=True)
                    if t.guard:  # GRPO-Guard's regulated ratio (on-policy: mu_old = mu, detached)
                        loss, step_stats = guard.guard_step_loss(
                            sub.latents[:, j], sub.next_latents[:, j], v, sub.sigmas[j], sub.sigmas_next[j],
                            sub.log_probs[:, j], a, noise_level=s.noise_level, clip_range=t.clip_range,
                            old_mean=None if old_means is None else old_means[idx, j], beta=t.beta,
                            velocity_ref=v_ref, sigma_guard=sub.sigma_guard)
                    else:
                        loss, step_stats = ops.grpo_step_loss(
                            sub.latents[:, j], sub.next_latents[:, j], v, sub.sigmas[j], sub.sigmas_next[j],
                            sub.log_probs[:, j], a, noise_level=s.noise_level, clip_range=t.clip_range,
                            beta=t.beta, velocity_ref=v_ref, kind=s.kind, sigma_guard=sub.sigma_guard)
                    # Always backward, whatever the loss: every rank must run the same collectives
                    # (FSDP reduce-scatters in backward). A non-finite loss poisons this optimizer
                    # step's gradients; optimizer_step then skips the step on every rank together.
                    (loss / (d.grad_accum * k_train)).backward()
                    stats.add(loss, step_stats, on_policy=on_policy)
                if (b_i + 1) % d.grad_accum == 0:
                    self.optimizer_step(params, it, stats)
        out = stats.summary()
        out.update(optimizer_steps=self.optimizer_steps,
                   lr=float(self.optimizer.param_groups[0]["lr"]))  # the last step's
        if out["skipped_steps"] and self.info.is_main:
            log.warning("iteration %d: %d non-finite loss(es); the optimizer steps they fell in were "
                        "skipped on every rank", it, int(out["skipped_steps"]))
        return out

    @torch.no_grad()
    def _guard_old_means(self, traj: Trajectory) -> Tensor:
        """GRPO-Guard with several optimizer steps per iteration: every trained step's transition
        mean under the rollout's weights, ``[B, K, ...]``, computed before the first update."""
        s, d = self.cfg.sample, self.derived
        out = torch.empty((traj.batch_size, d.trained_timesteps, *traj.latents.shape[2:]),
                          dtype=torch.float32, device=traj.latents.device)
        for idx in torch.arange(traj.batch_size, device=traj.latents.device).split(d.train_batch_size):
            sub = traj.select(idx)
            for j in range(d.trained_timesteps):
                v = recompute_step(self.policy, sub, j, guidance_scale=s.guidance_scale, autocast=self.forward)
                out[idx, j] = ops.sde_step(sub.latents[:, j], v, sub.sigmas[j], sub.sigmas_next[j],
                                           noise_level=s.noise_level, kind=s.kind, prev_sample=sub.next_latents[:, j],
                                           sigma_guard=sub.sigma_guard).mean.float()
        return out

    def train_flow_matching(self, rb: RolloutBatch, adv: Tensor, it: int) -> dict[str, float]:
        """DiffusionNFT / AWM (train.algorithm nft / awm; fastflow.objectives): each rollout's
        clean image is re-noised at ``train.fm_timesteps`` times of the rollout grid with fresh
        noise, and the CFG-free velocity there is trained with the algorithm's loss; NFT's old
        policy then follows the trained weights. Micro-batching, accumulation, clipping, the
        non-finite guard and the EMA are the GRPO path's."""
        cfg, d = self.cfg, self.derived
        s, t = cfg.sample, cfg.train
        traj = rb.traj
        dev = traj.final.device
        count = t.fm_timesteps or s.train_steps
        grid = self.policy.sigmas(s.train_steps)
        stats = StepStats(self.device)
        params = list(self.params.values())
        steps_before = self.optimizer_steps
        adv_dev = adv.to(dev)
        # awm with several optimizer steps per iteration: the sampling policy's weights, kept for
        # its old log-probs (one step: all gradients are taken before it, the old log-prob is exact)
        sampled = (nft.OldPolicy(self.params) if t.algorithm == "awm" and d.optimizer_steps_per_iter > 1
                   else None)
        for epoch in range(t.inner_epochs):
            g = generator(cfg.run.seed, it, _FM, self.info.rank, epoch)
            perm = torch.randperm(traj.batch_size, generator=g)
            batches = list(perm.to(dev).split(d.train_batch_size))
            for b_i, idx in enumerate(batches):
                x0, cond, a = traj.final[idx].float(), index_cond(traj.cond, idx), adv_dev[idx]
                times = fm_forward.training_times(grid, len(idx), count, g).to(dev)  # [b, count]
                noises = torch.randn((count, *x0.shape), generator=g).to(dev)
                x_ts = [fm_forward.noised(x0, times[:, k], noises[k]) for k in range(count)]
                on_policy = self.optimizer_steps == steps_before
                v_old = [None] * count  # the old / sampling policy's velocities, all at once (before
                old = self.old_policy if t.algorithm == "nft" else (None if on_policy else sampled)
                if old is not None:     # any graph exists: its weights are swapped in place)
                    with torch.no_grad(), old.applied():
                        v_old = [self._velocity(x_ts[k], times[:, k], cond) for k in range(count)]
                v_ema = [None] * count  # awm: the published run's KL to the EMA policy (swapped in
                if t.ema_kl_beta > 0:   # like the old policy, so also before any graph exists)
                    with torch.no_grad(), self.ema.applied():
                        v_ema = [self._velocity(x_ts[k], times[:, k], cond) for k in range(count)]
                for k in range(count):
                    v = self._velocity(x_ts[k], times[:, k], cond)
                    v_ref = None
                    if t.beta > 0:
                        with torch.no_grad(), self.policy.reference():
                            v_ref = self._velocity(x_ts[k], times[:, k], cond)
                    if t.algorithm == "nft":
                        loss, step_stats = nft.nft_loss(v, v_old[k], x_ts[k], x0, times[:, k],
                                                        nft.optimality(a, t.adv_clip), beta=t.nft_beta,
                                                        adv_clip=t.adv_clip, v_ref=v_ref, kl_beta=t.beta)
                    else:  # awm: on-policy old log-prob = the current one, detached (ratio exactly 1)
                        old_lp = None if v_old[k] is None else awm.awm_log_prob(
                            v_old[k], noises[k] - x0, times[:, k], t.awm_weighting, t.awm_ghuber_power)
                        loss, step_stats = awm.awm_loss(v, x0, noises[k], times[:, k], a, clip_range=t.clip_range,
                                                        old_log_prob=old_lp, weighting=t.awm_weighting,
                                                        power=t.awm_ghuber_power, v_ref=v_ref, kl_beta=t.beta,
                                                        v_ema=v_ema[k], ema_kl_beta=t.ema_kl_beta)
                    (loss / (d.grad_accum * count)).backward()  # always: every rank runs the same collectives
                    stats.add(loss, step_stats, on_policy=on_policy)
                if (b_i + 1) % d.grad_accum == 0:
                    self.optimizer_step(params, it, stats)
        if self.old_policy is not None:  # old <- decay old + (1 - decay) current
            self.old_policy.step(nft.old_decay(self.optimizer_steps, rate=t.old_decay_rate,
                                               max_decay=t.old_decay_max, flat=t.old_decay_flat))
        out = stats.summary()
        out.update(optimizer_steps=self.optimizer_steps, lr=float(self.optimizer.param_groups[0]["lr"]))
        return out

    def _velocity(self, x: Tensor, sigma: Tensor, cond) -> Tensor:
        """The CFG-free (conditional) velocity the flow-matching objectives train, float32."""
        with self.forward:
            v = self.policy.velocity(x, sigma, cond, guidance_scale=1.0)
        return v.float()

    def optimizer_step(self, params: list[torch.nn.Parameter], it: int, stats: "StepStats | None" = None) -> bool:
        """Clip, check and apply the accumulated gradients; returns whether the step was taken.

        Every rank takes the same decision: the gradients are already averaged over the ranks
        (DDP all-reduce / FSDP reduce-scatter) when their norm is computed, and each rank's count
        of non-finite losses since the last step is summed over the ranks with it. A step with a
        non-finite loss or gradient norm anywhere is skipped everywhere (gradients dropped)."""
        parallel.sync_gradients_(params, self.info)  # FSDP grads were reduce-scattered in backward
        if not any(p.grad is not None for p in params):
            # no gradient on any rank (sync_gradients_ fills in zeros for a gradient any rank
            # has; a sharded parameter's gradient exists on every rank or on none)
            return False
        gn = parallel.full(torch.nn.utils.clip_grad_norm_(params, self.cfg.train.max_grad_norm))
        bad = stats.take_nonfinite() if stats is not None else torch.zeros((), device=gn.device)
        flags = torch.stack([bad.to(gn.device, torch.float32), (~torch.isfinite(gn)).to(torch.float32)])
        all_reduce_sum_(flags, self.info)
        if bool(flags.sum() > 0):  # the one host read per optimizer step
            log.warning("iteration %d: non-finite loss or gradient norm; optimizer step skipped on every rank", it)
            self.optimizer.zero_grad(set_to_none=True)
            if stats is not None:
                stats.skipped_optimizer_steps += 1
            return False
        lr = self.lr_now()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1
        if self.ema is not None:
            self.ema.on_optimizer_step()
        if stats is not None:
            stats.add_grad_norm(gn)
        return True

    def lr_now(self) -> float:
        """train.lr under train.lr_schedule at the next optimizer step (restored on resume with
        the step count, so a resumed run continues the schedule)."""
        t = self.cfg.train
        return lr_at(self.optimizer_steps, lr=t.lr, kind=t.lr_schedule, warmup=t.lr_warmup,
                     min_ratio=t.lr_min_ratio,
                     total_steps=self.cfg.run.iterations * self.derived.optimizer_steps_per_iter)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, tag: str | None = None) -> dict[str, Any]:
        """ODE sampling at the full step count on the held-out prompts x seeds, with EMA weights."""
        cfg = self.cfg
        ctx = self.ema.applied() if self.ema is not None else contextlib.nullcontext()
        # The same images as python -m fastflow.evaluate draws (fastflow.evaluation); every rank
        # samples as many batches as the others (padding repeats a pair, weight 0).
        pairs, real = evaluation.rank_pairs(self.eval_seed_counts, self.info.rank, self.info.world_size)
        texts_all = [p.text for p in self.eval_prompts]
        per_image: dict[str, list[float]] = {}
        cats: list[str] = []
        images_keep = []
        by_cat: dict[str, list[tuple[Tensor, float | None]]] = {}  # a few images per category, for grids
        diversity = GroupDiversity()
        t0 = time.perf_counter()
        with ctx, self._sampling():
            batches = evaluation.sample_images(
                self.policy, texts_all, pairs, base_seed=cfg.eval.seed, steps=cfg.sample.eval_steps,
                guidance_scale=self.derived.eval_guidance_scale, batch_size=cfg.eval.batch_size,
                sampler=self._sample, autocast=self.forward, device=self.device)
            for start, images in batches:
                chunk = pairs[start:start + cfg.eval.batch_size]
                prompts = [self.eval_prompts[i] for i, _ in chunk]
                texts = [p.text for p in prompts]
                metas = [p.metadata for p in prompts]
                n = max(0, min(len(chunk), real - start))  # images past n are padding: weight 0
                if n and len(images_keep) < 64:
                    images_keep.append(images[: min(n, 64 - len(images_keep))])
                # scored all the same, so that a rank with only padding knows the metric names
                metrics = evaluation.score_images(self.policy, self.reward, images, texts, metas)
                for k, v in metrics.items():
                    per_image.setdefault(k, []).extend(float(x) for x in v)
                batch_cats = [prompt_category(self.policy, p) for p in prompts]
                ok = metrics.get("accuracy")
                for b, cat in enumerate(batch_cats[:n]):
                    if len(by_cat.setdefault(cat, [])) < GRID_PER_CATEGORY:
                        by_cat[cat].append((images[b], None if ok is None else float(ok[b])))
                cats += batch_cats
                for (i, sd), img in zip(chunk[:n], images[:n]):
                    if sd < cfg.eval.seeds:  # the extra seeds of small categories would outweigh the rest
                        diversity.add(i, img)
        # Sums and counts per (category, metric), reduced over ranks: every rank knows every
        # category from the shared prompt list, so the table has the same layout everywhere.
        all_cats = sorted({prompt_category(self.policy, p) for p in self.eval_prompts})
        # Each image weighs 1 / its prompt's seed count: "overall" stays the mean over prompts (=
        # over images when every prompt has eval.seeds) even when small categories get more seeds;
        # within a category every prompt has the same count, so its mean is the plain image mean.
        keys = sorted(per_image)
        weights = [1.0 / self.eval_seed_counts[i] if j < real else 0.0 for j, (i, _) in enumerate(pairs)]
        sums = torch.zeros(len(all_cats) + 1, len(keys), 2, dtype=torch.float64)
        for ki, k in enumerate(keys):
            for cat, val, w in zip(cats, per_image[k], weights):
                for row in (all_cats.index(cat), len(all_cats)):
                    sums[row, ki] += torch.tensor([val * w, w], dtype=torch.float64)
        if isinstance(self._sample, GraphedSampler):  # the eval batch's graphs: not kept while training
            self._sample.drop(kind="ode")
        all_reduce_sum_(sums, self.info)
        div = diversity.totals()
        all_reduce_sum_(div, self.info)
        out: dict[str, Any] = {"eval/time_s": time.perf_counter() - t0}
        if div[1] > 0:  # mean pairwise pixel distance between the seeds of one prompt
            out["eval/overall/diversity"] = float(div[0] / div[1])
        for row, cat in enumerate(all_cats + ["overall"]):
            for ki, k in enumerate(keys):
                if sums[row, ki, 1] > 0:
                    out[f"eval/{cat}/{k}"] = float(sums[row, ki, 0] / sums[row, ki, 1])
        if len(all_cats) > 1:  # GenEval's headline: the mean over categories, not over images
            for k in keys:
                vals = [out[f"eval/{c}/{k}"] for c in all_cats if f"eval/{c}/{k}" in out]
                out[f"eval/category_mean/{k}"] = sum(vals) / len(vals)
        if tag and self.info.is_main and images_keep:
            save_grid(torch.cat(images_keep), self.run_dir / f"samples_{tag}.png")
            self.logger.log_image(f"samples/{tag}", self.run_dir / f"samples_{tag}.png", self.iteration)
            self.grids[tag] = by_cat
            if tag == "after" and "before" in self.grids:
                save_before_after(self.grids["before"], by_cat, self.run_dir / "before_after.png")
                self.logger.log_image("samples/before_after", self.run_dir / "before_after.png", self.iteration)
        return out

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict[str, Any]:
        cfg, info = self.cfg, self.info
        self._install_signal_handlers()
        t_start = time.perf_counter()
        last_eval: dict[str, Any] = {}
        if self.iteration == 0 and cfg.eval.every > 0:
            last_eval = self.evaluate("before")
            self.logger.log(0, last_eval)
            self.first_eval = last_eval
        bar = None
        if info.is_main and cfg.log.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=cfg.run.iterations, initial=self.iteration, desc="flow-grpo", unit="it",
                       dynamic_ncols=True)
        while self.iteration < cfg.run.iterations and not self._agreed_stop():
            it = self.iteration
            torch.manual_seed(derive_seed(cfg.run.seed, it, _GLOBAL))
            t0 = time.perf_counter()
            rb = self.rollout(it)
            t1 = time.perf_counter()
            adv, adv_stats = self.advantages(rb)
            train_stats = self.train_on(rb, adv, it)
            t2 = time.perf_counter()
            self.iteration = it + 1
            metrics = {**adv_stats, **train_stats, "time/rollout_s": t1 - t0, "time/train_s": t2 - t1,
                       "time/images_per_s": rb.traj.batch_size / max(t1 - t0, 1e-9)}
            if cfg.eval.every and self.iteration % cfg.eval.every == 0 and self.iteration < cfg.run.iterations:
                last_eval = self.evaluate()
                metrics.update(last_eval)
            if self.iteration % cfg.log.every == 0 or last_eval is metrics:
                self.logger.log(self.iteration, metrics)
            if bar is not None:
                post = {"reward": f"{adv_stats['reward_mean']:.3f}"}
                acc = headline(last_eval)
                if acc is not None:
                    post["eval"] = f"{acc:.3f}"
                bar.set_postfix(post)
                bar.update(1)
            if cfg.checkpoint.every and self.iteration % cfg.checkpoint.every == 0:
                self.save()
            if cfg.run.max_minutes and (time.perf_counter() - t_start) / 60 > cfg.run.max_minutes:
                self.budget_spent = True  # acted on by all ranks together at the top of the loop
        if bar is not None:
            bar.close()
        if self.budget_spent and info.is_main:
            print(f"\nfastflow: run.max_minutes={cfg.run.max_minutes} reached at iteration "
                  f"{self.iteration}; stopping", file=sys.stderr)
        self.save()
        final = {}
        # Asked to stop (on any rank, at any moment of the loop, its last iteration included):
        # no final evaluation, on every rank alike, or its collectives would hang.
        (self.stop_agreed,) = self._any_rank(self.stop_requested)
        if not self.stop_agreed:
            final = self.evaluate("after")
            self.logger.log(self.iteration, {**final, "final": 1})
            if info.is_main:
                plot_curves(self.logger.path, self.run_dir / "curves.png")
                print(format_eval_table(getattr(self, "first_eval", {}), final))
                print(f"fastflow: run directory {self.run_dir} (wall time "
                      f"{(time.perf_counter() - t_start) / 60:.1f} min)")
            if hasattr(self.policy, "export"):
                path = self.export_final()
                if info.is_main:
                    print(f"fastflow: exported to {path}")
        self.reward_pool.close()
        self.logger.close()
        return final

    def export_final(self) -> Path | None:
        """Export the final weights (EMA when kept) with ``policy.export`` to ``run_dir/final``;
        returns the path on the main rank, None elsewhere. Every rank must call it: a sharded
        (FSDP) run first gathers the full weights on the main rank, shard by shard, into host
        memory."""
        sharded = self.strategy == "fsdp"
        if not (sharded or self.info.is_main):
            return None  # replicated weights: the main rank writes them alone
        with (self.ema.applied() if self.ema else contextlib.nullcontext()):
            state = parallel.full_state_dict(parallel.policy_modules(self.policy)[0]) if sharded else None
            if not self.info.is_main:
                return None
            out = self.run_dir / "final"
            return self.policy.export(out, state_dict=state) if sharded else self.policy.export(out)

    def _agreed_stop(self) -> bool:
        """Stop when any rank was asked to or found the time budget spent (ranks see a signal, or
        their clocks cross run.max_minutes, at different iterations; all must leave the loop
        together or the next collective would hang). The agreed request goes to
        ``self.stop_agreed``; ``self.stop_requested`` is only ever set, never cleared here: a
        signal handled while the flags are being reduced must count at the next agreement."""
        self.stop_agreed, self.budget_spent = self._any_rank(self.stop_requested, self.budget_spent)
        return self.stop_agreed or self.budget_spent

    def _any_rank(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag, true on every rank when it is true on any (one all-reduce; every rank calls it)."""
        if not self.info.enabled:
            return tuple(bool(f) for f in flags)
        t = torch.tensor([float(f) for f in flags])
        all_reduce_sum_(t, self.info)
        return tuple(bool(x > 0) for x in t)

    def _install_signal_handlers(self) -> None:
        first_at = []

        def request_stop(signum, frame):
            if first_at:
                # A second signal stops at once (the last checkpoint stays intact), unless it is
                # the first one delivered again: a batch scheduler signals every process of a job,
                # so a rank gets it directly and once more from the launcher that passes it on
                # (torchrun's agent, fastflow.distributed.launch_local).
                if time.monotonic() - first_at[0] > DUPLICATE_SIGNAL_S:
                    raise KeyboardInterrupt
                return
            first_at.append(time.monotonic())
            self.stop_requested = True
            print(f"\nfastflow: signal {signum}: finishing this iteration, checkpointing, then "
                  f"stopping (send again to stop at once)", file=sys.stderr)
        try:
            signal.signal(signal.SIGINT, request_stop)
            signal.signal(signal.SIGTERM, request_stop)
        except ValueError:  # not in the main thread (e.g. called from a test thread)
            pass


# ------------------------------------------------------------------------------------ helpers

DUPLICATE_SIGNAL_S = 3.0  # a stop signal this soon after the first is the same request delivered twice


class StepStats:
    """The training statistics of one iteration, summed on the device (no host synchronisation
    per step): the loss and the GRPO step stats (fastflow.grpo.grpo_step_loss) as means over the
    finite steps, ratio_min / ratio_max as extremes, the non-finite losses counted, and the
    on-policy steps' (those before the iteration's first optimizer step, where the rollout's
    log-probs must be reproduced exactly) clip fraction and largest |ratio - 1|."""

    _EXTREMES = ("ratio_min", "ratio_max")

    def __init__(self, device):
        self.device = torch.device(device)
        z = lambda: torch.zeros((), dtype=torch.float64, device=self.device)  # noqa: E731
        self.sums: dict[str, Tensor] = {}
        self.extremes: dict[str, Tensor] = {}
        self.finite, self.nonfinite, self._pending_bad = z(), z(), z()
        self.on_clip, self.on_count, self.on_dev = z(), z(), z()
        self.grad_norm_sum, self.grad_norms = z(), 0
        self.skipped_optimizer_steps = 0

    def add(self, loss: Tensor, stats: dict[str, Tensor], *, on_policy: bool) -> None:
        ok = torch.isfinite(loss.detach()).to(self.device)
        okf = ok.to(torch.float64)
        self.finite += okf
        self.nonfinite += 1 - okf
        self._pending_bad += 1 - okf
        values = {"loss": loss.detach(), **stats}
        for k, v in values.items():
            v = v.detach().to(self.device, torch.float64)
            if k in self._EXTREMES:  # (a python fill: no tensor made from the host per step)
                v = torch.where(ok, v, float("inf") if k == "ratio_min" else float("-inf"))
                prev = self.extremes.get(k)
                self.extremes[k] = v if prev is None else (torch.minimum(prev, v) if k == "ratio_min"
                                                           else torch.maximum(prev, v))
            else:
                self.sums[k] = self.sums.get(k, torch.zeros_like(v)) + torch.where(ok, v, torch.zeros_like(v))
        if on_policy and "clipfrac" in stats:
            self.on_clip += torch.where(ok, stats["clipfrac"].detach().to(self.device, torch.float64), 0.0)
            self.on_count += okf
            dev = torch.maximum(stats["ratio_max"].detach() - 1, 1 - stats["ratio_min"].detach())
            self.on_dev = torch.maximum(self.on_dev, torch.where(ok, dev.to(self.device, torch.float64), 0.0))

    def take_nonfinite(self) -> Tensor:
        """Non-finite losses since the last call (the optimizer step's share)."""
        bad, self._pending_bad = self._pending_bad, torch.zeros_like(self._pending_bad)
        return bad

    def add_grad_norm(self, gn: Tensor) -> None:
        self.grad_norm_sum += gn.detach().to(self.device, torch.float64)
        self.grad_norms += 1

    def summary(self) -> dict[str, float]:
        """Every statistic as a float: one device-to-host transfer."""
        names = list(self.sums) + list(self.extremes)
        vec = torch.stack([*self.sums.values(), *self.extremes.values(), self.finite, self.nonfinite,
                           self.on_clip, self.on_count, self.on_dev, self.grad_norm_sum]).tolist()
        *vals, finite, nonfinite, on_clip, on_count, on_dev, gn_sum = vec
        out = {}
        for k, v in zip(names, vals):
            out[k] = v if k in self._EXTREMES else v / max(finite, 1.0)
        out["skipped_steps"] = nonfinite
        out["skipped_optimizer_steps"] = self.skipped_optimizer_steps
        out["grad_norm"] = gn_sum / self.grad_norms if self.grad_norms else float("nan")
        if on_count:
            out["onpolicy/clipfrac"] = on_clip / on_count
            out["onpolicy/ratio_dev_max"] = on_dev
        return out


def build_optimizer(cfg, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """train.optimizer over ``params`` (plain or FSDP2-sharded), see fastflow.parallel.build_optimizer."""
    t = cfg.train
    return parallel.build_optimizer(params, name=t.optimizer, lr=t.lr, betas=(t.beta1, t.beta2),
                                    weight_decay=t.weight_decay, eps=t.adam_eps)


def _placed_like(p: Tensor, value: Tensor) -> Tensor:
    """A full tensor from a single-process checkpoint laid out like ``p`` (sharded when p is)."""
    value = value.to(parallel.local(p).device)
    if parallel.is_dtensor(p):
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(value, p.device_mesh, p.placements)
    return value


def resolve_resume(resume: str | None, cfg) -> tuple[Path | None, Path | None]:
    """(run directory, checkpoint) that ``--resume`` names; (None, None) without it.

    ``auto`` (a bare --resume): of the config's run directory (output_dir/name) and its ``-N``
    siblings, the one whose latest complete checkpoint is the newest, and that checkpoint; (None,
    None) when none has one (the run starts fresh, in a new directory if the name is taken). A path: a checkpoint folder
    (``<run>/checkpoints/iter-N``, holding state.json) or a run directory (its latest complete
    checkpoint). Anything else raises ConfigError in one line: checked before anything loads.
    """
    if resume is None:
        return None, None
    if resume == "auto":
        # The config's run directory or one of its "-N" siblings (a run started while the name
        # held an earlier run writes to name-N): the one whose latest checkpoint is the newest.
        base = Path(cfg.run.output_dir) / cfg.run.name
        runs = [base] + [p for p in base.parent.glob(f"{glob.escape(base.name)}-*")
                         if p.name[len(base.name) + 1:].isdigit()]
        found = [(c, r) for r in runs if (c := latest_checkpoint(r)) is not None]
        if not found:
            return None, None  # nothing to continue: a fresh run (never on top of an old one)
        latest, run = max(found, key=lambda cr: (cr[0] / "state.json").stat().st_mtime)
        _check(latest, f"(bare: {run})")
        return run.resolve(), latest.resolve()
    p = Path(resume).expanduser()
    if not p.exists():
        raise ConfigError(f"--resume {resume}: no such run directory or checkpoint")
    if (p / "state.json").is_file():
        if p.parent.name != "checkpoints":
            raise ConfigError(f"--resume {resume}: a checkpoint must sit in its run's checkpoints/ folder")
        _check(p, resume)
        return p.parent.parent.resolve(), p.resolve()
    if p.name.startswith("iter-") and p.parent.name == "checkpoints":
        raise ConfigError(f"--resume {resume}: an incomplete checkpoint (no state.json; a run killed "
                          f"while writing it): give the run directory to take its latest complete one")
    if (p / "checkpoints").is_dir() or (p / "config.toml").is_file() or (p / "metrics.jsonl").is_file():
        latest = latest_checkpoint(p)
        if latest is None:
            raise ConfigError(f"--resume {resume}: the run directory holds no complete checkpoint "
                              f"(checkpoints/iter-*/state.json)")
        _check(latest, resume)
        return p.resolve(), latest.resolve()
    raise ConfigError(f"--resume {resume}: neither a run directory (with checkpoints/) nor a checkpoint "
                      f"folder (with state.json)")


def check_cuda_graph_request(cfg, world_size: int) -> None:
    """``sample.cuda_graph = required`` that cannot be met, known from the config alone (no CUDA
    device for this run, or FSDP2 sharding, whose re-gathered weights a graph cannot follow):
    ConfigError now, before anything loads. What only the model can tell (a policy that cannot be
    captured) the trainer's GraphedSampler.check raises at start-up."""
    if cfg.sample.cuda_graph != "required":
        return
    if pick_device(cfg.run.device).type != "cuda":
        raise ConfigError(f"config: sample.cuda_graph = required, but this run has no CUDA device "
                          f"(run.device {cfg.run.device}); use auto or off")
    if parallel.will_shard(cfg, world_size):
        raise ConfigError("config: sample.cuda_graph = required, but FSDP2 sharding (distributed.strategy "
                          f"{cfg.distributed.strategy}, model.finetune {cfg.model.finetune}) re-gathers the "
                          "weights every rollout, which a captured graph cannot follow; use auto or off")


def _check(checkpoint: Path, resume: str) -> None:
    try:
        check_checkpoint(checkpoint)
    except ValueError as e:
        raise ConfigError(f"--resume {resume}: {e}") from None


def write_config(run_dir: Path, cfg, resumed_from: Path | None) -> None:
    """``run_dir/config.toml``: the resolved config of this run. A resumed run whose config differs
    keeps the earlier file as ``config.<checkpoint>.toml`` (nothing the user had is lost)."""
    path, text = run_dir / "config.toml", to_toml(cfg)
    if resumed_from is not None and path.is_file() and path.read_text() != text:
        keep = run_dir / f"config.before-{resumed_from.name}.toml"
        n = 1
        while keep.exists():
            keep, n = run_dir / f"config.before-{resumed_from.name}-{n}.toml", n + 1
        path.rename(keep)
    path.write_text(text)


def load_prompt_split(cfg, policy, split: str) -> list[Prompt]:
    path = cfg.data.train_prompts if split == "train" else cfg.data.eval_prompts
    if path:
        return load_prompts(path)
    if hasattr(policy, "default_prompts"):
        return list(policy.default_prompts(split))
    raise ConfigError(f"config: data.{split}_prompts is empty and model {cfg.model.kind!r} has no "
                      f"built-in prompt list; give a .txt or .jsonl prompt file")


def memory_plan_refused(cfg) -> bool:
    """The start-up memory check of a CUDA run (fastflow.plan.startup_check): True, with a few lines
    of advice on rank 0, when the run cannot fit. Every rank plans the same config with rank 0's
    shards against its own GPU, so on identical GPUs all ranks stop together (none is left waiting
    in a collective). A failure of the planner itself never stops a run: it is logged, the run starts."""
    import os

    from fastflow import plan

    try:
        refusal = plan.startup_check(cfg, world_size_from_env(), int(os.environ.get("LOCAL_RANK", "0") or 0))
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the plan is advice; the run itself decides
        log.warning("memory plan skipped (%s: %s)", type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return False
    if refusal is not None and int(os.environ.get("RANK", "0") or 0) == 0:
        print(refusal, file=sys.stderr)
    return refusal is not None


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        args = parse_cli(sys.argv[1:] if argv is None else argv)
        if args.print_config:
            print(to_toml(args.config, sources=True), end="")  # each value with where it came from
            return 0
        if args.plan:  # the memory plan only: nothing loads, no GPU needed (fastflow.plan)
            from fastflow.plan import plan_command
            return plan_command(args, args.plan_gpus, args.plan_gpu_memory)
        derived = validate(args.config, world_size_from_env())  # before anything heavy loads
        try:
            pick_device(args.config.run.device)
        except RuntimeError as e:  # run.device cuda without one
            raise ConfigError(f"config: {e}") from None
        reward_devices = [args.config.reward.device] + [o.get("device") or "" for o in
                                                       args.config.reward.options.values() if isinstance(o, dict)]
        if any(d.startswith("cuda") for d in reward_devices) and not torch.cuda.is_available():
            raise ConfigError("config: reward.device (or a reward's device option) asks for cuda, but no "
                              "CUDA device is available")
        resolve_resume(args.resume, args.config)  # a --resume that names nothing: one line, now
        check_served_rewards(args.config.reward.weights, args.config.reward.options)  # servers up?
        check_wandb(args.config.log)  # log.wandb without the package: one line, now
        check_cuda_graph_request(args.config, world_size_from_env())
        if args.plan_check and memory_plan_refused(args.config):  # advice now, not an OOM after loading
            return 2
        ranks = local_cpu_ranks(args.config)
    except (ConfigError, FileNotFoundError) as e:
        print(f"fastflow: {e}", file=sys.stderr)
        return 2
    if ranks > 1:
        return launch_local(ranks, "fastflow.train", list(sys.argv[1:] if argv is None else argv))
    info = init_distributed(args.config.run.device)
    finished = False
    try:
        try:
            trainer = Trainer(args.config, derived, info, resume=args.resume)
        except (ValueError, FileNotFoundError) as e:  # bad input found while loading (a prompt
            print(f"fastflow: {e}", file=sys.stderr)   # outside the model's grammar, a checkpoint...)
            return 2
        trainer.run()
        finished = True
    finally:
        shutdown(info, finished)
    return 0


def exit_rank(code: int) -> None:
    """End a rank of a distributed run once main() has returned: everything it writes is flushed
    and closed by then (the trainer closes its logger and reward pool, shutdown() destroys the
    process group), so leave without running C++ static destructors. A finished 2-rank gloo run
    was seen (once in about 20) to abort at interpreter exit with "terminate called without an
    active exception" (a library thread still joinable at exit), turning a complete run into a
    failed exit status."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    rc = main()
    if under_launcher():
        exit_rank(rc)
    sys.exit(rc)
