"""Atomic checkpoints: written into a hidden temporary folder, fsynced, then renamed into place.

A kill at any moment leaves either the previous checkpoints untouched or the new one complete;
``latest_checkpoint`` only ever sees complete ones (state.json is written last, then the folder is
renamed). Layout of ``<run>/checkpoints/iter-000020/`` for a single-process run:

    trainable.safetensors   the trainable weights by their Policy names
    ema.safetensors         their EMA (when enabled)
    old_policy.safetensors  DiffusionNFT's old (sampling) policy (train.algorithm nft)
    optimizer.pt            optimizer state by parameter name (torch.save; loaded with weights_only=True)
    state.json              iteration, optimizer steps, EMA steps

and for a run over several ranks (torch.distributed.checkpoint, every rank writes its shards):

    sharded/                .metadata + one __R_0.distcp file per rank: trainable, optimizer, ema,
                            old_policy
    state.json              as above, plus the world size that wrote it
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
                    keep: int = 2, old_policy: dict[str, torch.Tensor] | None = None) -> Path:
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
    if old_policy is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in old_policy.items()}, tmp / "old_policy.safetensors")
    torch.save(optimizer_state, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"iteration": iteration, **state}, indent=2))
    for f in tmp.iterdir():
        _fsync_file(f)
    _fsync_dir(tmp)
    _publish(tmp, final)
    prune(root, keep)
    return final


def _publish(tmp: Path, final: Path) -> None:
    """Rename a complete, fsynced ``tmp`` folder to ``final`` (atomic on one file system). A
    checkpoint re-written for the same iteration (e.g. after a resume) replaces the old one."""
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_dir(final.parent)


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


def check_checkpoint(path: Path) -> None:
    """Cheap checks that ``path`` is a readable fastflow checkpoint (headers only, no tensor data):
    raises ValueError in one line naming the file otherwise. For refusing a bad --resume before
    anything heavy loads."""
    import zipfile

    from safetensors import safe_open

    path = Path(path)
    try:
        json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint {path}: state.json unreadable ({e})") from None
    if is_sharded_checkpoint(path):
        return
    for name in ("trainable.safetensors", "ema.safetensors", "old_policy.safetensors"):
        f = path / name
        if name != "trainable.safetensors" and not f.exists():
            continue
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"checkpoint {path}: {name} is not a readable safetensors file ({first})") from None
    if not zipfile.is_zipfile(path / "optimizer.pt"):
        raise ValueError(f"checkpoint {path}: optimizer.pt is missing or not a torch.save file")


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Returns {"trainable", "ema" (or None), "old_policy" (or None), "optimizer", "state"}."""
    path = Path(path)
    if not (path / "state.json").is_file():
        raise FileNotFoundError(f"not a complete fastflow checkpoint: {path}")
    ema_file = path / "ema.safetensors"
    return {
        "trainable": load_file(path / "trainable.safetensors", device=str(map_location)),
        "ema": load_file(ema_file, device=str(map_location)) if ema_file.is_file() else None,
        "old_policy": (load_file(path / "old_policy.safetensors", device=str(map_location))
                       if (path / "old_policy.safetensors").is_file() else None),
        "optimizer": torch.load(path / "optimizer.pt", map_location=map_location, weights_only=True),
        "state": json.loads((path / "state.json").read_text()),
    }


# ------------------------------------------------------------------ optimizer state by name

# The checkpointed optimizer state is AdamW's, by parameter name, independent of the optimizer
# implementation and of the sharding: {"step", "exp_avg", "exp_avg_sq"} with fp32 moments shaped
# like the parameter (DTensors when it is one). A run may therefore resume at another world size,
# and bitsandbytes' 8-bit state is stored dequantized (re-quantized on load; exact round trip).
_BNB_BLOCK = 256  # bitsandbytes' blockwise optimizer state block size


def _inner(optimizer):
    return getattr(optimizer, "inner", optimizer)


def _state_key(optimizer, p):
    return optimizer.inner_param(p) if hasattr(optimizer, "inner_param") else p


def _is_bnb(optimizer) -> bool:
    return type(_inner(optimizer)).__module__.startswith("bitsandbytes")


def _like(p: torch.Tensor, local_value: torch.Tensor) -> torch.Tensor:
    """``local_value`` (this rank's part) as a tensor laid out like parameter ``p``."""
    from fastflow.parallel import is_dtensor

    if not is_dtensor(p):
        return local_value.view(p.shape)
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local_value.view(p.to_local().shape), p.device_mesh, p.placements,
                              shape=p.shape, stride=p.stride(), run_check=False)


def optimizer_state_by_name(optimizer, params: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The optimizer's AdamW state by parameter name (see above); zeros for untouched parameters."""
    out = {}
    for n, p in params.items():
        st = _inner(optimizer).state.get(_state_key(optimizer, p), {})
        if not st:
            # two tensors: DCP loads into them in place
            m, v = torch.zeros_like(p, dtype=torch.float32), torch.zeros_like(p, dtype=torch.float32)
            step = 0.0
        elif _is_bnb(optimizer):
            step = float(st["step"])
            m, v = (_dequantize(st, i) for i in (1, 2))
            m, v = _like(p, m), _like(p, v)
        else:
            step = float(st["step"])
            m, v = st["exp_avg"].float(), st["exp_avg_sq"].float()
        out[n] = {"step": torch.tensor(step, dtype=torch.float64), "exp_avg": m, "exp_avg_sq": v}
    return out


def _dequantize(st: dict, i: int) -> torch.Tensor:
    s = st[f"state{i}"]
    if s.dtype != torch.uint8:  # small tensors keep 32-bit state
        return s.float().clone()
    from bitsandbytes import functional as F

    return F.dequantize_blockwise(s, absmax=st[f"absmax{i}"], code=st[f"qmap{i}"], blocksize=_BNB_BLOCK).float()


def load_optimizer_state_by_name(optimizer, params: dict[str, torch.Tensor],
                                 state: dict[str, dict[str, torch.Tensor]]) -> None:
    """Install ``state`` (from ``optimizer_state_by_name``, full or sharded tensors) into ``optimizer``."""
    from fastflow.parallel import is_dtensor, local

    missing = [n for n in params if n not in state]
    if missing:
        raise ValueError(f"optimizer state lacks {len(missing)} parameters, e.g. {missing[0]}")
    inner = _inner(optimizer)
    where = {id(q): (gi, pi, g) for gi, g in enumerate(inner.param_groups) for pi, q in enumerate(g["params"])}
    for n, p in params.items():
        s = state[n]
        m, v = s["exp_avg"], s["exp_avg_sq"]
        if is_dtensor(p) and not is_dtensor(m):  # a full tensor from a single-process checkpoint
            from torch.distributed.tensor import distribute_tensor
            m, v = (distribute_tensor(x.to(local(p).device), p.device_mesh, p.placements) for x in (m, v))
        m_l, v_l = local(m), local(v)
        key = _state_key(optimizer, p)
        if _is_bnb(optimizer):
            st = inner.state[key]
            if not st:
                gi, pi, g = where[id(key)]
                inner.init_state(g, key, gi, pi)
                st = inner.state[key]
            st["step"] = int(s["step"])
            for i, x in ((1, m_l), (2, v_l)):
                buf = st[f"state{i}"]
                if buf.dtype == torch.uint8:
                    from bitsandbytes import functional as F
                    q, qs = F.quantize_blockwise(x.float().contiguous().view(buf.shape),
                                                 code=st[f"qmap{i}"], blocksize=_BNB_BLOCK)
                    buf.copy_(q)
                    st[f"absmax{i}"].copy_(qs.absmax)
                else:
                    buf.copy_(x.view(buf.shape))
        else:
            g = inner.param_groups[where[id(key)][0]]
            on_dev = bool(g.get("fused") or g.get("capturable"))
            step = torch.tensor(float(s["step"]), dtype=torch.float32,
                                device=local(p).device if on_dev else "cpu")
            inner.state[key] = {"step": step, "exp_avg": m.to(p.dtype).clone(),
                                "exp_avg_sq": v.to(p.dtype).clone()}


# ------------------------------------------------------------------ sharded (DCP) checkpoints

_SHARDED = "sharded"


def is_sharded_checkpoint(path: Path) -> bool:
    """True for a checkpoint written by ``save_sharded_checkpoint`` (torch.distributed.checkpoint)."""
    return (Path(path) / _SHARDED / ".metadata").is_file()


def save_sharded_checkpoint(run_dir: Path, iteration: int, info, *, trainable: dict[str, torch.Tensor],
                            optimizer_state: dict, state: dict, ema: dict[str, torch.Tensor] | None = None,
                            keep: int = 2, old_policy: dict[str, torch.Tensor] | None = None) -> Path:
    """Every rank writes its shards with torch.distributed.checkpoint into a hidden folder; rank 0
    then adds state.json and renames the folder into place (atomic, like ``save_checkpoint``).

    Collective: every rank must call it. Replicated tensors are written once. Needs a file system
    every rank sees (one machine, or a shared mount across nodes).
    """
    import torch.distributed.checkpoint as dcp

    from fastflow.distributed import barrier

    root = Path(run_dir) / "checkpoints"
    final = checkpoint_dir(run_dir, iteration)
    tmp = root / f".tmp-{final.name}-{_SHARDED}"
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a killed writer
            shutil.rmtree(tmp)
    barrier(info)
    sd = {"trainable": {k: v.detach() for k, v in trainable.items()}, "optimizer": optimizer_state}
    if ema is not None:
        sd["ema"] = dict(ema)
    if old_policy is not None:
        sd["old_policy"] = dict(old_policy)
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(str(tmp / _SHARDED), sync_files=True))
    barrier(info)  # every rank's files are complete before the folder becomes visible
    if info.is_main:
        (tmp / "state.json").write_text(json.dumps({"iteration": iteration, "world_size": info.world_size,
                                                    **state}, indent=2))
        _fsync_file(tmp / "state.json")
        _fsync_dir(tmp / _SHARDED)
        _fsync_dir(tmp)
        _publish(tmp, final)
        prune(root, keep)
    barrier(info)
    return final


def load_sharded_weights(path: Path, params: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """The weights of a sharded checkpoint as full tensors shaped like ``params`` (name -> tensor),
    without a process group and at any world size: its EMA when it holds one, else the trainable
    weights. Returns (state, "ema" | "trainable"). For evaluating a checkpoint of a multi-rank run."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise FileNotFoundError(f"not a fastflow sharded checkpoint: {path}")
    reader = dcp.FileSystemReader(str(path / _SHARDED))
    stored = reader.read_metadata().state_dict_metadata
    which = "ema" if any(k.startswith("ema.") for k in stored) else "trainable"
    missing = sorted(n for n in params if f"{which}.{n}" not in stored)
    if missing:
        raise ValueError(f"checkpoint {path} lacks {len(missing)} of the policy's parameters (e.g. {missing[0]}); "
                         f"was it written with another model.finetune / LoRA setting?")
    state = {n: torch.empty(p.shape, dtype=p.dtype) for n, p in params.items()}
    dcp.load({which: state}, storage_reader=reader)
    return state, which


def load_sharded_checkpoint(path: Path, *, trainable: dict[str, torch.Tensor], optimizer_state: dict,
                            ema: dict[str, torch.Tensor] | None = None,
                            old_policy: dict[str, torch.Tensor] | None = None) -> dict:
    """Load a sharded checkpoint IN PLACE into ``trainable``, ``optimizer_state`` (a template from
    ``optimizer_state_by_name``) and ``ema``, at any world size (resharded on read; also without a
    process group). Returns state.json."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    if not (path / "state.json").is_file() or not is_sharded_checkpoint(path):
        raise FileNotFoundError(f"not a complete fastflow sharded checkpoint: {path}")
    sd = {"trainable": {k: v.detach() for k, v in trainable.items()}, "optimizer": optimizer_state}
    if ema is not None:
        sd["ema"] = ema
    if old_policy is not None:
        sd["old_policy"] = old_policy
    try:
        dcp.load(sd, storage_reader=dcp.FileSystemReader(str(path / _SHARDED)))
    except Exception as e:  # DCP reports a mismatch as a long multi-rank trace; keep the cause
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"checkpoint {path} does not match this model: {first}") from e
    return json.loads((path / "state.json").read_text())
