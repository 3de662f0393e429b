"""Launched by tests/test_distributed.py under torchrun (gloo, loopback): one rank of a toy run.

    python -m torch.distributed.run --standalone --nproc_per_node N tests/dist_worker.py MODE OUT [--section.key V ...]

MODE train:   a full training run (like ``python -m fastflow.train``, ``--resume`` accepted), then
              every rank writes its full trainable, EMA and (DiffusionNFT) old-policy weights to
              OUT/rank{R}.safetensors.
MODE budget:  a run in which rank 1's clock crosses run.max_minutes after iteration 1 (rank 0's
              never does); every rank writes the iteration it stopped at.
MODE rollout: one rollout + advantages of iteration 0; every rank writes its initial noise, first SDE step,
              group ids, rewards, advantages and the gathered rewards/groups to OUT/rank{R}.safetensors.
MODE nan:     a training run in which rank 1 alone gets a non-finite loss at iteration 1 (its first
              trained step); every rank writes its weights, the iteration reached and the optimizer
              steps skipped (the run must not hang, and the ranks must agree).
MODE reference: builds the trainer only (full fine-tuning under FSDP2) and writes, per rank, the bytes
              of its reference shards and trained shards, their dtypes, and the gathered reference.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import save_file

from fastflow import parallel
from fastflow.config import parse_cli, validate
from fastflow.distributed import all_gather_cat, init_distributed, shutdown, world_size_from_env
from fastflow.train import Trainer


def main() -> int:
    mode, out, *argv = sys.argv[1:]
    out = Path(out)
    args = parse_cli(argv)
    derived = validate(args.config, world_size_from_env())
    info = init_distributed(args.config.run.device)
    finished = False
    try:
        t = Trainer(args.config, derived, info, resume=args.resume)
        if mode == "train":
            t.run()
            # full_tensor() is collective: every rank gathers every parameter
            tensors = {f"w.{n}": parallel.full(p.detach()).clone() for n, p in t.params.items()}
            if t.ema is not None:
                tensors.update({f"ema.{n}": parallel.full(v).clone() for n, v in t.ema.shadow.items()})
            if t.old_policy is not None:  # DiffusionNFT's old policy
                tensors.update({f"old.{n}": parallel.full(v).clone() for n, v in t.old_policy.shadow.items()})
            tensors["iteration"] = torch.tensor(t.iteration)
        elif mode == "budget":
            if info.rank == 1:  # this rank's clock jumps past run.max_minutes after iteration 1
                import fastflow.train as train_mod
                real = train_mod.time.perf_counter
                train_mod.time = types.SimpleNamespace(
                    perf_counter=lambda: real() + (1e6 if t.iteration >= 1 else 0.0))
            final = t.run()
            tensors = {"iteration": torch.tensor(t.iteration), "final_eval": torch.tensor(int(bool(final)))}
        elif mode == "rollout":
            rb = t.rollout(0)
            adv, _ = t.advantages(rb)
            tensors = {"noise": rb.traj.latents[:, 0].contiguous(), "next": rb.traj.next_latents[:, 0].contiguous(),
                       "groups": rb.group_ids.contiguous(),
                       "rewards": rb.rewards.contiguous(), "adv": adv.contiguous(),
                       "all_rewards": all_gather_cat(rb.rewards, info), "all_groups": all_gather_cat(rb.group_ids, info)}
        elif mode == "nan":
            import fastflow.train as train_mod

            real, calls = train_mod.ops.grpo_step_loss, []

            def poisoned(*a, **kw):  # rank 1, iteration 1, first trained step: loss -> nan
                loss, stats = real(*a, **kw)
                calls.append(t.iteration)
                if info.rank == 1 and t.iteration == 1 and calls.count(1) == 1:
                    loss = loss * float("nan")
                return loss, stats

            train_mod.ops = types.SimpleNamespace(**{**vars(train_mod.ops), "grpo_step_loss": poisoned})
            skipped = []
            real_train_on = t.train_on

            def train_on(rb, adv, it):
                out = real_train_on(rb, adv, it)
                skipped.append(out["skipped_optimizer_steps"])
                return out

            t.train_on = train_on
            t.run()
            tensors = {f"w.{n}": parallel.full(p.detach()).clone() for n, p in t.params.items()}
            tensors["iteration"] = torch.tensor(t.iteration)
            tensors["skipped"] = torch.tensor(skipped)
            tensors["optimizer_steps"] = torch.tensor(t.optimizer_steps)
        elif mode == "reference":
            ref = t.policy.tuning.ref_transformer
            trained = [p for p in t.params.values()]
            tensors = {"ref_local_numel": torch.tensor(sum(parallel.local(p).numel() for p in ref.parameters())),
                       "ref_numel": torch.tensor(sum(p.numel() for p in ref.parameters())),
                       "ref_bf16": torch.tensor(int(all(p.dtype == (torch.bfloat16 if p.ndim >= 2 else torch.float32)
                                                        for p in ref.parameters()))),
                       "trained_fp32": torch.tensor(int(all(parallel.local(p).dtype == torch.float32 for p in trained))),
                       "trained_local_numel": torch.tensor(sum(parallel.local(p).numel() for p in trained))}
            tensors.update({f"ref.{n}": parallel.full(p.detach()).float().clone() for n, p in ref.named_parameters()})
            tensors.update({f"w.{n}": parallel.full(p.detach()).float().clone() for n, p in t.params.items()})
        else:
            raise SystemExit(f"dist_worker: unknown mode {mode!r}; known: train, budget, rollout, nan, reference")
        tensors["strategy_fsdp"] = torch.tensor(int(t.strategy == "fsdp"))
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / f"rank{info.rank}.safetensors"))
        finished = True
    finally:
        shutdown(info, finished)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from fastflow.train import exit_rank  # leave as the trainer's ranks do (its docstring says why)
    exit_rank(main())
