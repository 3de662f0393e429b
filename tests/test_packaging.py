"""Packaging: the kernels install as fastflow.kernels, never as the bare name `kernels`, and the
libraries that probe for a `kernels` package still import cleanly from the repository root."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "fastflow").rglob("__init__.py")}
    found = {f for f in found if "__pycache__" not in f}
    assert found | {"fastflow.kernels"} == listed, "add new package folders to [tool.setuptools] packages"
    assert (ROOT / "kernels" / "__init__.py").is_file()


def _run_from_root(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_kernels_import_as_fastflow_kernels_from_the_repo_root():
    r = _run_from_root("import fastflow.kernels, pathlib; print(pathlib.Path(fastflow.kernels.__file__).parent.name)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "kernels"


def test_diffusers_and_bitsandbytes_import_cleanly_from_the_repo_root():
    # From the repo root the folder kernels/ is importable as a bare `kernels`; the libraries that
    # probe for the PyPI package of that name must not mistake it for theirs.
    code = ("import warnings; warnings.simplefilter('error', ImportWarning)\n"
            "import diffusers, bitsandbytes\n"
            "from diffusers.utils import import_utils as iu\n"
            "avail = getattr(iu, 'is_kernels_available', lambda: False)()\n"
            "print('kernels-available', avail)\n"
            "from diffusers import SD3Transformer2DModel, FluxTransformer2DModel\n"
            "import fastflow.ops, fastflow.kernels\n")
    r = _run_from_root(code)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "kernels-available False" in r.stdout


def test_installed_distribution_does_not_ship_a_top_level_kernels():
    from importlib.metadata import distribution

    dist = distribution("fastflow")
    top = (dist.read_text("top_level.txt") or "").split()
    assert "kernels" not in top


def test_wheel_ships_kernels_inside_fastflow(tmp_path):
    import zipfile

    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next(tmp_path.glob("fastflow-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastflow/kernels/__init__.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    assert "fastflow/sde.py" in names


def test_bare_kernels_name_is_an_empty_namespace_from_the_repo_root():
    # what the probes of transformers / bitsandbytes see when run from a checkout
    r = _run_from_root("import kernels, sys\n"
                       "print(kernels.__file__, hasattr(kernels, 'sde_step'), 'triton' in sys.modules)\n"
                       "from transformers.utils.import_utils import is_kernels_available\n"
                       "print(is_kernels_available())\n"
                       "import fastflow.kernels as k; print(k.sde_step.__module__)")
    assert r.returncode == 0, r.stderr[-1500:]
    assert r.stdout.split() == ["None", "False", "False", "False", "fastflow.kernels.sde_step"]


def test_bitsandbytes_does_not_load_the_repository_kernels():
    r = _run_from_root("import bitsandbytes, sys; print(any(m.startswith('kernels.') for m in sys.modules))")
    assert r.returncode == 0, r.stderr[-1500:]
    assert r.stdout.strip() == "False"
    assert "/kernels" not in r.stderr  # no warning pointing into our folder


def test_rewards_do_not_import_the_models():
    # The reward registry and the model registry share fastflow.registry; a reward server or a
    # reward client must not pull in the model adapters (and their diffusers import).
    r = _run_from_root("import sys, fastflow.rewards\n"
                       "print(sorted(m for m in sys.modules if m.startswith('fastflow.models')))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
