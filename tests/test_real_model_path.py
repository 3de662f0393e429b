"""The path users come for (SD3.5 / FLUX in bf16 through the trainer), on tiny random pipelines:
fp32 master weights for full fine-tuning, the on-policy ratio exactly 1 in bf16 with the paper's
clip range, prompt lists encoded once (and the text encoders offloaded), reward devices,
resume of a run directory, and host synchronisations that do not grow with the step count."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from fastflow import train as train_mod  # noqa: E402
from fastflow.config import ConfigError, load_config, validate  # noqa: E402
from fastflow.distributed import DistInfo  # noqa: E402
from fastflow.models._tiny import save_tiny_flux, save_tiny_sd3  # noqa: E402
from fastflow.models.prompt_cache import EmbeddingStore, PromptCache  # noqa: E402

SOLO = DistInfo(0, 1, 0, torch.device("cpu"))
PROMPTS = ["a red cube", "a blue ball", "a green cat"]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {"sd3": save_tiny_sd3(root / "sd3"), "flux": save_tiny_flux(root / "flux")}


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    p.write_text("\n".join(PROMPTS) + "\n")
    return p


def cpu_test_values(kind: str) -> list[str]:
    """Overrides that give a tiny ``kind`` pipeline the CPU values of the shapes preset (float32,
    every step trained, EMA each step, ...) where ``kind``'s own defaults (its published GPU recipe:
    bf16, a KL of 0.01, ...) differ; a test's own arguments come after and win."""
    from fastflow import config as C

    cpu, own = C.config_to_dict(C.preset_config("shapes")), C.config_to_dict(C.preset_config(kind))
    return [tok for s in cpu for k in cpu[s] if cpu[s][k] != own[s][k] and (s, k) not in (("model", "kind"), ("run", "name"))
            for tok in (f"--{s}.{k}", C._toml_value(cpu[s][k]))]


def trainer(tmp_path, kind, pipe, prompts, *extra, device=SOLO):
    """A one-process trainer of the tiny ``kind`` pipeline: 3 prompts x 4 images, 3 steps (all SDE
    and trained), the paper's clip range 1e-4, one optimizer step per iteration."""
    args = [*cpu_test_values(kind), "--model.kind", kind, "--model.path", str(pipe), "--model.resolution", "32",
            "--model.lora_rank", "4", "--model.lora_alpha", "8", "--reward.weights", "{toy_color=1.0}",
            "--data.train_prompts", str(prompts), "--data.eval_prompts", str(prompts),
            "--data.prompt_cache", str(tmp_path / "cache"),
            "--sample.group_size", "4", "--sample.prompts_per_iter", "3", "--sample.batch_size", "6",
            "--sample.train_steps", "3", "--sample.eval_steps", "3", "--sample.window_size", "0",
            "--sample.guidance_scale", "4.5" if kind == "sd3" else "3.5",
            "--run.iterations", "2", "--eval.every", "0", "--eval.seeds", "1",
            "--eval.min_category_images", "0", "--checkpoint.every", "1", "--log.progress", "false",
            "--log.tensorboard", "false", "--run.output_dir", str(tmp_path / "runs"), "--run.name", kind,
            "--train.optimizer_steps", "1", "--train.clip_range", "1e-4", "--train.batch_size", "0",
            "--run.max_minutes", "0", "--distributed.strategy", "none", *extra]
    cfg = load_config(None, args)
    return train_mod.Trainer(cfg, validate(cfg, 1), device)


def one_iteration(t, it=0):
    rb = t.rollout(it)
    adv, _ = t.advantages(rb)
    return t.train_on(rb, adv, it)


# ------------------------------------------------------------------------- fp32 master weights

@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_full_finetune_trains_fp32_master_weights_in_bf16(tmp_path, pipes, prompt_file, kind):
    """model.dtype bf16 is the compute dtype; full fine-tuning keeps its trained weights and AdamW
    state in float32 (an update of lr x 1e-2 relative size rounds to nothing in bf16), and a
    frozen bf16 reference equal to the base weights."""
    t = trainer(tmp_path, kind, pipes[kind], prompt_file, "--model.finetune", "full",
                "--model.dtype", "bfloat16", "--train.lr", "1e-6", "--train.ema", "false")
    params = t.params
    assert params and all(p.dtype == torch.float32 for p in params.values())
    ref = dict(t.policy.tuning.ref_transformer.named_parameters())
    # the reference's matrices in bf16, its vectors (norms, biases) as the policy's: fp32
    assert all(p.dtype == (torch.bfloat16 if p.ndim >= 2 else torch.float32) and not p.requires_grad
               for p in ref.values())
    start = {n: p.detach().clone() for n, p in params.items()}
    for n, p in start.items():  # the reference is the base (the weights as loaded in bf16)
        assert torch.equal(ref[n[len("transformer."):]], p.to(ref[n[len("transformer."):]].dtype)), n
    one_iteration(t)
    assert t.optimizer_steps == 1
    state = [t.optimizer.state[p] for p in params.values()]
    assert all(s["exp_avg"].dtype == torch.float32 and s["exp_avg_sq"].dtype == torch.float32 for s in state)
    # lr 1e-6: AdamW moves each weight by about 1e-6, far below bf16's resolution (2^-8 relative);
    # fp32 master weights keep those updates, bf16 ones would not move at all.
    moved = below_bf16 = 0
    for n, p in params.items():
        d = p.detach() != start[n]
        moved += int(d.sum())
        below_bf16 += int((d & (p.detach().to(torch.bfloat16) == start[n].to(torch.bfloat16))).sum())
    assert moved > 0 and below_bf16 > 0.5 * moved, (moved, below_bf16)


def test_lora_keeps_a_bf16_base_and_fp32_adapter(tmp_path, pipes, prompt_file):
    t = trainer(tmp_path, "sd3", pipes["sd3"], prompt_file, "--model.dtype", "bfloat16")
    assert all(p.dtype == torch.float32 for p in t.params.values())
    frozen = [p for n, p in t.policy.transformer.named_parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert t.policy.tuning.ref_transformer is None  # the reference is the adapter-disabled base


# ------------------------------------------------------------------------- on-policy ratio

def _onpolicy_case(tmp_path, pipes, prompt_file, kind, finetune, device_info=SOLO):
    t = trainer(tmp_path, kind, pipes[kind], prompt_file, "--model.dtype", "bfloat16",
                "--model.finetune", finetune, "--train.lr", "1e-3", device=device_info)
    out = one_iteration(t)
    return t, out


@pytest.mark.parametrize("finetune", ["lora", "full"])
@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_first_pass_reproduces_the_rollout_in_bf16(tmp_path, pipes, prompt_file, kind, finetune):
    """bf16 autocast, the paper's clip range 1e-4: the training pass before the first optimizer
    step must reproduce every recorded log-prob exactly (clipfrac 0, ratio exactly 1), because the
    rollout, the recompute and the reference run in one forward context."""
    t, out = _onpolicy_case(tmp_path, pipes, prompt_file, kind, finetune)
    assert out["onpolicy/clipfrac"] == 0.0
    assert out["onpolicy/ratio_dev_max"] == 0.0
    assert out["kl"] == 0.0  # policy == reference before the first update (all steps on-policy here)
    assert t.optimizer_steps == 1


def test_first_pass_statistic_sees_a_forward_context_mismatch(tmp_path, pipes, prompt_file):
    """The logged on-policy statistic is what catches a rollout that ran other kernels than the
    training pass: here the rollout samples under bf16 autocast while training recomputes in fp32."""
    t = trainer(tmp_path, "sd3", pipes["sd3"], prompt_file)
    from fastflow.runtime import ForwardContext

    train_fwd = t.forward
    t.forward = ForwardContext("cpu", torch.bfloat16)
    rb = t.rollout(0)
    t.forward = train_fwd
    adv, _ = t.advantages(rb)
    out = t.train_on(rb, adv, 0)
    assert out["onpolicy/ratio_dev_max"] > 1e-4 and out["onpolicy/clipfrac"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_first_pass_reproduces_the_rollout_in_bf16_on_gpu(tmp_path, pipes, prompt_file, kind):
    """The same on a CUDA device: graph-captured rollout, fused kernels, SDPA/cuDNN attention."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    info = DistInfo(0, 1, 0, torch.device("cuda", 0))
    for finetune in ("lora", "full"):
        t, out = _onpolicy_case(tmp_path / finetune, pipes, prompt_file, kind, finetune, info)
        assert out["onpolicy/clipfrac"] == 0.0, (finetune, out)
        assert out["onpolicy/ratio_dev_max"] == 0.0, (finetune, out)


# ------------------------------------------------------------------------- prompts encoded once

def test_prompt_cache_rows_own_their_bytes():
    """Rows are compact copies: 40 prompts encoded in batches of 32 hold 40 rows' bytes, not the
    two whole batches a view per row would keep alive."""
    def encode(ps):
        return {"e": torch.randn(len(ps), 10, 8), "p": torch.randn(len(ps), 8)}

    cache = PromptCache(encode, chunk=32)
    texts = [f"prompt {i}" for i in range(40)]
    out = cache(texts)
    row = (10 * 8 + 8) * 4
    assert cache.nbytes == 40 * row
    assert out["e"].shape == (40, 10, 8)
    small = PromptCache(encode, chunk=8, max_bytes=10 * row)  # evicts past the byte budget
    small(texts)
    assert small.nbytes <= 10 * row and len(small._rows) == 10


def test_warm_keeps_a_prompt_list_without_a_disk_store():
    """data.prompt_cache = "off": the lists are encoded in batches into host rows kept for the run,
    outside the LRU budget (nothing is stacked whole, nothing re-encoded later)."""
    calls = []

    def encode(ps):
        calls.append(len(ps))
        return {"e": torch.randn(len(ps), 10, 8)}

    row = 10 * 8 * 4
    cache = PromptCache(encode, chunk=8, max_bytes=5 * row)
    texts = [f"prompt {i}" for i in range(40)]
    cache.warm(texts)
    assert calls == [8] * 5 and cache.nbytes == 40 * row
    cache(texts[::-1])
    cache(["another"])  # an outside prompt goes to the LRU, the kept rows stay
    assert calls == [8] * 5 + [1] and cache.nbytes == 41 * row


def test_store_equals_the_uncached_encoder_and_is_reused(tmp_path, pipes):
    from fastflow.models import build_policy
    from tests.tiny_pipelines import tiny_cfg

    policy = build_policy(tiny_cfg("sd3", pipes["sd3"]), "cpu")
    direct = policy._encode(list(PROMPTS))  # one batch, as the store encodes them (one rank, one chunk)
    policy.cache_prompts(PROMPTS, cache_dir=tmp_path / "c", offload=True)
    store = policy._cache.store
    assert isinstance(store, EmbeddingStore) and len(store) == len(PROMPTS)
    got = policy.encode_prompts(list(reversed(PROMPTS)))
    for k in direct:
        assert torch.equal(got[k], direct[k].flip(0)), k
    assert store.nbytes > sum(v.numel() * v.element_size() for v in direct.values())
    # a second run with the same model and prompts reads the store, encodes nothing
    again = build_policy(tiny_cfg("sd3", pipes["sd3"]), "cpu")
    calls = []
    real = again._encode
    again._cache._encode = lambda ps: calls.append(list(ps)) or real(ps)
    again.cache_prompts(PROMPTS, cache_dir=tmp_path / "c")
    assert again._cache.store.directory == store.directory and calls == []
    # other weights at the same path: another key (never a stale store)
    other = build_policy(tiny_cfg("sd3", pipes["sd3"]), "cpu")
    with torch.no_grad():
        next(other.pipe.text_encoder.parameters()).add_(1.0)
    other.cache_prompts(PROMPTS, cache_dir=tmp_path / "c")
    assert other._cache.store.directory != store.directory
    # prompts outside the lists still encode (on the encoders' device, here the host)
    out = policy.encode_prompts(["a yellow bird"])
    assert torch.equal(out["prompt_embeds"][0], policy._encode(["a yellow bird"])["prompt_embeds"][0])


def _store_ranks(tmp_path, *mode):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(root / "tests" / "store_worker.py"), str(tmp_path / "cache"), str(tmp_path / "out"), *mode]
    p = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    return [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.timeout(300)
def test_store_parts_of_several_ranks_merge_and_a_second_run_reuses_them(tmp_path):
    """Two ranks each encode their slice (11 prompts: 6 and 5, in part files of 3 prompts); the
    manifest maps every prompt to its part and row; a second build encodes nothing."""
    first = _store_ranks(tmp_path)
    assert [r["encoded"] for r in first] == [6, 5]
    for r in first:
        assert r["rows"] == [10.0, 3.0, 0.0] and r["parts"] == 4
    again = _store_ranks(tmp_path)
    assert [r["encoded"] for r in again] == [0, 0] and again[0]["rows"] == [10.0, 3.0, 0.0]


@pytest.mark.timeout(300)
def test_a_store_not_shared_by_the_ranks_stops_every_rank_with_one_line(tmp_path):
    """A cache folder local to each rank (nodes with their own disks): rank 0 cannot see rank 1's
    part. Every rank must stop with the same one-line reason, none may wait alone in a collective
    (a hang would hit the launch timeout)."""
    for _ in range(2):  # the first build, then again with rank 0's half-built folder present
        ranks = _store_ranks(tmp_path, "per-rank")
        assert all("error" in r and "data.prompt_cache" in r["error"] for r in ranks), ranks
        assert all("\n" not in r["error"] for r in ranks)


def test_trainer_encodes_its_prompt_lists_once(tmp_path, pipes, prompt_file):
    t = trainer(tmp_path, "sd3", pipes["sd3"], prompt_file)
    store = t.policy._cache.store
    assert store is not None and set(store.index) == set(PROMPTS)
    assert (store.directory / "manifest.json").is_file()
    assert str(store.directory).startswith(str(tmp_path / "cache"))
    calls = []
    t.policy._cache._encode = lambda ps: calls.append(ps) or (_ for _ in ()).throw(AssertionError(ps))
    t.rollout(0)  # every prompt comes from the store
    assert calls == []


# ------------------------------------------------------------------------- rewards

def test_reward_device_defaults_to_the_rank_and_an_option_overrides_it():
    from fastflow.rewards import WeightedReward

    r = WeightedReward({"toy_color": 1.0, "shapes": 1.0}, "cuda:3", {"shapes": {"device": "cpu"}})
    assert r.devices == {"toy_color": "cuda:3", "shapes": "cpu"}
    assert r.rewards["toy_color"].device == "cuda:3" and r.rewards["shapes"].device == "cpu"


def test_reward_devices_are_checked_before_anything_loads():
    for args, key in ((["--reward.device", "gpu"], "reward.device"),
                      (["--reward.options", '{shapes = {device = "tpu"}}'], "reward.options.shapes.device")):
        with pytest.raises(ConfigError, match=key):
            validate(load_config(None, args))
    for dev in ("", "cpu", "cuda", "cuda:1"):
        validate(load_config(None, ["--reward.device", dev]))
    with pytest.raises(ConfigError, match="every rank's reward on that one GPU"):
        validate(load_config(None, ["--reward.device", "cuda:1", "--sample.batch_size", "12"]), 2)
    validate(load_config(None, ["--reward.device", "cuda", "--sample.batch_size", "12"]), 2)


def test_clip_scorers_run_in_bf16_on_cuda_and_fp32_on_cpu():
    from fastflow.rewards._clip import resolve_dtype

    assert resolve_dtype("auto", "cuda:0") == torch.bfloat16
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("float32", "cuda") == torch.float32


def test_a_served_reward_loads_no_model_on_the_ranks(monkeypatch):
    import fastflow.rewards._clip as clip

    def no_clip(*a, **k):
        raise AssertionError("a rank loaded a CLIP model for a served reward")

    monkeypatch.setattr(clip, "load_clip", no_clip)
    from fastflow.rewards import WeightedReward

    r = WeightedReward({"remote": 1.0}, "cuda:0", {"remote": {"url": "http://127.0.0.1:9", "reward": "pickscore"}})
    assert type(r.rewards["remote"]).__name__ == "RemoteReward"


def test_trainer_passes_its_device_to_the_rewards(tmp_path, pipes, prompt_file):
    t = trainer(tmp_path, "sd3", pipes["sd3"], prompt_file)
    assert t.reward.devices == {"toy_color": "cpu"}


# ------------------------------------------------------------------------- resume

def test_resume_of_a_run_directory_continues_in_it(tmp_path):
    from tests.test_train import toy_cfg

    cfg, d = toy_cfg(tmp_path, "--run.iterations", "2", "--checkpoint.every", "1")
    t = train_mod.Trainer(cfg, d, SOLO)
    t.run()
    run_dir = t.run_dir
    cfg = load_config(str(run_dir / "config.toml"), ["--run.iterations", "3"])
    again = train_mod.Trainer(cfg, validate(cfg, 1), SOLO, resume=str(run_dir))
    assert again.run_dir == run_dir.resolve() and again.iteration == 2
    again.run()
    its = [json.loads(l)["iteration"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()
           if "reward_mean" in json.loads(l)]
    assert its == [1, 2, 3]
    assert (run_dir / "config.before-iter-000002.toml").is_file()  # the earlier config is kept
    assert "iterations = 3" in (run_dir / "config.toml").read_text()
    assert not (run_dir.parent / f"{run_dir.name}-1").exists()


def test_bare_resume_continues_the_newest_of_a_name_and_its_numbered_siblings(tmp_path):
    """A run started while runs/NAME held an earlier run writes to runs/NAME-1; a bare --resume
    must continue that one (the newest checkpoint), not the older run, and with no checkpoint at
    all it starts fresh in a new directory instead of on top of the old run."""
    import os
    import time

    from tests.test_train import toy_cfg

    cfg, d = toy_cfg(tmp_path, "--run.iterations", "2", "--checkpoint.every", "1")
    first = train_mod.Trainer(cfg, d, SOLO)
    first.run()
    second = train_mod.Trainer(cfg, d, SOLO)  # the name is taken: this one goes to toy-1
    assert second.run_dir.name == "toy-1"
    second.run()
    old = first.run_dir / "checkpoints" / "iter-000002" / "state.json"
    os.utime(old, (time.time() - 3600, time.time() - 3600))  # the earlier run's checkpoint is older
    cfg3, d3 = toy_cfg(tmp_path, "--run.iterations", "3", "--checkpoint.every", "1")
    resumed = train_mod.Trainer(cfg3, d3, SOLO, resume="auto")
    assert resumed.run_dir == second.run_dir.resolve() and resumed.iteration == 2
    empty, d4 = toy_cfg(tmp_path / "other", "--run.iterations", "1")
    (tmp_path / "other" / "toy").mkdir(parents=True)
    (tmp_path / "other" / "toy" / "metrics.jsonl").write_text("")  # an old run without checkpoints
    fresh = train_mod.Trainer(empty, d4, SOLO, resume="auto")
    assert fresh.run_dir.name == "toy-1" and fresh.iteration == 0


def test_bad_resume_is_one_line_before_anything_loads(tmp_path, monkeypatch):
    cfg = load_config(None, ["--run.output_dir", str(tmp_path / "runs")])
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run" / "config.toml").write_text("")
    half = tmp_path / "r" / "checkpoints" / "iter-000004"
    half.mkdir(parents=True)  # killed while writing: no state.json
    bad = tmp_path / "b" / "checkpoints" / "iter-000002"
    bad.mkdir(parents=True)
    (bad / "state.json").write_text('{"iteration": 2}')
    (bad / "trainable.safetensors").write_bytes(b"truncated")
    cases = {str(tmp_path / "nowhere"): "no such run directory",
             str(tmp_path / "empty_run"): "holds no complete checkpoint",
             str(half): "incomplete checkpoint",
             str(tmp_path / "b"): "not a readable safetensors file",
             str(tmp_path): "neither a run directory"}
    for arg, msg in cases.items():
        with pytest.raises(ConfigError, match=msg):
            train_mod.resolve_resume(arg, cfg)
    # through the CLI: exit 2, one line, no model built and no run directory made
    import fastflow.models as models

    monkeypatch.setattr(models, "build_policy", lambda *a: (_ for _ in ()).throw(AssertionError("loaded")))
    for arg, msg in cases.items():
        assert train_mod.main(["--model.kind", "toy", "--reward.weights", "{toy_color=1.0}",
                               "--run.output_dir", str(tmp_path / "runs"), "--distributed.cpu_ranks", "1",
                               "--resume", arg]) == 2
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------- host synchronisations

def test_host_reads_per_iteration_do_not_grow_with_the_trained_steps(tmp_path, monkeypatch):
    """Stats stay on the device: the training pass reads the device once per optimizer step (the
    skip decision) and once at the end, not per trained step."""
    import sys

    from tests.test_train import toy_cfg

    counts = {}
    for steps in (2, 4):
        cfg, d = toy_cfg(tmp_path / str(steps), "--sample.train_steps", str(steps), "--sample.eval_steps", "4",
                         "--train.optimizer_steps", "2", "--sample.batch_size", "3", "--train.batch_size", "3")
        t = train_mod.Trainer(cfg, d, SOLO)
        rb = t.rollout(0)
        adv, _ = t.advantages(rb)
        n = [0]
        for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
            real = getattr(torch.Tensor, name)

            def counted(self, *a, _real=real, **k):
                caller = sys._getframe(1).f_code.co_filename
                if "/fastflow/" in caller:  # fastflow's own reads (torch's CPU Adam reads its steps)
                    n[0] += 1
                return _real(self, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)
        t.train_on(rb, adv, 0)
        monkeypatch.undo()
        counts[steps] = n[0]
    assert counts[2] == counts[4], counts
    assert counts[2] <= 3, counts  # 2 optimizer steps: one skip decision each, plus the summary


# ------------------------------------------------------------------------- loaders

def test_diffusers_loaders_get_the_dtype_under_the_name_they_take(monkeypatch, tmp_path):
    import sys
    import types

    from fastflow.models import sd3

    seen = []

    class Fake:
        @classmethod
        def from_pretrained(cls, path, **kw):
            seen.append(kw)

        from_single_file = from_pretrained

    sd3.load_pipeline(Fake, "some/hub-id", torch.bfloat16)
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"x")
    sd3.load_pipeline(Fake, str(weights), torch.bfloat16)
    assert seen == [{"dtype": torch.bfloat16}, {"dtype": torch.bfloat16}]  # diffusers 0.42: dtype
    old = types.ModuleType("diffusers.utils.deprecation_utils")  # a release before `dtype`
    monkeypatch.setitem(sys.modules, "diffusers.utils.deprecation_utils", old)
    sd3.load_pipeline(Fake, "some/hub-id", torch.bfloat16)
    assert seen[-1] == {"torch_dtype": torch.bfloat16}


def test_an_unreachable_reward_server_stops_the_run_before_it_starts(tmp_path, capsys, monkeypatch):
    import socket

    import fastflow.models as models

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(models, "build_policy", lambda *a: (_ for _ in ()).throw(AssertionError("loaded")))
    rc = train_mod.main(["--reward.weights", "{remote = 1.0}", "--reward.options",
                         f'{{remote = {{url = "http://127.0.0.1:{port}", startup_wait = 0.2}}}}',
                         "--run.output_dir", str(tmp_path / "runs"), "--distributed.cpu_ranks", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "reward remote" in err and f"127.0.0.1:{port}" in err and "\n" not in err, err
    assert not (tmp_path / "runs").exists()


def test_cuda_graph_requests_that_cannot_be_met_stop_before_loading(tmp_path, capsys, monkeypatch):
    import fastflow.models as models

    monkeypatch.setattr(models, "build_policy", lambda *a: (_ for _ in ()).throw(AssertionError("loaded")))
    base = ["--run.output_dir", str(tmp_path / "runs"), "--distributed.cpu_ranks", "1"]
    if not torch.cuda.is_available():
        assert train_mod.main([*base, "--sample.cuda_graph", "required"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
        assert train_mod.main([*base, "--run.device", "cuda"]) == 2
        assert "no CUDA device is available" in capsys.readouterr().err
    cfg = load_config(None, ["--sample.cuda_graph", "required", "--model.finetune", "full"])
    monkeypatch.setattr(train_mod, "pick_device", lambda pref: torch.device("cuda", 0))
    with pytest.raises(ConfigError, match="FSDP2 sharding"):
        train_mod.check_cuda_graph_request(cfg, 8)
    train_mod.check_cuda_graph_request(cfg, 1)  # one GPU: nothing sharded
    # legacy spellings still load: true / false are auto / off
    assert load_config(None, ["--sample.cuda_graph", "false"]).sample.cuda_graph == "off"
    legacy = tmp_path / "legacy.toml"
    legacy.write_text("[sample]\ncuda_graph = true\n")
    assert load_config(str(legacy)).sample.cuda_graph == "auto"
    assert not (tmp_path / "runs").exists()


@pytest.mark.gpu
def test_offloading_the_text_encoders_frees_their_device_memory(tmp_path, pipes):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from fastflow.models import build_policy
    from tests.tiny_pipelines import tiny_cfg

    policy = build_policy(tiny_cfg("sd3", pipes["sd3"], dtype="bfloat16"), "cuda")
    encoder_bytes = sum(p.numel() * p.element_size() for e in policy.text_encoders() for p in e.parameters())
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    policy.cache_prompts(PROMPTS, cache_dir=tmp_path / "c", offload=True)
    torch.cuda.synchronize()
    assert before - torch.cuda.memory_allocated() >= encoder_bytes
    assert policy.encoder_device.type == "cpu"
    cond = policy.encode_prompts(PROMPTS)  # from the store, onto the GPU
    assert cond["prompt_embeds"].device.type == "cuda"
    assert policy.encode_prompts(["a yellow bird"])["prompt_embeds"].device.type == "cuda"  # encoded on the host


@pytest.mark.gpu
def test_training_pass_syncs_with_the_host_per_optimizer_step_not_per_step_on_gpu(tmp_path):
    """CUDA's sync debug mode counts every host synchronisation (device reads and copies from
    pageable host memory alike): the count must not grow with the trained steps."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    import warnings

    from tests.test_train import toy_cfg

    info = DistInfo(0, 1, 0, torch.device("cuda", 0))
    counts = {}
    for steps in (2, 4):
        cfg, d = toy_cfg(tmp_path / str(steps), "--sample.train_steps", str(steps), "--sample.eval_steps", "4",
                         "--train.optimizer_steps", "2", "--sample.batch_size", "3", "--train.batch_size", "3",
                         "--run.device", "cuda")
        t = train_mod.Trainer(cfg, d, info)
        rb = t.rollout(0)
        adv, _ = t.advantages(rb)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                t.train_on(rb, adv, 0)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[steps] = sum("synchroniz" in str(w.message) for w in caught)
    assert counts[2] == counts[4], counts


# ------------------------------------------------------------------------- the EMA in place

def test_ema_applied_is_in_place_and_restores_exactly():
    from fastflow.ema import EMA

    torch.manual_seed(0)
    params = {f"w{i}": torch.nn.Parameter(torch.randn(64, 32)) for i in range(3)}
    params["half"] = torch.nn.Parameter(torch.randn(8).to(torch.bfloat16))
    ema = EMA(params, decay=0.5, every=1)
    with torch.no_grad():
        for p in params.values():
            p.add_(1.0)
    ema.on_optimizer_step()
    current = {n: p.detach().clone() for n, p in params.items()}
    shadow = {n: v.clone() for n, v in ema.shadow.items()}
    storages = {n: p.data_ptr() for n, p in params.items()}
    with ema.applied():
        for n, p in params.items():
            assert torch.equal(p.detach(), shadow[n].to(p.dtype)), n
            assert p.data_ptr() == storages[n]  # in place: the parameters keep their memory
            assert torch.equal(ema.shadow[n], shadow[n])
    for n, p in params.items():
        assert torch.equal(p.detach(), current[n]) and torch.equal(ema.shadow[n], shadow[n]), n


@pytest.mark.gpu
def test_ema_applied_needs_no_second_copy_of_the_weights_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from fastflow.ema import EMA

    params = {f"w{i}": torch.nn.Parameter(torch.randn(1024, 1024, device="cuda")) for i in range(16)}
    ema = EMA(params, decay=0.9, every=1)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with ema.applied():
        pass
    one_tensor = 1024 * 1024 * 4
    assert torch.cuda.max_memory_allocated() - base <= 2 * one_tensor  # not 16 tensors' worth
    assert all(p.is_cuda for p in params.values())
