"""Where measured activation models are kept, so that a plan measures each one once: in memory,
on disk (``$FASTFLOW_CACHE/plan``, keyed by what was measured and the library versions), and
shipped with fastflow (``published/measured/``) for the published architectures at the shipped
configs' settings, so that ``--plan`` of a shipped config measures nothing and runs in seconds.

A shipped measurement is keyed without the library versions (it was made with the versions it
records); anything else is measured here on first use (seconds to a minute of CPU) and kept on
disk. A cache that cannot be written is not an error: the measurement is made again next time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable

import torch

from fastflow.plan.arch import PUBLISHED

MEASURE_VERSION = 6  # bump when what a measurement records changes (cached and shipped ones are remade)
SHIPPED = PUBLISHED / "measured"

_MEMO: dict[str, dict] = {}
log = logging.getLogger("fastflow.plan")


def cache_dir() -> Path:
    from fastflow.models.prompt_cache import default_cache_dir

    return default_cache_dir() / "plan"


def versions() -> dict:
    """The libraries whose code decides what a forward allocates."""
    out = {"torch": torch.__version__.split("+")[0]}
    for name in ("diffusers", "peft", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def _digest(payload: dict) -> str:
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def shipped_name(kind: str, key: dict) -> str:
    """The file name of a shipped measurement of ``key`` (no versions in it)."""
    return f"{kind}-{_digest({'kind': kind, 'measure': MEASURE_VERSION, **key})}.json"


def cached(kind: str, key: dict, make: Callable[[], dict], *, use_shipped: bool = True) -> dict:
    """``make()``'s result for ``key``: from memory, the disk cache, the shipped measurements
    (``use_shipped``), else made now and kept on disk."""
    full = {"kind": kind, **key, **versions(), "measure": MEASURE_VERSION}
    digest = _digest(full)
    if digest in _MEMO:
        return _MEMO[digest]
    path = cache_dir() / f"{kind}-{digest}.json"
    for candidate in ([path, SHIPPED / shipped_name(kind, key)] if use_shipped else [path]):
        if candidate.is_file():
            try:
                value = json.loads(candidate.read_text(encoding="utf-8"))["value"]
            except (OSError, ValueError, KeyError):
                continue  # a torn or foreign file: measure again
            _MEMO[digest] = value
            return value
    log.info("memory plan: measuring the %s activation model on the CPU (once; kept in %s)", kind, path.parent)
    value = make()
    _MEMO[digest] = value
    record = {"kind": kind, "key": json.loads(json.dumps(key, default=str)), "versions": versions(),
              "measure": MEASURE_VERSION, "value": value}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
        tmp.write_text(json.dumps(record), encoding="utf-8")
        os.replace(tmp, path)  # atomic: ranks planning together never read a half-written file
    except OSError:
        pass
    return value


def ship_from(folder: Path) -> list[Path]:
    """Copy the measurements in a cache ``folder`` into the shipped folder, renamed by their keys
    without versions (python -m fastflow.plan.refresh)."""
    SHIPPED.mkdir(parents=True, exist_ok=True)
    out = []
    for p in sorted(folder.glob("*.json")):
        record = json.loads(p.read_text(encoding="utf-8"))
        dest = SHIPPED / shipped_name(record["kind"], record["key"])
        dest.write_text(json.dumps(record, sort_keys=True) + "\n", encoding="utf-8")
        out.append(dest)
    return out
