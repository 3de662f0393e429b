"""The environment record and the wheel check of bench/gpu_suite.sh.

    python bench/gpu_env.py record OUT.json [--commit C]   # versions, device, driver -> JSON (+ printed)
    python bench/gpu_env.py check-wheels WHEEL_DIR SITE      # every wheel's top-level modules import from SITE

Standard library and torch only at the top; the packages it reports are imported one by one, so a
missing or broken one becomes a field of the record instead of an error.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import importlib.metadata as md
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

# bench/ off sys.path (run as a script it is sys.path[0]): its kernels.py would shadow the
# ``kernels`` package that diffusers probes for when it is imported below.
_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _BENCH_DIR]

# Distribution name -> module name, for the packages whose versions the record carries.
PACKAGES = {
    "torch": "torch", "triton": "triton", "diffusers": "diffusers", "peft": "peft",
    "transformers": "transformers", "accelerate": "accelerate", "huggingface-hub": "huggingface_hub",
    "safetensors": "safetensors", "numpy": "numpy", "pytest": "pytest", "pytest-timeout": "pytest_timeout",
    "pytest-xdist": "xdist", "nvidia-ml-py": "pynvml", "bitsandbytes": "bitsandbytes",
}
SMI_FIELDS = ("name", "driver_version", "memory.total", "clocks.max.sm", "clocks.max.mem",
              "power.limit", "pstate", "temperature.gpu")


def _module_origin(module: str) -> str | None:
    spec = importlib.util.find_spec(module)
    if spec is None:
        return None
    return spec.origin or (list(spec.submodule_search_locations or []) or [None])[0]


def package_info(dist: str, module: str, do_import: bool) -> dict:
    """Version (from the imported module when it has one, else the distribution metadata), where it
    is imported from, and the import error if importing fails."""
    out: dict = {"module": module}
    try:
        out["origin"] = _module_origin(module)
    except (ImportError, ValueError) as e:
        out["origin"], out["error"] = None, f"{type(e).__name__}: {e}"
    if out.get("origin") is None:
        out.setdefault("error", "not installed")
        return out
    try:
        out["version"] = md.version(dist)
    except md.PackageNotFoundError:
        out["version"] = None
    if do_import:
        try:
            mod = importlib.import_module(module)
            out["version"] = getattr(mod, "__version__", None) or out["version"]
        except Exception as e:  # noqa: BLE001 - a broken package is recorded, not fatal
            out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return out


def nvidia_smi() -> dict:
    """The GPU's name, driver, memory, clocks and power limit read by nvidia-smi (read only)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"error": "nvidia-smi not found"}
    try:
        proc = subprocess.run([exe, f"--query-gpu={','.join(SMI_FIELDS)}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip()[:300]}
    gpus = [dict(zip(SMI_FIELDS, (v.strip() for v in line.split(","))))
            for line in proc.stdout.strip().splitlines() if line.strip()]
    return {"gpus": gpus}


def record(path: Path, commit: str) -> dict:
    import torch

    info: dict = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "mode": os.environ.get("GPU_SUITE_MODE", "gpu"),
        "commit": commit,
        "python": platform.python_version(), "executable": sys.executable,
        "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1), device_count=torch.cuda.device_count())
    else:
        model = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        info["device"] = f"CPU: {model} ({os.cpu_count()} cores)"
    heavy = {"diffusers", "peft", "triton"}  # imported to prove they load; the rest only located
    info["packages"] = {d: package_info(d, m, d in heavy) for d, m in PACKAGES.items()}
    for name in ("fastflow", "fastflow.kernels"):
        try:
            mod = importlib.import_module(name)
            info[name] = os.path.dirname(mod.__file__) if getattr(mod, "__file__", None) else None
        except Exception as e:  # noqa: BLE001
            info[name] = f"import failed: {type(e).__name__}: {e}"
    info["nvidia_smi"] = nvidia_smi()
    path.write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")
    return info


def wheel_modules(wheel: Path) -> list[str]:
    """Top-level import names a wheel installs (top_level.txt, else the RECORD's first path parts)."""
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        top = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        if top:
            mods = z.read(top[0]).decode().split()
        else:
            mods = set()
            for n in names:
                first = n.split("/", 1)[0]
                if first.endswith((".dist-info", ".data")) or first.startswith("__"):
                    continue
                if "/" in n:
                    mods.add(first)
                elif n.endswith(".py"):
                    mods.add(n[:-3])
            mods = sorted(mods)
    return [m for m in mods if m and m.isidentifier()]


def check_wheels(wheel_dir: Path, site: Path) -> int:
    """Import each wheel's modules and check that they load from ``site`` (the install target), not
    from a copy the image already had. Prints one line per module; returns the failure count."""
    failures = 0
    site = site.resolve()
    wheels = sorted(wheel_dir.glob("*.whl"))
    if not wheels:
        print(f"no wheels in {wheel_dir}")
        return 1
    for wheel in wheels:
        for mod in wheel_modules(wheel):
            try:
                m = importlib.import_module(mod)
                where = Path(getattr(m, "__file__", None) or list(m.__path__)[0]).resolve()
                ok = site in where.parents
                failures += not ok
                print(f"{'ok  ' if ok else 'FAIL'} {mod:24s} {getattr(m, '__version__', '-')!s:12s} {where}"
                      + ("" if ok else f"  (not from {site})"))
            except Exception as e:  # noqa: BLE001
                failures += 1
                print(f"FAIL {mod:24s} {type(e).__name__}: {e}")
    return failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("out", type=Path)
    r.add_argument("--commit", default="unknown")
    c = sub.add_parser("check-wheels")
    c.add_argument("wheel_dir", type=Path)
    c.add_argument("site", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "record":
        info = record(args.out, args.commit)
        pk = info["packages"]
        print(f"# device={info['device']} python={info['python']} torch={pk['torch'].get('version')} "
              f"cuda={info['torch_cuda']} triton={pk['triton'].get('version')} commit={info['commit']}")
        for d, p in pk.items():
            print(f"  {d:16s} {p.get('version') or '-':14s} {p.get('error') or p.get('origin') or ''}")
        print(f"  fastflow         {info['fastflow']}\n  fastflow.kernels {info['fastflow.kernels']}")
        print(f"  nvidia-smi       {info['nvidia_smi']}")
        return 0
    return 1 if check_wheels(args.wheel_dir, args.site) else 0


if __name__ == "__main__":
    sys.exit(main())
