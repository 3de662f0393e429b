"""Small shared helpers for fastflow's benchmarks: a machine header, timing, the device's measured
copy bandwidth, and JSON rows (device, versions, commit, date) appended under bench/results/.

Every bench imports it as ``from common import ...`` after putting bench/ on sys.path (each
script does that itself), so benches run as plain scripts: ``python bench/kernels.py``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def git_commit() -> str:
    """The repository's HEAD commit (with '+dirty' when tracked files changed), or 'unknown'."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3' on CUDA; the CPU model (and core count) on a CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def versions() -> dict[str, str]:
    """torch / triton / CUDA versions (triton 'absent' when it does not import)."""
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "absent"
    return {"torch": torch.__version__, "triton": tv, "cuda": str(torch.version.cuda)}


def header(device: torch.device) -> dict[str, str]:
    """The machine header every bench prints and stores with each row."""
    info = {"device": device_name(device), **versions(), "commit": git_commit(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "host_python": platform.python_version()}
    print("# " + "  ".join(f"{k}={v}" for k, v in info.items()))
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, reps: int = 20,
            flush_bytes: int = 0) -> float:
    """Median wall time of ``fn`` in milliseconds (CUDA events on a GPU).

    flush_bytes > 0 overwrites a buffer that large before every timed call (untimed), so inputs
    that would fit in L2 are read from memory as they are in a real step.
    """
    flush = torch.empty(flush_bytes // 4, dtype=torch.float32, device=device) if flush_bytes else None
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        if flush is not None:
            flush.zero_()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbps(device: torch.device, nbytes: int) -> float:
    """Measured device-to-device copy bandwidth (read + write bytes / time), GB/s."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=3, reps=10)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def write_rows(bench: str, rows: list[dict], info: dict) -> Path:
    """Append ``rows`` (each merged with the header ``info``) as JSON lines to
    bench/results/<bench>-<device>.jsonl; returns the file."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{bench}-{slug(info['device'])}.jsonl"
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps({"bench": bench, **info, **row}, sort_keys=True) + "\n")
    return path
