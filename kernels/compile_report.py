"""Compile every specialisation in kernels/specs.py for real GPU targets, on any machine.

    python -m fastflow.kernels.compile_report                 # sm_80 and sm_90, a summary
    python -m fastflow.kernels.compile_report --rows          # one line per specialisation
    python -m fastflow.kernels.compile_report --markdown docs/kernels.md --json out.json

Triton compiles without a GPU (``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``;
the triton wheel ships ptxas). Each specialisation is compiled to a cubin with the launchers'
options (specs.LAUNCH_OPTIONS) and its PTX is assembled once more by ptxas with ``-v`` for the
register, spill and stack counts. A specialisation fails on a compile error, on any register spill,
or on shared memory above the target's per-block limit. Exit status 1 when any fails, 2 when the
table and the kernels disagree (a kernel parameter or launch missing from kernels/specs.py).

Must run without TRITON_INTERPRET=1 (the interpreter replaces the kernels it would compile).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import specs

#: Opt-in shared memory per thread block (cudaDevAttrMaxSharedMemoryPerBlockOptin): 163 KiB on
#: compute capability 8.0 (A100) and 227 KiB on 9.0 (H100 / H200), as tabulated in the CUDA C++
#: Programming Guide, "Technical Specifications per Compute Capability", and the Ampere / Hopper
#: tuning guides. (8.6 / 8.9 parts have 99 KiB; every kernel here uses a few bytes.)
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ARCHS = (80, 90)

#: Approximate square roots and divisions in PTX (what ``tl.sqrt`` and ``/`` lower to on a GPU).
_APPROX = re.compile(r"\b(?:sqrt\.approx|div\.full|div\.approx|rcp\.approx)(?:\.ftz)?\.f32\b")
_PTXAS_STATS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def _kernel(spec: specs.Spec):
    fn = getattr(importlib.import_module(spec.module), spec.name)
    if not hasattr(fn, "arg_names") or type(fn).__name__ != "JITFunction":
        raise RuntimeError(f"{spec.module}.{spec.name} is a {type(fn).__name__}, not a compiled "
                           "JITFunction: unset TRITON_INTERPRET")
    return fn


def check_table() -> list[str]:
    """Disagreements between kernels/specs.py and the kernels (empty when they agree)."""
    problems = []
    for spec in specs.SPECS:
        fn = _kernel(spec)
        want = [(name, kind == "constexpr", name in spec.no_specialize) for name, kind in spec.args]
        got = [(p.name, bool(p.is_constexpr), bool(p.do_not_specialize)) for p in fn.params]
        if want != got:
            problems.append(f"{spec.name}: table {want} != kernel {got}")
    # Every launched kernel (named *_kernel by convention) has an entry, and no launcher launches
    # one except through Spec.launch.
    named = {s.name for s in specs.SPECS}
    folder = Path(specs.__file__).parent
    for path in sorted(folder.glob("*.py")):
        source = path.read_text()
        for name in re.findall(r"^def (\w+_kernel)\(", source, flags=re.M):
            if name not in named:
                problems.append(f"{path.name}: kernel {name} has no entry in kernels/specs.py")
        for name in re.findall(r"(\w+_kernel)\s*\[", source):
            problems.append(f"{path.name}: {name}[...] launched directly, not through Spec.launch")
    return problems


def _ptxas(arch: int) -> tuple[str, list[str]]:
    """The ptxas triton uses for ``arch`` and the options it passes (so the counts are the cubin's)."""
    from triton.backends.nvidia import compiler as nv

    try:
        tool = nv.get_ptxas(arch)
    except TypeError:  # older triton: one ptxas for every arch
        tool = nv.get_ptxas()
    make_cubin = inspect.getsource(nv.CUDABackend.make_cubin)
    opts = ["-lineinfo", "-v"]
    if not specs.LAUNCH_OPTIONS.get("enable_fp_fusion", True):
        opts.append("--fmad=false")
    if "regAllocOptLevel" in make_cubin:
        opts.append("--regAllocOptLevel=2")
    return tool.path, opts


@contextlib.contextmanager
def _ptxas_log():
    """Have triton print its ptxas log, where this triton can."""
    try:
        from triton import knobs
        nvidia = knobs.nvidia
        old = nvidia.dump_ptxas_log
    except (ImportError, AttributeError):
        yield
        return
    nvidia.dump_ptxas_log = True
    try:
        yield
    finally:
        nvidia.dump_ptxas_log = old


def compile_one(spec: specs.Spec, const: dict, dtypes: dict, variant: str, arch: int,
                fn=None) -> dict:
    """Compile one specialisation for ``arch``; a row of the report (``error`` set on failure)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.backends.nvidia import compiler as nv

    fn = fn if fn is not None else _kernel(spec)
    sig, attrs, ones = spec.signature(dtypes, variant)
    roles = {r: dtypes[n] for n, r in ((n, spec.pointer_role(n, const)) for n in dtypes)
             if r in spec.roles}
    row = {"kernel": spec.name, "arch": f"sm_{arch}", "variant": variant, "constexprs": const,
           "dtypes": roles, "regs": None, "spill_bytes": None, "stack_bytes": None,
           "shared_bytes": None, "approx_sqrt_div": None, "error": None}
    start = time.perf_counter()
    try:
        options = {k: v for k, v in specs.LAUNCH_OPTIONS.items()}
        # Triton runs ptxas with -v; where it can print that log (knobs.nvidia.dump_ptxas_log),
        # it is read from there, else (a cached compile, an older triton) ptxas runs once more.
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), _ptxas_log():
            compiled = triton.compile(ASTSource(fn, sig, {**const, **ones}, attrs),
                                      target=GPUTarget("cuda", arch, 32), options=options)
        row["shared_bytes"] = int(compiled.metadata.shared)
        log = printed.getvalue()
        if not _PTXAS_STATS.search(log):
            ptxas, opts = _ptxas(arch)
            gpu_name = nv.sm_arch_from_capability(arch)
            with tempfile.TemporaryDirectory() as tmp:
                src = Path(tmp) / "k.ptx"
                src.write_text(compiled.asm["ptx"])
                log = subprocess.run([ptxas, *opts, f"--gpu-name={gpu_name}", str(src), "-o",
                                      str(Path(tmp) / "k.o")], capture_output=True, text=True,
                                     check=True).stderr
        stats, regs = _PTXAS_STATS.search(log), _PTXAS_REGS.search(log)
        row["regs"] = int(regs.group(1))
        row["stack_bytes"] = int(stats.group(1))
        row["spill_bytes"] = int(stats.group(2)) + int(stats.group(3))
        # The step coefficients use correctly rounded sqrt / division (tl.sqrt_rn, tl.div_rn);
        # only Philox's Box-Muller transform (noise) keeps the fast ones.
        row["approx_sqrt_div"] = len(_APPROX.findall(compiled.asm["ptx"]))
        problems = []
        if row["approx_sqrt_div"] and not _draws_noise(spec, const):
            problems.append(f"{row['approx_sqrt_div']} approximate sqrt / division in the PTX")
        if row["spill_bytes"] > 0:
            problems.append(f"{row['spill_bytes']} bytes of register spills")
        if row["shared_bytes"] > SHARED_LIMIT[arch]:
            problems.append(f"{row['shared_bytes']} bytes of shared memory > {SHARED_LIMIT[arch]}")
        if problems:
            row["error"] = "; ".join(problems)
    except Exception as e:  # noqa: BLE001  (a compile error is a result here)
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        row["error"] = f"{type(e).__name__}: " + " | ".join(lines[-6:])[:1200]
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row


def _draws_noise(spec: specs.Spec, const: dict) -> bool:
    return spec is specs.SDE_STEP and const["NOISE"] == specs.NOISE_PHILOX


def _task(args):
    name, const, dtypes, variant, arch = args
    spec = next(s for s in specs.SPECS if s.name == name)
    return compile_one(spec, const, dtypes, variant, arch)


def tasks(archs=ARCHS, only: str | None = None) -> list[tuple]:
    out = []
    for spec in specs.SPECS:
        if only and only not in spec.name:
            continue
        for const, dtypes, variant in spec.specialisations():
            for arch in archs:
                out.append((spec.name, const, dtypes, variant, arch))
    return out


def run(archs=ARCHS, jobs: int | None = None, only: str | None = None) -> list[dict]:
    todo = tasks(archs, only)
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        return [_task(t) for t in todo]
    # Compiles are independent and CPU-bound: one process each, results in table order.
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_task, todo, chunksize=4))


def _flags(const: dict) -> str:
    return " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in const.items()
                    if k not in ("BLOCK", "ITERS", "BLOCK_C", "BLOCK_B"))


def summary(rows: list[dict]) -> list[dict]:
    """Per kernel and arch: specialisations, the register / stack / shared maxima, spills, failures."""
    out = {}
    for r in rows:
        key = (r["kernel"], r["arch"])
        s = out.setdefault(key, {"kernel": r["kernel"], "arch": r["arch"], "count": 0, "failed": 0,
                                 "regs_min": None, "regs_max": 0, "spill_bytes": 0,
                                 "stack_max": 0, "shared_max": 0})
        s["count"] += 1
        s["failed"] += r["error"] is not None
        if r["regs"] is not None:
            s["regs_min"] = r["regs"] if s["regs_min"] is None else min(s["regs_min"], r["regs"])
            s["regs_max"] = max(s["regs_max"], r["regs"])
            s["spill_bytes"] = max(s["spill_bytes"], r["spill_bytes"])
            s["stack_max"] = max(s["stack_max"], r["stack_bytes"])
            s["shared_max"] = max(s["shared_max"], r["shared_bytes"])
    return list(out.values())


START, END = "<!-- compile-report:start -->", "<!-- compile-report:end -->"


def markdown(rows: list[dict]) -> str:
    """The report as markdown: a summary per kernel and target, then each constexpr combination
    with its register range (over the dtypes and value variants) on sm_80 and sm_90."""
    import triton

    n_spec = len({(r["kernel"], repr(r["constexprs"]), repr(r["dtypes"]), r["variant"]) for r in rows})
    lines = [START, "",
             f"Generated by `python -m fastflow.kernels.compile_report --markdown docs/kernels.md` "
             f"(triton {triton.__version__}, ptxas of its wheel): {n_spec} specialisations, "
             f"{len(rows)} compiles, {sum(r['error'] is not None for r in rows)} failed.", "",
             "| kernel | target | specialisations | failed | registers | spill bytes | "
             "stack bytes (max) | shared bytes (max) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for s in summary(rows):
        lines.append(f"| `{s['kernel']}` | {s['arch']} | {s['count']} | {s['failed']} | "
                     f"{s['regs_min']}-{s['regs_max']} | {s['spill_bytes']} | {s['stack_max']} | "
                     f"{s['shared_max']} |")
    lines += ["", "Per constexpr combination: registers (min-max over the velocity dtypes and the "
              "aligned / unaligned / ones variants), the largest stack frame and shared memory, on "
              "sm_80 / sm_90. Spills are 0 everywhere (the check fails otherwise).", "",
              "| kernel | constexprs | registers sm_80 | registers sm_90 | stack | shared |",
              "|---|---|---:|---:|---:|---:|"]
    groups = {}
    for r in rows:
        groups.setdefault((r["kernel"], _flags(r["constexprs"])), []).append(r)
    for (kernel, flags), rs in groups.items():
        def regs(arch):
            vals = [r["regs"] for r in rs if r["arch"] == arch and r["regs"] is not None]
            return f"{min(vals)}-{max(vals)}" if vals else "failed"
        stack = max((r["stack_bytes"] or 0) for r in rs)
        shared = max((r["shared_bytes"] or 0) for r in rs)
        lines.append(f"| `{kernel}` | {flags or '-'} | {regs('sm_80')} | {regs('sm_90')} | "
                     f"{stack} | {shared} |")
    return "\n".join(lines + ["", END]) + "\n"


def write_markdown(path: Path, text: str) -> None:
    """Replace the report section of ``path`` (between START and END), or write the file."""
    if path.exists() and START in (old := path.read_text()) and END in old:
        text = old[:old.index(START)] + text.rstrip("\n") + old[old.index(END) + len(END):]
    path.write_text(text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=sorted(SHARED_LIMIT))
    p.add_argument("--jobs", type=int, default=None, help="compile processes (default: all CPUs)")
    p.add_argument("--only", default=None, help="kernels whose name contains this")
    p.add_argument("--rows", action="store_true", help="print one line per specialisation")
    p.add_argument("--json", type=Path, default=None, help="write every row as JSON")
    p.add_argument("--markdown", type=Path, default=None, help="write the report table")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_report: TRITON_INTERPRET=1 replaces the kernels with the interpreter; unset it",
              file=sys.stderr)
        return 2
    problems = check_table()
    for line in problems:
        print(f"TABLE: {line}")
    if problems:
        return 2
    start = time.perf_counter()
    rows = run(args.arch, args.jobs, args.only)
    seconds = time.perf_counter() - start
    for r in rows:
        if args.rows or r["error"]:
            status = "FAIL " + r["error"] if r["error"] else "ok"
            dts = ",".join(f"{k}={v}" for k, v in r["dtypes"].items())
            print(f"{r['kernel']:17s} {r['arch']} {r['variant']:9s} {_flags(r['constexprs']):48s} "
                  f"{dts:32s} regs={r['regs']} spill={r['spill_bytes']} stack={r['stack_bytes']} "
                  f"shared={r['shared_bytes']} {status}")
    for s in summary(rows):
        print(f"{s['kernel']:17s} {s['arch']}: {s['count']:4d} specialisations, {s['failed']} failed, "
              f"registers {s['regs_min']}-{s['regs_max']}, spills {s['spill_bytes']} B, "
              f"stack <= {s['stack_max']} B, shared <= {s['shared_max']} B")
    failed = sum(r["error"] is not None for r in rows)
    print(f"{len(rows)} compiles, {failed} failed, {seconds:.1f} s")
    if args.json:
        args.json.write_text(json.dumps({"seconds": seconds, "rows": rows}, indent=1))
    if args.markdown:
        write_markdown(args.markdown, markdown(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
