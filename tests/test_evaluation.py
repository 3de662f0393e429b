"""fastflow.evaluation, the one held-out evaluation of the trainer and of ``python -m
fastflow.evaluate``: the same images (noise a function of eval.seed, prompt text and seed index),
the same scores (the policy's verifier, else the config's rewards), for any model kind.

The end-to-end test trains a tiny random SD3 pipeline for one iteration with a tiny reward
(toy_color: the distance of the image to the prompt's colour), then evaluates the run's checkpoint
with the CLI: its per-image rewards must reproduce the trainer's own final evaluation."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from fastflow import evaluate, evaluation  # noqa: E402
from fastflow import train as train_mod  # noqa: E402
from fastflow.config import load_config, to_toml, validate  # noqa: E402
from fastflow.distributed import DistInfo  # noqa: E402
from fastflow.models._tiny import save_tiny_sd3  # noqa: E402
from tests.test_real_model_path import cpu_test_values  # noqa: E402

SOLO = DistInfo(0, 1, 0, torch.device("cpu"))
PROMPTS = ["a red cube", "a blue ball", "a green cat"]


def test_image_seeds_are_a_function_of_text_index_and_base_only():
    # eval.seed 0 keeps the seeds evaluations have always used: crc32 of "prompt\0index"
    import zlib
    assert evaluation.image_seed("a circle", 3) == zlib.crc32(b"a circle\x003") & 0x7FFFFFFF
    seeds = {evaluation.image_seed(p, i, b) for p in PROMPTS for i in range(4) for b in (0, 1, 7)}
    assert len(seeds) == len(PROMPTS) * 4 * 3  # distinct across prompts, indices and bases
    assert evaluation.image_seed("a circle", 3, 7) == evaluation.image_seed("a circle", 3, 7)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_rank_pairs_cover_every_image_once_with_equal_batches(world):
    counts = [3, 1, 4, 2]
    shards = [evaluation.rank_pairs(counts, r, world) for r in range(world)]
    assert len({len(p) for p, _ in shards}) == 1  # every rank samples as many images
    real = [pair for p, n in shards for pair in p[:n]]
    assert sorted(real) == sorted((i, s) for i, n in enumerate(counts) for s in range(n))
    assert sum(n for _, n in shards) == sum(counts)


@pytest.fixture(scope="module")
def sd3_pipe(tmp_path_factory):
    return save_tiny_sd3(tmp_path_factory.mktemp("pipe") / "sd3")


def _config(tmp_path, pipe, *extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    args = [*cpu_test_values("sd3"), "--model.kind", "sd3", "--model.path", str(pipe), "--model.resolution", "32",
            "--model.lora_rank", "4", "--model.lora_alpha", "8", "--reward.weights", "{toy_color=1.0}",
            "--data.train_prompts", str(prompts), "--data.eval_prompts", str(prompts),
            "--data.prompt_cache", str(tmp_path / "cache"),
            "--sample.group_size", "2", "--sample.prompts_per_iter", "3", "--sample.batch_size", "6",
            "--sample.train_steps", "2", "--sample.eval_steps", "3", "--sample.window_size", "0",
            "--run.iterations", "1", "--eval.every", "0", "--eval.seeds", "2", "--eval.batch_size", "4",
            "--eval.min_category_images", "0", "--log.progress", "false", "--log.tensorboard", "false",
            "--run.output_dir", str(tmp_path / "runs"), "--run.name", "ev", "--train.lr", "3e-3",
            "--train.batch_size", "0", "--run.max_minutes", "0", "--distributed.strategy", "none", *extra]
    return load_config(None, args)


def test_cli_reproduces_the_trainers_evaluation_of_an_sd3_checkpoint(tmp_path, sd3_pipe, capsys):
    cfg = _config(tmp_path, sd3_pipe)
    t = train_mod.Trainer(cfg, validate(cfg, 1), SOLO)
    t.run()
    final = t.evaluate()  # the trained (EMA) weights, as the final checkpoint holds them
    run_dir = t.run_dir
    (tmp_path / "run.toml").write_text(to_toml(cfg))
    out = tmp_path / "eval"
    rc = evaluate.main([str(tmp_path / "run.toml"), "--checkpoint", str(run_dir), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert summary["images"] == len(rows) == 3 * 2 and summary["prompts"] == 3
    assert {r["category"] for r in rows} == {"all"} and all((out / r["file"]).is_file() for r in rows)
    assert all(set(r["metrics"]) == {"reward", "toy_color"} and "correct" not in r for r in rows)
    assert (out / "grid.png").is_file()
    cli = summary["metrics"]["reward"]["overall"]
    assert cli == pytest.approx(final["eval/overall/reward"], abs=1e-6)
    assert summary["metrics"]["toy_color"]["all"] == pytest.approx(final["eval/all/toy_color"], abs=1e-6)

    # Other images (another eval.seed) score differently by far more than the tolerance above:
    # the agreement is that of the same images, not of two samples of the same distribution.
    policy = evaluate._policy_for(str(tmp_path / "run.toml"), evaluate.resolve_checkpoint(run_dir), "cpu")
    from fastflow.rewards import WeightedReward
    other = evaluate.evaluate_policy(policy, PROMPTS, 2, 3, cfg.sample.guidance_scale, base_seed=1,
                                     reward=WeightedReward({"toy_color": 1.0}), batch_size=4)
    assert abs(other.means("reward")["overall"] - cli) > 100 * 1e-6


def test_cli_of_a_reward_scored_model_needs_prompts_and_rewards(tmp_path, sd3_pipe, capsys):
    for extra, words in ((["--data.eval_prompts", ""], "no prompts: model.kind sd3 has no built-in list"),
                         (["--reward.weights", "{}"], "reward.weights must name at least one reward")):
        cfg = _config(tmp_path, sd3_pipe, *extra)
        (tmp_path / "bad.toml").write_text(to_toml(cfg))
        assert evaluate.main([str(tmp_path / "bad.toml"), "--out", str(tmp_path / "ev")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("evaluate: ") and words in err and err.count("\n") == 1, err
    assert not (tmp_path / "ev").exists()  # refused before anything was written


def test_cli_pads_qwen_image_prompts_as_the_run_did(tmp_path):
    """Qwen-Image pads every prompt to one length per run, from the run's prompt lists: the CLI
    fits the same length (else its images would come from other padding than the run's)."""
    from fastflow.models._tiny import save_tiny_qwenimage
    from tests.test_real_model_path import trainer

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube on a long wooden table beside a window\na blue ball\n")
    t = trainer(tmp_path, "qwenimage", save_tiny_qwenimage(tmp_path / "qwen"), prompts)
    (tmp_path / "run.toml").write_text(to_toml(t.cfg))
    policy = evaluate._policy_for(str(tmp_path / "run.toml"), None, "cpu")
    assert policy.text_len == policy.max_sequence_length != t.policy.text_len  # unfitted: the maximum
    evaluate._fit_prompts_as_the_run(t.cfg, ["a blue ball"], policy)
    assert policy.text_len == t.policy.text_len
