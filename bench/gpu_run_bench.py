"""Runs a bench script with its JSON rows redirected into a folder.

    python bench/gpu_run_bench.py OUTDIR bench/kernels.py --cases sd35

bench/kernels.py has no ``--out`` option: it appends its rows through ``common.write_rows`` to
``common.RESULTS`` (bench/results). bench/gpu_suite.sh runs it through this wrapper, which points
``common.RESULTS`` at OUTDIR before running the script as ``__main__``, so a suite run never mixes
its rows into the committed files. Scripts that take ``--out`` need no wrapper.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: gpu_run_bench.py OUTDIR SCRIPT [ARGS...]", file=sys.stderr)
        return 2
    out, script = Path(argv[0]), Path(argv[1])
    if not script.is_file():
        print(f"gpu_run_bench.py: no script {script}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(BENCH))
    import common  # the module the script's ``from common import ...`` will find in sys.modules

    out.mkdir(parents=True, exist_ok=True)
    common.RESULTS = out
    sys.argv = [str(script), *argv[2:]]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:  # the script's own exit status (a message when it exits with one)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 1
        return e.code or 0
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
