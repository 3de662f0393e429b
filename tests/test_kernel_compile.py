"""The fused kernels compiled for real GPU targets (sm_80, sm_90) without a GPU, and the table of
specialisations (kernels/specs.py) that the launchers launch through.

Compiling needs the real triton.jit kernels, while the parity tests import them under
TRITON_INTERPRET=1: every compile runs in a subprocess without it
(``python -m fastflow.kernels.compile_report``). The table module is loaded from its file, so this
test imports no kernel module in the test process.
"""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parent.parent


def _specs():
    spec = importlib.util.spec_from_file_location("fastflow_kernel_specs", ROOT / "kernels" / "specs.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(mod)
    return mod


specs = _specs()


def _compiled_env():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _python(code: str, *, interpret: bool = False, timeout: int = 300):
    env = _compiled_env()
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_table_matches_the_kernels():
    """Each table entry has its kernel's parameters (names, constexprs, unspecialised strides), every
    *_kernel has an entry, and no launcher launches a kernel except through Spec.launch."""
    r = _python("from fastflow.kernels import compile_report as c; print(c.check_table())")
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "[]", r.stdout


@pytest.mark.slow
def test_every_specialisation_compiles_for_sm80_and_sm90(tmp_path):
    """Every specialisation in the table compiles for sm_80 and sm_90 with no register spill,
    shared memory within the target's limit, and correctly rounded sqrt / division."""
    out = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "fastflow.kernels.compile_report", "--json", str(out)],
                       cwd=ROOT, env=_compiled_env(), capture_output=True, text=True, timeout=900)
    print(r.stdout[-6000:])  # the per-kernel resource summary (pytest -s, or on failure)
    assert r.returncode == 0, (r.stdout[-6000:], r.stderr[-3000:])
    rows = json.loads(out.read_text())["rows"]
    expected = sum(len(s.specialisations()) for s in specs.SPECS) * 2
    assert len(rows) == expected
    limit = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
    for row in rows:
        assert row["error"] is None, row
        assert row["regs"] > 0 and row["spill_bytes"] == 0, row
        assert 0 <= row["shared_bytes"] <= limit[row["arch"]], row
    assert {(r["kernel"], r["arch"]) for r in rows} == \
        {(s.name, a) for s in specs.SPECS for a in ("sm_80", "sm_90")}


_PLANTED = '''
import triton
import triton.language as tl


@triton.jit
def planted_kernel(x_ptr, out_ptr, C, BLOCK: tl.constexpr):
    """Sums C floats; the accumulator starts in bfloat16 and becomes float32 in the loop."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.bfloat16)
    for start in range(0, C, BLOCK):
        acc += tl.load(x_ptr + start + offs, mask=start + offs < C, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))
'''


def test_compile_check_catches_what_the_interpreter_accepts(tmp_path):
    """A dtype mix the interpreter runs (and gets right) but the compiler rejects: a loop-carried
    accumulator whose type changes. The same compile path as the report flags it."""
    (tmp_path / "planted.py").write_text(_PLANTED)
    run = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(tmp_path)!r})
        from planted import planted_kernel
        x = torch.arange(100, dtype=torch.float32)
        out = torch.zeros(1)
        planted_kernel[(1,)](x, out, 100, BLOCK=32)
        print(out.item())
    """)
    r = _python(run, interpret=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert float(r.stdout.split()[-1]) == sum(range(100))

    compile_it = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from planted import planted_kernel
        from fastflow.kernels import compile_report, specs
        spec = specs.Spec(name="planted_kernel", module="planted",
                          args=specs._args("x_ptr:ptr out_ptr:ptr C:i32 BLOCK:constexpr"),
                          constexprs={{"BLOCK": (32,)}}, pointer_role=lambda n, c: specs.F32)
        row = compile_report.compile_one(spec, {{"BLOCK": 32}},
                                         {{"x_ptr": "fp32", "out_ptr": "fp32"}}, "aligned", 90)
        print(row["error"])
    """)
    r = _python(compile_it)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Loop-carried variable acc" in r.stdout, r.stdout[-3000:]


# ------------------------------------------------------------------------------------------------
# The table's launch guard (no compiler, no kernel: a stand-in records the launch)
# ------------------------------------------------------------------------------------------------


class _Recorder:
    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda **kw: self.calls.append((grid, kw))


def _finalize_args(torch, **over):
    buf = torch.zeros(4)
    args = dict(part_lp_ptr=buf, part_kl_ptr=buf, lp_ptr=buf, kl_ptr=buf, std_ptr=buf,
                sig_ptr=buf, sig_s=0, sig_v=0.0, nxt_ptr=buf, nxt_s=-1, nxt_v=0.4,
                grd_ptr=buf, grd_s=-1, grd_v=0.9, a=0.7, sin_a=0.9, N=5, C=1, KIND=0, HAS_KL=False)
    args.update(over)
    return args


def test_launch_passes_the_table_constexprs_and_options():
    import torch

    fn = _Recorder()
    specs.FINALIZE.launch(fn, (4,), **_finalize_args(torch))
    (grid, kw), = fn.calls
    assert grid == (4,)
    assert kw["BLOCK_C"] == specs.BLOCK_C and kw["KIND"] == 0 and kw["HAS_KL"] is False
    assert kw["num_warps"] == specs.NUM_WARPS and kw["enable_fp_fusion"] is False


def test_launch_refuses_what_the_table_does_not_hold():
    import torch

    fn = _Recorder()
    with pytest.raises(ValueError, match="KIND=2"):  # finalize never runs for the ODE step
        specs.FINALIZE.launch(fn, (4,), **_finalize_args(torch, KIND=2))
    with pytest.raises(ValueError, match="BLOCK_C=32"):
        specs.FINALIZE.launch(fn, (4,), **_finalize_args(torch, BLOCK_C=32))
    with pytest.raises(TypeError, match="float64"):
        specs.FINALIZE.launch(fn, (4,), **_finalize_args(torch, lp_ptr=torch.zeros(4, dtype=torch.float64)))
    with pytest.raises(ValueError, match="not an int32"):
        specs.FINALIZE.launch(fn, (4,), **_finalize_args(torch, N=2**31))
    with pytest.raises(TypeError, match="python float"):
        specs.FINALIZE.launch(fn, (4,), **_finalize_args(torch, a=torch.tensor(0.7)))
    with pytest.raises(TypeError, match="unexpected arguments"):
        specs.FINALIZE.launch(fn, (4,), **_finalize_args(torch, extra=1))
    assert fn.calls == []
    # Pick: the ODE step with Philox noise is no specialisation; WRITE_OUT follows the noise mode.
    with pytest.raises(ValueError, match="not a specialisation"):
        specs.SDE_STEP.pick(KIND=2, CFG=False, NOISE=specs.NOISE_PHILOX, WRITE_MEAN=True)
    assert specs.SDE_STEP.pick(KIND=0, CFG=True, NOISE=specs.NOISE_GIVEN_NEXT,
                               WRITE_MEAN=False)["WRITE_OUT"] is False


def test_launch_refuses_mixed_dtypes_within_a_role():
    import torch

    fn = _Recorder()
    f32, bf16, f16 = (torch.zeros(4, dtype=d) for d in (torch.float32, torch.bfloat16, torch.float16))
    args = dict(x_ptr=f32, sx=4, y_ptr=f32, sy=4, u_ptr=bf16, su=4, c_ptr=f16, sc=4, w=4.5,
                ru_ptr=f32, sru=4, rc_ptr=f32, src=4, wr=0.0, part_lp_ptr=f32, part_kl_ptr=f32,
                sig_ptr=f32, sig_s=-1, sig_v=0.5, nxt_ptr=f32, nxt_s=-1, nxt_v=0.4,
                grd_ptr=f32, grd_s=-1, grd_v=0.5, a=0.7, sin_a=0.9, N=4, C=1,
                KIND=0, CFG=True, REF_CFG=False, HAS_KL=False)
    with pytest.raises(TypeError, match="velocity pointers mix bf16 and fp16"):
        specs.GRPO_FWD.launch(fn, (1, 1), **args)
    specs.GRPO_FWD.launch(fn, (1, 1), **{**args, "c_ptr": bf16})
    assert len(fn.calls) == 1


def test_grid_limits():
    specs.check_grid(specs.MAX_BATCH, specs.MAX_GRID_Y, "test")  # the largest launch allowed
    with pytest.raises(ValueError, match=r"batch 2147483648 exceeds .* limit 2147483647"):
        specs.check_grid(specs.MAX_BATCH + 1, 1, "test")
    with pytest.raises(ValueError, match="elements per sample exceed"):
        specs.check_grid(1, specs.MAX_GRID_Y + 1, "test")
    assert specs.MAX_GRID_X == 2**31 - 1 and specs.MAX_GRID_Y == 65535  # CUDA's grid limits


def test_enumeration_counts():
    """The specialisation count the report compiles (two targets each), per kernel."""
    counts = {s.name: len(s.specialisations()) for s in specs.SPECS}
    # sde_step: SDE / CPS with every noise mode and mean flag, the ODE step with a noise tensor
    # (unused) or a given next sample (then only for the mean), each with and without CFG.
    combos = {(c["KIND"], c["NOISE"], c["WRITE_MEAN"]) for c in specs.SDE_STEP.combinations()}
    assert combos == {(k, n, m) for k in (0, 1) for n in (0, 1, 2) for m in (False, True)} | \
        {(2, 0, False), (2, 0, True), (2, 2, True)}
    assert counts == {"_sde_step_kernel": 15 * 2 * (3 + 2), "finalize_kernel": 4 * 3,
                      "_fwd_kernel": 4 * (3 + 2) + 8 * (9 + 2), "_bwd_kernel": 4 * (3 + 2) + 8 * (9 + 2),
                      "_loss_kernel": 2 * 3}
