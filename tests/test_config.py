"""fastflow.config: schema defaults, TOML + overrides, one-line errors, derived batch sizes."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from fastflow import config as C
from fastflow.config import (SECTIONS, CliArgs, Config, ConfigError, Derived, _fields, config_to_dict,
                             load_config, parse_cli, to_toml, validate)

ROOT = Path(__file__).resolve().parents[1]

# The embedded default (no config file): the shapes task on a CPU, the schema's defaults with the
# shapes preset (configs/shapes.toml spells out the same values).
SPEC_DEFAULTS = {
    "run": dict(name="shapes", output_dir="runs", seed=0, device="auto", iterations=300, max_minutes=15.0),
    "model": dict(kind="shapes", path="", dtype="float32", finetune="lora", lora_rank=16, lora_alpha=32.0,
                  lora_targets=[], resolution=512, shift=0.0, compile=False, attention="auto",
                  offload_text_encoders=True),
    "sample": dict(train_steps=8, eval_steps=20, guidance_scale=4.5, noise_level=0.7, kind="sde", group_size=8,
                   prompts_per_iter=12, batch_size=16, shared_initial_noise=True, prompt_sampling="uniform",
                   prompt_floor=0.2, window_size=2, window_start=0, cuda_graph="auto", cuda_graph_mode="graph"),
    "train": dict(optimizer="adamw", lr=1e-3, lr_schedule="constant", lr_warmup=0, lr_min_ratio=0.1,
                  beta1=0.9, beta2=0.999, weight_decay=1e-4, adam_eps=1e-8,
                  batch_size=16, optimizer_steps=1, beta=0.04, clip_range=1e-4, adv_clip=5.0, global_std=True,
                  timestep_fraction=1.0, max_grad_norm=1.0, inner_epochs=1, ema=True, ema_decay=0.9,
                  ema_every=1, algorithm="grpo", guard=False, nft_beta=1.0, old_decay_rate=0.001,
                  old_decay_max=0.5, old_decay_flat=0, fm_timesteps=0, awm_weighting="uniform",
                  awm_ghuber_power=0.25, ema_kl_beta=0.0),
    "data": dict(train_prompts="", eval_prompts="", prompt_cache=""),
    "reward": dict(weights={"shapes": 1.0}, options={}, device=""),
    "eval": dict(every=75, seeds=8, min_category_images=96, seed=0, guidance_scale=0.0, batch_size=128, max_prompts=0),
    "log": dict(every=1, tensorboard=True, progress=True, wandb=False, wandb_project="fastflow", wandb_entity="",
                wandb_name="", wandb_tags=[]),
    "checkpoint": dict(every=50, keep=2),
    "distributed": dict(strategy="auto", cpu_offload=False, activation_checkpointing=False,
                        reshard_after_forward=True, cpu_ranks=0),
}


def write(tmp_path: Path, text: str, name: str = "run.toml") -> str:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


# The paper's SD3.5 numbers (FLOW_GRPO.md section 6) on top of the defaults: the batch arithmetic
# and range tests below are written against them (configs/pickscore.toml carries the same).
PAPER = ["--run.max_minutes", "0", "--model.lora_rank", "32", "--model.lora_alpha", "64",
         "--sample.train_steps", "10", "--sample.eval_steps", "40", "--sample.group_size", "24",
         "--sample.prompts_per_iter", "48", "--sample.batch_size", "9", "--sample.window_size", "0",
         "--train.batch_size", "0", "--train.optimizer_steps", "2", "--train.timestep_fraction", "0.99",
         "--eval.every", "10", "--eval.batch_size", "64", "--checkpoint.every", "20",
         "--sample.window_start", "-1", "--train.lr", "3e-4", "--train.ema_every", "8"]


def paper() -> Config:
    return load_config(None, PAPER)


def error_of(fn, *args, **kwargs) -> str:
    """The ConfigError message of fn(*args); checks the one-line contract on the way."""
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("config: "), msg
    assert isinstance(info.value, ValueError)
    return msg


def check(overrides: list[str], world_size: int = 1) -> str:
    """The message of load_config(None, overrides) + validate, whichever raises."""
    return error_of(lambda: validate(load_config(None, [*PAPER, *overrides]), world_size))


# ----------------------------------------------------------------------------------------------
# Schema and defaults
# ----------------------------------------------------------------------------------------------


def test_defaults_are_the_specified_shapes_run():
    assert config_to_dict(load_config()) == SPEC_DEFAULTS
    assert load_config() == C.preset_config("shapes") == C.preset_config()
    # Types of defaults follow the annotations (a float default written as 0 would break to_toml).
    for s, cls in C.SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert C._coerce(f"{s}.{f.name}", getattr(getattr(Config(), s), f.name), C._type_of(s, f.name)) \
                == getattr(getattr(Config(), s), f.name)
            assert f.metadata["help"].strip(), f"{s}.{f.name} has no help text"


def test_defaults_do_not_share_mutable_state():
    a, b = Config(), Config()
    a.reward.weights["other"] = 2.0
    a.model.lora_targets.append("to_q")
    assert b.reward.weights == {"pickscore": 1.0} and b.model.lora_targets == []


def test_schema_defaults_are_the_papers_sd3_recipe():
    """The schema's defaults are the paper's SD3.5-M PickScore run: configs/pickscore.toml, which
    spells out every key, differs from them only in its name and the model kind (the schema's
    kind is the embedded shapes task)."""
    schema = config_to_dict(Config())
    paper = config_to_dict(load_config(str(ROOT / "configs" / "pickscore.toml")))
    assert {(s, k) for s in schema for k in schema[s] if schema[s][k] != paper[s][k]} == \
        {("run", "name"), ("model", "kind")}
    assert config_to_dict(load_config(None, ["--model.kind", "sd3"]))["train"] == paper["train"]


def test_presets_name_schema_options_of_registered_kinds():
    from fastflow import models, presets

    assert set(presets.PRESETS) == set(models.REGISTRY)
    for kind, table in presets.PRESETS.items():
        cfg = C.preset_config(kind)
        assert cfg.model.kind == kind
        for section, values in table.items():
            for key, value in values.items():  # every key exists and has the schema's type
                assert getattr(getattr(cfg, section), key) == C._coerce_field(section, key, value)
        prompts = str(ROOT / "fastflow" / "shapes" / "prompts_train.txt")  # any local file (not fetched sets)
        files = [] if kind in ("shapes", "toy") else ["--data.train_prompts", prompts, "--data.eval_prompts", prompts]
        validate(load_config(None, ["--model.kind", kind, *files]), 1 if kind in ("shapes", "toy") else 8)


def test_default_config_validates():
    d = validate(load_config())
    assert isinstance(d, Derived)
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.world_size = 2  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------
# Loading and overrides
# ----------------------------------------------------------------------------------------------


def test_toml_file_sets_values_over_defaults(tmp_path):
    path = write(tmp_path, """
[run]
name = "pick"
iterations = 5
[train]
lr = 1          # an integer is accepted for a float
[reward.weights]
shapes = 0.5
""")
    cfg = load_config(path)
    assert cfg.run.name == "pick" and cfg.run.iterations == 5
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.reward.weights == {"shapes": 0.5}
    assert cfg.sample == load_config().sample  # untouched sections keep their defaults (shapes: no kind given)


@pytest.mark.parametrize("overrides, section, key, expected", [
    (["--run.name", "my_run"], "run", "name", "my_run"),                 # bare text for a str
    (["--run.name", "2024"], "run", "name", "2024"),                     # number-looking text stays text
    (["--run.name", '"quoted name"'], "run", "name", "quoted name"),     # TOML string literal
    (["--run.name=a=b"], "run", "name", "a=b"),                          # '=' form splits once
    (["--run.seed", "7"], "run", "seed", 7),
    (["--run.seed=12"], "run", "seed", 12),
    (["--sample.window_start", "-1"], "sample", "window_start", -1),   # negative number is a value
    (["--train.lr", "1e-4"], "train", "lr", 1e-4),
    (["--train.lr", "2"], "train", "lr", 2.0),                           # int accepted for float
    (["--sample.noise_level", "0.5"], "sample", "noise_level", 0.5),
    (["--train.ema", "false"], "train", "ema", False),
    (["--model.compile", "true"], "model", "compile", True),
    (["--model.compile"], "model", "compile", True),                     # bare bool flag
    (["--model.compile", "--train.ema", "false"], "model", "compile", True),
    (["--sample.kind=cps"], "sample", "kind", "cps"),
    (["--model.lora_targets", '["to_q", "to_k"]'], "model", "lora_targets", ["to_q", "to_k"]),
    (["--model.lora_targets=[]"], "model", "lora_targets", []),
    (["--reward.weights", "{shapes=1.0}"], "reward", "weights", {"shapes": 1.0}),
    (["--reward.weights", "{shapes = 2, toy_color = 0.5}"], "reward", "weights",
     {"shapes": 2.0, "toy_color": 0.5}),
    (["--reward.weights.toy_color", "0.25"], "reward", "weights", {"shapes": 1.0, "toy_color": 0.25}),
    (["--reward.options", '{shapes = {partial = true}}'], "reward", "options", {"shapes": {"partial": True}}),
    (["--reward.options.shapes.url", "http://host:8000/score"], "reward", "options",
     {"shapes": {"url": "http://host:8000/score"}}),
    (["--train.lr", "1e-3", "--train.lr", "5e-4"], "train", "lr", 5e-4),  # later wins
])
def test_overrides_of_every_type(overrides, section, key, expected):
    cfg = load_config(None, overrides)
    value = getattr(getattr(cfg, section), key)
    assert value == expected and type(value) is type(expected)


def test_overrides_apply_after_the_file(tmp_path):
    path = write(tmp_path, "[train]\nlr = 1e-3\nbeta = 0.01\n")
    cfg = load_config(path, ["--train.lr", "2e-4"])
    assert cfg.train.lr == 2e-4 and cfg.train.beta == 0.01


# ----------------------------------------------------------------------------------------------
# One-line errors naming the key
# ----------------------------------------------------------------------------------------------


def test_unknown_key_in_file_with_suggestion(tmp_path):
    msg = error_of(load_config, write(tmp_path, "[train]\nlrr = 1e-4\n"))
    assert msg == "config: train.lrr is not an option of [train] (did you mean train.lr?)"


def test_unknown_key_override_with_suggestion():
    assert check(["--train.lrr", "1e-4"]) == "config: train.lrr is not an option of [train] (did you mean train.lr?)"


@pytest.mark.parametrize("text, expected", [
    ("[trian]\nlr = 1\n", "config: [trian] is not a section (did you mean [train]?)"),
    ("[sample]\nlr = 1e-4\n", "config: sample.lr is not an option of [sample] (did you mean train.lr?)"),
    ("lr = 1e-4\n", "config: lr is not a section; options live in sections (did you mean train.lr?)"),
    ("[train]\nlr = \"abc\"\n", 'config: train.lr must be a float, got "abc"'),
    ("[train]\noptimizer_steps = true\n", "config: train.optimizer_steps must be an integer, got true"),
    ("[train]\noptimizer_steps = 2.0\n", "config: train.optimizer_steps must be an integer, got 2.0"),
    ("[train]\nema = 1\n", "config: train.ema must be a boolean (true or false), got 1"),
    ("[model]\nlora_targets = [\"to_q\", 3]\n",
     'config: model.lora_targets must be a list of strings, got ["to_q", 3]'),
    ("[reward]\nweights = {shapes = \"high\"}\n", 'config: reward.weights.shapes must be a float, got "high"'),
    ("[reward]\noptions = {shapes = 1}\n", "config: reward.options.shapes must be a table, got 1"),
    ("run = 3\n", "config: [run] must be a table of options, got run = 3"),
])
def test_file_errors(tmp_path, text, expected):
    assert error_of(load_config, write(tmp_path, text)) == expected


def test_bad_toml_and_missing_file(tmp_path):
    msg = error_of(load_config, write(tmp_path, "[train]\nlr = = 1\n"))
    assert "is not valid TOML" in msg and "line 2" in msg
    assert error_of(load_config, str(tmp_path / "nope.toml")) == f"config: file not found: {tmp_path / 'nope.toml'}"


@pytest.mark.parametrize("overrides, expected", [
    (["--train.lr", "abc"], 'config: train.lr must be a float, got "abc"'),
    (["--train.optimizer_steps", "true"], "config: train.optimizer_steps must be an integer, got true"),
    (["--run.iterations", "1.5"], "config: run.iterations must be an integer, got 1.5"),
    (["--train.ema", "yes"], 'config: train.ema must be a boolean (true or false), got "yes"'),
    (["--reward.weights", "shapes"], 'config: reward.weights must be a table of name -> float, got "shapes"'),
    (["--model.lora_targets", "to_q"], 'config: model.lora_targets must be a list of strings, got "to_q"'),
    (["--train.lr"], "config: --train.lr needs a value"),
    (["--lr", "1e-4"], "config: --lr is not an option; overrides are --section.key VALUE (did you mean --train.lr?)"),
    (["--trian.lr", "1"], "config: [trian] is not a section (did you mean [train]?)"),
    (["--train.lr.x", "1"], "config: train.lr is a float, so train.lr.x has no sub-key"),
    (["stray"], 'config: unexpected argument "stray"; overrides are --section.key VALUE'),
])
def test_override_errors(overrides, expected):
    assert check(overrides) == expected


@pytest.mark.parametrize("key, bad, allowed", [
    ("run.device", "gpu", "auto, cpu, cuda"),
    ("model.dtype", "fp16", "float32, bfloat16, float16"),
    ("model.finetune", "qlora", "lora, full"),
    ("sample.kind", "euler", "sde, cps, ode"),
    ("train.optimizer", "sgd", "adamw, adamw8bit"),
    ("distributed.strategy", "deepspeed", "auto, none, ddp, fsdp"),
])
def test_choices(key, bad, allowed):
    msg = check([f"--{key}", bad])
    assert msg.startswith(f"config: {key} must be one of {allowed}; got \"{bad}\""), msg


def test_model_kind_choices_come_from_the_registry():
    from fastflow.models import REGISTRY
    msg = check(["--model.kind", "sd35"])
    assert msg.startswith("config: model.kind must be one of ") and "(did you mean sd3?)" in msg
    for kind in REGISTRY:
        assert kind in msg
    assert check(["--model.kind", "flux", "--model.resolution", "500"]) == \
        "config: model.resolution (500) must be a multiple of 16 for flux"


def test_type_errors_in_code_built_configs_are_caught_by_validate():
    cfg = Config()
    cfg.train.lr = "abc"  # type: ignore[assignment]
    assert error_of(validate, cfg) == 'config: train.lr must be a float, got "abc"'
    cfg = Config()
    cfg.sample.group_size = True  # type: ignore[assignment]
    assert error_of(validate, cfg) == "config: sample.group_size must be an integer, got true"


@pytest.mark.parametrize("overrides, expected", [
    (["--sample.noise_level", "0"], "config: sample.noise_level (0.0) must be in (0, 2] for sample.kind sde"),
    (["--sample.noise_level", "2.5"], "config: sample.noise_level (2.5) must be in (0, 2] for sample.kind sde"),
    (["--sample.kind", "cps", "--train.timestep_fraction", "0.5", "--sample.noise_level", "1.5"],
     "config: sample.noise_level (1.5) must be in (0, 1] for sample.kind cps"),
    (["--model.kind", "qwenimage", "--model.resolution", "520"],
     "config: model.resolution (520) must be a multiple of 16 for qwenimage"),
    (["--train.lr", "0"], "config: train.lr (0.0) must be > 0"),
    (["--train.clip_range", "-1e-4"], "config: train.clip_range (-0.0001) must be > 0"),
    (["--train.beta", "-0.1"], "config: train.beta (-0.1) must be >= 0"),
    (["--train.timestep_fraction", "0"], "config: train.timestep_fraction (0.0) must be in (0, 1]"),
    (["--train.timestep_fraction", "1.01"], "config: train.timestep_fraction (1.01) must be in (0, 1]"),
    (["--sample.group_size", "1"], "config: sample.group_size (1) must be >= 2 (advantages compare images of one prompt)"),
    (["--sample.batch_size", "0"], "config: sample.batch_size (0) must be >= 1"),
    (["--train.batch_size", "-1"], "config: train.batch_size (-1) must be >= 1, or 0 (= sample.batch_size)"),
    (["--eval.batch_size", "0"], "config: eval.batch_size (0) must be >= 1"),
    (["--run.iterations", "0"], "config: run.iterations (0) must be >= 1"),
    (["--eval.seeds", "0"], "config: eval.seeds (0) must be >= 1"),
    (["--eval.min_category_images", "-1"], "config: eval.min_category_images (-1) must be >= 0 (0 = off)"),
    (["--checkpoint.keep", "0"], "config: checkpoint.keep (0) must be >= 1"),
    (["--checkpoint.every", "-1"], "config: checkpoint.every (-1) must be >= 0 (0 = only at the end)"),
    (["--model.lora_rank", "0"], "config: model.lora_rank (0) must be >= 1"),
    (["--sample.window_size", "11"], "config: sample.window_size (11) must be in [0, sample.train_steps (10)]"),
    (["--sample.window_size", "-1"], "config: sample.window_size (-1) must be in [0, sample.train_steps (10)]"),
    (["--sample.window_size", "4", "--sample.window_start", "7"],
     "config: sample.window_start (7) must be -1 (random) or in [0, 6] (sample.train_steps - sample.window_size)"),
    (["--sample.window_start", "-2"],
     "config: sample.window_start (-2) must be -1 (random) or in [0, 10] (sample.train_steps - sample.window_size)"),
    (["--sample.eval_steps", "5"], "config: sample.eval_steps (5) must be >= sample.train_steps (10)"),
    (["--train.optimizer_steps", "0"], "config: train.optimizer_steps (0) must be >= 1"),
    (["--train.ema_decay", "1.0"], "config: train.ema_decay (1.0) must be in [0, 1)"),
    (["--train.lr_warmup", "-1"], "config: train.lr_warmup (-1) must be >= 0"),
    (["--train.lr_min_ratio", "1.5"], "config: train.lr_min_ratio (1.5) must be in [0, 1]"),
    (["--eval.seed", "-1"], "config: eval.seed (-1) must be >= 0"),
    (["--distributed.cpu_offload", "--distributed.strategy", "ddp"],
     "config: distributed.cpu_offload needs distributed.strategy fsdp (or auto), got ddp"),
])
def test_ranges(overrides, expected):
    assert check(overrides) == expected


@pytest.mark.parametrize("key, value", [("train.lr", "inf"), ("train.clip_range", "nan"),
                                        ("run.max_minutes", "inf"), ("sample.guidance_scale", "-inf")])
def test_non_finite_floats(key, value):
    assert check([f"--{key}", value]) == f"config: {key} must be a finite number, got {value}"


def test_boundaries_that_are_allowed():
    cfg = load_config(None, [*PAPER, "--sample.noise_level", "1", "--train.beta", "0",
                             "--train.timestep_fraction", "1", "--sample.group_size", "2", "--sample.prompts_per_iter", "9",
                             "--sample.window_size", "10", "--sample.window_start", "0",
                             "--sample.eval_steps", "10"])
    d = validate(cfg)
    assert d.trained_timesteps == 10 and d.images_per_iter == 18


def test_strategy_none_needs_one_rank():
    cfg = load_config(None, ["--distributed.strategy", "none"])
    assert validate(cfg, 1).world_size == 1
    assert error_of(validate, cfg, 2) == \
        "config: distributed.strategy none runs a single process, but the world size is 2"


def test_no_trained_timestep():
    assert check(["--train.timestep_fraction", "0.05"]) == \
        "config: train.timestep_fraction (0.05) trains no step: floor(sample.train_steps (10) * 0.05) = 0"
    # K is the window length when windowed: 0.4 of 10 steps would train 4, of a 2-step window 0.
    assert check(["--sample.window_size", "2", "--train.timestep_fraction", "0.4"]) == \
        "config: train.timestep_fraction (0.4) trains no step: floor(sample.window_size (2) * 0.4) = 0"


@pytest.mark.parametrize("overrides, world_size, expected", [
    ([], 5, "config: sample.prompts_per_iter * sample.group_size (48 x 24 = 1152 images) must split evenly "
            "over 5 rank(s) x sample.batch_size (9) = 45 images per sampler call"),
    (["--sample.batch_size", "10"], 1, "config: sample.prompts_per_iter * sample.group_size (48 x 24 = 1152 "
                                       "images) must split evenly over 1 rank(s) x sample.batch_size (10) = 10 "
                                       "images per sampler call"),
    (["--train.batch_size", "5"], 8, "config: train.batch_size (5) must divide the 144 images per rank "
                                     "(1152 images / 8 rank(s))"),
    (["--train.optimizer_steps", "3"], 32, "config: train.optimizer_steps (3) must divide the 4 training "
                                           "micro-batches per rank (36 images / train batch 9)"),
])
def test_batch_splits(overrides, world_size, expected):
    assert check(overrides, world_size) == expected


def test_world_size_argument():
    assert error_of(validate, Config(), 0) == "config: world size must be an integer >= 1, got 0"


def test_reward_errors():
    assert check(["--reward.weights", "{}"]) == \
        "config: reward.weights must name at least one reward, e.g. {shapes = 1.0}"
    msg = check(["--reward.weights", "{shapes = 1.0, shpes = 1.0}"])
    assert msg == "config: reward.weights.shpes is not a registered reward (did you mean shapes?)"
    msg = check(["--reward.weights", "{zzz = 1.0}"])
    assert msg.startswith("config: reward.weights.zzz is not a registered reward (known: ") and "shapes" in msg
    assert check(["--reward.weights", "{shapes = 0}"]) == "config: reward.weights are all 0: nothing to optimise"
    assert check(["--reward.options.shapez.x", "1"]) == \
        "config: reward.options.shapez is for a reward not in reward.weights (did you mean reward.options.shapes?)"


def test_missing_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check(["--data.train_prompts", "prompts/train.txt"]) == \
        'config: data.train_prompts file not found: "prompts/train.txt"'
    assert check(["--data.eval_prompts", "eval.csv"]) == \
        'config: data.eval_prompts must be a .txt or .jsonl file, got "eval.csv"'
    assert check(["--model.path", "./weights"]) == 'config: model.path not found: "./weights"'
    assert check(["--model.path", "lora.safetensors"]) == 'config: model.path not found: "lora.safetensors"'
    # Present files pass; a hub id is not a local path and is not checked here.
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "train.txt").write_text("a circle\n")
    (tmp_path / "lora.safetensors").write_bytes(b"")
    validate(load_config(None, ["--data.train_prompts", "prompts/train.txt", "--model.path", "lora.safetensors"]))
    validate(load_config(None, ["--model.path", "stabilityai/stable-diffusion-3.5-medium"]))


def test_error_messages_are_one_line_even_for_multiline_values():
    msg = check(["--train.lr", '"a\nb"'])
    assert "\n" not in msg and msg.startswith("config: train.lr must be a float")


# ----------------------------------------------------------------------------------------------
# Derived sizes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size, per_rank, sample_batches, opt_steps", [
    (1, 1152, 128, 2),
    (2, 576, 64, 2),
    (8, 144, 16, 2),
    (32, 36, 4, 2),  # the paper's SD3.5 runs: 32 ranks x batch 9 x 4 batches, grad accumulation 2
])
def test_derived_paper_numbers(world_size, per_rank, sample_batches, opt_steps):
    d = validate(paper(), world_size)  # the paper's SD3.5 batch numbers
    assert d == Derived(world_size=world_size, images_per_iter=48 * 24, images_per_rank=per_rank,
                        sample_batches_per_rank=sample_batches, train_batch_size=9,
                        train_batches_per_rank=sample_batches, grad_accum=sample_batches // 2,
                        optimizer_steps_per_iter=opt_steps,
                        trained_timesteps=9, eval_guidance_scale=4.5)
    # Conservation: every image is sampled once and trained once per inner epoch.
    assert d.images_per_rank * world_size == d.images_per_iter
    assert d.sample_batches_per_rank * 9 == d.images_per_rank


def test_one_config_for_any_world_size():
    cfg = paper()
    ok = {ws: validate(cfg, ws) for ws in (1, 2, 4, 8, 16, 32, 64)}
    for ws, d in ok.items():  # the same optimisation on any world size: 2 steps of 576 images each
        assert d.optimizer_steps_per_iter == 2
        assert d.grad_accum * ws * d.train_batch_size == 576
    for ws in (3, 5, 7, 256):  # 1152 = 2^7 x 9 images do not fill whole batches of 9 on these
        assert "must split evenly over" in error_of(validate, cfg, ws)
    # 128 ranks: one micro-batch each, which cannot be split into 2 optimizer steps.
    assert error_of(validate, cfg, 128) == ("config: train.optimizer_steps (2) must divide the 1 training "
                                            "micro-batches per rank (9 images / train batch 9)")


def test_derived_options():
    d = validate(load_config(None, [*PAPER, "--train.batch_size", "4", "--sample.batch_size", "8",
                                    "--train.inner_epochs", "2", "--eval.guidance_scale", "7",
                                    "--sample.window_size", "3", "--train.timestep_fraction", "0.7"]), 8)
    assert (d.images_per_rank, d.sample_batches_per_rank, d.train_batch_size, d.train_batches_per_rank) == \
        (144, 18, 4, 36)
    assert d.optimizer_steps_per_iter == 2 * 2  # inner_epochs x optimizer_steps
    assert d.grad_accum == 36 // 2
    assert d.trained_timesteps == 2  # floor(3 * 0.7)
    assert d.eval_guidance_scale == 7.0
    # floor(10 * 0.3) is 3 although 10 * 0.3 == 3.0000000000000004, and 100 * 0.29 gives 29, not 28.
    assert validate(load_config(None, [*PAPER, "--train.timestep_fraction", "0.3"])).trained_timesteps == 3
    cfg = load_config(None, [*PAPER, "--sample.train_steps", "100", "--sample.eval_steps", "100",
                             "--train.timestep_fraction", "0.29"])
    assert validate(cfg).trained_timesteps == 29


# ----------------------------------------------------------------------------------------------
# Writing and round trips
# ----------------------------------------------------------------------------------------------


def _unusual_config() -> Config:
    cfg = Config()
    cfg.run.name = 'ünïcode "quoted" \\ back\tslash'
    cfg.run.max_minutes = 12.5
    cfg.model.lora_targets = ["to_q", "to_out.0"]
    cfg.train.lr = 1e-8
    cfg.train.adam_eps = 1.5e-12
    cfg.train.ema = False
    cfg.sample.window_start = -1
    cfg.reward.weights = {"shapes": 1.0, "toy_color": -0.25, "odd name.x": 2.0}
    cfg.reward.options = {"shapes": {"url": "http://h:1/x", "retries": 3, "nested": {"a": [1, 2.5]}},
                          "toy_color": {}}
    return cfg


@pytest.mark.parametrize("comments", [True, False])
@pytest.mark.parametrize("make", [Config, _unusual_config])
def test_to_toml_round_trip(tmp_path, make, comments):
    cfg = make()
    text = to_toml(cfg, comments=comments)
    back = load_config(write(tmp_path, text))
    assert back == cfg
    assert config_to_dict(back) == config_to_dict(cfg)
    assert to_toml(back, comments=comments) == text


def test_print_config_output_documents_every_option():
    text = to_toml(Config())
    for s in C.SECTIONS:
        assert f"[{s}]" in text
        for f in dataclasses.fields(C.SECTIONS[s]):
            assert f"\n# {f.metadata['help']}" in text and f"\n{f.name} = " in text


def test_config_to_dict_is_a_copy():
    cfg = Config()
    d = config_to_dict(cfg)
    d["reward"]["weights"]["x"] = 1.0
    assert "x" not in cfg.reward.weights


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def test_parse_cli(tmp_path):
    path = write(tmp_path, "[run]\nname = \"from_file\"\n")
    args = parse_cli([path, "--print-config", "--train.lr", "1e-4", "--model.compile", "--sample.kind=cps"])
    assert isinstance(args, CliArgs)
    assert args.config_path == path and args.print_config and args.resume is None
    assert args.overrides == ("--train.lr", "1e-4", "--model.compile", "--sample.kind=cps")
    assert args.config.run.name == "from_file" and args.config.train.lr == 1e-4
    assert args.config.model.compile is True and args.config.sample.kind == "cps"

    empty = parse_cli([])
    assert empty.config == load_config() and empty.config_path is None and not empty.print_config
    assert empty.overrides == ()


@pytest.mark.parametrize("argv, resume, config_path", [
    (["--resume"], "auto", None),
    (["--resume", "runs/shapes"], "runs/shapes", None),
    (["--resume=runs/x/ckpt_20"], "runs/x/ckpt_20", None),
    (["--resume", "--train.lr", "1e-4"], "auto", None),
    (["CFG", "--resume"], "auto", "CFG"),
    (["--resume", "CFG"], "auto", "CFG"),                  # a .toml after --resume is the config
    (["--model.compile", "CFG"], None, "CFG"),             # a bool flag does not swallow the config
])
def test_parse_cli_resume(tmp_path, argv, resume, config_path):
    path = write(tmp_path, "[run]\nseed = 3\n")
    args = parse_cli([path if a == "CFG" else a for a in argv])
    assert args.resume == resume
    assert args.config_path == (path if config_path else None)
    assert args.config.run.seed == (3 if config_path else 0)


def test_parse_cli_errors(tmp_path):
    a, b = write(tmp_path, "", "a.toml"), write(tmp_path, "", "b.toml")
    assert error_of(parse_cli, [a, b]) == f"config: unexpected argument \"{b}\"; a config file ({a}) was already given"
    assert error_of(parse_cli, ["-x"]) == 'config: unknown flag "-x"; options are --section.key VALUE (see --help)'
    assert error_of(parse_cli, ["--train.lrr", "1"]) == \
        "config: train.lrr is not an option of [train] (did you mean train.lr?)"


def test_help_lists_every_option_with_its_doc(capsys):
    with pytest.raises(SystemExit) as info:
        parse_cli(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(C.USAGE)
    for s in C.SECTIONS:
        for f in dataclasses.fields(C.SECTIONS[s]):
            assert f"--{s}.{f.name} " in out and f.metadata["help"] in out


# ----------------------------------------------------------------------------------------------
# Docs, import weight, shipped configs
# ----------------------------------------------------------------------------------------------


def test_docs_are_generated_from_the_schema():
    doc = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert doc == C.render_markdown(), "docs/config.md is stale: python -m fastflow.config --markdown > docs/config.md"
    for s in C.SECTIONS:
        for f in dataclasses.fields(C.SECTIONS[s]):
            assert f"| `{f.name}` |" in doc


def test_config_and_validation_load_no_model_library():
    code = ("import sys, fastflow.config as c; assert 'torch' not in sys.modules, 'torch at import'; "
            "c.validate(c.load_config(None, ['--train.lr', '1e-4']), 2); "
            "heavy = [m for m in ('diffusers', 'transformers', 'peft', 'bitsandbytes', 'rapidocr') if m in sys.modules]; "
            "assert not heavy, heavy")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


CONFIGS = sorted((ROOT / "configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load_and_validate(path, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # relative prompt paths in shipped configs are from the repository root
    cfg = load_config(str(path))
    assert load_config(write(tmp_path, to_toml(cfg))) == cfg
    # Paper configs point at user-supplied prompt files (docs/models.md): stand in for them.
    for key in ("train_prompts", "eval_prompts"):
        rel = getattr(cfg.data, key)
        if rel and not (ROOT / rel).is_file():
            stand_in = tmp_path / "prompts" / rel
            stand_in.parent.mkdir(parents=True, exist_ok=True)
            stand_in.write_text('{"prompt": "a photo of a cat", "tag": "single_object"}\n'
                                if rel.endswith(".jsonl") else "a photo of a cat\n")
            setattr(cfg.data, key, str(stand_in))
    # World size 1 where the batch splits; a config meant for a pod must still split for some
    # power-of-two world size, and every other check (rewards, files, ranges) must pass.
    try:
        d = validate(cfg, 1)
    except ConfigError as e:
        if "must split evenly" not in str(e) and "must divide" not in str(e):
            raise
        for ws in (2, 4, 8, 16, 32, 64):
            try:
                d = validate(cfg, ws)
                break
            except ConfigError:
                continue
        else:
            raise
    assert d.images_per_iter == cfg.sample.prompts_per_iter * cfg.sample.group_size


def test_cps_with_kl_must_not_train_the_noiseless_last_step():
    msg = check(["--sample.kind", "cps", "--train.timestep_fraction", "1.0"])
    assert msg.startswith("config: train.timestep_fraction (1.0) trains the last step, where sample.kind cps")
    ok = lambda o: validate(load_config(None, [*PAPER, *o]), 1)  # noqa: E731
    ok(["--sample.kind", "cps", "--train.timestep_fraction", "1.0", "--train.beta", "0"])
    ok(["--sample.kind", "cps"])  # 0.99: 9 of 10 steps
    # a fixed window that stops short of the end may train all its steps
    ok(["--sample.kind", "cps", "--train.timestep_fraction", "1.0", "--sample.window_size", "3",
        "--sample.window_start", "2"])


def test_shapes_config_is_the_embedded_default():
    assert load_config(str(ROOT / "configs" / "shapes.toml")) == load_config()


RESOLVED = ROOT / "tests" / "data" / "resolved_configs.json"


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.toml")) + ["(none)"])
def test_every_shipped_config_resolves_to_its_recorded_values(name):
    """Every value of every shipped config, as recorded when the configs still spelled out every
    key (tests/data/resolved_configs.json). Defaults per model kind, base files and slimmer
    configs must not change a single resolved value; a new config records its values there
    (a deliberate change updates the record and says why in its commit)."""
    import json

    recorded = json.loads(RESOLVED.read_text())
    assert name in recorded, f"configs/{name} has no record in {RESOLVED.name}"
    got = config_to_dict(load_config(None if name == "(none)" else str(ROOT / "configs" / name)))
    diff = [f"{s}.{k}: {recorded[name][s][k]!r} -> {got[s][k]!r}" for s in recorded[name] for k in recorded[name][s]
            if recorded[name][s][k] != got[s][k]]
    assert not diff, diff
    assert set(got) == set(recorded[name]) and all(set(got[s]) == set(recorded[name][s]) for s in got)


# ----------------------------------------------------------------------------------------------
# Presets, extends, sources
# ----------------------------------------------------------------------------------------------


def test_extends_presets_and_where_each_value_came_from(tmp_path):
    base = write(tmp_path, '[model]\nkind = "flux"\n[train]\nlr = 1e-5\nbeta = 0.02\n', "base.toml")
    (tmp_path / "sub").mkdir()
    child = write(tmp_path, 'extends = "../base.toml"\n[run]\nname = "child"\n[train]\nbeta = 0.0\n', "sub/child.toml")
    cfg = load_config(child, ["--train.lr", "2e-5"])
    assert cfg.model.kind == "flux" and cfg.sample.train_steps == 6 and cfg.model.lora_rank == 64  # the flux preset
    assert cfg.train.beta == 0.0 and cfg.train.lr == 2e-5 and cfg.run.name == "child"
    assert cfg.train.clip_range == Config().train.clip_range  # neither preset nor file: the schema's
    src = C.sources_of(cfg)
    assert src["model.kind"] == f"file {base}" and src["sample.train_steps"] == "preset flux"
    assert src["train.beta"] == f"file {child}" and src["train.lr"] == "command line"
    assert "train.clip_range" not in src
    text = to_toml(cfg, sources=True)
    assert "train_steps = 6  # from: preset flux\n" in text and "clip_range = 0.0001  # from: default\n" in text
    assert load_config(write(tmp_path, text, "printed.toml")) == cfg  # --print-config output loads back
    # the command line's kind selects the preset, over the file's
    assert load_config(child, ["--model.kind", "qwenimage"]).sample.noise_level == 1.2


def test_print_config_names_the_source_of_every_value(capsys):
    from fastflow import train
    assert train.main(["--print-config", "--train.lr", "5e-4"]) == 0
    out = capsys.readouterr().out
    assert "lr = 0.0005  # from: command line\n" in out and 'name = "shapes"  # from: preset shapes\n' in out
    assert "clip_range = 0.0001  # from: default\n" in out


def test_bad_extends_is_one_line(tmp_path):
    a = write(tmp_path, 'extends = "b.toml"\n', "a.toml")
    write(tmp_path, 'extends = "a.toml"\n', "b.toml")
    assert "extends makes a cycle" in error_of(load_config, a)
    missing = write(tmp_path, 'extends = "nope.toml"\n', "m.toml")
    assert "extends nope.toml: file not found" in error_of(load_config, missing)
    bad = write(tmp_path, 'extends = 3\n', "n.toml")
    assert "extends must be the path of a TOML file, got 3" in error_of(load_config, bad)
    chain = [write(tmp_path, f'extends = "c{i + 1}.toml"\n', f"c{i}.toml") for i in range(C.MAX_EXTENDS + 1)]
    write(tmp_path, "", f"c{C.MAX_EXTENDS + 1}.toml")
    assert "longer than" in error_of(load_config, chain[0])
