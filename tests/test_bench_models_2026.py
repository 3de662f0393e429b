"""bench/models.py knows Qwen-Image and FLUX.2 [klein]: FLOPs counted from their configs equal
torch's FLOP counter on the tiny configs (through fastflow's own velocity code, CFG included), the
real configs have the published sizes, and bench/train_step.py runs them in its tiny CPU mode."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


@pytest.fixture(scope="module")
def bench_models():
    """bench/models.py loaded by path (bench/ on sys.path would let its kernels.py shadow the
    ``kernels`` name that diffusers and bitsandbytes probe for)."""
    spec = importlib.util.spec_from_file_location("fastflow_bench_models_2026", BENCH / "models.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["tiny-qwenimage", "tiny-flux2-klein"])
def test_flops_from_config_match_torch_flop_counter(bench_models, name):
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    m = bench_models
    arch = m.ARCHS[name]
    assert arch.cfg  # both run CFG: the counted forward is the doubled batch
    policy = m.bench_policy(arch, m.build_transformer(arch, "cpu", torch.float32), device="cpu",
                            dtype=torch.float32, finetune="none")
    batch = 3
    cond = m.random_cond(arch, batch, "cpu", torch.float32)
    x = torch.randn(batch, *arch.latent_shape)

    def cpu_sdpa(q, k, v, *args, out_shape=None, **kwargs):  # not in the counter's registry
        return sdpa_flop_count(q, k, v)

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa}
    for attention, custom in ((False, {}), (True, mapping)):
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=custom) as fc:
            policy.velocity(x, torch.full((batch,), 0.5), cond, guidance_scale=arch.guidance)
        assert m.forward_flops(arch, 2 * batch, attention=attention) == fc.get_total_flops()
    assert m.rollout_flops(arch, batch, 2) == 2 * m.forward_flops(arch, 2 * batch)


def test_real_architectures_have_the_published_sizes(bench_models):
    import diffusers

    m = bench_models
    qwen, klein = m.ARCHS["qwen-image"], m.ARCHS["flux.2-klein-base-4b"]
    assert qwen.latent_shape == (1024, 64) and klein.latent_shape == (1024, 128)
    assert qwen.cfg and klein.cfg and m.TINY["qwen-image"] == "tiny-qwenimage"
    with torch.device("meta"):
        q = diffusers.QwenImageTransformer2DModel(**qwen.config)
        k = diffusers.Flux2Transformer2DModel(**klein.config)
    n_q = sum(p.numel() for p in q.parameters())
    n_k = sum(p.numel() for p in k.parameters())
    assert 20.3e9 < n_q < 20.6e9, n_q  # "a 20B MMDiT"
    assert 3.8e9 < n_k < 4.0e9, n_k  # "4B"
    # Independent bounds at full size: an image token meets at least the image stream's attention
    # and MLP weights; no token meets more than every weight, plus attention.
    for arch, model, n_params in ((qwen, q, n_q), (klein, k, n_k)):
        stream = sum(p.numel() for n, p in model.named_parameters() if n.startswith("transformer_blocks.") and (
            ".img_mlp." in n or ".ff." in n or any(f".attn.{w}." in n for w in ("to_q", "to_k", "to_v", "to_out"))))
        f = m.forward_flops(arch, 1)
        n = arch.image_tokens + arch.text_tokens
        d = arch.config["num_attention_heads"] * arch.config["attention_head_dim"]
        blocks = arch.config["num_layers"] + arch.config.get("num_single_layers", 0)
        assert 2 * stream * arch.image_tokens < f < 2 * n_params * n + blocks * 4 * n * n * d, arch.name


def test_train_step_bench_runs_the_new_architectures(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(BENCH / "train_step.py"), "--device", "cpu", "--out", str(tmp_path),
                           "--models", "qwen-image,flux.2-klein-base-4b", "--finetune", "lora"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (rows_file,) = tmp_path.glob("*.jsonl")
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [r["model"] for r in rows] == ["tiny-qwenimage", "tiny-flux2-klein"]
    for r in rows:
        assert r["cfg"] is True and r["loss_finite"] is True and r["flops_per_step"] > 0
        assert 0 <= r["onpolicy_ratio_dev"] < 1e-6  # the recompute reproduces the rollout
