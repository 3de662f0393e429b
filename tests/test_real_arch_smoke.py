"""bench/real_arch_smoke.py at toy widths: the same path as the real-architecture smoke run (a saved
pipeline loaded by the trainer, one Trainer.run iteration per case in its own process, the export
reloaded by the stock diffusers API, memory accounted and checked against the measured bytes), so
the script cannot rot; and its memory formulas against bitsandbytes itself."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "real_arch_smoke.py"


def _script():
    spec = importlib.util.spec_from_file_location("real_arch_smoke", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(*args, timeout=120):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.timeout(240)
def test_tiny_mode_trains_exports_and_reloads(tmp_path):
    pytest.importorskip("bitsandbytes")
    out, work = tmp_path / "out", tmp_path / "work"
    proc = _run("--mode", "tiny", "--cases", "sd3-lora,flux-full-8bit,qwen-lora,klein-full",
                "--sd3-lora-layers", "2", "--flux-full-blocks", "1,1", "--qwen-lora-blocks", "2",
                "--klein-full-blocks", "1,1", "--in-process", "--out", str(out), "--work-dir", str(work),
                timeout=220)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    cases = {c["case"]: c for c in res["cases"]}
    assert set(cases) == {"sd3-lora", "flux-full-8bit", "qwen-lora", "klein-full"}
    for name, c in cases.items():
        assert "error" not in c, (name, c.get("error"))
        t, v = c["train"], c["verify"]
        assert c["check"] == {}, (name, c["check"])  # computed bytes at 1 rank == measured bytes
        assert t["export"]["equals_trainer_ema"] and t["export"]["covers_all_trainable"], name
        assert v["equal"] and v["same_keys"] and v["tensors"] > 0, (name, v)
        assert t["metrics"]["onpolicy/clipfrac"] == 0.0 and t["metrics"]["optimizer_steps"] == 1
        assert t["metrics"]["kl"] == 0.0, name  # the reference equals the policy before the update
        assert t["peak_rss"] > 0 and t["measured"]["weights"] > 0
        if name != "qwen-lora":
            assert t["measured"]["grads"] == t["measured"]["weights"], name
    lora = cases["sd3-lora"]
    assert lora["verify"]["api"] == "StableDiffusion3Pipeline.load_lora_weights"
    assert lora["verify"]["lora_scale_ok"]  # alpha / r travelled with the export
    assert lora["train"]["export"]["lora_B_nonzero"] > 0  # the step moved the adapter
    assert lora["train"]["dtypes"]["frozen"] == ["torch.bfloat16"]
    full = cases["flux-full-8bit"]
    assert full["verify"]["api"] == "FluxTransformer2DModel.from_pretrained"
    assert full["train"]["dtypes"]["trainable"] == ["torch.float32"]  # fp32 master weights
    assert "torch.uint8" in full["train"]["dtypes"]["optimizer_state"]
    # the reference: a bf16 copy of the matrices, fp32 vectors (norms, biases) like the policy's
    assert full["train"]["measured"]["weights"] // 2 < full["train"]["measured"]["reference"] \
        < 0.6 * full["train"]["measured"]["weights"]
    qwen = cases["qwen-lora"]
    assert qwen["verify"]["api"] == "QwenImagePipeline.load_lora_weights" and qwen["verify"]["lora_scale_ok"]
    # Qwen-Image's last block: its text output is discarded, so its text MLP and to_add_out LoRA get
    # no gradient (and no optimizer state); the accounting above says so byte for byte
    assert 0 < qwen["train"]["measured"]["grads"] < qwen["train"]["measured"]["weights"]
    klein = cases["klein-full"]
    assert klein["verify"]["api"] == "Flux2Transformer2DModel.from_pretrained"
    assert klein["train"]["dtypes"]["trainable"] == ["torch.float32"]
    assert klein["config"]["joint_attention_dim"] == 48 and klein["config"]["in_channels"] == 16
    rows = {(r["model"], r["depth"], r["finetune"], r["ranks"], r["how"]) for r in res["memory"]}
    assert ("tiny flux", "1 double + 1 single", "full, 8-bit AdamW", 8, "computed") in rows
    assert ("tiny sd3", "2 layers", "LoRA, AdamW", 1, "measured") in rows
    assert ("tiny qwenimage", "2 blocks", "LoRA, AdamW", 8, "computed") in rows
    assert ("tiny flux2_klein", "1 double + 1 single (full)", "full, AdamW", 8, "computed") in rows
    table = (out / "table.md").read_text()
    assert "| sd3-lora |" in table and "| flux-full-8bit |" in table and "fsdp2" in table
    assert "| qwen-lora |" in table and "| klein-full |" in table
    assert not (work / "pipelines").exists() and not (work / "runs").exists()  # cleaned up


@pytest.mark.parametrize("args, words", [
    (["--cases", "sd3-lora,nope"], "unknown case(s) nope"),
    (["--resolution", "100"], "multiple of 16"),
    (["--sd3-full-layers", "30"], "1..24"),
    (["--flux-lora-blocks", "2"], "DOUBLE,SINGLE"),
    (["--klein-lora-blocks", "6,20"], "1..5 double"),
    (["--qwen-lora-blocks", "61"], "1..60"),
    (["--activation-checkpointing", "klein-lora,nope"], "unknown case(s) nope"),
    (["--mode", "huge"], "invalid choice"),
    (["--max-rss-gib", "0"], "> 0"),
    (["--out", "/proc/no-such-dir"], "cannot write there"),
])
def test_bad_input_is_one_line(tmp_path, args, words):
    proc = _run(*args, "--work-dir", str(tmp_path / "w"), timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], proc.stderr
    assert not (tmp_path / "w").exists()  # nothing made before the check


def test_published_configs_and_encoder_widths():
    """The real-mode cases are the published transformers (parameter counts of the whole models on
    the meta device) read by text encoders of the real output widths."""
    m = _script()
    qwen, klein = m.full_config("qwenimage", "real"), m.full_config("flux2_klein", "real")
    assert (qwen["num_layers"], qwen["joint_attention_dim"]) == (60, 3584)
    assert (klein["num_layers"], klein["num_single_layers"], klein["joint_attention_dim"]) == (5, 20, 7680)
    assert m.encoder_widths("qwenimage", qwen) == {"qwen2_5_vl": 3584}  # Qwen2.5-VL-7B's hidden size
    assert m.encoder_widths("flux2_klein", klein) == {"qwen3": 2560}  # Qwen3-4B's, stacked 3 times
    assert (m.latent_channels("qwenimage", qwen), m.latent_channels("flux2_klein", klein)) == (16, 32)
    acc = m.account("qwenimage", qwen, "full", "adamw", 8)
    assert 20.4e9 < acc["params"] < 20.5e9 and acc["strategy"] == "fsdp2"  # "Qwen-Image 20B"
    # the last block's text MLP and to_add_out hold no gradient: fewer grad bytes than weights
    assert 0 < acc["weights"] - acc["grads"] < 0.01 * acc["weights"]
    acc = m.account("flux2_klein", klein, "lora", "adamw", 1, targets=m.lora_targets("flux2_klein"), rank=64)
    assert 3.8e9 < acc["params"] < 3.9e9 and acc["frozen_base"] == 2 * acc["params"]  # "4B", bf16
    assert acc["grads"] == acc["weights"] == 4 * acc["trainable"]


def test_fsdp2_shard_and_8bit_state_rules():
    """The per-rank rules the computed rows use: FSDP2's dim-0 chunk of rank 0 (padded to
    ceil(dim0 / W) rows), and bitsandbytes' AdamW8bit state, checked against the optimizer
    itself on shard-sized tensors with the threshold fastflow uses for 8 ranks."""
    bnb = pytest.importorskip("bitsandbytes")
    from fastflow.parallel import optimizer_state_bytes

    m = _script()
    assert m._shard_numel((10, 3), 8) == 2 * 3 and m._shard_numel((16, 3), 8) == 2 * 3
    assert m._shard_numel((3,), 8) == 1 and m._shard_numel((10, 3), 1) == 30
    shapes = [(300,), (511,), (512,), (4097,), (70, 33)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = bnb.optim.AdamW8bit(params, lr=1e-3, min_8bit_size=4096 // 8)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    expect = sum(m._adam8_bytes(p.numel(), 512) for p in params) + 2 * 256 * 4  # + the two shared maps
    assert optimizer_state_bytes(opt) == expect


def test_child_process_step_and_memory_watchdog(tmp_path):
    """A step in its own process (how the real-width run keeps each case's peak RSS its own) writes
    its result back; one whose resident memory passes the limit is killed and reported."""
    m = _script()
    conf = m.transformer_config("flux", "tiny", (1, 1))
    spec = {"name": "flux-1d1s", "family": "flux", "config": conf, "widths": m.encoder_widths("flux", conf),
            "resolution": 32, "seed": 0, "dir": str(tmp_path / "pipe")}
    res, err = m.run_child("build", spec, tmp_path, limit_bytes=1)
    assert res is None and err.startswith("killed: resident memory passed")
    res, err = m.run_child("build", spec, tmp_path, limit_bytes=8 * 2**30)
    assert err == "" and res["transformer_params"] == sum(
        p.numel() for p in __import__("diffusers").FluxTransformer2DModel.from_pretrained(
            str(tmp_path / "pipe" / "transformer")).parameters())
    assert (tmp_path / "pipe" / "model_index.json").is_file()
