"""Launched by tests/test_distributed.py under torchrun (gloo, loopback): one rank of a toy run.

    python -m torch.distributed.run --standalone --nproc_per_node N tests/dist_worker.py MODE OUT [--section.key V ...]

MODE train:   a full training run (like ``python -m fastflow.train``, ``--resume`` accepted), then
              every rank writes its full trainable and EMA weights to OUT/rank{R}.safetensors.
MODE budget:  a run in which rank 1's clock crosses run.max_minutes after iteration 1 (rank 0's
              never does); every rank writes the iteration it stopped at.
MODE rollout: one rollout + advantages of iteration 0; every rank writes its initial noise, first SDE step,
              group ids, rewards, advantages and the gathered rewards/groups to OUT/rank{R}.safetensors.
"""

from __future__ import annotations

import os
import sys
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
            tensors["iteration"] = torch.tensor(t.iteration)
        elif mode == "budget":
            if info.rank == 1:  # this rank's clock jumps past run.max_minutes after iteration 1
                import types

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
        else:
            raise SystemExit(f"dist_worker: unknown mode {mode!r}; known: train, budget, rollout")
        tensors["strategy_fsdp"] = torch.tensor(int(t.strategy == "fsdp"))
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / f"rank{info.rank}.safetensors"))
        finished = True
    finally:
        shutdown(info, finished)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
