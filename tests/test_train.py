"""The training loop end to end on the toy policy: it learns, logs, checkpoints and resumes exactly."""

import json

import pytest
import torch

from fastflow import train as train_mod
from fastflow.checkpoint import latest_checkpoint, load_checkpoint
from fastflow.config import load_config, validate
from fastflow.distributed import DistInfo
from fastflow.lr_schedule import lr_at

SOLO = DistInfo(0, 1, 0, torch.device("cpu"))


def toy_cfg(tmp_path, *extra):
    overrides = ["--model.kind", "toy", "--reward.weights", "{toy_color=1.0}", "--sample.group_size", "4",
                 "--sample.prompts_per_iter", "3", "--sample.batch_size", "6", "--sample.train_steps", "4",
                 "--sample.eval_steps", "6", "--sample.guidance_scale", "1.5", "--run.iterations", "4",
                 "--eval.every", "0", "--eval.seeds", "2", "--eval.min_category_images", "0", "--checkpoint.every", "2", "--log.progress", "false",
                 "--log.tensorboard", "false", "--run.output_dir", str(tmp_path), "--run.name", "toy",
                 "--train.batch_size", "0", "--sample.window_size", "0", "--run.max_minutes", "0", *extra]
    cfg = load_config(None, overrides)
    return cfg, validate(cfg, 1)


def run(cfg, derived, resume=None):
    t = train_mod.Trainer(cfg, derived, SOLO, resume=resume)
    t.run()
    return t


def weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.params.items()}


def test_reward_rises_on_toy(tmp_path):
    cfg, d = toy_cfg(tmp_path, "--run.iterations", "40", "--train.lr", "3e-3", "--train.clip_range", "0.2",
                     "--train.beta", "0.0", "--train.ema", "false", "--checkpoint.every", "1000",
                     "--train.optimizer_steps", "3", "--sample.group_size", "8", "--sample.batch_size", "8")
    t = run(cfg, d)
    rows = [json.loads(l) for l in (t.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "reward_mean" in r]
    first = sum(r["reward_mean"] for r in train_rows[:10]) / 10
    last = sum(r["reward_mean"] for r in train_rows[-10:]) / 10
    assert last > first + 0.05, (first, last)
    # the first inner pass of every iteration starts on-policy
    assert all(abs(r["ratio_mean"] - 1) < 0.05 for r in train_rows)


def test_run_leaves_logs_checkpoints_and_plots(tmp_path):
    cfg, d = toy_cfg(tmp_path, "--eval.every", "2", "--log.tensorboard", "true")
    t = run(cfg, d)
    rd = t.run_dir
    for name in ["metrics.jsonl", "config.toml", "curves.png", "samples_before.png", "samples_after.png",
                 "before_after.png"]:
        assert (rd / name).is_file(), name
    assert any((rd / "tensorboard").iterdir())
    assert latest_checkpoint(rd).name == "iter-000004"
    rows = [json.loads(l) for l in (rd / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows if "reward_mean" in r] == [1, 2, 3, 4]
    assert any("eval/overall/reward" in r for r in rows)
    assert all(0 <= r["eval/overall/diversity"] <= 1 for r in rows if "eval/overall/reward" in r)
    assert validate(load_config(str(rd / "config.toml")), 1) is not None  # the saved config reloads


def test_eval_gives_small_categories_more_seeds_and_overall_stays_a_mean_over_prompts(tmp_path):
    prompts = tmp_path / "eval.jsonl"
    prompts.write_text('{"prompt": "a red square", "tag": "A"}\n{"prompt": "a blue square", "tag": "B"}\n'
                       '{"prompt": "a green square", "tag": "B"}\n')
    cfg, d = toy_cfg(tmp_path, "--data.eval_prompts", str(prompts), "--eval.seeds", "1",
                     "--eval.min_category_images", "4")
    t = train_mod.Trainer(cfg, d, SOLO)
    assert t.eval_seed_counts == [4, 2, 2]
    out = t.evaluate()
    metrics = {k.split("/")[2] for k in out if k.startswith("eval/A/")}
    assert metrics
    for m in metrics:  # A has 4 images and B 4, but A is 1 prompt of 3: overall weighs it 1/3
        want = (out[f"eval/A/{m}"] + 2 * out[f"eval/B/{m}"]) / 3
        assert out[f"eval/overall/{m}"] == pytest.approx(want, abs=1e-9), m


@pytest.mark.parametrize("sampling", ["uniform", "category", "signal"])
def test_interrupted_and_resumed_run_ends_with_identical_weights(tmp_path, sampling):
    common = ("--train.lr", "1e-3", "--train.clip_range", "0.1", "--sample.prompt_sampling", sampling)
    cfg, d = toy_cfg(tmp_path / "a", "--run.iterations", "4", *common)
    full = run(cfg, d)

    cfg2, d2 = toy_cfg(tmp_path / "b", "--run.iterations", "2", *common)
    run(cfg2, d2)
    cfg3, d3 = toy_cfg(tmp_path / "b", "--run.iterations", "4", *common)
    resumed = run(cfg3, d3, resume="auto")
    assert resumed.iteration == 4
    assert resumed.prompt_sampler.state_dict() == full.prompt_sampler.state_dict()
    a, b = weights(full), weights(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    ema_a, ema_b = full.ema.state_dict(), resumed.ema.state_dict()
    assert all(torch.equal(ema_a[n], ema_b[n]) for n in ema_a)
    # and training actually moved the weights (otherwise equality would prove nothing)
    first = load_checkpoint(latest_checkpoint(tmp_path / "b" / "toy"))["trainable"]
    assert first.keys() == a.keys()
    fresh = train_mod.Trainer(cfg, d, SOLO)
    assert any(not torch.equal(fresh.params[n], a[n]) for n in a)


SCHEDULE = ("--train.lr", "1e-3", "--train.clip_range", "0.1", "--train.optimizer_steps", "2",
            "--train.lr_schedule", "cosine", "--train.lr_warmup", "2", "--train.lr_min_ratio", "0.1")


def test_lr_schedule_is_logged_and_resumes_where_it_stopped(tmp_path, monkeypatch):
    cfg, d = toy_cfg(tmp_path / "a", *SCHEDULE)
    full = run(cfg, d)
    rows = [json.loads(l) for l in (full.run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r["lr"] for r in rows if "lr" in r]
    # 4 iterations x 2 optimizer steps: the logged lr is each iteration's last step's
    expected = [lr_at(s, lr=1e-3, total_steps=8, kind="cosine", warmup=2, min_ratio=0.1) for s in (1, 3, 5, 7)]
    assert logged == pytest.approx(expected)
    assert logged[-1] == pytest.approx(1e-4)

    # the same run, stopped (as by a signal) after iteration 2 and resumed: identical weights
    real_train_on = train_mod.Trainer.train_on

    def stop_after_two(self, rb, adv, it):
        out = real_train_on(self, rb, adv, it)
        self.stop_requested = it == 1
        return out

    monkeypatch.setattr(train_mod.Trainer, "train_on", stop_after_two)
    cfg2, d2 = toy_cfg(tmp_path / "b", *SCHEDULE)
    assert run(cfg2, d2).iteration == 2
    monkeypatch.setattr(train_mod.Trainer, "train_on", real_train_on)
    resumed = run(cfg2, d2, resume="auto")
    assert resumed.iteration == 4 and resumed.optimizer_steps == 8
    a, b = weights(full), weights(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_eval_noise_follows_eval_seed_not_run_seed(tmp_path, monkeypatch):
    seen = []
    real_sample = train_mod.sample

    def spy(policy, *args, seeds=None, **kw):
        if kw.get("kind") == "ode":
            seen.append(seeds.clone())
        return real_sample(policy, *args, seeds=seeds, **kw)

    monkeypatch.setattr(train_mod, "sample", spy)
    for i, extra in enumerate([(), ("--run.seed", "5"), ("--eval.seed", "1")]):
        cfg, d = toy_cfg(tmp_path / str(i), "--run.iterations", "1", "--sample.cuda_graph", "false", *extra)
        run(cfg, d)
    assert len(seen) == 3
    assert torch.equal(seen[0], seen[1])  # another training seed, the same evaluation images
    assert not torch.equal(seen[0], seen[2])


def test_non_finite_loss_is_skipped_and_weights_stay_finite(tmp_path, monkeypatch, caplog):
    real = train_mod.ops.grpo_step_loss
    calls = {"n": 0}

    def flaky(*args, **kw):
        loss, stats = real(*args, **kw)
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            loss = loss * float("nan")
        return loss, stats

    monkeypatch.setattr(train_mod.ops, "grpo_step_loss", flaky)
    cfg, d = toy_cfg(tmp_path, "--run.iterations", "2")
    with caplog.at_level("WARNING"):
        t = run(cfg, d)
    assert "non-finite loss" in caplog.text
    assert all(torch.isfinite(p).all() for p in t.params.values())
    rows = [json.loads(l) for l in (t.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("skipped_steps", 0) for r in rows) > 0


def test_fresh_run_never_overwrites_an_earlier_one(tmp_path):
    cfg, d = toy_cfg(tmp_path, "--run.iterations", "1")
    first = run(cfg, d)
    second = run(cfg, d)
    assert first.run_dir != second.run_dir and second.run_dir.name == "toy-1"
    assert latest_checkpoint(first.run_dir) is not None


def test_bad_config_is_one_clear_line_and_exit_2(capsys):
    assert train_mod.main(["--train.lrr", "1e-4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.lrr" in err[0]


def test_print_config_round_trips(capsys, tmp_path):
    assert train_mod.main(["--print-config", "--train.lr", "1e-4", "--model.kind", "toy"]) == 0
    text = capsys.readouterr().out
    path = tmp_path / "c.toml"
    path.write_text(text)
    cfg = load_config(str(path))
    assert cfg.train.lr == 1e-4 and cfg.model.kind == "toy"


def test_cli_end_to_end_in_a_subprocess(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "fastflow.train", "--model.kind", "toy", "--reward.weights", "{toy_color=1.0}",
           "--sample.group_size", "4", "--sample.prompts_per_iter", "3", "--sample.batch_size", "6",
           "--train.batch_size", "6", "--sample.train_steps", "4", "--sample.window_size", "0",
           "--sample.eval_steps", "6", "--run.iterations", "2", "--eval.seeds", "1", "--eval.min_category_images", "0",
           "--run.output_dir", str(tmp_path), "--run.name", "cli", "--log.progress", "false",
           "--train.optimizer", "adamw8bit"]  # imports bitsandbytes, whose import warns on some CPUs
    r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "cli" / "metrics.jsonl").is_file() and (tmp_path / "cli" / "curves.png").is_file()
    assert "category" in r.stdout and "reward" in r.stdout  # the final table
    assert "gemm_4bit_forward" not in r.stderr  # third-party import noise stays out of the log


def test_group_diversity_is_the_mean_pairwise_pixel_distance():
    d = train_mod.GroupDiversity()
    a, b, c = torch.zeros(3, 4, 4), torch.ones(3, 4, 4), torch.full((3, 4, 4), 0.5)
    for key, img in [(0, a), (0, b), (0, c), (1, a), (1, a)]:  # prompt 0: three seeds, prompt 1: two equal
        d.add(key, img)
    total, pairs = d.totals().tolist()
    assert pairs == 3 + 1
    assert abs(total - (1.0 + 0.5 + 0.5 + 0.0)) < 1e-6  # |a-b|, |a-c|, |b-c|, then identical images
    big = train_mod.GroupDiversity(max_side=8)
    big.add(0, torch.zeros(3, 32, 32))
    big.add(0, torch.ones(3, 32, 32))
    assert big.totals().tolist() == [1.0, 1.0]  # pooling keeps the mean difference


def test_local_cpu_ranks_auto_explicit_and_ignored(monkeypatch):
    from fastflow import distributed

    cfg, _ = toy_cfg("/tmp/unused")  # 12 images per iteration, rollout batch 6
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(distributed, "cpu_threads", lambda: 8)
    assert distributed.local_cpu_ranks(cfg) == 2          # 12 images split into batches of 6: 2 ranks at most
    monkeypatch.setattr(distributed, "cpu_threads", lambda: 1)
    assert distributed.local_cpu_ranks(cfg) == 1
    cfg.distributed.cpu_ranks = 1
    monkeypatch.setattr(distributed, "cpu_threads", lambda: 8)
    assert distributed.local_cpu_ranks(cfg) == 1
    cfg.distributed.cpu_ranks = 4                       # 12 images do not split into 4 ranks of batch 6
    with pytest.raises(train_mod.ConfigError, match="rank"):
        distributed.local_cpu_ranks(cfg)
    monkeypatch.setenv("WORLD_SIZE", "2")               # already under torchrun: never relaunch
    monkeypatch.setenv("RANK", "0")
    assert distributed.local_cpu_ranks(cfg) == 1


def test_cli_launches_local_ranks_and_reports_a_failed_rank(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    base = [sys.executable, "-m", "fastflow.train", "--model.kind", "toy", "--reward.weights", "{toy_color=1.0}",
            "--sample.group_size", "4", "--sample.prompts_per_iter", "3", "--sample.batch_size", "6",
            "--train.batch_size", "6", "--sample.train_steps", "4", "--sample.window_size", "0",
            "--sample.eval_steps", "6", "--run.iterations", "2", "--eval.seeds", "1", "--eval.min_category_images", "0", "--log.progress", "false",
            "--run.output_dir", str(tmp_path), "--distributed.cpu_ranks", "2", "--log.tensorboard", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    env.pop("WORLD_SIZE", None)
    env.pop("RANK", None)
    r = subprocess.run(base + ["--run.name", "two"], cwd=root, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "fastflow: 2 ranks" in r.stderr
    assert "category" in r.stdout and (tmp_path / "two" / "metrics.jsonl").is_file()
    assert "view tensor" not in r.stderr  # the toy net returns no view (FSDP2 warns about those)
    # a --resume that names no checkpoint is refused in one line before any rank starts
    (tmp_path / "junk").mkdir()
    r = subprocess.run(base + ["--run.name", "bad", "--resume", str(tmp_path / "junk")], cwd=root,
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2 and "of 2 failed" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().count("\n") == 0 and "neither a run directory" in r.stderr, r.stderr[-3000:]
    # a rank that fails on bad input found while loading (a checkpoint of another model: here
    # one parameter missing) -> its one line, then the launcher's one line naming it, exit != 0
    from safetensors.torch import load_file, save_file

    ck = sorted((tmp_path / "two" / "checkpoints").glob("iter-*"))[-1]
    if (ck / "sharded").is_dir():  # a 2-rank run writes the sharded format: load it whole
        from fastflow.checkpoint import load_sharded_weights
        from fastflow.models.toy import ToyPolicy

        params = {f"net.{n}": p for n, p in ToyPolicy().net.named_parameters()}
        state, _ = load_sharded_weights(ck, params)
        other = tmp_path / "other" / "checkpoints" / ck.name
        other.mkdir(parents=True)
        (other / "state.json").write_text((ck / "state.json").read_text())
        save_file({k: v.contiguous() for k, v in list(state.items())[1:]}, str(other / "trainable.safetensors"))
        import torch as _torch
        _torch.save({}, other / "optimizer.pt")
    else:
        other = ck
        state = load_file(str(ck / "trainable.safetensors"))
        save_file(dict(list(state.items())[1:]), str(ck / "trainable.safetensors"))
    r = subprocess.run(base + ["--run.name", "bad", "--resume", str(other)], cwd=root,
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode != 0
    assert "fastflow: rank 0 of 2 failed (exit code 2)" in r.stderr or "fastflow: rank 1 of 2 failed (exit code 2)" in r.stderr, r.stderr[-3000:]
    assert "lacks parameter" in r.stderr and "Traceback" not in r.stderr, r.stderr[-3000:]


@pytest.mark.parametrize("shared", [True, False])
def test_shared_initial_noise_starts_each_group_from_one_noise(tmp_path, shared):
    cfg, d = toy_cfg(tmp_path, "--sample.shared_initial_noise", str(shared).lower())
    t = train_mod.Trainer(cfg, d, SOLO)
    rb = t.rollout(0)
    x0 = rb.traj.latents[:, 0]          # window_size 0: step 0 is recorded, its input is the initial noise
    nxt = rb.traj.next_latents[:, 0]
    for g in rb.group_ids.unique():
        idx = (rb.group_ids == g).nonzero().flatten()
        same = all(torch.equal(x0[idx[0]], x0[i]) for i in idx[1:])
        assert same == shared
        assert not torch.equal(nxt[idx[0]], nxt[idx[1]])   # the SDE noise still differs per image
    firsts = [x0[(rb.group_ids == g).nonzero()[0, 0]] for g in rb.group_ids.unique()]
    assert not torch.equal(firsts[0], firsts[1])              # and groups start apart
