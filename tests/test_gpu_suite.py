"""bench/gpu_suite.sh rehearsed on the CPU (--dry-run): the install step, JSON rows collected in
OUTDIR, the summary and its export, and a part that fails or hangs does not lose the parts after
it; bad input is one line before anything is made; bench/gpu_summary.py reads cut-off rows and
JUnit failures; bench/gpu_env.py check-wheels refuses modules that do not come from the target."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "bench" / "gpu_suite.sh"
PY = sys.executable

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def _probe_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel: installing it must put `gpusuiteprobe` on the parts' path."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "gpusuiteprobe-1.0-py3-none-any.whl"
    info = "gpusuiteprobe-1.0.dist-info"
    files = {
        "gpusuiteprobe/__init__.py": '__version__ = "1.0"\n',
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: gpusuiteprobe\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{info}/top_level.txt": "gpusuiteprobe\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return wheel


def _suite(*args, env=None, timeout=150):
    full_env = dict(os.environ, GPU_SUITE_PYTHON=PY, **(env or {}))
    full_env.pop("GPU_SUITE_DRY", None)
    return subprocess.run(["bash", str(SUITE), *map(str, args)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def _parts(out: Path) -> dict[str, list[str]]:
    rows = [line.split("\t") for line in (out / "parts.tsv").read_text().splitlines()]
    return {r[0]: r[1:] for r in rows}


def _results_listing():
    res = ROOT / "bench" / "results"
    return sorted((p.name, p.stat().st_size) for p in res.rglob("*")) if res.exists() else []


def _copy_without_git(dest: Path) -> Path:
    """The tree as the GPU machine gets it: a copy without .git (what the suite runs from it)."""
    skip = shutil.ignore_patterns("__pycache__", "results", ".gpu_wheels")
    for folder in ("bench", "fastflow", "kernels"):
        shutil.copytree(ROOT / folder, dest / folder, ignore=skip)
    return dest


@pytest.mark.slow
def test_dry_run_keeps_every_part_and_reports_failures(tmp_path):
    """Run from a copy of the tree without .git, as on the GPU machine: the rows carry
    GPU_SUITE_COMMIT (bench/common.py's fallback, no git stand-in)."""
    wheels, out, export = tmp_path / "wheels", tmp_path / "out", tmp_path / "export"
    _probe_wheel(wheels)
    tree = _copy_without_git(tmp_path / "tree")
    before = _results_listing()
    proc = subprocess.run(["bash", str(tree / "bench" / "gpu_suite.sh"), str(out), "--dry-run", "--wheels",
                           str(wheels), "--export", str(export),
                           "--only", "kernels_sd35,dry_fail,dry_timeout,train_sd35_full"],
                          cwd=tree, env={**{k: v for k, v in os.environ.items() if k != "GPU_SUITE_DRY"},
                                         "GPU_SUITE_PYTHON": PY, "GPU_SUITE_COMMIT": "c0ffee+dirty"},
                          capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "6 of 6 parts as expected" in proc.stdout

    parts = _parts(out)
    assert list(parts) == ["install", "env", "kernels_sd35", "dry_fail", "dry_timeout", "train_sd35_full"]
    status = {name: p[0] for name, p in parts.items()}
    assert status == {"install": "ok", "env": "ok", "kernels_sd35": "ok", "dry_fail": "failed",
                      "dry_timeout": "timed out", "train_sd35_full": "ok"}
    assert parts["dry_fail"][1] == "3"
    wall, limit = float(parts["dry_timeout"][2]), float(parts["dry_timeout"][3])
    assert limit == 3 and limit <= wall < limit + 3  # stopped at its limit, not after its 60 s sleep

    # the wheel went into the suite's target, and the parts import fastflow with its kernels inside
    assert "ok   gpusuiteprobe" in (out / "install.log").read_text()
    env = json.loads((out / "env.json").read_text())
    assert env["mode"] == "dry-run" and env["cuda_available"] is False
    assert Path(env["fastflow.kernels"]).parts[-2:] == ("fastflow", "kernels")
    assert "gpu_suite." in env["fastflow.kernels"]
    assert env["commit"] == "c0ffee+dirty"

    # rows of a part run after the failing and the hung one, and of the kernels bench (--out)
    kernels = [json.loads(line) for f in out.glob("kernels-*.jsonl") for line in f.read_text().splitlines()]
    assert {(r["case"], r["impl"]) for r in kernels} == {("tiny", "eager")} and len(kernels) == 4
    train = [json.loads(line) for f in out.glob("train_step-*.jsonl") for line in f.read_text().splitlines()]
    assert [(r["model"], r["finetune"], r["kernels"]) for r in train] == [("tiny-sd3", "full", "torch")]
    assert all(r["commit"] == "c0ffee+dirty" and r["device"] for r in kernels + train)
    assert not (tree / "bench" / "results").exists()  # nothing appended to the tree's results
    assert _results_listing() == before
    # each bench part gets its limit (90 s in a dry run) less the 10% margin as --time-budget
    for log in ("kernels_sd35.log", "train_sd35_full.log"):
        assert "# time budget 81 s from the process start" in (out / log).read_text(), log

    summary = (out / "summary.md").read_text()
    for line in ("| dry_fail | failed (exit 3) |", "| dry_timeout | timed out |", "| kernels_sd35 | ok |",
                 "| train_sd35_full | ok |", "| tiny | rollout |", "| tiny-sd3 | full |", "CPU dry run"):
        assert line in summary, line
    assert (export / "summary.md").read_text() == summary
    with tarfile.open(export / "gpu-suite.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"out/parts.tsv", "out/summary.md", "out/env.json", "out/train_sd35_full.log"} <= names
    assert any(n.startswith("out/train_step-") for n in names)


def test_out_of_budget_parts_are_skipped_and_reported(tmp_path):
    out = tmp_path / "out"
    proc = _suite(out, "--dry-run", "--budget", "1", "--only", "dry_fail", "--wheels", tmp_path)
    assert proc.returncode == 1
    assert {p[0] for p in _parts(out).values()} == {"skipped"} and len(_parts(out)) == 3
    assert "| install | skipped |" in (out / "summary.md").read_text()


@pytest.mark.parametrize("args, message", [
    ([], "give an output folder"),
    (["{out}", "--dry-run", "--only", "kernels_sd35,nope"], "unknown part 'nope'"),
    (["{out}", "--only", "dry_fail"], "unknown part 'dry_fail' for a gpu run"),
    (["{out}", "--dry-run", "--budget", "5m"], "--budget must be whole seconds"),
    (["{out}", "--dry-run", "--frobnicate"], "unknown option '--frobnicate'"),
    (["{full}", "--dry-run"], "exists and is not an empty folder"),
    (["{out}", "--dry-run", "--export", "{out}/inner"], "must lie outside OUTDIR"),
    (["{out}"], "no CUDA device"),
])
def test_bad_input_is_one_line_and_makes_nothing(tmp_path, args, message):
    out, full = tmp_path / "out", tmp_path / "full"
    full.mkdir()
    (full / "old.jsonl").write_text("{}\n")
    args = [a.format(out=out, full=full) for a in args]
    proc = _suite(*args, env={"CUDA_VISIBLE_DEVICES": ""}, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_suite.sh: ") and message in lines[0], proc.stderr
    assert not out.exists() and proc.stdout == ""


def test_gpu_wheels_rejects_bad_arguments_before_downloading(tmp_path):
    for args, message in ((["--limit-mib", "lots"], "--limit-mib must be a whole number"),
                          (["--fast"], "unknown argument '--fast'")):
        proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_wheels.sh"), *args, "--dest", str(tmp_path / "w")],
                              cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "w").exists()


def test_check_wheels_fails_when_a_module_does_not_come_from_the_target(tmp_path):
    # the module the wheel names imports, but from a copy outside the install target
    wheels, site, other = tmp_path / "wheels", tmp_path / "site", tmp_path / "other"
    _probe_wheel(wheels)
    site.mkdir()
    (other / "gpusuiteprobe").mkdir(parents=True)
    (other / "gpusuiteprobe" / "__init__.py").write_text('__version__ = "0.9"\n')
    cmd = [PY, str(ROOT / "bench" / "gpu_env.py"), "check-wheels", str(wheels), str(site)]
    env = dict(os.environ, PYTHONPATH=str(other))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 1 and "FAIL gpusuiteprobe" in proc.stdout and "not from" in proc.stdout
    # installed into the target (and first on the path), it passes
    shutil.copytree(other / "gpusuiteprobe", site / "gpusuiteprobe")
    env["PYTHONPATH"] = f"{site}{os.pathsep}{other}"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0 and proc.stdout.startswith("ok   gpusuiteprobe"), proc.stdout


def test_summary_reads_cut_off_rows_and_junit_failures(tmp_path):
    (tmp_path / "parts.tsv").write_text("pytest_gpu\tfailed\t1\t12.5\t150\tpytest_gpu.log\n"
                                        "sampler_sd35_b24\ttimed out\t124\t75.0\t75\tsampler_sd35_b24.log\n"
                                        "kernels_sd35\tok\t0\t40.0\t45\tkernels_sd35.log\n")
    (tmp_path / "kernels_sd35.log").write_text("# time budget: 40 s: skipped 3 case(s): a, b, c\n")
    (tmp_path / "suite.tsv").write_text("mode\tgpu\nbudget_s\t450\nelapsed_s\t90\ncommit\tabc123\n")
    (tmp_path / "pytest_gpu.log").write_text("...\n")
    (tmp_path / "pytest_gpu.xml").write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_kernels" name="test_a[cuda]"/>'
        '<testcase classname="tests.test_kernels" name="test_b[cuda]"><failure message="assert 1 == 2">x</failure></testcase>'
        '<testcase classname="tests.test_graphs" name="test_c"><skipped message="no"/></testcase>'
        '</testsuite></testsuites>')
    row = {"bench": "sampler_throughput", "model": "sd3.5-medium", "batch": 24, "method": "fastflow",
           "images_per_s": 9.5, "speedup": 2.61, "ms_per_step": 101.0, "mfu": 0.52, "peak_mem_gib": 40.2,
           "path": "graph"}
    (tmp_path / "sampler_throughput-nvidia-h200.jsonl").write_text(json.dumps(row) + '\n{"bench": "samp')
    proc = subprocess.run([PY, str(ROOT / "bench" / "gpu_summary.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "summary.md").read_text()
    assert "3 tests: 1 passed, 1 failed, 0 errors, 1 skipped." in text
    assert "- failed: `tests.test_kernels::test_b[cuda]`: assert 1 == 2" in text
    assert "| sd3.5-medium | 24 | - | 9.50 | 2.61 | 101.0 | 52.0% | 40.2 | graph |" in text
    assert "| pytest_gpu | failed (exit 1) | 12.5 | 150 |" in text and "| sampler_sd35_b24 | timed out |" in text
    assert "commit abc123" in text
    assert "| kernels_sd35 | ok, 3 skipped (budget) |" in text  # a part cut short by its budget says so
