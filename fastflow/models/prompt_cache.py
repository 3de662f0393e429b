"""Prompt conditioning computed once: an on-disk store of a run's fixed prompt lists, encoded over
the ranks, and a small in-memory cache for any other prompt.

Why: SD3.5's text encoders (CLIP-L, CLIP-G, T5-XXL) hold about 11 GB of bf16 weights per rank, and
an iteration only needs the embeddings of ~48 prompts out of a fixed list. So the trainer encodes
its training and evaluation lists once, each rank a slice of them (``EmbeddingStore.build``),
into safetensors files keyed by the model and the prompt list, reused by later runs; then the
encoders can leave the device. Rows are read back on demand from the memory-mapped files (one copy
in the page cache serves every rank of a machine) and copied to the device through pinned memory.

    store = EmbeddingStore.build(cache_dir, key, texts, encode, info)
    cache = PromptCache(encode, device, store=store)
    cond = cache(["a cat", "a dog"])        # batch-first tensors on the device

A row's values equal what ``encode`` gives for that prompt in the batch it was encoded in (rows are
padded to a fixed length by every tokenizer of these models, so only the batch composition can
move them, by float rounding).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

Encode = Callable[[list[str]], dict[str, Tensor]]

_MANIFEST = "manifest.json"


def default_cache_dir() -> Path:
    """``$FASTFLOW_CACHE`` or ``$XDG_CACHE_HOME/fastflow`` (``~/.cache/fastflow``)."""
    if os.environ.get("FASTFLOW_CACHE"):
        return Path(os.environ["FASTFLOW_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "fastflow"


def module_fingerprint(module: torch.nn.Module | None) -> str:
    """A cheap identity of a module's weights: its class, config and a few thousand values of its
    first and last parameters (two checkpoints at one path with other weights differ here)."""
    if module is None:
        return "none"
    h = hashlib.sha256(type(module).__name__.encode())
    config = getattr(module, "config", None)
    if config is not None:
        as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        h.update(json.dumps(as_dict, sort_keys=True, default=str).encode())
    params = list(module.parameters())
    for p in (params[:1] + params[-1:]) if params else []:
        h.update(str((tuple(p.shape), p.dtype)).encode())
        h.update(p.detach().reshape(-1)[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()


def store_key(texts: Sequence[str], **identity) -> str:
    """The store folder name: a hash of the model identity (``identity``) and the prompt list."""
    h = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
    for t in texts:
        h.update(t.encode("utf-8") + b"\x00")
    return h.hexdigest()[:32]


class EmbeddingStore:
    """Read-only embeddings of a fixed prompt list, in ``part-R.safetensors`` files (one per rank
    that encoded a slice) plus ``manifest.json`` (every prompt's part and row, written last)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        manifest = json.loads((self.directory / _MANIFEST).read_text(encoding="utf-8"))
        self.keys: list[str] = manifest["keys"]
        self.parts: list[str] = manifest["parts"]
        self.index: dict[str, tuple[int, int]] = {t: (int(p), int(r)) for t, p, r in manifest["rows"]}
        self._files: list | None = None

    def __contains__(self, text: str) -> bool:
        return text in self.index

    def __len__(self) -> int:
        return len(self.index)

    @property
    def nbytes(self) -> int:
        """Bytes of the part files on disk (not memory: rows are read on demand)."""
        return sum((self.directory / p).stat().st_size for p in self.parts)

    def _open(self):
        if self._files is None:
            from safetensors import safe_open

            self._files = [safe_open(str(self.directory / p), framework="pt") for p in self.parts]
        return self._files

    def rows(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """The stored rows of ``texts`` (all must be in the store), stacked batch-first on the CPU."""
        files = self._open()
        out: dict[str, list[Tensor]] = {k: [] for k in self.keys}
        for t in texts:
            part, row = self.index[t]
            for k in self.keys:
                out[k].append(files[part].get_slice(k)[row:row + 1])
        return {k: torch.cat(v) for k, v in out.items()}

    @classmethod
    def build(cls, root: Path, key: str, texts: Sequence[str], encode: Encode, info=None, *,
              chunk: int = 32, progress: bool = False) -> "EmbeddingStore":
        """Open ``root/key``, encoding it first if it is not complete: rank ``r`` of ``w`` encodes
        the unique prompts ``r::w`` in batches of ``chunk`` and writes its part atomically; rank 0
        writes the manifest once every part exists. Collective: every rank calls it (``info`` a
        fastflow.distributed.DistInfo, None for one process); the folder must be on a file system
        every rank sees (as checkpoints)."""
        from safetensors.torch import save_file

        from fastflow.distributed import barrier

        rank, world = (info.rank, info.world_size) if info is not None else (0, 1)
        directory = Path(root) / key
        texts = list(dict.fromkeys(texts))
        if not (directory / _MANIFEST).is_file():
            directory.mkdir(parents=True, exist_ok=True)
            mine = texts[rank::world]
            tensors: dict[str, list[Tensor]] = {}
            bar = None
            if progress and rank == 0:
                from tqdm.auto import tqdm
                bar = tqdm(total=len(mine), desc="encoding prompts", unit="prompt", dynamic_ncols=True)
            for i in range(0, len(mine), chunk):
                out = encode(mine[i:i + chunk])
                for k, v in out.items():
                    tensors.setdefault(k, []).append(v.detach().to("cpu"))
                if bar is not None:
                    bar.update(len(mine[i:i + chunk]))
            if bar is not None:
                bar.close()
            if mine:
                part = directory / f"part-{rank:05d}-of-{world:05d}.safetensors"
                tmp = part.with_name(f".tmp-{part.name}-{os.getpid()}")
                save_file({k: torch.cat(v).contiguous() for k, v in tensors.items()}, str(tmp))
                os.replace(tmp, part)
            barrier(info) if info is not None else None
            if rank == 0:
                parts = [f"part-{r:05d}-of-{world:05d}.safetensors" for r in range(world) if texts[r::world]]
                rows = [[t, parts.index(f"part-{i % world:05d}-of-{world:05d}.safetensors"), i // world]
                        for i, t in enumerate(texts)]
                keys = sorted(tensors) if tensors else []
                manifest = {"keys": keys, "parts": parts, "rows": rows}
                tmp = directory / f".tmp-{_MANIFEST}-{os.getpid()}"
                tmp.write_text(json.dumps(manifest), encoding="utf-8")
                os.replace(tmp, directory / _MANIFEST)
            barrier(info) if info is not None else None
        return cls(directory)


class PromptCache:
    """Per-prompt conditioning on ``device``: from the attached EmbeddingStore when the prompt is
    in it, else from an in-memory cache of host rows (least recently used evicted past
    ``max_bytes``), else encoded (in batches of ``chunk`` for the prompts not seen yet).

    Host rows are compact copies, never views of an encoder's batch output (a view would keep the
    whole batch alive); with a CUDA device, batches travel through pinned memory.
    """

    def __init__(self, encode: Encode, device=None, *, store: EmbeddingStore | None = None,
                 max_bytes: int = 1 << 30, chunk: int = 32):
        self._encode = encode
        self.device = torch.device(device) if device is not None else None
        self.store = store
        self._rows: OrderedDict[str, dict[str, Tensor]] = OrderedDict()
        self._held = 0  # bytes of the rows in _rows (each row owns its storage)
        self.max_bytes = int(max_bytes)
        self.chunk = chunk

    @property
    def nbytes(self) -> int:
        """Host bytes held by the in-memory rows (storages counted once)."""
        seen, total = set(), 0
        for row in self._rows.values():
            for v in row.values():
                st = v.untyped_storage()
                if st.data_ptr() not in seen:
                    seen.add(st.data_ptr())
                    total += st.nbytes()
        return total

    def __call__(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        prompts = list(prompts)
        if not prompts:
            raise ValueError("encode_prompts: empty prompt list")
        in_store = self.store is not None and all(p in self.store for p in prompts)
        if in_store:
            return self._to_device(self.store.rows(prompts))
        missing = list(dict.fromkeys(p for p in prompts if p not in self._rows
                                     and not (self.store is not None and p in self.store)))
        for i in range(0, len(missing), self.chunk):
            part = missing[i:i + self.chunk]
            out = self._encode(part)
            for j, p in enumerate(part):
                row = {k: _compact(v[j]) for k, v in out.items()}
                self._rows[p] = row
                self._held += sum(t.nbytes for t in row.values())
        rows = []
        for p in prompts:
            if p in self._rows:
                self._rows.move_to_end(p)
                rows.append(self._rows[p])
            else:
                rows.append({k: v[0] for k, v in self.store.rows([p]).items()})
        result = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        while len(self._rows) > 1 and self._held > self.max_bytes:
            _, row = self._rows.popitem(last=False)
            self._held -= sum(t.nbytes for t in row.values())
        return self._to_device(result)

    def _to_device(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.device is None or self.device.type == "cpu":
            return batch
        if self.device.type == "cuda":
            return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}
        return {k: v.to(self.device) for k, v in batch.items()}


def _compact(t: Tensor) -> Tensor:
    """A host copy of ``t`` that owns exactly its own bytes (never a view of a larger batch)."""
    t = t.detach()
    return t.clone() if t.device.type == "cpu" else t.to("cpu")
