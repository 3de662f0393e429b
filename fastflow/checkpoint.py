"""Atomic checkpoints: written into a hidden temporary folder, fsynced, then renamed into place.

A kill at any moment leaves either the previous checkpoints untouched or the new one complete;
``latest_checkpoint`` only ever sees complete ones. Layout of ``<run>/checkpoints/iter-000020/``:

    trainable.safetensors   the trainable weights by their Policy names
    ema.safetensors         their EMA (when enabled)
    optimizer.pt            optimizer state (torch.save; loaded with weights_only=True)
    state.json              iteration, optimizer steps, EMA steps, config digest
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_PREFIX = "iter-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def checkpoint_dir(run_dir: Path, iteration: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"{_PREFIX}{iteration:06d}"


def save_checkpoint(run_dir: Path, iteration: int, *, trainable: dict[str, torch.Tensor],
                    optimizer_state: dict, state: dict, ema: dict[str, torch.Tensor] | None = None,
                    keep: int = 2) -> Path:
    """Write a complete checkpoint for ``iteration`` atomically; prune to the ``keep`` newest."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(run_dir, iteration)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, tmp / "trainable.safetensors")
    if ema is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in ema.items()}, tmp / "ema.safetensors")
    torch.save(optimizer_state, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"iteration": iteration, **state}, indent=2))
    for f in tmp.iterdir():
        _fsync_file(f)
    _fsync_dir(tmp)
    if final.exists():  # re-written after a resume: move the old one aside first
        old = root / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)
    prune(root, keep)
    return final


def prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob(f"{_PREFIX}*") if (p / "state.json").is_file())
    for p in done[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(".tmp-*"):  # leftovers of killed writers (never a complete checkpoint)
        if not p.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    done = sorted(p for p in root.glob(f"{_PREFIX}*") if (p / "state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Returns {"trainable", "ema" (or None), "optimizer", "state"}."""
    path = Path(path)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"not a complete fastflow checkpoint: {path}")
    ema_file = path / "ema.safetensors"
    return {
        "trainable": load_file(path / "trainable.safetensors", device=str(map_location)),
        "ema": load_file(ema_file, device=str(map_location)) if ema_file.is_file() else None,
        "optimizer": torch.load(path / "optimizer.pt", map_location=map_location, weights_only=True),
        "state": json.loads((path / "state.json").read_text()),
    }
