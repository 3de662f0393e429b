"""Distributed training on CPU: 2 gloo ranks under torchrun (loopback), the toy policy.

Each test launches tests/dist_worker.py with ``torch.distributed.run --standalone`` (a free local
port), with a timeout, and compares what the ranks wrote with single-process runs in this process.
"""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastflow import train as train_mod
from fastflow.checkpoint import is_sharded_checkpoint, latest_checkpoint
from fastflow.config import load_config, validate
from fastflow.distributed import DistInfo
from fastflow.grpo import group_advantages

pytestmark = pytest.mark.timeout(300)

SOLO = DistInfo(0, 1, 0, torch.device("cpu"))
WORKER = str(Path(__file__).with_name("dist_worker.py"))
ROOT = Path(__file__).resolve().parent.parent


def toy_args(out_dir, *extra):
    # 3 prompts x 4 = 12 images: 6 per rank at 2 ranks; one optimizer step per iteration so the
    # global batch of every step is the same set of samples at any world size.
    return ["--model.kind", "toy", "--reward.weights", "{toy_color=1.0}", "--sample.group_size", "4",
            "--sample.prompts_per_iter", "3", "--sample.batch_size", "3", "--sample.train_steps", "4",
            "--sample.eval_steps", "4", "--sample.guidance_scale", "1.5", "--run.iterations", "4",
            "--eval.every", "0", "--eval.seeds", "1", "--eval.min_category_images", "0", "--checkpoint.every", "2", "--log.progress", "false",
            "--log.tensorboard", "false", "--run.output_dir", str(out_dir), "--run.name", "toy",
            "--train.optimizer_steps", "1", "--train.lr", "3e-3", "--train.clip_range", "0.2",
            "--train.ema_every", "1", "--train.batch_size", "0", "--sample.window_size", "0",
            "--run.max_minutes", "0", *extra]


def torchrun_cmd(mode, dump, args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            WORKER, mode, str(dump), *args]


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def launch(mode, dump, args, timeout=120):
    p = subprocess.run(torchrun_cmd(mode, dump, args), cwd=ROOT, env=env(), capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, f"torchrun failed ({p.returncode}):\n{(p.stdout + p.stderr)[-4000:]}"
    return [load_file(str(Path(dump) / f"rank{r}.safetensors")) for r in range(2)]


def solo(out_dir, *extra, resume=None):
    cfg = load_config(None, toy_args(out_dir, *extra))
    t = train_mod.Trainer(cfg, validate(cfg, 1), SOLO, resume=resume)
    return t


def weights(t):
    return {n: p.detach().clone() for n, p in t.params.items()}


def assert_ranks_identical(dumps):
    a, b = dumps
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"ranks disagree on {k}"


LR, STEPS_AFTER_RESUME = 3e-3, 2


def assert_close_8bit(got, want):
    """Continuations with re-quantized 8-bit moments: Adam moves a weight by at most ~lr per
    step, so no weight may differ by more than 2 * lr * steps; almost all must agree closely."""
    diffs = torch.cat([(got[k].float() - want[k].float()).abs().flatten() for k in got if k.startswith("w.")])
    assert float(diffs.max()) <= 2 * LR * STEPS_AFTER_RESUME, float(diffs.max())
    assert float(diffs.mean()) < 1e-4, float(diffs.mean())


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_two_ranks_agree_and_match_one_rank(tmp_path, strategy):
    dumps = launch("train", tmp_path / "dump", toy_args(tmp_path / "dist", "--distributed.strategy", strategy))
    assert_ranks_identical(dumps)
    assert int(dumps[0]["strategy_fsdp"]) == (strategy == "fsdp")
    assert is_sharded_checkpoint(latest_checkpoint(tmp_path / "dist" / "toy"))

    one = solo(tmp_path / "solo")
    start = weights(one)
    one.run()
    end = weights(one)
    moved = max(float((end[n] - start[n]).abs().max()) for n in end)
    assert moved > 1e-3  # training changed the weights, so agreement below means something
    for n, w in end.items():
        torch.testing.assert_close(dumps[0][f"w.{n}"], w, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(dumps[0][f"ema.{n}"], one.ema.shadow[n], atol=2e-5, rtol=1e-4)


def test_fsdp_adamw8bit_sharded_checkpoint_resumes_at_two_and_one_rank(tmp_path):
    pytest.importorskip("bitsandbytes")
    args = toy_args(tmp_path / "dist", "--train.optimizer", "adamw8bit", "--checkpoint.keep", "5",
                    "--distributed.strategy", "fsdp")
    full = launch("train", tmp_path / "full", args)
    assert_ranks_identical(full)
    ck2 = tmp_path / "dist" / "toy" / "checkpoints" / "iter-000002"
    assert is_sharded_checkpoint(ck2)
    saved = tmp_path / "saved-iter-000002"
    shutil.copytree(ck2, saved)

    # the same world size continues within 8-bit rounding: the state is stored dequantized and
    # re-quantized on load, exact except in blocks whose largest moment is negative (the signed
    # map's most negative code is -0.993, not -1). fp32 AdamW resumes bit for bit (kill test).
    again = launch("train", tmp_path / "again", [*args, "--resume", str(ck2)])
    assert_ranks_identical(again)
    assert int(again[0]["iteration"]) == 4
    assert_close_8bit(again[0], full[0])

    # one rank reads the 2-rank shards; its continuation agrees up to reduction order and the
    # 8-bit block boundaries (whole tensors at 1 rank, shards at 2)
    one_dir = tmp_path / "one" / "toy" / "checkpoints"
    one_dir.mkdir(parents=True)
    shutil.copytree(saved, one_dir / "iter-000002")
    t = solo(tmp_path / "one", "--train.optimizer", "adamw8bit", resume=str(one_dir / "iter-000002"))
    assert t.iteration == 2
    big = t.params["net.net.0.weight"]
    assert t.optimizer.state[big]["state1"].dtype == torch.uint8  # really 8-bit state
    t.run()
    assert_close_8bit({f"w.{n}": w for n, w in weights(t).items()}, full[0])


def test_fsdp_nft_sharded_checkpoint_resumes_exactly(tmp_path):
    """DiffusionNFT under FSDP2 at 2 ranks: its old policy is saved in the sharded checkpoint and a
    resumed run continues bit for bit (weights, EMA and old policy) at the same world size."""
    args = toy_args(tmp_path / "dist", "--train.algorithm", "nft", "--sample.kind", "ode",
                    "--sample.shared_initial_noise", "false", "--train.fm_timesteps", "2",
                    "--train.old_decay_rate", "0.2", "--checkpoint.keep", "5", "--distributed.strategy", "fsdp")
    full = launch("train", tmp_path / "full", args)
    assert_ranks_identical(full)
    ck2 = tmp_path / "dist" / "toy" / "checkpoints" / "iter-000002"
    assert is_sharded_checkpoint(ck2)
    again = launch("train", tmp_path / "again", [*args, "--resume", str(ck2)])
    assert_ranks_identical(again)
    assert int(again[0]["iteration"]) == 4
    old = [k for k in full[0] if k.startswith("old.")]
    assert old and any(not torch.equal(full[0][k], full[0]["w." + k[4:]]) for k in old)  # it lags
    for k in full[0]:
        assert torch.equal(again[0][k], full[0][k]), f"resumed run differs on {k}"


# The first SDE step of one sample computed by two ranks (one thread each) and by one rank in this
# process (its own thread count): a network's output is not bitwise the same across thread counts or
# batch compositions (matmul blocking), so those next latents agree to float rounding only. Measured
# on an AVX-512 EPYC: at most 1.2e-7 apart (one float32 ulp at |x| in [1, 2); |x| <= 3.6), so the bound
# is ~80x the measured rounding, and 1e4x below the 1.6 (max-norm) that separates two distinct samples
# (asserted in the test): another sample's noise cannot pass for the right one.
NEXT_LATENTS_ATOL = 1e-5


@pytest.mark.parametrize("shared", [False, True], ids=["own_noise", "shared_group_noise"])
def test_noise_is_distinct_per_sample_and_groups_span_ranks(tmp_path, shared):
    flag = ("--sample.shared_initial_noise", str(shared).lower())
    dumps = launch("rollout", tmp_path / "dump", toy_args(tmp_path / "dist", *flag))
    noise = torch.cat([d["noise"] for d in dumps]).flatten(1)
    nxt = torch.cat([d["next"] for d in dumps]).flatten(1)
    groups = torch.cat([d["groups"] for d in dumps])
    rewards = torch.cat([d["rewards"] for d in dumps])
    assert noise.shape[0] == 12
    spanning = set(dumps[0]["groups"].tolist()) & set(dumps[1]["groups"].tolist())
    assert spanning, "no group spans both ranks; the test would not test gathering"
    # the SDE noise of every sample is its own, also for two samples of one group on two ranks
    assert float((torch.cdist(nxt, nxt) + torch.eye(12) * 1e9).min()) > 1.0
    if shared:  # one initial noise per group, whichever rank holds its samples; groups start apart
        for g in groups.unique():
            rows = noise[groups == g]
            assert all(torch.equal(rows[0], r) for r in rows[1:])
        firsts = torch.stack([noise[groups == g][0] for g in groups.unique()])
        assert float((torch.cdist(firsts, firsts) + torch.eye(len(firsts)) * 1e9).min()) > 1.0
    else:  # no two samples share initial noise
        assert float((torch.cdist(noise, noise) + torch.eye(12) * 1e9).min()) > 1.0
    # both ranks gathered every rank's rewards and groups, in rank order, and normalised by them
    for d in dumps:
        assert torch.equal(d["all_rewards"], rewards) and torch.equal(d["all_groups"], groups)
    adv = group_advantages(rewards, groups, global_std=True, clip=5.0)
    torch.testing.assert_close(torch.cat([d["adv"] for d in dumps]), adv)
    per_group = {int(g): adv[groups == g] for g in groups.unique()}
    assert all(abs(float(v.sum())) < 1e-4 for v in per_group.values())  # zero mean within each group

    # The same samples at 1 rank, which holds the iteration's samples in the order the two ranks
    # hold them, concatenated. Twins are matched by that exact bookkeeping, never by the latents:
    # the same group and bit for bit the same initial noise at every position (own noise: distinct
    # per sample, so a sample at another position would fail here) ...
    t = solo(tmp_path / "solo", *flag)
    rb = t.rollout(0)
    solo_noise = rb.traj.latents[:, 0].flatten(1)
    solo_next = rb.traj.next_latents[:, 0].flatten(1)
    assert torch.equal(rb.group_ids, groups)
    assert torch.equal(solo_noise, noise)
    # ... and the same SDE noise: next latents within float rounding of the twin's, while every other
    # sample is far outside that bound (the bound cannot let a wrong noise pass)
    torch.testing.assert_close(solo_next, nxt, atol=NEXT_LATENTS_ATOL, rtol=0)
    apart = (solo_next[:, None] - nxt[None]).abs().amax(-1) + torch.eye(12) * 1e9
    assert float(apart.min()) > 1e4 * NEXT_LATENTS_ATOL, float(apart.min())
    torch.testing.assert_close(rb.rewards, rewards, atol=1e-5, rtol=0)


def kill_run(proc: subprocess.Popen, marker: str) -> None:
    """SIGKILL torchrun *and* its workers. torchrun starts each worker in a session of its own, so
    killing torchrun's process group leaves the ranks running (they would go on checkpointing
    under the resumed run): kill every process whose command line carries the run's marker."""
    def pids():
        return _pids_with(marker)

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in pids():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pids(), "workers of the killed run survived"


def test_sigkill_mid_run_loses_only_the_inflight_iteration(tmp_path):
    iters = "24"
    args = toy_args(tmp_path / "dist", "--run.iterations", iters, "--checkpoint.every", "1",
                    "--distributed.strategy", "fsdp")
    run_dir = tmp_path / "dist" / "toy"
    proc = subprocess.Popen(torchrun_cmd("train", tmp_path / "killed", args), cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    seen = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            seen = latest_checkpoint(run_dir)
            if seen is not None and int(seen.name.split("-")[1]) >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        kill_run(proc, str(tmp_path / "killed"))  # torchrun and both ranks, wherever they are
    finally:
        kill_run(proc, str(tmp_path / "killed"))
    assert seen is not None
    last = latest_checkpoint(run_dir)
    assert int(seen.name.split("-")[1]) <= int(last.name.split("-")[1]) < int(iters)  # killed mid-run
    assert not (tmp_path / "killed").exists()  # it really died before finishing

    # the last complete checkpoint loads (here at 1 rank) ...
    probe = solo(tmp_path / "probe", "--run.iterations", iters, resume=str(last))
    assert probe.iteration == int(last.name.split("-")[1])
    # ... and the resumed 2-rank run ends exactly where an uninterrupted one does
    resumed = launch("train", tmp_path / "resumed", [*args, "--resume"])
    assert int(resumed[0]["iteration"]) == int(iters)
    ref = launch("train", tmp_path / "ref", toy_args(tmp_path / "ref_run", "--run.iterations", iters,
                                                     "--checkpoint.every", "1", "--distributed.strategy", "fsdp"))
    for k in ref[0]:
        assert torch.equal(resumed[0][k], ref[0][k]), k
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))  # leftovers of the kill cleaned up
    import json
    its = [json.loads(l)["iteration"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()
           if "reward_mean" in l]
    assert its == list(range(1, int(iters) + 1))  # each iteration logged once, none lost


def test_ranks_leave_together_when_one_clock_crosses_the_time_budget(tmp_path):
    """run.max_minutes is checked on each rank's own clock; a rank that stopped alone would leave
    the others waiting in the next collective. Rank 1's clock jumps past the budget after iteration
    1: both ranks must stop there and run the final evaluation together."""
    ranks = launch("budget", tmp_path / "dump", toy_args(tmp_path / "run", "--run.max_minutes", "5",
                                                         "--run.iterations", "6", "--eval.every", "100"))
    assert [int(r["iteration"]) for r in ranks] == [1, 1]
    assert all(int(r["final_eval"]) == 1 for r in ranks)


def sd3_args(out_dir, pipe, prompts, *extra):
    """A two-iteration run of the tiny SD3 pipeline (fastflow.models._tiny) with the toy colour
    reward: the trainer's own end-of-run export is what the export tests read."""
    return ["--model.kind", "sd3", "--model.path", str(pipe), "--model.resolution", "32",
            "--model.lora_rank", "4", "--model.lora_alpha", "8", "--reward.weights", "{toy_color=1.0}",
            "--data.train_prompts", str(prompts), "--data.eval_prompts", str(prompts),
            "--sample.group_size", "4", "--sample.prompts_per_iter", "3", "--sample.batch_size", "3",
            "--sample.train_steps", "3", "--sample.eval_steps", "3", "--sample.window_size", "0",
            "--run.iterations", "2", "--eval.every", "0", "--eval.seeds", "1",
            "--eval.min_category_images", "0", "--checkpoint.every", "2", "--log.progress", "false",
            "--log.tensorboard", "false", "--run.output_dir", str(out_dir), "--run.name", "sd3",
            "--train.optimizer_steps", "1", "--train.clip_range", "0.2", "--train.batch_size", "0",
            "--train.ema_every", "1", "--train.ema_decay", "0.5", "--run.max_minutes", "0",
            "--distributed.strategy", "fsdp", *extra]


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_fsdp_run_exports_its_gathered_ema_weights(tmp_path, finetune):
    """A sharded run's parameters are shards on each rank: the end-of-run export gathers them on
    rank 0 and writes the same files a one-rank run writes (the LoRA for load_lora_weights, or the
    whole transformer for from_pretrained), holding the EMA weights."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    from fastflow.models._tiny import save_tiny_sd3

    pipe = save_tiny_sd3(tmp_path / "pipe")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue ball\na green cat\n")
    lr = "3e-3" if finetune == "lora" else "1e-3"
    dumps = launch("train", tmp_path / "dump", sd3_args(tmp_path / "runs", pipe, prompts,
                                                        "--model.finetune", finetune, "--train.lr", lr))
    assert int(dumps[0]["strategy_fsdp"]) == 1
    assert_ranks_identical(dumps)
    ema = {n[len("ema.transformer."):]: v for n, v in dumps[0].items() if n.startswith("ema.")}
    cur = {n[len("w.transformer."):]: v for n, v in dumps[0].items() if n.startswith("w.")}
    assert ema and max(float((ema[n] - cur[n]).abs().max()) for n in ema) > 1e-5  # EMA != current
    final = tmp_path / "runs" / "sd3" / "final"

    if finetune == "lora":
        exported = load_file(str(final / "pytorch_lora_weights.safetensors"))
        assert len(exported) == len(ema)
        for n, v in ema.items():  # peft's saved form: no adapter name, "transformer." prefix
            torch.testing.assert_close(exported["transformer." + n.replace(".default.", ".")], v,
                                       rtol=0, atol=0)
        assert max(float(v.abs().max()) for n, v in ema.items() if "lora_B" in n) > 0  # really trained
        fresh = StableDiffusion3Pipeline.from_pretrained(pipe)
        fresh.load_lora_weights(str(final))  # a stock pipeline reads it
        (adapter,) = fresh.transformer.peft_config  # the loader names the adapter itself
        loaded = dict(fresh.transformer.named_parameters())
        for n, v in ema.items():
            torch.testing.assert_close(loaded[n.replace(".default.", f".{adapter}.")], v, rtol=0, atol=0)
    else:
        base = dict(SD3Transformer2DModel.from_pretrained(pipe, subfolder="transformer").named_parameters())
        model = SD3Transformer2DModel.from_pretrained(final / "transformer")
        got = dict(model.named_parameters())
        assert got.keys() == ema.keys()
        for n, v in ema.items():
            torch.testing.assert_close(got[n], v, rtol=0, atol=0)
        assert max(float((got[n] - base[n]).abs().max()) for n in got) > 1e-4  # trained, not the base


def test_a_rank_leaves_with_its_exit_status_and_its_output_flushed(tmp_path):
    """Under a launcher a rank ends with os._exit once main() returns (fastflow.train.exit_rank):
    its buffered output (a pipe, not a terminal) must still arrive whole, and its status be main's."""
    e = {k: v for k, v in env().items() if k != "PYTHONUNBUFFERED"}  # stdout block-buffered, as a pipe is
    e.update(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0")
    p = subprocess.run([sys.executable, "-m", "fastflow.train", "--print-config"], cwd=ROOT, env=e,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.rstrip().splitlines()[-1].startswith("cpu_ranks = ")  # the last key, all of it
    (tmp_path / "c.toml").write_text(p.stdout)
    assert load_config(str(tmp_path / "c.toml")) == load_config(None)
    bad = subprocess.run([sys.executable, "-m", "fastflow.train", "--train.lr", "-1"], cwd=ROOT, env=e,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("fastflow: ") and "train.lr" in bad.stderr
    # a short last write sits in the pipe's buffer: exit_rank flushes it before os._exit
    code = "from fastflow.train import exit_rank; print('the last line'); exit_rank(3)"
    short = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=e, capture_output=True, text=True, timeout=120)
    assert (short.returncode, short.stdout) == (3, "the last line\n"), short.stderr[-2000:]


@pytest.mark.parametrize("who", ["launcher", "every process"])
def test_a_stop_signal_finishes_the_iteration_checkpoints_and_exits_cleanly(tmp_path, who):
    """SIGTERM to a `python -m fastflow.train` run of 2 local ranks: sent to the launcher alone (a
    user's kill or Ctrl-C; torchrun's agent, left to itself, would SIGTERM the ranks and kill them
    30 s later) or to every process of the run (a batch scheduler; each rank then gets it twice,
    once passed on by the launcher). Either way every rank finishes its iteration, checkpoints
    there and the run exits 0: the signal is neither taken as "stop at once" nor turned into a
    kill by the agent."""
    run_dir = tmp_path / "runs" / "toy"
    args = toy_args(tmp_path / "runs", "--run.iterations", "100000", "--checkpoint.every", "0",
                    "--distributed.cpu_ranks", "2")
    proc = subprocess.Popen([sys.executable, "-m", "fastflow.train", *args], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    marker = str(tmp_path / "runs")
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and \
                not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before the signal"
        ranks = [pid for pid in _pids_with(marker) if pid != proc.pid]
        assert len(ranks) == 2, ranks
        for pid in [proc.pid] + (ranks if who == "every process" else []):
            os.kill(pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        kill_run(proc, marker)
    assert proc.returncode == 0, err[-3000:]
    assert err.count("finishing this iteration, checkpointing") == 2, err[-3000:]  # once per rank
    assert "KeyboardInterrupt" not in err and "death signal" not in err, err[-3000:]
    logged = [int(line.split('"iteration": ')[1].split(",")[0]) for line in metrics.read_text().splitlines()]
    last = latest_checkpoint(run_dir)
    assert last is not None and int(last.name.split("-")[1]) == max(logged) >= 3  # where it stopped


def _pids_with(marker: str) -> list[int]:
    """The processes whose command line contains ``marker``."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if marker in (d / "cmdline").read_bytes().decode(errors="replace"):
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def test_a_signal_handled_while_ranks_agree_on_stopping_is_not_lost(monkeypatch):
    """The ranks agree on stopping with an all-reduce of their flags; a signal handled during it
    (a Python handler runs between any two bytecodes) sets this rank's request after its flag was
    sent. That request must count at the next agreement, not be overwritten by this one's result."""
    t = object.__new__(train_mod.Trainer)
    t.info = DistInfo(0, 2, 0, torch.device("cpu"))
    t.stop_requested = t.budget_spent = False

    def reduce_while_a_signal_arrives(flags, info):  # the peer's flags are all zero
        t.stop_requested = True

    monkeypatch.setattr(train_mod, "all_reduce_sum_", reduce_while_a_signal_arrives)
    assert t._agreed_stop() is False  # the flags were sent before the signal
    monkeypatch.setattr(train_mod, "all_reduce_sum_", lambda flags, info: None)
    assert t._agreed_stop() is True and t.stop_agreed  # the next agreement stops every rank
