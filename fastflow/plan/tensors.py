"""Exact byte arithmetic of the plan: memory sizes, the TensorSpec inventory of a module, FSDP2's
dim-0 shards and the optimizer states (torch AdamW, bitsandbytes' 8-bit AdamW).

Everything here is a pure function of shapes and dtypes: it equals, byte for byte, what the
trainer allocates (tests/test_plan.py compares it with real allocations).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import nn

GiB = 1 << 30
MiB = 1 << 20

# ----------------------------------------------------------------------------------------- sizes

# no unit means GiB: the number a user reads off a GPU's data sheet
_UNITS = {"": GiB, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3,
          "gb": 1000**3, "t": 1000**4, "tb": 1000**4, "kib": 1 << 10, "mib": MiB, "gib": GiB,
          "tib": 1 << 40}


def parse_size(text: str) -> int:
    """``"80GiB"`` / ``"80GB"`` / ``"81920MiB"`` / ``"80"`` (GiB) -> bytes; ValueError otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError(f"not a memory size: {text!r} (e.g. 80GiB, 80GB, 81920MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt(n: float) -> str:
    """Bytes for people: ``1.50 GiB``, ``432.0 MiB``, ``12.0 KiB``, ``0 B``."""
    n = float(n)
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    if abs(n) >= MiB:
        return f"{n / MiB:.1f} MiB"
    if abs(n) >= 1024:
        return f"{n / 1024:.1f} KiB"
    return f"{int(n)} B"


def count(n: int) -> str:
    """A parameter count for people: ``2.47B``, ``18.9M``, ``3.2k``."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}" if unit == "B" else f"{n / div:.1f}{unit}"
    return str(n)


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def round_up(n: int, to: int) -> int:
    """``n`` rounded up to a multiple of ``to`` (the CUDA caching allocator's 512-byte blocks)."""
    return -(-n // to) * to if to > 1 and n else n


# ------------------------------------------------------------------------------ tensor inventory

@dataclass(frozen=True)
class TensorSpec:
    """One parameter or buffer: its name, shape, dtype, whether it trains, its FSDP2 group (a
    block's index, -1 for the root that gathers everything outside the blocks) and, for a trained
    one, whether a loss reaches it (one that none reaches holds no gradient and no optimizer
    state: Qwen-Image's last block's text output is discarded)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    trainable: bool = False
    group: int = -1
    grad: bool = True

    @functools.cached_property
    def numel(self) -> int:  # (cached: the advice sums millions of them)
        return math.prod(self.shape)

    def nbytes(self, dtype: torch.dtype | None = None) -> int:
        return self.numel * (dtype or self.dtype).itemsize


def specs_of(module: nn.Module, groups: dict[int, int] | None = None,
             prefix: str = "") -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(parameters, buffers) of a (meta) module as TensorSpecs; ``groups`` maps id(submodule) of
    each FSDP2 block to its index (a tensor outside every block is in the root group, -1)."""
    owner: dict[int, int] = {}
    if groups:
        by_id = {id(m): m for m in module.modules()}
        for mod_id, g in groups.items():
            sub = by_id[mod_id]
            for t in [*sub.parameters(), *sub.buffers()]:
                owner[id(t)] = g
    params = [TensorSpec(prefix + n, tuple(p.shape), p.dtype, p.requires_grad, owner.get(id(p), -1))
              for n, p in module.named_parameters()]
    buffers = [TensorSpec(prefix + n, tuple(b.shape), b.dtype, False, owner.get(id(b), -1))
               for n, b in module.named_buffers()]
    return params, buffers


def sum_bytes(specs: Iterable[TensorSpec], round_to: int = 1, dtype: torch.dtype | None = None) -> int:
    """Bytes of ``specs`` (each allocation rounded up to ``round_to``), optionally as ``dtype``."""
    return sum(round_up(s.nbytes(dtype), round_to) for s in specs)


def placed(spec: TensorSpec, dtype: torch.dtype) -> TensorSpec:
    """``fastflow.models.sd3.place``: floating tensors cast to ``dtype``, integer ones kept."""
    from dataclasses import replace

    return replace(spec, dtype=dtype) if spec.dtype.is_floating_point else spec


# ---------------------------------------------------------------------------------- FSDP2 shards

def _chunk(d0: int, world: int) -> int:
    return -(-d0 // world)


def local_numel(spec: TensorSpec, world: int, rank: int = 0) -> int:
    """Elements of ``spec`` on ``rank`` when FSDP2 shards it over ``world`` ranks (torch.chunk on
    dim 0: chunks of ceil(d0 / world) rows, the last ranks possibly fewer or none). The optimizer
    state and the EMA follow these local shards."""
    if world == 1 or not spec.shape:
        return spec.numel
    c = _chunk(spec.shape[0], world)
    rows = max(0, min(c, spec.shape[0] - rank * c))
    return rows * math.prod(spec.shape[1:])


def padded_numel(spec: TensorSpec, world: int) -> int:
    """Elements FSDP2 allocates for ``spec``'s shard on every rank: the chunk padded to the full
    ceil(d0 / world) rows (so that one all-gather buffer fits every rank's shard)."""
    if world == 1 or not spec.shape:
        return spec.numel
    return _chunk(spec.shape[0], world) * math.prod(spec.shape[1:])


# ---------------------------------------------------------------------------- optimizer state

def adamw_state_bytes(numels: Sequence[int], round_to: int = 1) -> int:
    """torch AdamW: exp_avg and exp_avg_sq (float32) and a float32 step per tensor."""
    return sum(2 * round_up(4 * n, round_to) + round_up(4, round_to) for n in numels)


def adamw8bit_state_bytes(numels: Sequence[int], min_8bit_size: int = 4096, round_to: int = 1) -> int:
    """bitsandbytes AdamW8bit: uint8 moments plus a float32 absmax per 256-element block each (the
    two 256-entry quantization maps are shared by every tensor, so counted once); float32 moments
    for tensors under ``min_8bit_size`` elements."""
    total, any8 = 0, False
    for n in numels:
        if n < min_8bit_size:
            total += 2 * round_up(4 * n, round_to)
        else:
            any8 = True
            blocks = -(-n // 256)
            total += 2 * round_up(n, round_to) + 2 * round_up(4 * blocks, round_to)
    return total + (2 * round_up(256 * 4, round_to) if any8 else 0)
