"""Seeds of the trainer's random streams: a 63-bit seed is a hash of integers (the run's seed, a
stream id, the iteration, a sample index, ...), so every draw is a pure function of where it is
used, independent of batch composition, world size and process; a resumed run draws exactly what
an uninterrupted one would have."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across runs, platforms and processes)."""
    h = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


def generator(*parts: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(derive_seed(*parts))
    return g


# Stream ids keep the uses of (seed, iteration) apart.
# (4 was the evaluation noise's; evaluation noise is now fastflow.evaluation.image_seed.)
_PROMPTS, _NOISE, _SHUFFLE, _EVAL_NOISE, _GLOBAL, _GROUP_NOISE, _FM = 1, 2, 3, 4, 5, 6, 7


