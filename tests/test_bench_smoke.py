"""The benchmarks run in their tiny CPU mode and write well-formed JSON rows, each as it is
measured (a killed bench keeps them), honour --out and --time-budget, and end bad input in one
line; bench/common.py's time budget and commit fallback; their FLOP counts agree with torch's FLOP
counter; CMakeLists.txt configures and registers the cpu / gpu tests."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def _run_bench(script, out, *extra, timeout=45):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(BENCH / script), "--device", "cpu", "--out", str(out),
                           *extra], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    files = list(Path(out).glob("*.jsonl"))
    assert len(files) == 1, files
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    return proc.stdout, rows


def _check_header(row):
    for key in ("device", "torch", "triton", "commit", "date", "bench"):
        assert row[key], key


def test_sampler_throughput_cpu_smoke(tmp_path):
    out, rows = _run_bench("sampler_throughput.py", tmp_path)
    assert "numbers mean nothing" in out
    assert {(r["model"], r["method"]) for r in rows} == {
        (m, k) for m in ("tiny-sd3", "tiny-flux") for k in ("reference", "fastflow")}
    for r in rows:
        _check_header(r)
        assert r["bench"] == "sampler_throughput" and r["tiny"] is True
        assert r["images_per_s"] > 0 and r["ms_per_step"] > 0 and 0 < r["mfu"] < 1
        assert r["flops_per_rollout"] > 0 and r["peak_mem_gib"] is None
        if r["method"] == "fastflow":
            assert r["path"] == "eager" and "not CUDA" in r["fallback_reason"]
            assert r["speedup"] > 0 and r["attention"] == "auto"
            assert r["captures"] == 0 and r["captures_timed"] == 0  # nothing captured off CUDA
    sd3 = [r for r in rows if r["model"] == "tiny-sd3"]
    assert all(r["cfg"] for r in sd3) and not any(r["cfg"] for r in rows if r["model"] == "tiny-flux")


def test_sampler_throughput_reference_covers_the_2026_models(tmp_path):
    """The authors'-style eager reference rollout of models without a hand-written forward here
    (Qwen-Image's rescaled true CFG, FLUX.2 [klein]) goes through the policy's own velocity."""
    _, rows = _run_bench("sampler_throughput.py", tmp_path, "--models", "qwen-image,flux.2-klein-base-4b",
                         "--repeats", "1", "--warmup", "0", timeout=120)
    assert {(r["model"], r["method"]) for r in rows} == {
        (m, k) for m in ("tiny-qwenimage", "tiny-flux2-klein") for k in ("reference", "fastflow")}
    assert all(r["images_per_s"] > 0 for r in rows)


def test_train_step_cpu_smoke(tmp_path):
    out, rows = _run_bench("train_step.py", tmp_path, "--models", "sd3.5-medium", "--finetune", "lora,full")
    assert "numbers mean nothing" in out
    assert {(r["model"], r["finetune"], r["kernels"]) for r in rows} == {
        ("tiny-sd3", "lora", "torch"), ("tiny-sd3", "full", "torch")}
    for r in rows:
        _check_header(r)
        assert r["seconds_per_step"] > 0 and 0 < r["mfu"] < 1 and r["loss_finite"] is True
        assert r["trained_steps"] == 2  # floor(3 * 0.99) of the tiny 3-step rollout
        # the recompute reproduces the rollout's log-probs before the first update
        assert r["attention"] == "auto" and 0 <= r["onpolicy_ratio_dev"] < 1e-6
    lora, full = sorted(rows, key=lambda r: r["finetune"] != "lora")
    assert full["flops_per_step"] > lora["flops_per_step"]  # weight gradients count in full


def test_bench_rejects_bad_arguments(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(BENCH / "sampler_throughput.py"), "--device", "cpu",
                           "--models", "sd2", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "unknown model 'sd2'" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not list(tmp_path.glob("*.jsonl"))


def _results_listing():
    res = BENCH / "results"
    return sorted((p.name, p.stat().st_size) for p in res.rglob("*")) if res.exists() else []


@pytest.mark.parametrize("script", ["kernels.py", "sampler_throughput.py", "train_step.py"])
def test_cuda_without_a_gpu_is_one_line(tmp_path, script):
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(BENCH / script), "--device", "cuda", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [f"{script}: --device cuda: no CUDA device is available"]
    assert proc.stdout == "" and not out.exists()


def test_kernels_out_puts_rows_in_that_folder(tmp_path):
    before = _results_listing()
    out, rows = _run_bench("kernels.py", tmp_path / "new", "--cases", "tiny", "--reps", "1")
    assert [(r["case"], r["op"], r["impl"]) for r in rows] == [
        ("tiny", op, "eager") for op in ("rollout", "rollout_philox", "train_fwd", "train_fwd_bwd")]
    for r in rows:
        _check_header(r)
        assert r["bench"] == "kernels" and r["ms"] > 0
    assert "# 4 rows -> " + str(tmp_path / "new") in out
    assert _results_listing() == before  # nothing appended to the committed results


@pytest.mark.parametrize("script, skipped", [
    ("kernels.py", "skipped 8 case(s): tiny/rollout, tiny/rollout_philox, tiny/train_fwd, "
                   "tiny/train_fwd_bwd, small/rollout,"),
    ("sampler_throughput.py", "skipped 4 case(s): tiny-sd3 b=2 reference, tiny-sd3 b=2 fastflow, "
                              "tiny-flux b=2 reference, tiny-flux b=2 fastflow"),
    ("train_step.py", "skipped 4 case(s): tiny-sd3 lora torch, tiny-sd3 full torch, "
                      "tiny-flux lora torch, tiny-flux full torch"),
])
def test_spent_time_budget_skips_every_case_and_exits_0(tmp_path, script, skipped):
    # The budget counts from the process start, so after the imports 0.01 s is spent for sure.
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(BENCH / script), "--device", "cpu", "--out", str(tmp_path),
                           "--time-budget", "0.01"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("# time budget:")]
    assert len(lines) == 1 and skipped in lines[0], proc.stdout
    assert "# 0 rows (nothing written)" in proc.stdout
    assert not list(tmp_path.iterdir())  # no model built, no file made


def test_rows_survive_a_kill(tmp_path):
    """Each row is on disk as soon as it is measured: killed (as `timeout` does) after the first
    case, the bench leaves that case's row, complete."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen([sys.executable, str(BENCH / "train_step.py"), "--device", "cpu",
                             "--out", str(tmp_path), "--models", "sd3.5-medium,flux.1-dev",
                             "--finetune", "lora,full"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:
            files = list(tmp_path.glob("*.jsonl"))
            if files and files[0].read_text().endswith("\n"):
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL  # killed before its last case: not a finished run
    text = next(tmp_path.glob("*.jsonl")).read_text()
    rows = [json.loads(line) for line in text.splitlines()]
    assert 1 <= len(rows) < 4 and text.endswith("\n")
    assert rows[0]["model"] == "tiny-sd3" and rows[0]["finetune"] == "lora"
    assert rows[0]["seconds_per_step"] > 0 and rows[0]["commit"]


@pytest.fixture()
def bench_common():
    """bench/common.py loaded by path (see bench_models below)."""
    spec = importlib.util.spec_from_file_location("fastflow_bench_common", BENCH / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_time_budget_stops_before_a_case_that_would_not_fit(bench_common):
    now = [1.0]
    budget = bench_common.TimeBudget(10, clock=lambda: now[0])
    assert budget.allows("a")  # nothing measured yet: it starts while time is left
    now[0] = 3.0
    budget.setup_done()  # a built the model in 2 s: later cases reuse it
    now[0] = 5.0
    budget.done()  # a took 2 s after its set-up, 4 s in all
    assert budget.allows("b")  # 5 + 2 <= 10
    now[0] = 8.5
    budget.done()  # b took 3.5 s: the estimate is the longest, 3.5 s
    now[0] = 8.9
    assert not budget.allows("c")  # 8.9 + 3.5 > 10
    now[0] = 0.0
    assert not budget.allows("d")  # once stopped, nothing more starts
    assert budget.skipped == ["c", "d"]
    assert budget.report() == ("# time budget: 8.9 s of 10 s spent, the longest case so far took "
                               "3.5 s: skipped 2 case(s): c, d")
    spent = bench_common.TimeBudget(2, clock=lambda: 2.5)
    assert not spent.allows("x") and spent.report().startswith("# time budget: 2.5 s of 2 s spent: ")
    free = bench_common.TimeBudget(None, clock=lambda: 1e9)
    assert free.allows("x") and free.report() is None and free.banner() is None
    # the default clock counts from the process start: at least the time since this test began
    assert bench_common.process_elapsed() >= time.monotonic() - bench_common._IMPORTED


def test_git_commit_falls_back_to_the_environment(tmp_path, monkeypatch, bench_common):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if shutil.which("git") is None or head.returncode != 0:
        pytest.skip("needs git and the repository's .git")
    monkeypatch.setenv("FASTFLOW_COMMIT", "from-env")
    assert bench_common.git_commit().split("+")[0] == head.stdout.strip()  # git wins when present

    def copy_in(folder: Path):
        (folder / "bench").mkdir(parents=True)
        shutil.copy(BENCH / "common.py", folder / "bench" / "common.py")
        spec = importlib.util.spec_from_file_location(f"bench_common_{folder.name}", folder / "bench" / "common.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    copy = copy_in(tmp_path / "copy")  # a tree without .git
    assert copy.git_commit() == "from-env"
    monkeypatch.delenv("FASTFLOW_COMMIT")
    monkeypatch.setenv("GPU_SUITE_COMMIT", "abc123+dirty")
    assert copy.git_commit() == "abc123+dirty"
    # a copy inside another repository does not take that repository's HEAD
    outer = tmp_path / "outer"
    outer.mkdir()
    git = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
    for cmd in (["init", "-q"], ["commit", "-q", "--allow-empty", "-m", "x"]):
        subprocess.run(git + cmd, cwd=outer, check=True, capture_output=True)
    assert copy_in(outer / "tree").git_commit() == "abc123+dirty"
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))  # git not installed
    assert bench_common.git_commit() == "abc123+dirty"
    monkeypatch.delenv("GPU_SUITE_COMMIT")
    assert copy.git_commit() == "unknown"


@pytest.fixture(scope="module")
def bench_models():
    """bench/models.py loaded by path: putting bench/ on sys.path would let its kernels.py shadow
    the ``kernels`` name that diffusers and bitsandbytes probe for."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fastflow_bench_models", BENCH / "models.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
def test_flops_from_config_match_torch_flop_counter(bench_models, name):
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    m = bench_models
    arch = m.ARCHS[name]
    policy = m.bench_policy(arch, m.build_transformer(arch, "cpu", torch.float32), device="cpu",
                            dtype=torch.float32, finetune="none")
    batch = 3
    cond = m.random_cond(arch, batch, "cpu", torch.float32)
    x = torch.randn(batch, *arch.latent_shape)

    # The CPU SDPA op is not in the counter's registry: count it with torch's own SDPA formula.
    def cpu_sdpa(q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(q, k, v)

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa}
    for attention, custom in ((False, {}), (True, mapping)):
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=custom) as fc:
            policy.velocity(x, torch.full((batch,), 0.5), cond, guidance_scale=arch.guidance)
        forward_batch = batch * (2 if arch.cfg else 1)
        assert m.forward_flops(arch, forward_batch, attention=attention) == fc.get_total_flops()
    assert m.forward_flops(arch, 2) == 2 * m.forward_flops(arch, 1)


def test_real_architectures_have_the_published_sizes(bench_models):
    m = bench_models
    sd3, flux = m.ARCHS["sd3.5-medium"], m.ARCHS["flux.1-dev"]
    assert sd3.latent_shape == (16, 64, 64) and sd3.image_tokens == 1024 and sd3.cfg
    assert flux.latent_shape == (1024, 64) and not flux.cfg
    # Sizes on the meta device (no memory): SD3.5-M's checkpoint holds ~2.47B values (2.24B
    # parameters + the 384 x 384 positional-embedding table), FLUX.1-dev ~11.9B parameters.
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    with torch.device("meta"):
        t = SD3Transformer2DModel(**sd3.config)
        n_sd3 = sum(p.numel() for p in t.parameters())
        n_sd3_all = n_sd3 + sum(b.numel() for b in t.buffers())
        n_flux = sum(p.numel() for p in FluxTransformer2DModel(**flux.config).parameters())
    assert 2.2e9 < n_sd3 < 2.3e9 and 2.4e9 < n_sd3_all < 2.55e9, (n_sd3, n_sd3_all)
    assert 11.8e9 < n_flux < 12.0e9, n_flux
    # Independent bounds on the formula at full size: every image token meets at least the image
    # stream's attention and MLP weights; no token meets more than all weights, plus attention.
    image_stream = sum(p.numel() for n, p in t.named_parameters()
                       if n.startswith("transformer_blocks.") and (".ff." in n or ".attn2." in n or any(
                           f".attn.{k}." in n for k in ("to_q", "to_k", "to_v", "to_out"))))
    f = m.forward_flops(sd3, 1)
    n = sd3.image_tokens + sd3.text_tokens
    d = sd3.config["num_attention_heads"] * sd3.config["attention_head_dim"]
    attention = sd3.config["num_layers"] * 4 * n * n * d * 2
    assert 2 * image_stream * sd3.image_tokens < f < 2 * n_sd3 * n + attention


def test_cmake_registers_cpu_and_gpu_tests(tmp_path):
    if shutil.which("cmake") is None or shutil.which("ctest") is None:
        pytest.skip("cmake is not installed")
    build = tmp_path / "build"
    conf = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build)], capture_output=True,
                          text=True, timeout=60)
    assert conf.returncode == 0, conf.stdout + conf.stderr

    def listed(label):
        proc = subprocess.run(["ctest", "--test-dir", str(build), "-N", "-L", label],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, proc.stderr
        return {line.split(":", 1)[1].strip() for line in proc.stdout.splitlines()
                if line.strip().startswith("Test #")}

    cpu, gpu = listed("cpu"), listed("gpu")
    assert {"cpu_suite", "cpu_bench_sampler_throughput", "cpu_bench_train_step"} <= cpu
    assert {"gpu_check", "gpu_parity", "gpu_bench_sampler_throughput", "gpu_bench_train_step"} <= gpu
    assert not cpu & gpu
    cache = (build / "CMakeCache.txt").read_text()
    py = ROOT / ".venv" / "bin" / "python"
    if py.exists():
        assert f"FASTFLOW_PYTHON:FILEPATH={py}" in cache


def _load_bench(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_algorithms_table_pools_seeds_paired_by_prompt(tmp_path, capsys):
    """bench/algorithms.py: per-run gains, and per algorithm the seeds' mean, spread and the paired
    gain with the seeds' images pooled, checked against hand-computed values on a fake evaluation."""
    from PIL import Image

    def evaluation(name, correct):  # correct[prompt] = the 0/1 of its 2 images
        d = tmp_path / name
        (d / "images").mkdir(parents=True)
        rows = []
        for p, (cat, cs) in enumerate(correct.items()):
            for s, c in enumerate(cs):
                f = f"images/{p}_{s}.png"
                Image.new("RGB", (4, 4), (60 * s, 0, 0)).save(d / f)
                rows.append(dict(prompt=f"p{p}", category=cat, seed_index=s, correct=c, file=f))
        (d / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return d

    def run(name):
        d = tmp_path / name
        d.mkdir()
        (d / "config.toml").write_text("group_size = 2\nprompts_per_iter = 3\n")
        (d / "metrics.jsonl").write_text("".join(json.dumps({"iteration": i, "reward_mean": 0.1 * i, "time/rollout_s": 30,
                                                             "time/train_s": 30}) + "\n" for i in (1, 2)))
        return d

    base = evaluation("base", {"a": [0, 0], "b": [1, 0]})          # per prompt 0, 0.5
    s0 = evaluation("s0", {"a": [1, 0], "b": [1, 0]})              # 0.5, 0.5: per image +25
    s1 = evaluation("s1", {"a": [1, 1], "b": [1, 1]})              # 1, 1: per image +75
    bench = _load_bench("algorithms")
    assert bench.main(["--base", str(base), "--seeds", "2", "--run", f"X/0={run('r0')},{s0}",
                       "--run", f"X/1={run('r1')},{s1}"]) == 0
    out = capsys.readouterr().out
    assert "| X/0 |" in out and "+25.0 +- 25.0" in out  # paired over 2 prompts: diffs 0.5, 0 -> s.e. 0.25
    # seeds pooled: per prompt (0.75 - 0, 0.75 - 0.5) -> mean 0.5, s.e. 0.25; category mean gains 25 and 75
    assert "| X | 2 | +50.0 +- 35.4 (+25.0..+75.0) | +50.0 +- 35.4 (+25.0..+75.0) | +50.0 +- 25.0 |" in out
