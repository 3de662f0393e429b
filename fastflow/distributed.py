"""torch.distributed plumbing under torchrun: process group, rank-aware helpers, gathers.

Single-process runs (no torchrun) need none of it: every helper degrades to the identity.
"""

from __future__ import annotations

import glob
import os
import signal
import sys
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("run.device: 'cuda' asked for, but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def under_launcher() -> bool:
    """True inside a process started by torchrun (or any launcher that sets its variables)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def cpu_threads() -> int:
    """The CPU threads this process may use: OMP_NUM_THREADS when set, else the usable cores."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _child_pids() -> list[int]:
    """This process's children, from the parent pid in every /proc/PID/stat (Linux)."""
    me, pids = os.getpid(), []
    for path in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(path) as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "PID (COMM)": state, ppid, ...
            if int(fields[1]) == me:
                pids.append(int(path.split("/")[2]))
        except (OSError, ValueError, IndexError):
            continue  # gone since the listing
    return pids


def _pass_signal_to_ranks(signum, frame) -> None:
    for pid in _child_pids():
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def launch_local(nproc: int, module: str, argv: list[str]) -> int:
    """Run ``python -m module *argv`` as ``nproc`` ranks on this machine through torch's launcher
    (torchrun --standalone: a free local port, gloo on CPUs), this process's CPU threads split
    evenly between them. Returns the exit code; a failed rank is reported in one line (its own
    traceback is above it).

    Ctrl-C / SIGTERM: the ranks finish their iteration, checkpoint and stop. torchrun's agent would
    answer the signal by sending SIGTERM to the ranks and killing them 30 s later, whether or not
    they were done; here this process passes SIGINT / SIGTERM on to the ranks instead and waits for
    them (a rank takes a second signal within a few seconds as the same request, see
    Trainer._install_signal_handlers)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    threads = max(1, cpu_threads() // nproc)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # read by each rank's torch at start-up
    launcher = ["--standalone", f"--nproc_per_node={nproc}"]
    previous = {}
    if os.path.isfile("/proc/self/stat") and threading.current_thread() is threading.main_thread():
        launcher += ["--signals-to-handle", "SIGHUP,SIGQUIT"]  # the agent leaves SIGINT / SIGTERM to us
        previous = {s: signal.signal(s, _pass_signal_to_ranks) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        torchrun_main([*launcher, "-m", module, *argv])
    except ChildFailedError as e:
        rank, info = e.get_first_failure()  # the others were stopped because of it
        print(f"fastflow: rank {rank} of {nproc} failed (exit code {info.exitcode}); see its error above",
              file=sys.stderr)
        return info.exitcode if isinstance(info.exitcode, int) and info.exitcode > 0 else 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPUs), or run alone."""
    world = world_size_from_env()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local_rank)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(rank, world, local_rank, device)


def all_gather_cat(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate equal-shaped tensors from every rank along dim 0 (rank order)."""
    if not info.enabled:
        return t
    dev = info.device if info.device.type == "cuda" else torch.device("cpu")
    local = t.detach().to(dev).contiguous()
    out = [torch.empty_like(local) for _ in range(info.world_size)]
    dist.all_gather(out, local)
    return torch.cat(out).to(t.device)


def all_reduce_mean_(tensors: list[torch.Tensor], info: DistInfo) -> None:
    """Average tensors (e.g. gradients) over ranks in place."""
    if not info.enabled:
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(info.world_size)


def all_reduce_sum_(t: torch.Tensor, info: DistInfo) -> None:
    """Sum a tensor over ranks in place (CPU tensors travel through the backend's device)."""
    if not info.enabled:
        return
    dev = info.device if info.device.type == "cuda" else torch.device("cpu")
    buf = t.to(dev)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    t.copy_(buf.to(t.device))


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo, finished: bool = False) -> None:
    """Tear the process group down. ``finished`` (every rank got to the end): a barrier first, so no
    rank destroys its group while a peer still has a collective in flight (seen once as an abort,
    "terminate called without an active exception", at exit of a finished gloo run). Error paths
    skip the barrier: a peer may never arrive."""
    if info.enabled and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


def broadcast_str(s: str, info: DistInfo, src: int = 0) -> str:
    """Rank ``src``'s string on every rank (sent as UTF-8 bytes in a tensor, never pickled)."""
    if not info.enabled:
        return s
    dev = info.device if info.device.type == "cuda" else torch.device("cpu")
    data = torch.tensor(list(s.encode()), dtype=torch.uint8, device=dev)
    n = torch.tensor([data.numel()], dtype=torch.long, device=dev)
    dist.broadcast(n, src)
    buf = data if info.rank == src else torch.empty(int(n), dtype=torch.uint8, device=dev)
    dist.broadcast(buf, src)
    return bytes(buf.cpu().tolist()).decode()


def local_cpu_ranks(cfg) -> int:
    """How many ranks a run started without torchrun on a CPU launches (``distributed.cpu_ranks``;
    0 = the most, up to the CPU threads and 8, that the batch splits over). 1 under torchrun, on
    a GPU, or for a single-process strategy."""
    from fastflow.config import ConfigError, validate

    if under_launcher() or pick_device(cfg.run.device).type != "cpu" or cfg.distributed.strategy == "none":
        return 1
    if cfg.distributed.cpu_ranks:
        if cfg.distributed.cpu_ranks > 1:
            validate(cfg, cfg.distributed.cpu_ranks)  # a batch that does not split: one clear line
        return cfg.distributed.cpu_ranks
    for n in range(min(cpu_threads(), 8), 1, -1):
        try:
            validate(cfg, n)
            return n
        except ConfigError:
            continue
    return 1
