"""The benchmarks run in their tiny CPU mode and write well-formed JSON rows; their FLOP counts
agree with torch's FLOP counter; CMakeLists.txt configures and registers the cpu / gpu tests."""

import json
import os
import shutil
import subprocess
import sys
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
            assert r["speedup"] > 0
    sd3 = [r for r in rows if r["model"] == "tiny-sd3"]
    assert all(r["cfg"] for r in sd3) and not any(r["cfg"] for r in rows if r["model"] == "tiny-flux")


def test_train_step_cpu_smoke(tmp_path):
    out, rows = _run_bench("train_step.py", tmp_path, "--models", "sd3.5-medium", "--finetune", "lora,full")
    assert "numbers mean nothing" in out
    assert {(r["model"], r["finetune"], r["kernels"]) for r in rows} == {
        ("tiny-sd3", "lora", "torch"), ("tiny-sd3", "full", "torch")}
    for r in rows:
        _check_header(r)
        assert r["seconds_per_step"] > 0 and 0 < r["mfu"] < 1 and r["loss_finite"] is True
        assert r["trained_steps"] == 2  # floor(3 * 0.99) of the tiny 3-step rollout
    lora, full = sorted(rows, key=lambda r: r["finetune"] != "lora")
    assert full["flops_per_step"] > lora["flops_per_step"]  # weight gradients count in full


def test_bench_rejects_bad_arguments(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(BENCH / "sampler_throughput.py"), "--device", "cpu",
                           "--models", "sd2", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "unknown model 'sd2'" in proc.stderr
    assert not list(tmp_path.glob("*.jsonl"))


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
