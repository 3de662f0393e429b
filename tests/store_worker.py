"""Launched by tests/test_real_model_path.py under torchrun (gloo, loopback): every rank builds an
EmbeddingStore of the same prompts with a stand-in encoder.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/store_worker.py ROOT OUT [per-rank]

ROOT: the cache folder (with ``per-rank``, each rank uses ROOT/rank-R: a cache that is not shared,
as on nodes with local disks). Each rank writes OUT/rank{R}.json: the rows it read back, or the
one-line error it stopped with, and how many prompts it encoded itself.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from fastflow.distributed import init_distributed, shutdown
from fastflow.models.prompt_cache import EmbeddingStore


def main() -> int:
    root, out, *mode = sys.argv[1:]
    info = init_distributed("cpu")
    root = Path(root) / f"rank-{info.rank}" if mode == ["per-rank"] else Path(root)
    texts = [f"p{i}" for i in range(11)]
    encoded = []

    def encode(ps):
        encoded.extend(ps)
        return {"e": torch.tensor([[float(p[1:])] * 3 for p in ps]), "pooled": torch.ones(len(ps), 2)}

    result = {"encoded": len(encoded)}
    try:
        store = EmbeddingStore.build(root, "k", texts, encode, info, chunk=2, part_rows=3)
        result.update(rows=store.rows(["p10", "p3", "p0"])["e"][:, 0].tolist(), parts=len(store.parts))
    except ValueError as e:
        result["error"] = str(e)
    result["encoded"] = len(encoded)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank{info.rank}.json").write_text(json.dumps(result))
    shutdown(info, finished=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
