"""Measured per-rank training memory of the toy velocity net: AdamW vs 8-bit AdamW, FSDP2 vs none.

    python bench/memory.py [--hidden 512]                                    # one process
    python -m torch.distributed.run --standalone --nproc_per_node 2 bench/memory.py [--hidden 512]   # FSDP2

Counts the bytes this rank holds in trainable weights, their gradients and the optimizer state
after one real training step (fastflow.parallel.training_memory: local shards only). CPU tensors;
activations and allocator overhead are not included.
"""

from __future__ import annotations

import argparse
import json

import torch

from fastflow import parallel
from fastflow.distributed import init_distributed, shutdown
from fastflow.models.toy import ToyVelocityNet


def measure(hidden: int, optimizer: str, info) -> dict:
    torch.manual_seed(0)
    net = ToyVelocityNet(48, hidden=hidden)
    if info.enabled:
        parallel.apply_fsdp(net, [m for m in net.net if isinstance(m, torch.nn.Linear)])
    params = [p for p in net.parameters()]
    opt = parallel.build_optimizer(params, name=optimizer, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
    x, tok = torch.randn(4, 3, 4, 4), torch.randint(0, 7, (4,))
    net(x, torch.rand(4), tok).square().mean().backward()
    mem = parallel.training_memory(params, opt)  # grads still present
    opt.step()
    mem["optimizer"] = parallel.optimizer_state_bytes(opt)
    return mem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512)
    a = ap.parse_args()
    info = init_distributed("cpu")
    finished = False
    try:
        rows = {o: measure(a.hidden, o, info) for o in ("adamw", "adamw8bit")}
        if info.is_main:
            print(json.dumps({"world_size": info.world_size, "sharding": "fsdp2" if info.enabled else "none",
                              "hidden": a.hidden, "bytes_per_rank": rows}, indent=1))
        finished = True
    finally:
        shutdown(info, finished)


if __name__ == "__main__":
    main()
