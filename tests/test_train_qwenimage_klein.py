"""Qwen-Image and FLUX.2 [klein] through the trainer, on their tiny random pipelines
(fastflow.models._tiny), as tests/test_real_model_path.py runs SD3 / FLUX: the first training pass
reproduces the rollout (ratio exactly 1 in fp32; clipfrac 0 in bf16 autocast with the paper's clip
range 1e-4, LoRA and full fine-tuning), a two-iteration run that checkpoints, resumes and exports
its EMA weights in the files the stock pipelines load, and a two-rank FSDP2 run under torchrun."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from fastflow import train as train_mod  # noqa: E402
from fastflow.config import load_config, validate  # noqa: E402
from fastflow.models._tiny import save_tiny_flux2_klein, save_tiny_qwenimage  # noqa: E402
from tests.test_real_model_path import SOLO, cpu_test_values, one_iteration, trainer  # noqa: E402

PROMPTS = ["a red cube", "a blue ball", "a green cat"]
KINDS = ["qwenimage", "flux2_klein"]
PIPELINE = {"qwenimage": "QwenImagePipeline", "flux2_klein": "Flux2KleinPipeline"}
TRANSFORMER = {"qwenimage": "QwenImageTransformer2DModel", "flux2_klein": "Flux2Transformer2DModel"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread: the toy-sized matmuls wait milliseconds each for a second thread on a
    shared machine and run in microseconds on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipes")
    return {"qwenimage": save_tiny_qwenimage(root / "qwenimage"),
            "flux2_klein": save_tiny_flux2_klein(root / "flux2_klein")}


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    p.write_text("\n".join(PROMPTS) + "\n")
    return p


# ------------------------------------------------------------------------- on-policy ratio

@pytest.mark.parametrize("kind", KINDS)
def test_first_pass_reproduces_the_rollout_in_fp32(tmp_path, pipes, prompt_file, kind):
    t = trainer(tmp_path, kind, pipes[kind], prompt_file, "--train.lr", "1e-3")
    assert t.policy.transformer.dtype == torch.float32
    if kind == "qwenimage":  # the trainer encoded the lists: their longest prompt sets the length
        assert t.policy.text_len == 16 and t.policy._cache.store is not None
    out = one_iteration(t)
    assert out["onpolicy/ratio_dev_max"] == 0.0 and out["onpolicy/clipfrac"] == 0.0
    assert out["kl"] == 0.0 and t.optimizer_steps == 1


@pytest.mark.parametrize("finetune", ["lora", "full"])
@pytest.mark.parametrize("kind", KINDS)
def test_first_pass_reproduces_the_rollout_in_bf16(tmp_path, pipes, prompt_file, kind, finetune):
    """bf16 autocast, the paper's clip range 1e-4: the training pass before the first optimizer
    step reproduces every recorded log-prob (clipfrac 0, ratio exactly 1); full fine-tuning keeps
    fp32 master weights and a bf16 reference."""
    t = trainer(tmp_path, kind, pipes[kind], prompt_file, "--model.dtype", "bfloat16",
                "--model.finetune", finetune, "--train.lr", "1e-3")
    assert all(p.dtype == torch.float32 for p in t.params.values())
    if finetune == "full":
        ref = t.policy.tuning.ref_transformer
        assert any(p.dtype == torch.bfloat16 for p in ref.parameters())
    out = one_iteration(t)
    assert out["onpolicy/clipfrac"] == 0.0 and out["onpolicy/ratio_dev_max"] == 0.0, out
    assert out["kl"] == 0.0 and t.optimizer_steps == 1


# ------------------------------------------------------------------------- run, resume, export

def _final_matches_ema(kind, pipe, final, ema, finetune):
    """The exported files hold the EMA weights and the stock pipeline / model class loads them."""
    import diffusers

    if finetune == "lora":
        exported = load_file(str(final / "pytorch_lora_weights.safetensors"))
        assert len(exported) == len(ema)
        for n, v in ema.items():  # peft's saved form: no adapter name, "transformer." prefix
            torch.testing.assert_close(exported["transformer." + n.replace(".default.", ".")], v, rtol=0, atol=0)
        fresh = getattr(diffusers, PIPELINE[kind]).from_pretrained(pipe)
        fresh.load_lora_weights(str(final))
        (adapter,) = fresh.transformer.peft_config
        loaded = dict(fresh.transformer.named_parameters())
        for n, v in ema.items():
            torch.testing.assert_close(loaded[n.replace(".default.", f".{adapter}.")], v, rtol=0, atol=0)
    else:
        model = getattr(diffusers, TRANSFORMER[kind]).from_pretrained(final / "transformer")
        got = dict(model.named_parameters())
        assert got.keys() == ema.keys()
        for n, v in ema.items():
            torch.testing.assert_close(got[n], v.to(got[n].dtype), rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_two_iterations_resume_and_export_loadable_by_the_stock_pipeline(tmp_path, pipes, prompt_file, kind):
    t = trainer(tmp_path, kind, pipes[kind], prompt_file, "--train.lr", "3e-3", "--train.ema_every", "1",
                "--train.ema_decay", "0.5", "--train.clip_range", "0.2")
    start = {n: p.detach().clone() for n, p in t.params.items()}
    t.run()
    assert t.iteration == 2 and t.optimizer_steps == 2
    run_dir = t.run_dir
    moved = max(float((p.detach() - start[n]).abs().max()) for n, p in t.params.items())
    assert moved > 1e-4  # the LoRA trained
    ema = {n[len("transformer."):]: v.detach().clone() for n, v in t.ema.shadow.items()}
    _final_matches_ema(kind, pipes[kind], run_dir / "final", ema, "lora")

    # resume the run directory for a third iteration: weights, optimizer and EMA continue
    cfg = load_config(str(run_dir / "config.toml"), ["--run.iterations", "3"])
    again = train_mod.Trainer(cfg, validate(cfg, 1), SOLO, resume=str(run_dir))
    assert again.run_dir == run_dir.resolve() and again.iteration == 2
    for n, p in again.params.items():
        assert torch.equal(p.detach(), t.params[n].detach()), n
    for n, v in again.ema.shadow.items():
        assert torch.equal(v, t.ema.shadow[n]), n
    again.run()
    assert again.iteration == 3 and again.optimizer_steps == 3
    its = [json.loads(line)["iteration"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
           if "reward_mean" in json.loads(line)]
    assert its == [1, 2, 3]
    ema3 = {n[len("transformer."):]: v for n, v in again.ema.shadow.items()}
    assert max(float((ema3[n] - ema[n]).abs().max()) for n in ema) > 0  # the third step moved it
    _final_matches_ema(kind, pipes[kind], run_dir / "final", ema3, "lora")


def test_full_finetune_run_exports_a_from_pretrained_transformer(tmp_path, pipes, prompt_file):
    kind = "flux2_klein"
    t = trainer(tmp_path, kind, pipes[kind], prompt_file, "--model.finetune", "full", "--train.lr", "1e-3",
                "--train.ema_every", "1", "--train.ema_decay", "0.5", "--train.clip_range", "0.2",
                "--run.iterations", "1")
    t.run()
    ema = {n[len("transformer."):]: v for n, v in t.ema.shadow.items()}
    _final_matches_ema(kind, pipes[kind], t.run_dir / "final", ema, "full")


# ------------------------------------------------------------------------- FSDP2 at two ranks

def _fsdp_args(kind, out_dir, pipe, prompts, *extra):
    """A two-iteration FSDP2 run of the tiny ``kind`` pipeline with the toy colour reward."""
    return [*cpu_test_values(kind), "--model.kind", kind, "--model.path", str(pipe), "--model.resolution", "32",
            "--model.lora_rank", "4", "--model.lora_alpha", "8", "--reward.weights", "{toy_color=1.0}",
            "--data.train_prompts", str(prompts), "--data.eval_prompts", str(prompts),
            "--sample.group_size", "4", "--sample.prompts_per_iter", "3", "--sample.batch_size", "3",
            "--sample.train_steps", "3", "--sample.eval_steps", "3", "--sample.window_size", "0",
            "--sample.guidance_scale", "3.5", "--run.iterations", "2", "--eval.every", "0",
            "--eval.seeds", "1", "--eval.min_category_images", "0", "--checkpoint.every", "2",
            "--log.progress", "false", "--log.tensorboard", "false", "--run.output_dir", str(out_dir),
            "--run.name", kind, "--train.optimizer_steps", "1", "--train.clip_range", "0.2",
            "--train.batch_size", "0", "--train.ema_every", "1", "--train.ema_decay", "0.5",
            "--run.max_minutes", "0", "--distributed.strategy", "fsdp", *extra]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind, finetune", [("qwenimage", "full"), ("flux2_klein", "lora")])
def test_two_rank_fsdp2_run_agrees_and_exports_its_gathered_ema(tmp_path, prompt_file, kind, finetune):
    """Two gloo ranks under torchrun: the transformer sharded per block (the full fine-tuning
    reference too, filled shard by shard; Qwen-Image with activation checkpointing, as its
    configs), both ranks end with the same weights, and rank 0 writes the gathered EMA weights in
    the stock pipeline's format."""
    from tests.test_distributed import assert_ranks_identical, launch

    pipe = (save_tiny_qwenimage if kind == "qwenimage" else save_tiny_flux2_klein)(tmp_path / "pipe")
    lr = "3e-3" if finetune == "lora" else "1e-3"
    extra = ["--distributed.activation_checkpointing", str(kind == "qwenimage").lower()]
    dumps = launch("train", tmp_path / "dump", _fsdp_args(kind, tmp_path / "runs", pipe, prompt_file,
                                                          "--model.finetune", finetune, "--train.lr", lr,
                                                          *extra),
                   timeout=280)
    assert int(dumps[0]["strategy_fsdp"]) == 1 and int(dumps[0]["iteration"]) == 2
    assert_ranks_identical(dumps)
    ema = {n[len("ema.transformer."):]: v for n, v in dumps[0].items() if n.startswith("ema.")}
    cur = {n[len("w.transformer."):]: v for n, v in dumps[0].items() if n.startswith("w.")}
    assert ema and max(float((ema[n] - cur[n]).abs().max()) for n in ema) > 1e-6  # EMA != current
    _final_matches_ema(kind, pipe, tmp_path / "runs" / kind / "final", ema, finetune)
    if finetune == "full":  # trained away from the base weights
        import diffusers

        base = getattr(diffusers, TRANSFORMER[kind]).from_pretrained(pipe, subfolder="transformer").state_dict()
        assert max(float((ema[n] - base[n]).abs().max()) for n in ema) > 1e-5
