"""The memory plan (fastflow.plan): its exact parts equal what the trainer really allocates (tiny
SD3 / FLUX / Qwen-Image / FLUX.2 [klein] / shapes policies on the CPU, one process and FSDP2 at 2
gloo ranks), its activation estimate is within a stated tolerance of the CPU memory profiler's
peak at two resolutions, every shipped config plans offline from shipped measurements, a run
that cannot fit stops before loading with advice, and bad input is one line.

Run as a script under torchrun, this file is the 2-rank worker of the FSDP2 test.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastflow import parallel, plan  # noqa: E402
from fastflow.config import ConfigError, load_config, parse_cli  # noqa: E402

pytestmark = pytest.mark.timeout(600)

PROMPTS = "a red cube\na blue ball\na green cat\n"
ACT_TOLERANCE = 0.15  # docs/memory.md: measured within 8 % on these cases


def tiny_args(kind, pipe, prompts, out_dir, *extra):
    """A tiny sd3 / flux run (fastflow.models._tiny) with the toy colour reward: 3 prompts x 4."""
    return ["--model.kind", kind, "--model.path", str(pipe), "--model.resolution", "32",
            "--model.lora_rank", "4", "--model.lora_alpha", "8", "--reward.weights", "{toy_color=1.0}",
            "--data.train_prompts", str(prompts), "--data.eval_prompts", str(prompts),
            "--data.prompt_cache", "off", "--model.offload_text_encoders", "false",
            "--sample.group_size", "4", "--sample.prompts_per_iter", "3", "--sample.batch_size", "3",
            "--sample.train_steps", "3", "--sample.eval_steps", "3", "--sample.window_size", "0",
            "--run.iterations", "1", "--eval.every", "0", "--eval.seeds", "1",
            "--eval.min_category_images", "0", "--log.progress", "false", "--log.tensorboard", "false",
            "--run.output_dir", str(out_dir), "--run.name", "plan", "--run.device", "cpu",
            "--train.optimizer_steps", "1", "--train.batch_size", "3", "--run.max_minutes", "0", *extra]


def shapes_args(out_dir, *extra):
    return ["--sample.group_size", "4", "--sample.prompts_per_iter", "2", "--sample.batch_size", "4",
            "--train.batch_size", "4", "--run.iterations", "1", "--eval.every", "0", "--log.progress", "false",
            "--log.tensorboard", "false", "--run.output_dir", str(out_dir), "--run.name", "plan",
            "--run.device", "cpu", "--run.max_minutes", "0", *extra]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for this module: the models here are tiny, and on a busy 2-core machine
    two threads spend milliseconds per operation waiting for each other (ten times the whole
    test). Byte counts do not depend on it; the activation protocol (docs/memory.md) runs the
    plan's measurements and the profiled step alike on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def exact_only(monkeypatch):
    """Plans without the measured parts (activations, VAE decode): the exact parts do not depend
    on them, and measuring costs seconds the exact tests do not need."""
    from fastflow.plan import assemble, measure

    zero = {"train": 0, "train_ckpt": 0, "rollout": 0, "eval": 0, "rollout_core": 0, "eval_core": 0,
            "casts": 0, "residual": 0.0}
    monkeypatch.setattr(assemble, "activations", lambda *a, **k: dict(zero))
    monkeypatch.setattr(measure, "vae_decode_bytes", lambda *a, **k: 0)


# --------------------------------------------------------------------------- what the trainer holds

def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a DTensor: its local shard's)."""
    seen = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            st = parallel.local(t).untyped_storage()
            seen[st.data_ptr() or id(st)] = st.nbytes()
    return sum(seen.values())


def measured_parts(trainer) -> dict[str, int]:
    """What a Trainer really holds, part by part, after one rollout and one optimizer step (the
    gradients read just before that step)."""
    pol = trainer.policy
    out: dict[str, int] = {}
    grads: dict[str, int] = {}
    real_step = trainer.optimizer_step

    def spy(params, it, stats=None):
        grads["grads"] = storage_bytes(p.grad for p in params if p.grad is not None)
        return real_step(params, it, stats)

    trainer.optimizer_step = spy
    rb = trainer.rollout(0)
    adv, _ = trainer.advantages(rb)
    trainer.train_on(rb, adv, 0)
    traj = rb.traj
    out["storage"] = storage_bytes([traj.latents, traj.next_latents, traj.log_probs, traj.final,
                                    traj.prompt_ids, *traj.cond.values()])
    sub = traj.select(torch.arange(trainer.derived.train_batch_size))
    out["microbatch"] = storage_bytes([sub.latents, sub.next_latents, sub.log_probs, sub.final,
                                       sub.prompt_ids, *sub.cond.values()])
    out["grads"] = grads["grads"]
    out["optimizer"] = parallel.optimizer_state_bytes(trainer.optimizer)
    out["ema"] = storage_bytes(trainer.ema.shadow.values()) if trainer.ema is not None else 0
    if getattr(trainer, "old_policy", None) is not None:  # DiffusionNFT's sampling policy
        out["old_policy"] = storage_bytes(trainer.old_policy.shadow.values())
    net = getattr(pol, "transformer", None) or getattr(pol, "model", None) or pol.net
    out["trainable"] = storage_bytes(p for p in net.parameters() if p.requires_grad)
    out["frozen"] = storage_bytes(p for p in net.parameters() if not p.requires_grad)
    out["buffers"] = storage_bytes(net.buffers())
    ref = getattr(getattr(pol, "tuning", None), "ref_transformer", None)
    if ref is not None:
        out["reference"] = storage_bytes([*ref.parameters(), *ref.buffers()])
    if hasattr(pol, "text_encoders"):
        out["encoders"] = storage_bytes(t for e in pol.text_encoders() for t in [*e.parameters(), *e.buffers()])
        out["vae"] = storage_bytes([*pol.pipe.vae.parameters(), *pol.pipe.vae.buffers()])
    return out


def build_trainer(argv, info=None):
    from fastflow.config import validate
    from fastflow.distributed import DistInfo
    from fastflow.train import Trainer

    args = parse_cli(argv)
    info = info or DistInfo(0, 1, 0, torch.device("cpu"))
    return Trainer(args.config, validate(args.config, info.world_size), info), args.config


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from fastflow.models._tiny import save_tiny_flux, save_tiny_flux2_klein, save_tiny_qwenimage, save_tiny_sd3

    root = tmp_path_factory.mktemp("pipes")
    prompts = root / "prompts.txt"
    prompts.write_text(PROMPTS)
    return {"sd3": save_tiny_sd3(root / "sd3"), "flux": save_tiny_flux(root / "flux"),
            "qwenimage": save_tiny_qwenimage(root / "qwenimage"),
            "flux2_klein": save_tiny_flux2_klein(root / "flux2_klein"), "prompts": prompts}


EXACT = ("trainable", "frozen", "buffers", "reference", "encoders", "vae", "grads", "optimizer", "ema",
         "old_policy", "storage", "microbatch")


def assert_exact(planned: plan.Plan, measured: dict[str, int]) -> None:
    assert set(measured) <= set(EXACT)
    for key, value in measured.items():
        got = planned.parts[key].bytes if key in planned.parts else 0  # no such part: nothing held
        assert got == value, f"{key}: planned {got} != allocated {value}"


@pytest.mark.parametrize("kind,finetune,dtype,optimizer", [
    ("sd3", "lora", "float32", "adamw"),
    ("flux", "full", "bfloat16", "adamw8bit"),
    ("qwenimage", "lora", "float32", "adamw"),
    ("flux2_klein", "full", "bfloat16", "adamw8bit"),
])
def test_exact_parts_equal_the_trainers_allocations(tmp_path, pipes, exact_only, kind, finetune, dtype, optimizer):
    """Weights, buffers, reference, encoders, VAE, gradients, optimizer state after a step, EMA,
    rollout storage and the micro-batch copy of a real one-process Trainer, byte for byte (LoRA in
    float32 with AdamW; full fine-tuning in bf16 with fp32 master weights, a separate reference and
    8-bit AdamW)."""
    if optimizer == "adamw8bit":
        pytest.importorskip("bitsandbytes")
    argv = tiny_args(kind, pipes[kind], pipes["prompts"], tmp_path, "--model.finetune", finetune,
                     "--model.dtype", dtype, "--train.optimizer", optimizer)
    trainer, cfg = build_trainer(argv)
    measured = measured_parts(trainer)
    assert measured["optimizer"] > 0 and measured["grads"] > 0
    assert_exact(plan.make_plan(cfg, 1, device="cpu", advice=False), measured)


@pytest.mark.parametrize("finetune,algorithm", [("lora", "grpo"), ("full", "nft")])
def test_exact_parts_of_the_shapes_policy(tmp_path, exact_only, finetune, algorithm):
    """The shapes policy's parts, its reference and sampling copies, and (DiffusionNFT) the old
    policy's float32 weights."""
    pytest.importorskip("peft")
    trainer, cfg = build_trainer(shapes_args(tmp_path, "--model.finetune", finetune, "--train.algorithm", algorithm))
    measured = measured_parts(trainer)
    assert ("old_policy" in measured) == (algorithm == "nft")
    planned = plan.make_plan(cfg, 1, device="cpu", advice=False)
    assert_exact(planned, measured)
    pol = trainer.policy  # the reference copy and (LoRA) the merged sampling copy, made by the rollout
    copies = storage_bytes([*pol._ref_model.parameters(), *pol._ref_model.buffers()])
    if finetune == "lora":
        copies += storage_bytes([*pol._merged.parameters(), *pol._merged.buffers()])
    assert sum(p.bytes for k, p in planned.parts.items() if k.startswith("extra:")) == copies


# --------------------------------------------------------------------------------- FSDP2, 2 ranks

def _worker() -> int:
    """torchrun worker: build the Trainer under FSDP2, one rollout and one optimizer step, write
    this rank's measured parts to OUT/rank{R}.json."""
    from fastflow.config import validate
    from fastflow.distributed import init_distributed, shutdown, world_size_from_env
    from fastflow.train import Trainer

    out, *argv = sys.argv[1:]
    args = parse_cli(argv)
    info = init_distributed("cpu")
    finished = False
    try:
        trainer = Trainer(args.config, validate(args.config, world_size_from_env()), info)
        parts = measured_parts(trainer)
        parts["strategy"] = trainer.strategy
        Path(out, f"rank{info.rank}.json").write_text(json.dumps(parts))
        finished = True
    finally:
        shutdown(info, finished)
    return 0


def _fsdp_argv(pipes, out_dir) -> list[str]:
    argv = tiny_args("sd3", pipes["sd3"], pipes["prompts"], out_dir / "runs", "--model.finetune", "full",
                     "--model.dtype", "bfloat16", "--train.optimizer", "adamw8bit",
                     "--distributed.strategy", "fsdp")
    argv[argv.index("--sample.group_size") + 1] = "2"  # 3 x 2 = 6 images: 3 per rank
    return argv


def _start_fsdp_run(pipes, out_dir):
    """The 2-rank FSDP2 run of tiny SD3 (torchrun, gloo), writing each rank's parts to out_dir."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(Path(__file__)), str(out_dir), *_fsdp_argv(pipes, out_dir)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module", autouse=True)
def fsdp_run(request, tmp_path_factory):
    """test_fsdp2_shards_at_two_ranks_equal_the_plan's 2-rank run, started in the background as
    this module starts (when that test is selected): its two processes spend most of their time
    importing, which overlaps the one-process tests instead of following them."""
    import importlib.util

    wanted = any(getattr(it, "originalname", it.name) == "test_fsdp2_shards_at_two_ranks_equal_the_plan"
                 for it in request.session.items)
    if not wanted or importlib.util.find_spec("bitsandbytes") is None:
        yield None
        return
    try:
        pipes = request.getfixturevalue("pipes")
    except pytest.skip.Exception:
        yield None
        return
    out_dir = tmp_path_factory.mktemp("fsdp")
    proc = _start_fsdp_run(pipes, out_dir)
    yield proc, out_dir
    if proc.poll() is None:  # the test never collected it
        proc.kill()
        proc.wait()


def test_fsdp2_shards_at_two_ranks_equal_the_plan(pipes, fsdp_run, exact_only):
    """Per-rank shards, gradient buffers, the sharded reference, 8-bit AdamW state (decided per
    local shard) and EMA of both ranks of a 2-rank FSDP2 full fine-tuning run equal the plan for
    that rank (uneven chunks: test_fsdp2_chunks; the tiny model's first dimensions are even)."""
    pytest.importorskip("bitsandbytes")
    proc, out_dir = fsdp_run
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        raise AssertionError("the 2-rank run took over 300 s: " + output[-4000:]) from None
    assert proc.returncode == 0, output[-4000:]
    from fastflow.plan import layout

    argv = _fsdp_argv(pipes, out_dir)
    cfg = load_config(None, argv)
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    for m in ranks:
        assert m.pop("strategy") == "fsdp"
    # the sharded layout set up for FSDP2 directly, and taken from the one-process layout (which
    # the plan does when the policy places both alike: layout._shard_invariant)
    for derived in (False, True):
        layout._LAYOUTS.clear()
        if derived:
            plan.make_plan(cfg, 1, device="cpu", advice=False)
        for rank, measured in enumerate(ranks):
            planned = plan.make_plan(cfg, 2, device="cpu", advice=False, rank=rank)
            assert planned.strategy == "fsdp"
            assert_exact(planned, measured)


# ----------------------------------------------------------------------------------- small parts

def test_parse_size():
    assert plan.parse_size("80GiB") == 80 * 2**30
    assert plan.parse_size("80GB") == 80 * 10**9
    assert plan.parse_size("81920MiB") == 80 * 2**30
    assert plan.parse_size("141") == 141 * 2**30
    for bad in ("", "abc", "0GiB", "-3GB", "12XB", "banana"):
        with pytest.raises(ValueError):
            plan.parse_size(bad)


def test_optimizer_state_formulas_equal_the_optimizers():
    bnb = pytest.importorskip("bitsandbytes")
    sizes = [(4095,), (4096,), (300, 17), (257,), (64, 64), (5000, 3)]  # both sides of 8-bit's 4096
    params = [torch.nn.Parameter(torch.randn(*s)) for s in sizes]
    opt = bnb.optim.AdamW8bit(params, lr=1e-3)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert parallel.optimizer_state_bytes(opt) == plan.adamw8bit_state_bytes([p.numel() for p in params])
    opt2 = torch.optim.AdamW(params, lr=1e-3, foreach=True)
    opt2.step()
    assert parallel.optimizer_state_bytes(opt2) == plan.adamw_state_bytes([p.numel() for p in params])


def test_fsdp2_chunks():
    spec = plan.TensorSpec("w", (7, 5), torch.float32)
    assert [plan.local_numel(spec, 2, r) for r in (0, 1)] == [20, 15]
    assert plan.padded_numel(spec, 2) == 20
    assert [plan.local_numel(spec, 8, r) for r in range(8)] == [5] * 7 + [0]


# ------------------------------------------------------------------------------------ activations

def _profiled_step(policy, cfg, ckpt: bool) -> tuple[int, int]:
    """CPU profiler peaks of one trained step as the trainer runs it (the policy forward with
    grad, the reference forward when train.beta > 0, the per-step loss, the backward; gradients
    already allocated by an earlier step) and of one no-grad rollout step, above what was alive
    before."""
    from fastflow import ops
    from fastflow.rollout import recompute_step, sample
    from fastflow.runtime import forward_context

    if ckpt:  # as the trainer applies it: every block of the transformer
        parallel.apply_activation_checkpointing(parallel.policy_modules(policy)[1])
    fwd = forward_context(cfg, torch.device("cpu"))
    s = cfg.sample
    if hasattr(policy, "fit_prompts"):  # Qwen-Image: the text length the trainer fits to the prompt lists
        policy.fit_prompts(PROMPTS.splitlines())
    cond = policy.encode_prompts(["a red cube", "a blue ball", "a green cat"][: s.batch_size])
    traj = sample(policy, cond, num_steps=2, guidance_scale=s.guidance_scale, noise_level=0.7,
                  generator=torch.Generator().manual_seed(0), device="cpu", autocast=fwd)
    adv = torch.linspace(-1, 1, s.batch_size)

    beta = cfg.train.beta

    def step():  # as Trainer.train_on: the reference forward only with a KL term
        v = recompute_step(policy, traj, 0, guidance_scale=s.guidance_scale, autocast=fwd)
        ref = None
        if beta > 0:
            with torch.no_grad():
                ref = recompute_step(policy, traj, 0, guidance_scale=s.guidance_scale, autocast=fwd, reference=True)
        loss, _ = ops.grpo_step_loss(traj.latents[:, 0], traj.next_latents[:, 0], v, traj.sigmas[0],
                                     traj.sigmas_next[0], traj.log_probs[:, 0], adv, noise_level=0.7,
                                     clip_range=1e-4, beta=beta, velocity_ref=ref, sigma_guard=traj.sigma_guard)
        loss.backward()

    step()
    train = plan.peak_bytes(step)
    # one sampling step (Qwen-Image's terminal stretch needs two: its storage is a few KiB here)
    n_roll = 2 if cfg.model.kind == "qwenimage" else 1
    with torch.no_grad():
        roll = plan.peak_bytes(lambda: sample(policy, cond, num_steps=n_roll, guidance_scale=s.guidance_scale,
                                              noise_level=0.7, generator=torch.Generator().manual_seed(0),
                                              device="cpu", autocast=fwd))
    return train, roll


@pytest.mark.parametrize("kind,finetune,ckpt", [("sd3", "lora", False), ("flux", "full", True),
                                                ("qwenimage", "lora", False), ("flux2_klein", "full", True)])
def test_activation_estimate_within_tolerance_of_the_cpu_peak(tmp_path, pipes, kind, finetune, ckpt):
    """The plan's training and rollout activations (bf16) against the CPU profiler's peaks of the
    real policy, at 32 and 64 px (SD3: 64 and 256 image tokens; FLUX: 16 and 64), without and with
    activation checkpointing."""
    from fastflow.models import build_policy
    from fastflow.plan.activations import activations

    errors = []
    for res in (32, 64):
        argv = tiny_args(kind, pipes[kind], pipes["prompts"], tmp_path, "--model.finetune", finetune,
                         "--model.dtype", "bfloat16", "--model.resolution", str(res),
                         "--distributed.activation_checkpointing", str(ckpt).lower())
        cfg = load_config(None, argv)
        layout = plan.build_layout(cfg, shard=False)
        b = (cfg.sample.batch_size, 2 if layout.cfg_doubles and cfg.sample.guidance_scale > 1 else 1)
        act = activations(cfg, layout, torch.bfloat16, False, finetune == "full", b, b, b, False, 1)
        torch.manual_seed(0)
        train, roll = _profiled_step(build_policy(cfg, torch.device("cpu")), cfg, ckpt)
        planned = act["train_ckpt" if ckpt else "train"]
        errors.append((res, (planned - train) / train, (act["rollout"] - roll) / roll))
    print(f"{kind} {finetune} ckpt {ckpt} activation error (res, train, rollout): {errors}", file=sys.stderr)
    for res, e_train, e_roll in errors:
        assert abs(e_train) <= ACT_TOLERANCE and abs(e_roll) <= ACT_TOLERANCE, errors


def test_saved_activations_extrapolate_exactly_to_a_wider_deeper_model():
    """The saved-bytes fit of scaled copies (head dims 4 and 8, ranks 2 and 4, one block per kind)
    predicts, exactly, what a wider, deeper transformer with another LoRA rank saves at other batch
    and token counts: the extrapolation the plan makes to the published widths."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from fastflow.plan import arch, fit, scaled

    config = {"sample_size": 16, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 6,
              "attention_head_dim": 32, "num_attention_heads": 3, "joint_attention_dim": 256,
              "caption_projection_dim": 96, "pooled_projection_dim": 128, "pos_embed_max_size": 16,
              "dual_attention_layers": [0, 1, 2], "qk_norm": "rms_norm"}  # 2 dual + 2 plain after the first
    targets = arch.default_targets("sd3")
    model_fit = fit.measure_transformer("sd3", config, lora=True, targets=targets, dtype=torch.bfloat16,
                                        trainable_dtype=torch.float32)
    assert model_fit.fit_residual < 1e-6
    model = scaled.build_scaled("sd3", config, True, 6, 2.0, targets, torch.float32, torch.bfloat16)
    counter = plan.SavedTensors(model, arch.transformer_blocks("sd3", model))
    for B, side, nt in ((3, 6, 7), (2, 8, 20)):
        kw = scaled.scaled_inputs("sd3", config, B, side * side, nt, torch.bfloat16)
        per, _, _ = counter(lambda: scaled.forward(model, kw, torch.bfloat16))
        assert model_fit.saved(B, side * side, nt, 6) == sum(per.values())


# ---------------------------------------------------------------------------------- the command

def _shipped_configs():
    return sorted((ROOT / "configs").glob("*.toml"))


@pytest.fixture
def no_measuring(monkeypatch):
    """Any measurement fails the test: a shipped config must plan from shipped measurements."""
    from fastflow.plan import fit, measure

    def refuse(*a, **k):
        raise AssertionError("measured at plan time: python -m fastflow.plan.refresh")
    for mod, name in ((fit, "measure_transformer"), (fit, "measure_transients"), (measure, "measure_vae_decode"),
                      (measure, "measure_small_policy"), (measure, "measure_step_overhead")):
        monkeypatch.setattr(mod, name, refuse)


def test_every_shipped_config_plans_offline_from_shipped_measurements(monkeypatch, capsys, no_measuring):
    """``--plan`` of every shipped config (sd3, flux, qwenimage, flux2_klein, shapes) prints a
    per-rank plan with no network, no model files and no measuring (published configs and
    measurements shipped in fastflow/plan/published), at its multi-GPU size and on one small GPU
    (advice)."""
    from fastflow.config import validate
    from fastflow.train import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    configs = _shipped_configs()
    assert {load_config(str(p)).model.kind for p in configs} >= {"sd3", "flux", "qwenimage", "flux2_klein", "shapes"}
    codes = set()
    advised = set()  # one config per architecture also on a GPU too small for it: the advice's variants
    for path in configs:
        cfg = plan.offline_copy(load_config(str(path)))[0]
        gpus = next((n for n in (8, 2) if _valid(validate, cfg, n)), 1)
        runs = [(gpus, "80GiB")]
        if (cfg.model.kind, cfg.model.path) not in advised:
            advised.add((cfg.model.kind, cfg.model.path))
            runs.append((1, "4GiB"))
        for world, memory in runs:
            code = main([str(path), "--plan", "--plan-gpus", str(world), "--plan-gpu-memory", memory])
            out = capsys.readouterr().out
            assert code in (0, 1), path
            assert "per rank" in out and "phases" in out and ("fits:" in out or "does not fit" in out), out
            for part in ("trainable weights", "gradients", "optimizer state", "rollout storage", "activations"):
                assert part in out, (path, part)
            codes.add(code)
            if code == 1:
                assert "does not fit" in out and "settings that bring it down" in out
    assert codes == {0, 1}  # fits at its size; does not on a small GPU (exit 1, with advice)


def _valid(validate, cfg, n) -> bool:
    try:
        validate(cfg, n)
        return True
    except ConfigError:
        return False


def test_a_run_that_cannot_fit_gets_advice_that_holds(no_measuring):
    """Full fine-tuning of SD3.5-Medium on one 24 GiB GPU: each advised setting, planned again with
    exactly those overrides, gives the peak the advice says (``--plan`` exits 1 with it printed:
    test_every_shipped_config_plans_offline_from_shipped_measurements)."""
    from fastflow.config import apply_overrides

    base = plan.offline_copy(load_config("configs/pickscore.toml", ["--model.finetune", "full"]))[0]
    p = plan.make_plan(base, 1, gpu_memory=24 * 2**30)
    assert p.advice and not p.fits
    out = p.render()
    assert "does not fit" in out and "settings that bring it down" in out
    assert all(a.setting in out for a in p.advice)
    for a in p.advice:
        assert a.peak < p.peak and a.saves == p.peak - a.peak
        again = plan.make_plan(apply_overrides(copy.deepcopy(base), a.overrides), a.world,
                               gpu_memory=24 * 2**30, advice=False)
        assert again.peak == a.peak, a.setting
    assert any(a.fits for a in p.advice) or (p.combined is not None and p.combined.fits)


def _fake_gpu(monkeypatch, total: int):
    import fastflow.distributed as dist

    monkeypatch.setattr(dist, "pick_device", lambda pref, local_rank=0: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i=0: types.SimpleNamespace(total_memory=total, name="Fake GPU"))


def test_startup_refuses_a_run_that_cannot_fit_before_anything_loads(tmp_path, monkeypatch, capsys):
    """On CUDA (faked: a 1 GiB GPU) the trainer plans at start-up and stops with exit 2 and a few
    lines of advice on rank 0, before any run directory exists; every rank takes the same decision
    (rank 1 prints nothing and stops too); --no-plan-check skips the check."""
    from fastflow import train

    _fake_gpu(monkeypatch, 1 << 30)
    argv = shapes_args(tmp_path, "--sample.batch_size", "4", "--eval.batch_size", "128")
    cfg = load_config(None, argv)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert train.memory_plan_refused(cfg)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[0].startswith("fastflow: memory plan: does not fit") and 2 <= len(lines) <= 5, err
    assert "it would fit with:" in err and "--no-plan-check" in err
    assert plan.startup_check(cfg, 1, local_rank=1) == plan.startup_check(cfg, 1, local_rank=0)
    monkeypatch.setenv("RANK", "1")
    assert train.memory_plan_refused(cfg) and capsys.readouterr().err == ""
    monkeypatch.delenv("RANK")
    # through main(): exit 2 before loading (the run directory is never made)
    assert train.main(argv) == 2
    assert "does not fit" in capsys.readouterr().err
    assert not (tmp_path / "plan").exists()
    # on an 80 GiB GPU the same run starts (the check says nothing)
    _fake_gpu(monkeypatch, 80 << 30)
    assert not train.memory_plan_refused(cfg)
    assert parse_cli([*argv, "--no-plan-check"]).plan_check is False


def test_startup_refuses_qwenimage_on_one_small_gpu_with_advice(monkeypatch, capsys, no_measuring):
    """The shipped Qwen-Image recipe on one 48 GiB GPU (faked): refused before anything loads, with
    what would make it fit (more GPUs: every rank gathers the 38 GiB bf16 base while sampling),
    from shipped configurations and measurements only."""
    from fastflow import train

    _fake_gpu(monkeypatch, 48 << 30)
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_config("configs/qwenimage_pickscore.toml")
    assert train.memory_plan_refused(cfg)
    err = capsys.readouterr().err
    assert err.startswith("fastflow: memory plan: does not fit") and "48.00 GiB" in err, err
    assert "it would fit with:" in err and "GPUs" in err, err


def test_cpu_runs_are_never_refused(tmp_path):
    cfg = load_config(None, shapes_args(tmp_path, "--eval.batch_size", "100000"))
    assert plan.startup_check(cfg, 1) is None


@pytest.mark.parametrize("argv,msg", [
    (["--plan", "--plan-gpus", "0"], "--plan-gpus must be an integer >= 1"),
    (["--plan", "--plan-gpus", "x"], "--plan-gpus must be an integer >= 1"),
    (["--plan", "--plan-gpu-memory", "banana"], "--plan-gpu-memory must be a size"),
    (["--plan", "--plan-gpus"], "--plan-gpus needs a value"),
    (["--plan-gpus", "4"], "only go with --plan"),
])
def test_bad_plan_flags_are_one_line(argv, msg, capsys):
    from fastflow.train import main

    with pytest.raises(ConfigError, match=msg):
        parse_cli(argv)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg.split()[0] in err[0], err


def test_bad_input_to_plan_is_one_line(capsys):
    from fastflow.train import main

    # 12 x 8 = 96 images do not split over 5 ranks
    assert main(["configs/shapes.toml", "--plan", "--plan-gpus", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastflow: config:") and "5 rank" in err[0]
    assert main(["--model.kind", "sd3", "--model.path", "someone/unknown-model", "--plan"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no shipped config" in err[0]
    assert main(["configs/qwenimage_pickscore.toml", "--model.path", "black-forest-labs/FLUX.2-klein-base-4B",
                 "--plan"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a flux2_klein model, but model.kind is qwenimage" in err[0], err


if __name__ == "__main__":
    sys.exit(_worker())
