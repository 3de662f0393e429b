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
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

Encode = Callable[[list[str]], dict[str, Tensor]]
log = logging.getLogger("fastflow.prompt_cache")

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
    """Read-only embeddings of a fixed prompt list, in part files (each rank writes its slice's,
    ``part_rows`` prompts a file) plus ``manifest.json`` (every prompt's part file and row,
    written last: a folder without it is incomplete and is encoded again)."""

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
              chunk: int = 32, part_rows: int = 512, progress: bool = False) -> "EmbeddingStore":
        """Open ``root/key``, encoding it first if any rank lacks it complete: rank ``r`` of ``w``
        encodes the unique prompts ``r::w`` in batches of ``chunk``, writing a part file every
        ``part_rows`` prompts (so it never holds more than one part in memory); rank 0 writes the
        manifest once every part exists.

        Collective when ``info`` spans ranks: every rank calls it, and every decision (build or
        not, a failure anywhere, whether every rank can read the result) is agreed over the ranks,
        so no rank waits alone in a collective. The folder must be on a file system every rank
        sees (as checkpoints); otherwise every rank stops with one line saying so."""
        from fastflow.distributed import barrier, broadcast_str

        rank, world = (info.rank, info.world_size) if info is not None else (0, 1)
        if info is not None:
            key = broadcast_str(key, info)  # one folder for all, whatever a rank computed
        directory = Path(root) / key
        texts = list(dict.fromkeys(texts))
        if _any_rank(not (directory / _MANIFEST).is_file(), info):
            _collectively(lambda: cls._encode_slice(directory, texts, encode, rank, world, chunk,
                                                    part_rows, progress and rank == 0),
                          info, f"encoding prompts into {directory}")
            barrier(info) if info is not None else None
            _collectively(lambda: cls._write_manifest(directory, texts, world) if rank == 0 else None,
                          info, f"writing {directory / _MANIFEST} (a folder every rank sees is needed: "
                                f"data.prompt_cache)")
        store = _collectively(lambda: cls(directory)._check(), info,
                              f"reading the prompt store {directory} (is data.prompt_cache on a file system "
                              f"every rank sees? else set it to one, or to \"off\")")
        return store

    def _check(self) -> "EmbeddingStore":
        for f in self._open():
            for k in self.keys:
                f.get_slice(k)
        return self

    @staticmethod
    def _encode_slice(directory: Path, texts: list[str], encode: Encode, rank: int, world: int,
                      chunk: int, part_rows: int, progress: bool) -> None:
        import shutil

        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        mine = list(range(rank, len(texts), world))
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(mine), desc="encoding prompts", unit="prompt", dynamic_ncols=True)
        parts = []
        for b, start in enumerate(range(0, len(mine), part_rows)):
            rows = mine[start:start + part_rows]
            tensors: dict[str, list[Tensor]] = {}
            for i in range(0, len(rows), chunk):
                out = encode([texts[j] for j in rows[i:i + chunk]])
                for k, v in out.items():
                    tensors.setdefault(k, []).append(v.detach().to("cpu"))
                if bar is not None:
                    bar.update(len(rows[i:i + chunk]))
            block = {k: torch.cat(v).contiguous() for k, v in tensors.items()}
            if b == 0:  # the whole slice's size, known from the first part: refuse a full disk now
                need = sum(t.nbytes for t in block.values()) * len(mine) / max(len(rows), 1)
                free = shutil.disk_usage(directory).free
                if need > free:
                    raise OSError(f"{need / 2**30:.1f} GiB needed, {free / 2**30:.1f} GiB free")
                if progress:
                    log.info("prompt store: %d prompts, about %.1f GiB per rank, in %s", len(texts),
                             need / 2**30, directory)
            name = f"part-{rank:05d}-{b:05d}-of-{world:05d}.safetensors"
            tmp = directory / f".tmp-{name}-{os.getpid()}"
            save_file(block, str(tmp))
            os.replace(tmp, directory / name)
            parts.append([name, rows])
        if bar is not None:
            bar.close()
        index = directory / f"part-{rank:05d}-of-{world:05d}.json"  # which rows each part holds
        tmp = index.with_name(f".tmp-{index.name}-{os.getpid()}")
        tmp.write_text(json.dumps(parts), encoding="utf-8")
        os.replace(tmp, index)

    @staticmethod
    def _write_manifest(directory: Path, texts: list[str], world: int) -> None:
        files, rows, keys = [], [], None
        for r in range(world):
            if not texts[r::world]:
                continue
            for name, members in json.loads((directory / f"part-{r:05d}-of-{world:05d}.json").read_text()):
                if keys is None:
                    from safetensors import safe_open
                    with safe_open(str(directory / name), framework="pt") as f:
                        keys = sorted(f.keys())
                files.append(name)
                rows += [[texts[j], len(files) - 1, row] for row, j in enumerate(members)]
        if len(rows) != len(texts):
            raise ValueError(f"the parts hold {len(rows)} of {len(texts)} prompts")
        tmp = directory / f".tmp-{_MANIFEST}-{os.getpid()}"
        tmp.write_text(json.dumps({"keys": keys or [], "parts": files, "rows": rows}), encoding="utf-8")
        os.replace(tmp, directory / _MANIFEST)


def _any_rank(flag: bool, info) -> bool:
    """True on every rank when ``flag`` is true on any (one small all-reduce)."""
    if info is None or not info.enabled:
        return bool(flag)
    from fastflow.distributed import all_reduce_sum_

    t = torch.tensor([float(flag)])
    all_reduce_sum_(t, info)
    return bool(t[0] > 0)


def _collectively(fn, info, what: str):
    """Run ``fn`` on this rank; if it fails on any rank, every rank raises ValueError (one line
    naming ``what`` and this rank's own error, if it had one) instead of some ranks going on into
    a collective that the failed ones never reach."""
    result, err = None, None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - reported as one line on every rank below
        err = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    if _any_rank(err is not None, info):
        raise ValueError(f"prompt cache: {what} failed: {err or 'on another rank'}")
    return result


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
        self._kept: dict[str, dict[str, Tensor]] = {}  # warm(): never evicted
        self._rows: OrderedDict[str, dict[str, Tensor]] = OrderedDict()
        self._held = 0  # bytes of the rows in _rows (each row owns its storage)
        self.max_bytes = int(max_bytes)
        self.chunk = chunk

    def warm(self, prompts: Sequence[str]) -> None:
        """Encode ``prompts`` (a fixed list, in batches of ``chunk``) into host rows that are kept
        for the whole run, outside the LRU budget: a run's prompt lists without a disk store
        (data.prompt_cache = "off"), about 1.7 MB of host memory per SD3 prompt on every rank."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._kept
                   and not (self.store is not None and p in self.store)]
        for i in range(0, len(missing), self.chunk):
            part = missing[i:i + self.chunk]
            out = self._encode(part)
            for j, p in enumerate(part):
                self._kept[p] = {k: _compact(v[j]) for k, v in out.items()}
                row = self._rows.pop(p, None)
                if row is not None:
                    self._held -= sum(t.nbytes for t in row.values())

    @property
    def nbytes(self) -> int:
        """Host bytes held by the in-memory rows (storages counted once)."""
        seen, total = set(), 0
        for row in [*self._kept.values(), *self._rows.values()]:
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
        missing = list(dict.fromkeys(p for p in prompts if p not in self._rows and p not in self._kept
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
            if p in self._kept:
                rows.append(self._kept[p])
            elif p in self._rows:
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
