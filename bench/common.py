"""Small shared helpers for fastflow's benchmarks: a machine header, timing, the device's measured
copy bandwidth, JSON rows (device, versions, commit, date) appended under bench/results/ as each
is measured, a time budget, and argument checks that end in one line.

Every bench imports it as ``from common import ...`` after putting bench/ on sys.path (each
script does that itself), so benches run as plain scripts: ``python bench/kernels.py``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

_IMPORTED = time.monotonic()

RESULTS = Path(__file__).resolve().parent / "results"
# Where the commit comes from when the tree is a copy without .git (or git is not installed).
COMMIT_ENV = ("FASTFLOW_COMMIT", "GPU_SUITE_COMMIT")


def git_commit() -> str:
    """The repository's HEAD commit (with '+dirty' when tracked files changed); without a git
    repository of its own (a copied tree, no git installed) the first of $FASTFLOW_COMMIT /
    $GPU_SUITE_COMMIT that is set; else 'unknown'."""
    root = Path(__file__).resolve().parent.parent
    try:
        top, head = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=root,
                                   capture_output=True, text=True, check=True).stdout.split()
        # A copy placed inside some other repository must not report that repository's HEAD.
        if Path(top).resolve() == root:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                   capture_output=True, text=True, check=True).stdout.strip()
            return head + ("+dirty" if dirty else "")
    except (OSError, ValueError, subprocess.CalledProcessError):
        pass
    for name in COMMIT_ENV:
        if os.environ.get(name, "").strip():
            return os.environ[name].strip()
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


class RowWriter:
    """Appends rows, each merged with the header ``info``, as JSON lines to
    RESULTS/<bench>-<device>.jsonl the moment they are measured: every row is one write, flushed
    to the operating system before the next case starts, so a bench killed by a time limit or a
    crash keeps every row it measured (at worst a cut-off last line, which readers skip). The
    folder and file are made with the first row: a run that measures nothing leaves nothing."""

    def __init__(self, bench: str, info: dict):
        self.bench, self.info = bench, info
        self.path: Path | None = None
        self.count = 0

    def write(self, row: dict) -> None:
        if self.path is None:
            RESULTS.mkdir(parents=True, exist_ok=True)
            self.path = RESULTS / f"{self.bench}-{slug(self.info['device'])}.jsonl"
        line = json.dumps({"bench": self.bench, **self.info, **row}, sort_keys=True) + "\n"
        with self.path.open("a") as f:
            f.write(line)
            f.flush()
        self.count += 1

    def summary(self) -> str:
        return f"# {self.count} rows -> {self.path}" if self.path else "# 0 rows (nothing written)"


def write_rows(bench: str, rows: list[dict], info: dict) -> Path | None:
    """Append ``rows`` (each merged with the header ``info``) as JSON lines to
    RESULTS/<bench>-<device>.jsonl; returns the file (None when ``rows`` is empty)."""
    writer = RowWriter(bench, info)
    for row in rows:
        writer.write(row)
    return writer.path


# ------------------------------------------------------------------------------ time budget


def process_elapsed() -> float:
    """Seconds since this process started (imports and model builds count, as they do for a
    `timeout` around it); from /proc on Linux, else since this module was imported."""
    since_import = time.monotonic() - _IMPORTED
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError, AttributeError):
        return since_import
    elapsed = uptime - started
    # Clock ticks are 10 ms; a value below the import time means /proc is not this process's.
    return elapsed if elapsed >= since_import - 0.05 else since_import


class TimeBudget:
    """``--time-budget SECONDS``: a bench stops starting cases once the next one would end past
    the budget, counted from the process start (``clock``). A case is expected to take as long
    as the longest one so far (the first one: no time), so a case is started while
    ``elapsed + longest <= seconds``; after the first refusal every later case is skipped too, and
    ``report()`` says which. One-time set-up inside a case (building the model its later cases
    reuse) is left out of that estimate by ``setup_done()``. ``seconds=None``: no budget."""

    def __init__(self, seconds: float | None, clock: Callable[[], float] = process_elapsed):
        self.seconds, self.clock = seconds, clock
        self.longest = 0.0
        self.skipped: list[str] = []
        self.reason = ""
        self._started: float | None = None

    def allows(self, case: str) -> bool:
        """True when ``case`` may start now (and its time starts); False when it is skipped."""
        now = self.clock()
        if self.seconds is not None and (self.skipped or now + self.longest > self.seconds):
            if not self.skipped:
                self.reason = (f"{now:.1f} s of {self.seconds:g} s spent"
                               + (f", the longest case so far took {self.longest:.1f} s"
                                  if self.longest else ""))
            self.skipped.append(case)
            return False
        self._started = now
        return True

    def setup_done(self) -> None:
        """The started case's one-time set-up is over: its time so far does not count towards
        the estimate for later cases, which reuse what it built."""
        if self._started is not None:
            self._started = self.clock()

    def done(self) -> None:
        """The case that ``allows`` started has ended (measured, failed or out of memory)."""
        if self._started is not None:
            self.longest = max(self.longest, self.clock() - self._started)
            self._started = None

    def banner(self) -> str | None:
        """The line a bench prints at its start when it has a budget."""
        if self.seconds is None:
            return None
        return f"# time budget {self.seconds:g} s from the process start ({self.clock():.1f} s spent)"

    def report(self) -> str | None:
        """The line naming what was skipped (printed by the bench), or None when nothing was."""
        if not self.skipped:
            return None
        return (f"# time budget: {self.reason}: skipped {len(self.skipped)} case(s): "
                + ", ".join(self.skipped))


# ------------------------------------------------------------------------------ arguments


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line, ``<prog>: <message>``, exit status 2 (no usage)."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"{self.prog}: {message}\n")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """--device, --out and --time-budget, the same in every bench."""
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--out", default=None, help="results folder (default bench/results)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="start no case that would end past SECONDS after the process started; "
                             "print what was skipped and exit 0 with the rows so far")


def check_common_arguments(parser: argparse.ArgumentParser, args) -> torch.device:
    """Checks --device / --out / --time-budget (one line and exit 2 on bad input, before anything
    is built or written); sets RESULTS from --out; returns the device."""
    global RESULTS
    if args.time_budget is not None and not (math.isfinite(args.time_budget) and args.time_budget >= 0):
        parser.error(f"--time-budget must be a number of seconds >= 0, got {args.time_budget:g}")
    if args.out is not None:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            parser.error(f"--out {args.out}: exists and is not a folder")
        RESULTS = out
    text = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        parser.error(f"--device: unknown device {text!r}; use cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {text}: the benches run on cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {text}: no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device
