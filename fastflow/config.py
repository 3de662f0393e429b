"""Typed run configuration: TOML file -> dataclasses -> ``--section.key value`` overrides -> checks.

A run is described by one :class:`Config` with a section per concern (``[run]``, ``[model]``,
``[sample]``, ...). Every field has a default (together: the embedded shapes run, so
``python -m fastflow.train`` works with no file) and a help text (rendered by ``--help``,
``--print-config`` and docs/config.md).

    cfg = load_config("configs/pickscore.toml", ["--train.lr", "1e-4", "--sample.kind=cps"])
    derived = validate(cfg, world_size=8)        # raises ConfigError (one line naming the key)

Everything here is cheap: no model, no weights and no torch import, so a mistyped key fails in
well under a second instead of after minutes of loading.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import json
import math
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser under its backport name
    import tomli as tomllib  # type: ignore[no-redef]

from fastflow import models as _models
from fastflow import objectives as _objectives


class ConfigError(ValueError):
    """A config mistake; the message is one line that names the offending key."""

    def __init__(self, message: str):
        # One line whatever the caller built, so logs and launcher output stay grep-able.
        super().__init__(" ".join(str(message).split()))


def opt(default: Any, help: str, *, choices: Sequence[str] | Callable[[], Sequence[str]] | None = None,
        aliases: dict | None = None):
    """A config field: its default, a one-sentence help text and (optionally) its allowed values.

    ``choices`` may be a callable so that registries are read when validating, not at import.
    ``aliases`` maps values of an earlier spelling of the option to today's (e.g. a boolean that
    became a choice), so that existing configs keep loading.
    """
    meta = {"help": help, "choices": choices, "aliases": aliases or {}}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def _model_kinds() -> list[str]:
    return sorted(_models.REGISTRY)


# ----------------------------------------------------------------------------------------------
# Schema. Defaults are the paper's: Flow-GRPO on SD3.5-Medium with PickScore. model.kind's default
# is the embedded shapes task, whose values (and every other model's recipe) are the presets of
# fastflow/presets.py that model.kind selects (load_config).
# ----------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    """The run as a whole: its name, where it writes, seed, device and length."""

    name: str = opt("run", "Run name; the run directory is output_dir/name.")
    output_dir: str = opt("runs", "Parent directory of run directories (checkpoints, logs, eval images).")
    seed: int = opt(42, "Base random seed of the run (>= 0).")
    device: str = opt("auto", "Where to run; auto = cuda when available, else cpu.",
                      choices=("auto", "cpu", "cuda"))
    iterations: int = opt(2000, "RL iterations (each: sample rollouts, score them, train on them).")
    max_minutes: float = opt(0.0, "Wall-clock budget in minutes: when reached, stop cleanly, checkpoint "
                                  "and run the final eval; 0 = no budget.")


@dataclass
class ModelConfig:
    """The model being fine-tuned and how (LoRA or full)."""

    kind: str = opt("shapes", "Model adapter, from the registry in fastflow/models/__init__.py.",
                    choices=_model_kinds)
    path: str = opt("stabilityai/stable-diffusion-3.5-medium", "Weights: a hub id, a local directory or a weights file (.safetensors/.pt); "
                        "\"\" = the model's built-in default.")
    dtype: str = opt("bfloat16", "Model compute dtype; the SDE math (log-probs, KL) always runs in float32.",
                     choices=("float32", "bfloat16", "float16"))
    finetune: str = opt("lora", "Train LoRA adapters (lora) or every weight (full).", choices=("lora", "full"))
    lora_rank: int = opt(32, "LoRA rank r.")
    lora_alpha: float = opt(64.0, "LoRA alpha; the adapter's output is scaled by alpha / r.")
    lora_targets: list[str] = opt([], "Module names that get LoRA adapters; empty = the model's paper "
                                      "default (SD3.5: the attention projections).")
    resolution: int = opt(512, "Image side in pixels for the diffusers models (a multiple of 16); the toy and shapes "
                               "models have a fixed size.")
    shift: float = opt(0.0, "Time-grid shift of the flow sigmas; 0 = the model's default.")
    compile: bool = opt(False, "torch.compile the denoiser (diffusers models: the transformer and its frozen "
                               "copy; shapes: text encoder and UNet of the trained, reference and "
                               "sampling copies, which ran 0.9x on a one-thread CPU, so off there).")
    attention: str = opt("auto", "Attention kernels of every forward on CUDA (rollout, training recompute and "
                                 "KL reference alike, so recorded log-probs are reproduced): sdpa = PyTorch "
                                 "SDPA with cuDNN, flash, memory-efficient first; flash = also diffusers' "
                                 "flash-attn backend (needs flash_attn); auto = flash when installed, else "
                                 "sdpa; none = PyTorch's own choice. No effect off CUDA.",
                         choices=("auto", "sdpa", "flash", "none"))
    offload_text_encoders: bool = opt(True, "Diffusers models: encode the training and evaluation prompt lists once "
                                            "(over the ranks, cached on disk: data.prompt_cache), then move "
                                            "the text encoders to host memory (about 11 GB of bf16 weights "
                                            "for SD3.5's CLIP-L/G + T5-XXL); prompts outside the lists are "
                                            "then encoded on the CPU. false = keep them on the device.")


@dataclass
class SampleConfig:
    """Rollouts: the reduced-step SDE sampler, groups and the per-rank rollout batch."""

    train_steps: int = opt(10, "Denoising steps T of training rollouts.")
    eval_steps: int = opt(40, "Denoising steps of evaluation (ODE sampler); >= train_steps.")
    guidance_scale: float = opt(4.5, "Classifier-free guidance weight w of rollouts (FLUX: the value fed "
                                     "to its guidance embedding).")
    noise_level: float = opt(0.7, "SDE noise level a: sde in (0, 2] (std_t = a sqrt(t / (1 - t)); SD3.5 0.7, "
                                  "FLUX 0.9, Qwen-Image 1.2), cps in (0, 1].")
    kind: str = opt("sde", "Stochastic step: sde (Flow-GRPO) or cps (coefficient-preserving); ode = the "
                           "deterministic sampler, for train.algorithm nft / awm only (clean images, no "
                           "log-probs; then sample.shared_initial_noise must be false).",
                    choices=("sde", "cps", "ode"))
    group_size: int = opt(24, "Images per prompt G (one GRPO group); >= 2.")
    prompts_per_iter: int = opt(48, "Prompts per iteration over all ranks; images per iteration = "
                                    "prompts_per_iter * group_size.")
    batch_size: int = opt(9, "Per-rank rollout micro-batch (images per sampler call).")
    shared_initial_noise: bool = opt(False, "Every image of a group starts from the same initial noise, so "
                                            "the group's rewards differ only through the SDE noise of the "
                                            "trained steps: the advantages then measure the sampled actions, "
                                            "not the luck of the starting point (a lower-variance gradient, "
                                            "most useful with a short SDE window). false = a different noise "
                                            "per image, as the paper's scripts.")
    prompt_sampling: str = opt("uniform", "Which training prompts an iteration rolls out: uniform (distinct, "
                                          "equally likely, as the authors' scripts), category (every category "
                                          "equally often: a prompt weighs 1 / its category's size; for "
                                          "benchmarks scored as a mean over categories) or signal (in proportion to "
                                          "the within-group reward std of each prompt's recent groups, so "
                                          "fewer rollouts land in all-equal groups that carry no gradient; "
                                          "fastflow.prompt_sampler).", choices=("uniform", "category", "signal"))
    prompt_floor: float = opt(0.2, "signal sampling: every prompt's weight gets this fraction of the mean "
                                   "weight added, so prompts that looked solved or hopeless keep being "
                                   "tried; >= 0.")
    window_size: int = opt(0, "0 = every step is SDE and trained; else Flow-GRPO-Fast: only a window of "
                              "this many steps is SDE and trained, the others are ODE.")
    window_start: int = opt(0, "First step of the window, in [0, train_steps - window_size]; -1 = random "
                                "per iteration.")
    cuda_graph: str = opt("auto", "CUDA-graph rollouts (fastflow.graphs: captured once per shape, one graph "
                                  "per step and step kind, so any SDE window replays them): auto = capture "
                                  "when possible, else the eager sampler runs and the reason is logged once "
                                  "(off CUDA, under FSDP2 sharding, a failed capture); required = stop with "
                                  "the reason instead; off = always eager. true / false mean auto / off.",
                          choices=("auto", "required", "off"), aliases={True: "auto", False: "off"})
    cuda_graph_mode: str = opt("graph", "graph (explicit torch.cuda.CUDAGraph) or compile "
                                        "(torch.compile mode reduce-overhead).", choices=("graph", "compile"))


@dataclass
class TrainConfig:
    """The update: optimizer, batching, loss terms, EMA, and the algorithm (Flow-GRPO by default)."""

    optimizer: str = opt("adamw", "adamw (torch) or adamw8bit (bitsandbytes).", choices=("adamw", "adamw8bit"))
    lr: float = opt(3e-4, "Learning rate (> 0): the peak of the schedule.")
    lr_schedule: str = opt("constant", "After the warmup: constant (the public code's way), or decay to "
                                       "lr * lr_min_ratio by the run's last optimizer step (run.iterations "
                                       "x optimizer steps per iteration), linearly or along half a cosine. "
                                       "A run stopped early by run.max_minutes stops part-way down.",
                           choices=("constant", "linear", "cosine"))
    lr_warmup: int = opt(0, "Optimizer steps of linear warmup to lr (>= 0); 0 = none.")
    lr_min_ratio: float = opt(0.1, "The decaying schedules' final lr as a fraction of lr, in [0, 1].")
    beta1: float = opt(0.9, "Adam beta1, in [0, 1).")
    beta2: float = opt(0.999, "Adam beta2, in [0, 1).")
    weight_decay: float = opt(1e-4, "Decoupled weight decay (>= 0).")
    adam_eps: float = opt(1e-8, "Adam epsilon (> 0).")
    batch_size: int = opt(9, "Per-rank training micro-batch (images per forward/backward); "
                             "0 = sample.batch_size.")
    optimizer_steps: int = opt(2, "Optimizer steps per inner epoch (the paper: 2). Gradients accumulate over "
                                  "the training micro-batches between steps; independent of the world size, "
                                  "so one config trains the same way on any number of GPUs.")
    beta: float = opt(0.01, "KL penalty weight (the public code's KL form); 0 = no KL term.")
    clip_range: float = opt(1e-4, "PPO ratio clip epsilon (> 0).")
    adv_clip: float = opt(5.0, "Advantages are clipped to [-adv_clip, adv_clip] (> 0).")
    global_std: bool = opt(True, "Normalise advantages by the std over all rewards of the iteration "
                                 "(true) or by each group's std (false).")
    timestep_fraction: float = opt(0.99, "Fraction of the SDE steps that are trained: the first "
                                         "floor(K * fraction), K = window_size or train_steps; in (0, 1].")
    max_grad_norm: float = opt(1.0, "Gradient-norm clip (> 0).")
    inner_epochs: int = opt(1, "Passes over each iteration's rollout data.")
    ema: bool = opt(True, "Keep an EMA of the trainable weights, used for evaluation and checkpoints.")
    ema_decay: float = opt(0.9, "EMA decay, in [0, 1).")
    ema_every: int = opt(8, "Update the EMA every this many optimizer steps.")
    # The algorithm (docs/algorithms.md). grpo: the settings above; nft / awm: flow matching on
    # the forward process of each rollout's clean images (beta, adv_clip, clip_range (awm),
    # global_std, optimizer and EMA settings apply; timestep_fraction does not).
    algorithm: str = opt("grpo", "grpo (Flow-GRPO), nft (DiffusionNFT: negative-aware flow matching with an "
                                 "old sampling policy) or awm (Advantage Weighted Matching).",
                         choices=_objectives.ALGORITHMS)
    guard: bool = opt(False, "GRPO-Guard (algorithm grpo, sample.kind sde): the regulated ratio s (log p - "
                             "log p_old) + |mu - mu_old|^2 / (2 s), s the transition std, instead of the "
                             "plain log-ratio: no negative bias, each step's gradient scaled by s.")
    nft_beta: float = opt(1.0, "DiffusionNFT's beta (> 0): the implicit policies v+- = v_old +- beta (v - "
                               "v_old); the published configs use 1.0 (GenEval, PickScore) and 0.1 (OCR).")
    old_decay_rate: float = opt(0.001, "nft: the old policy's EMA decay rises by this much per optimizer step "
                                       "(>= 0), old <- decay old + (1 - decay) current after each iteration.")
    old_decay_max: float = opt(0.5, "nft: the old policy's decay stops rising at this value, in [0, 1) (the "
                                    "published schedules: 0.5 with rate 0.001, 0.999 with rate 0.0075).")
    old_decay_flat: int = opt(0, "nft: the old policy's decay is 0 (old = current) for this many optimizer "
                                 "steps (>= 0; the published OCR schedule: 75).")
    fm_timesteps: int = opt(0, "nft / awm: training times per image per iteration, drawn without repeats "
                               "from the rollout grid's sigma_1 .. sigma_T (0 = all T = sample.train_steps, "
                               "as the published configs).")
    awm_weighting: str = opt("uniform", "awm: the flow-matching log-likelihood's time weighting, uniform "
                                        "(-|v - (eps - x0)|^2) or t (times t).", choices=("uniform", "t"))


@dataclass
class DataConfig:
    """Prompt files. Relative paths are read from the working directory."""

    train_prompts: str = opt("pickscore:train.txt", "Training prompt file (.txt: one prompt a line, lines starting with # are "
                                 "comments; .jsonl: objects with a \"prompt\" key plus metadata), or a "
                                 "published prompt set as SET:FILE (e.g. pickscore:train.txt, after python -m "
                                 "fastflow.data fetch pickscore); \"\" = the model's built-in list.")
    eval_prompts: str = opt("pickscore:test.txt", "Held-out evaluation prompt file (.txt/.jsonl) or prompt set (SET:FILE, e.g. "
                                "pickscore:test.txt); \"\" = the model's built-in list.")
    prompt_cache: str = opt("", "Diffusers models: folder of the on-disk prompt-embedding cache, keyed by model, "
                                "encoder settings and prompt list (reused by later runs); \"\" = "
                                "$FASTFLOW_CACHE or ~/.cache/fastflow; \"off\" = no disk cache.")


@dataclass
class RewardConfig:
    """Rewards: the training reward is the weighted sum of named rewards (each is logged)."""

    weights: dict[str, float] = opt({"pickscore": 1.0}, "Reward name -> weight; names from the registry in "
                                                     "fastflow/rewards/__init__.py.")
    options: dict[str, dict] = opt({}, "Reward name -> table of keyword options for that reward's factory, "
                                       "e.g. {ocr = {engine = \"rapidocr\"}} or a server url.")
    device: str = opt("", "Where in-process rewards run: \"\" = the rank's device (its GPU; CLIP-based "
                          "scorers then run in bf16), or cpu / cuda. One reward can override it with "
                          "reward.options.NAME.device. Served rewards (remote) load nothing locally.")


@dataclass
class EvalConfig:
    """Evaluation: full-step ODE sampling on the held-out prompts with fixed seeds."""

    every: int = opt(60, "Evaluate every this many iterations; 0 = only at the end.")
    seeds: int = opt(1, "Images per eval prompt (fixed seeds).")
    min_category_images: int = opt(
        0, "More seeds for the prompts of small categories, so that every category gets at least "
            "this many images (0 = eval.seeds for every prompt). The headline is the mean over "
            "categories: a 1-prompt category at 8 images would move it by 2 points from noise alone.")
    seed: int = opt(0, "Seed of the evaluation noise, independent of run.seed: runs with different "
                       "seeds are evaluated on the same images, so their numbers compare directly.")
    guidance_scale: float = opt(0.0, "Guidance weight at evaluation; 0 = sample.guidance_scale.")
    batch_size: int = opt(16, "Per-rank evaluation batch.")
    max_prompts: int = opt(0, "Evaluate at most this many prompts; 0 = all.")


@dataclass
class LogConfig:
    """Logging."""

    every: int = opt(1, "Log scalars every this many iterations.")
    tensorboard: bool = opt(True, "Write TensorBoard event files into the run directory.")
    progress: bool = opt(True, "Show progress bars on the console.")
    wandb: bool = opt(False, "Log to Weights & Biases too (pip install 'fastflow[wandb]'): every metric, the "
                             "eval tables and image grids; a resumed run continues its wandb run. "
                             "WANDB_MODE=offline writes it locally (wandb sync uploads it later).")
    wandb_project: str = opt("fastflow", "wandb project.")
    wandb_entity: str = opt("", "wandb entity (user or team); \"\" = your default entity.")
    wandb_name: str = opt("", "wandb run name; \"\" = the run directory's name.")
    wandb_tags: list[str] = opt([], "wandb run tags.")


@dataclass
class CheckpointConfig:
    """Checkpoints (EMA weights, optimizer, RNG state) for resuming."""

    every: int = opt(60, "Save a checkpoint every this many iterations, and at the end; 0 = only at the end.")
    keep: int = opt(2, "Checkpoints kept; older ones are deleted.")


@dataclass
class DistributedConfig:
    """Several ranks: GPUs under torchrun, or CPU ranks the trainer launches itself."""

    strategy: str = opt("auto", "Data parallelism: auto = chosen from the model and world size; none = "
                                "a single process; ddp; fsdp (FSDP2).", choices=("auto", "none", "ddp", "fsdp"))
    cpu_offload: bool = opt(False, "FSDP: keep parameters, gradients and optimizer state on the CPU.")
    activation_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.")
    reshard_after_forward: bool = opt(True, "FSDP: free gathered parameters after forward (less memory, "
                                            "more communication).")
    cpu_ranks: int = opt(1, "Started without torchrun on a CPU: run this many ranks on this machine "
                            "(torch's launcher, standalone), the CPU threads split between them. Small "
                            "convolutional models train about 1.5x faster as two one-thread ranks than as "
                            "one two-thread process. 0 = auto: the most ranks, up to the CPU threads "
                            "available (OMP_NUM_THREADS, else the cores) and 8, that split the batch; "
                            "1 = one process. Ignored under torchrun and on GPUs.")


@dataclass
class Config:
    """A whole run: one attribute per TOML section."""

    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


@dataclass(frozen=True)
class Derived:
    """Quantities the trainer needs that follow from a config and the world size."""

    world_size: int
    images_per_iter: int  # prompts_per_iter * group_size, over all ranks
    images_per_rank: int
    sample_batches_per_rank: int  # sampler calls per rank per iteration
    train_batch_size: int  # train.batch_size with 0 resolved
    train_batches_per_rank: int  # training micro-batches per rank per inner epoch
    grad_accum: int  # micro-batches per optimizer step on each rank
    optimizer_steps_per_iter: int  # over all inner epochs
    trained_timesteps: int  # K' = floor(K * timestep_fraction)
    eval_guidance_scale: float  # eval.guidance_scale with 0 resolved


@dataclass
class CliArgs:
    """The parsed command line of ``python -m fastflow.train``."""

    config: Config
    config_path: str | None
    print_config: bool
    resume: str | None  # None, "auto" (bare --resume) or a path
    overrides: tuple[str, ...]
    plan: bool = False  # --plan: print the per-rank memory plan (fastflow.plan) and exit
    plan_gpus: int | None = None  # --plan-gpus N (default: $WORLD_SIZE or 1)
    plan_gpu_memory: str | None = None  # --plan-gpu-memory SIZE (default: this GPU's, else 80 GiB)
    plan_check: bool = True  # --no-plan-check: skip the start-up memory check on CUDA


# ----------------------------------------------------------------------------------------------
# Schema introspection
# ----------------------------------------------------------------------------------------------

# Section name -> its dataclass, in schema order (annotations are strings under `from __future__
# import annotations`, so they are resolved once here).
SECTIONS: dict[str, type] = dict(typing.get_type_hints(Config))
_HINTS: dict[str, dict[str, Any]] = {s: typing.get_type_hints(cls) for s, cls in SECTIONS.items()}


def _fields(section: str) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(SECTIONS[section])}


def _type_of(section: str, key: str):
    return _HINTS[section][key]


def _choices(f: dataclasses.Field) -> tuple[str, ...] | None:
    c = f.metadata.get("choices")
    if c is None:
        return None
    return tuple(c() if callable(c) else c)


def _type_name(tp) -> str:
    """Short type name for docs and help: str, int, float, bool, list[str], table[str -> float]."""
    origin = typing.get_origin(tp)
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    if origin is dict:
        return f"table[str -> {_type_name(typing.get_args(tp)[1])}]"
    if tp is dict:
        return "table"
    return tp.__name__


def _type_phrase(tp) -> str:
    """The type as it reads in an error: 'a float', 'a list of strings', ..."""
    origin = typing.get_origin(tp)
    if origin is list:
        return "a list of strings"
    if origin is dict:
        inner = typing.get_args(tp)[1]
        return "a table of tables" if inner is dict else f"a table of name -> {_type_name(inner)}"
    return {str: "a string", int: "an integer", float: "a float", bool: "a boolean (true or false)",
            dict: "a table"}[tp]


# ----------------------------------------------------------------------------------------------
# TOML values out
# ----------------------------------------------------------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(k: str) -> str:
    return k if _BARE_KEY.match(k) else json.dumps(k)


def _toml_value(v: Any) -> str:
    """A TOML literal for v (str, bool, int, float, list, dict, nested)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)  # always has '.' or 'e', both valid TOML floats
    if isinstance(v, str):
        # JSON string escapes are a subset of TOML basic-string escapes.
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        if not v:
            return "{}"
        return "{ " + ", ".join(f"{_toml_key(str(k))} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return json.dumps(str(v))


def _show(v: Any, limit: int = 60) -> str:
    """A value as it appears in an error message: TOML-style, one line, bounded length."""
    try:
        s = _toml_value(v)
    except Exception:  # a value of an unexpected type still needs a readable message
        s = repr(v)
    s = " ".join(s.split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------
# Types
# ----------------------------------------------------------------------------------------------


def _coerce_field(section: str, key: str, value: Any, tp=None) -> Any:
    """``_coerce`` of one option's value, after mapping its legacy spellings (``aliases``)."""
    aliases = _fields(section)[key].metadata.get("aliases") or {}
    if aliases and isinstance(value, str) and value in ("true", "false"):  # --key false on the CLI
        value = value == "true"
    if isinstance(value, bool) and value in aliases:  # (True == 1: only booleans are aliased)
        value = aliases[value]
    return _coerce(f"{section}.{key}", value, tp if tp is not None else _type_of(section, key))


def _coerce(name: str, value: Any, tp) -> Any:
    """Check value against the field type; returns it with ints widened to float where a float is
    wanted. Raises ConfigError naming ``name`` otherwise."""

    def bad():
        return ConfigError(f"config: {name} must be {_type_phrase(tp)}, got {_show(value)}")

    origin = typing.get_origin(tp)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        # bool is an int subclass in Python; `optimizer_steps = true` is still a mistake.
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise bad()
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad()
        (inner,) = typing.get_args(tp)
        out = []
        for x in value:
            try:
                out.append(_coerce(name, x, inner))
            except ConfigError:
                raise bad() from None
        return out
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        _, inner = typing.get_args(tp)
        out = {}
        for k, x in value.items():
            try:
                out[str(k)] = _coerce(f"{name}.{k}", x, inner)
            except ConfigError:
                raise ConfigError(f"config: {name}.{k} must be {_type_phrase(inner)}, got {_show(x)}") from None
        return out
    raise TypeError(f"unsupported config field type {tp!r}")  # a schema bug, not a user error


# ----------------------------------------------------------------------------------------------
# Keys and did-you-mean
# ----------------------------------------------------------------------------------------------


def _all_keys() -> list[str]:
    return [f"{s}.{k}" for s in SECTIONS for k in _fields(s)]


def _suggest(word: str, candidates: Sequence[str]) -> str | None:
    m = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return m[0] if m else None


def _unknown_section(section: str) -> ConfigError:
    hint = _suggest(section, SECTIONS)
    if hint is None:
        # A bare option name at the top level: `lr = 1e-4` outside any [section].
        owners = [k for k in _all_keys() if k.split(".", 1)[1] == section]
        if owners:
            return ConfigError(f"config: {section} is not a section; options live in sections "
                               f"(did you mean {owners[0]}?)")
        return ConfigError(f"config: [{section}] is not a section (sections: {', '.join(SECTIONS)})")
    return ConfigError(f"config: [{section}] is not a section (did you mean [{hint}]?)")


def _unknown_key(section: str, key: str) -> ConfigError:
    names = list(_fields(section))
    hint = _suggest(key, names)
    if hint is not None:
        hint = f"{section}.{hint}"
    else:
        # The right key in the wrong section, e.g. `[sample] lr = ...`.
        owners = [k for k in _all_keys() if k.split(".", 1)[1] == key]
        hint = owners[0] if owners else _suggest(f"{section}.{key}", _all_keys())
    tail = f" (did you mean {hint}?)" if hint else f" (options: {', '.join(names)})"
    return ConfigError(f"config: {section}.{key} is not an option of [{section}]{tail}")


def _resolve(dotted: str) -> tuple[str, str, list[str]]:
    """'train.lr' -> ('train', 'lr', []); 'reward.weights.ocr' -> ('reward', 'weights', ['ocr'])."""
    parts = dotted.split(".")
    if len(parts) < 2 or not all(parts):
        hint = _suggest(dotted, _all_keys())
        if hint is None:
            owners = [k for k in _all_keys() if k.split(".", 1)[1] == dotted]
            hint = owners[0] if owners else None
        tail = f" (did you mean --{hint}?)" if hint else ""
        raise ConfigError(f"config: --{dotted} is not an option; overrides are --section.key VALUE{tail}")
    section, key, rest = parts[0], parts[1], parts[2:]
    if section not in SECTIONS:
        raise _unknown_section(section)
    if key not in _fields(section):
        raise _unknown_key(section, key)
    if rest and typing.get_origin(_type_of(section, key)) is not dict:
        raise ConfigError(f"config: {section}.{key} is {_type_phrase(_type_of(section, key))}, so "
                          f"{dotted} has no sub-key")
    return section, key, rest


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def _read_toml(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config: file not found: {path}")
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config: {path} is not valid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config: cannot read {path}: {e}") from None


def _apply_table(cfg: Config, data: dict, source: str, sources: dict[str, str] | None = None) -> None:
    """Set the options of ``data`` ({section: {key: value}}) on ``cfg``, recording ``source`` per
    key; unknown sections or keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a table of sections, got {_show(data)}")
    for section, table in data.items():
        if section not in SECTIONS:
            raise _unknown_section(section)
        if not isinstance(table, dict):
            raise ConfigError(f"config: [{section}] must be a table of options, got {section} = {_show(table)}")
        obj = getattr(cfg, section)
        for key, value in table.items():
            if key not in _fields(section):
                raise _unknown_key(section, key)
            setattr(obj, key, _coerce_field(section, key, copy.deepcopy(value)))
            if sources is not None:
                sources[f"{section}.{key}"] = source


def _kind_in(data: dict) -> str | None:
    model = data.get("model") if isinstance(data, dict) else None
    kind = model.get("kind") if isinstance(model, dict) else None
    return kind if isinstance(kind, str) else None


def preset_config(kind: str | None = None, sources: dict[str, str] | None = None) -> Config:
    """The schema's defaults with the preset of ``kind`` (fastflow.presets; None = model.kind's
    default) applied."""
    from fastflow import presets

    cfg = Config()
    kind = kind or cfg.model.kind
    _apply_table(cfg, presets.preset(kind), f"preset {kind}", sources)
    cfg.model.kind = kind if kind in _model_kinds() else cfg.model.kind  # an unknown kind: validate names it
    if sources is not None:
        sources.setdefault("model.kind", "default")
    return cfg


def config_from_dict(data: dict) -> Config:
    """A Config from nested dicts ({section: {key: value}}) over the defaults of its model.kind
    (the schema's, with that kind's preset); unknown sections or keys and wrong types raise
    ConfigError. Sections and keys left out keep their defaults."""
    cfg = preset_config(_kind_in(data))
    _apply_table(cfg, data, "dict")
    return cfg


#: How deep ``extends`` chains may go (a longer chain is almost certainly a mistake).
MAX_EXTENDS = 8


def _file_layers(path: str) -> list[tuple[str, dict]]:
    """The TOML tables a config file stands for, base first: its ``extends`` file (a path relative
    to the file's folder; itself possibly extending another), then the file. ``extends`` is the
    only top-level key outside the sections."""
    chain: list[tuple[str, dict]] = []
    seen: list[Path] = []
    current: Path | None = Path(path)
    while current is not None:
        resolved = current.expanduser().resolve()
        if resolved in seen:
            names = " -> ".join(str(s) for s in seen + [resolved])
            raise ConfigError(f"config: extends makes a cycle: {names}")
        if len(seen) >= MAX_EXTENDS:
            raise ConfigError(f"config: extends chain of {path} is longer than {MAX_EXTENDS} files")
        seen.append(resolved)
        data = _read_toml(str(current))
        base = data.pop("extends", None)
        chain.append((os.path.normpath(str(current)), data))  # sub/../base.toml reads as base.toml
        if base is None:
            current = None
        elif not isinstance(base, str) or not base.strip():
            raise ConfigError(f"config: {current}: extends must be the path of a TOML file, got {_show(base)}")
        else:
            nxt = Path(base).expanduser()
            current = nxt if nxt.is_absolute() else current.parent / nxt
            if not current.is_file():
                raise ConfigError(f"config: {chain[-1][0]}: extends {base}: file not found: {current}")
    return chain[::-1]


def _parse_literal(raw: str) -> tuple[bool, Any]:
    """(True, value) when raw is a TOML literal (1e-4, true, "x", [1, 2], {a = 1}), else (False, raw)."""
    try:
        doc = tomllib.loads(f"v = {raw}")
    except tomllib.TOMLDecodeError:
        return False, raw
    # `1 \n w = 2` would parse with an extra key: treat it as text, not as a literal.
    if set(doc) != {"v"}:
        return False, raw
    return True, doc["v"]


def _override_value(raw: str, tp) -> Any:
    ok, value = _parse_literal(raw)
    if tp is str:
        # A str field takes the text as typed (`--run.name 2024` is the name "2024"), unless it was
        # written as a quoted TOML string.
        return value if ok and isinstance(value, str) else raw
    return value  # bare text for a non-str field -> the type check names it


def _takes_next(option: str, nxt: str | None) -> bool:
    """Whether the token after ``--option`` (no '=') is its value. Not when it is another --option
    or absent, nor a .toml file after a bool option (``--model.compile configs/x.toml`` is a flag
    and then the config path)."""
    if nxt is None or nxt.startswith("--"):
        return False
    section, key, rest = _resolve(option)
    if _type_of(section, key) is bool and not rest:
        return not nxt.endswith(".toml")
    return True


def _split_overrides(tokens: Sequence[str]) -> list[tuple[str, str | None]]:
    """['--a.b', '1', '--c.d=2', '--e.f'] -> [('a.b', '1'), ('c.d', '2'), ('e.f', None)].
    A value is missing (None) when the next token is not one (see _takes_next)."""
    out: list[tuple[str, str | None]] = []
    i = 0
    tokens = list(tokens)
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--") or tok == "--":
            raise ConfigError(f"config: unexpected argument {_show(tok)}; overrides are --section.key VALUE")
        name, eq, val = tok[2:].partition("=")
        if eq:
            out.append((name, val))
            i += 1
        elif _takes_next(name, tokens[i + 1] if i + 1 < len(tokens) else None):
            out.append((name, tokens[i + 1]))
            i += 2
        else:
            out.append((name, None))
            i += 1
    return out


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """Apply ``--section.key VALUE`` / ``--section.key=VALUE`` overrides to cfg in place (and return
    it). Values are TOML literals; a str field also takes bare text; a bool option given without
    a value means true; ``--reward.weights.ocr 0.5`` sets one entry of a table option."""
    for name, raw in _split_overrides(overrides):
        section, key, rest = _resolve(name)
        tp = _type_of(section, key)
        obj = getattr(cfg, section)
        if raw is None:
            if tp is bool and not rest:
                setattr(obj, key, True)
                continue
            raise ConfigError(f"config: --{name} needs a value")
        if not rest:
            setattr(obj, key, _coerce_field(section, key, _override_value(raw, tp), tp))
            continue
        # One entry inside a table option: descend, creating sub-tables as needed.
        table = copy.deepcopy(getattr(obj, key))
        node = table
        for part in rest[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            elif not isinstance(nxt, dict):
                raise ConfigError(f"config: {section}.{key}.{part} is not a table, so {name} has no sub-key")
            node = nxt
        ok, value = _parse_literal(raw)
        node[rest[-1]] = value if ok else raw
        setattr(obj, key, _coerce(f"{section}.{key}", table, tp))
    return cfg


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a TOML config (None = the embedded defaults), then apply CLI-style overrides.

    Resolution, later wins: the schema's defaults (the paper's SD3.5-M recipe), the preset of the
    resolved model.kind (fastflow.presets: the shapes task, FLUX.1, Qwen-Image, klein), the config
    file's ``extends`` chain (base first), the file, the overrides. Where each value came from is
    kept in ``sources_of(cfg)`` (what ``--print-config`` shows).

    Unknown sections/keys and wrong types raise ConfigError here; the remaining checks (choices,
    ranges, batch arithmetic, files) are in :func:`validate`.
    """
    layers = _file_layers(path) if path is not None else []
    kind = None
    for _, data in layers:
        kind = _kind_in(data) or kind
    for name, raw in _split_overrides(overrides):
        if name == "model.kind" and raw is not None:
            ok, value = _parse_literal(raw)
            kind = value if ok and isinstance(value, str) else raw
    sources: dict[str, str] = {}
    cfg = preset_config(kind, sources)
    for label, data in layers:
        _apply_table(cfg, data, f"file {label}", sources)
    apply_overrides(cfg, overrides)
    for name, raw in _split_overrides(overrides):
        section, key, _ = _resolve(name)
        sources[f"{section}.{key}"] = "command line"
    object.__setattr__(cfg, "_sources", sources)
    return cfg


def sources_of(cfg: Config) -> dict[str, str]:
    """Where each option of a loaded config came from: "default", "preset KIND", "file PATH" or
    "command line" (keys absent from the result: the schema's default)."""
    return dict(getattr(cfg, "_sources", {}))


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """The config as nested plain dicts {section: {key: value}} (deep copies)."""
    return {s: copy.deepcopy(dataclasses.asdict(getattr(cfg, s))) for s in SECTIONS}


def to_toml(cfg: Config, *, comments: bool = True, sources: bool = False) -> str:
    """The config as a TOML document that load_config reads back to an equal Config; with
    ``comments`` each option is preceded by its help text; with ``sources`` each value is followed
    by where it came from (``# from: preset shapes``; see :func:`load_config`)."""
    lines: list[str] = []
    origin = sources_of(cfg) if sources else {}
    for s, values in config_to_dict(cfg).items():
        if lines:
            lines.append("")
        if comments:
            lines.append(f"# {_doc(SECTIONS[s])}")
        lines.append(f"[{s}]")
        for k, f in _fields(s).items():
            if comments:
                lines.append(f"# {_help_line(s, f)}")
            line = f"{k} = {_toml_value(values[k])}"
            if sources:
                line += f"  # from: {origin.get(f'{s}.{k}', 'default')}"
            lines.append(line)
    return "\n".join(lines) + "\n"


def _doc(cls: type) -> str:
    return " ".join((cls.__doc__ or "").split())


def _help_line(section: str, f: dataclasses.Field, *, static: bool = False) -> str:
    """Help text plus allowed values. ``static`` leaves registry-backed choices unlisted so that
    docs/config.md does not go stale each time a model is registered."""
    text = f.metadata.get("help", "")
    if static and callable(f.metadata.get("choices")):
        return text
    ch = _choices(f)
    return f"{text} One of: {', '.join(ch)}." if ch else text


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or path.endswith((".safetensors", ".pt"))


def validate(cfg: Config, world_size: int = 1) -> Derived:
    """Check everything that can be checked without loading a model; return the derived sizes.

    Raises ConfigError (one line naming the key) on: wrong types, values outside their choices or
    ranges, step/window mismatches, a batch that does not split over ``world_size`` ranks, unknown
    rewards and missing files.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError(f"config: world size must be an integer >= 1, got {_show(world_size)}")
    if not isinstance(cfg, Config):
        raise ConfigError(f"config: expected a fastflow.config.Config, got {type(cfg).__name__}")

    # Types first: every later check may then rely on them (the Config may have been built or
    # edited in code, not only loaded).
    for s in SECTIONS:
        obj = getattr(cfg, s)
        if not isinstance(obj, SECTIONS[s]):
            raise ConfigError(f"config: [{s}] must be a {SECTIONS[s].__name__}, got {type(obj).__name__}")
        for k, f in _fields(s).items():
            value = _coerce_field(s, k, getattr(obj, k))
            if _fields(s)[k].metadata.get("aliases"):  # a Config edited in code may hold a legacy
                setattr(obj, k, value)                  # spelling: store today's
            # inf/nan pass most range checks (nan compares False both ways), so refuse them here.
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"config: {s}.{k} must be a finite number, got {_show(value)}")
            ch = _choices(f)
            if ch is not None and getattr(obj, k) not in ch:
                v = getattr(obj, k)
                hint = _suggest(v, ch)
                tail = f" (did you mean {hint}?)" if hint else ""
                raise ConfigError(f"config: {s}.{k} must be one of {', '.join(ch)}; got {_show(v)}{tail}")

    run, model, sample, train = cfg.run, cfg.model, cfg.sample, cfg.train

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(f"config: {msg}")

    # Ranges, section by section, in schema order.
    need(run.seed >= 0, f"run.seed ({run.seed}) must be >= 0")
    need(run.iterations >= 1, f"run.iterations ({run.iterations}) must be >= 1")
    need(run.max_minutes >= 0,
         f"run.max_minutes ({run.max_minutes}) must be >= 0 (0 = no budget)")
    need(run.name.strip() != "" and "/" not in run.name and "\\" not in run.name,
         f"run.name ({_show(run.name)}) must be a non-empty directory name without slashes")
    need(run.output_dir.strip() != "", "run.output_dir must not be empty")

    need(model.lora_rank >= 1, f"model.lora_rank ({model.lora_rank}) must be >= 1")
    need(model.lora_alpha > 0, f"model.lora_alpha ({model.lora_alpha}) must be > 0")
    need(all(t.strip() for t in model.lora_targets), "model.lora_targets must not contain empty names")
    need(model.resolution >= 1, f"model.resolution ({model.resolution}) must be >= 1")
    multiple = _models.RESOLUTION_MULTIPLE.get(model.kind)
    if multiple:  # VAE downsampling x transformer patch: checked before the weights load
        need(model.resolution % multiple == 0,
             f"model.resolution ({model.resolution}) must be a multiple of {multiple} for {model.kind}")
    need(model.shift >= 0, f"model.shift ({model.shift}) must be >= 0 (0 = the model's default)")

    need(sample.train_steps >= 1, f"sample.train_steps ({sample.train_steps}) must be >= 1")
    need(sample.eval_steps >= sample.train_steps,
         f"sample.eval_steps ({sample.eval_steps}) must be >= sample.train_steps ({sample.train_steps})")
    need(sample.guidance_scale >= 0, f"sample.guidance_scale ({sample.guidance_scale}) must be >= 0")
    a_max = 1.0 if sample.kind == "cps" else 2.0  # cps: sin(a pi / 2) rises only up to a = 1
    need(0 < sample.noise_level <= a_max,
         f"sample.noise_level ({sample.noise_level}) must be in (0, {a_max:g}] for sample.kind {sample.kind}")
    need(sample.prompt_floor >= 0, f"sample.prompt_floor ({sample.prompt_floor}) must be >= 0")
    need(sample.group_size >= 2, f"sample.group_size ({sample.group_size}) must be >= 2 (advantages "
                                 f"compare images of one prompt)")
    need(sample.prompts_per_iter >= 1, f"sample.prompts_per_iter ({sample.prompts_per_iter}) must be >= 1")
    need(sample.batch_size >= 1, f"sample.batch_size ({sample.batch_size}) must be >= 1")
    need(0 <= sample.window_size <= sample.train_steps,
         f"sample.window_size ({sample.window_size}) must be in [0, sample.train_steps ({sample.train_steps})]")
    last_start = sample.train_steps - sample.window_size
    need(sample.window_start == -1 or 0 <= sample.window_start <= last_start,
         f"sample.window_start ({sample.window_start}) must be -1 (random) or in [0, {last_start}] "
         f"(sample.train_steps - sample.window_size)")

    need(train.lr > 0, f"train.lr ({train.lr}) must be > 0")
    need(train.lr_warmup >= 0, f"train.lr_warmup ({train.lr_warmup}) must be >= 0")
    need(0 <= train.lr_min_ratio <= 1, f"train.lr_min_ratio ({train.lr_min_ratio}) must be in [0, 1]")
    need(0 <= train.beta1 < 1, f"train.beta1 ({train.beta1}) must be in [0, 1)")
    need(0 <= train.beta2 < 1, f"train.beta2 ({train.beta2}) must be in [0, 1)")
    need(train.weight_decay >= 0, f"train.weight_decay ({train.weight_decay}) must be >= 0")
    need(train.adam_eps > 0, f"train.adam_eps ({train.adam_eps}) must be > 0")
    need(train.batch_size >= 0, f"train.batch_size ({train.batch_size}) must be >= 1, or 0 (= sample.batch_size)")
    need(train.optimizer_steps >= 1, f"train.optimizer_steps ({train.optimizer_steps}) must be >= 1")
    need(train.beta >= 0, f"train.beta ({train.beta}) must be >= 0")
    need(train.clip_range > 0, f"train.clip_range ({train.clip_range}) must be > 0")
    need(train.adv_clip > 0, f"train.adv_clip ({train.adv_clip}) must be > 0")
    need(0 < train.timestep_fraction <= 1, f"train.timestep_fraction ({train.timestep_fraction}) must be in (0, 1]")
    need(train.max_grad_norm > 0, f"train.max_grad_norm ({train.max_grad_norm}) must be > 0")
    need(train.inner_epochs >= 1, f"train.inner_epochs ({train.inner_epochs}) must be >= 1")
    need(0 <= train.ema_decay < 1, f"train.ema_decay ({train.ema_decay}) must be in [0, 1)")
    need(train.ema_every >= 1, f"train.ema_every ({train.ema_every}) must be >= 1")
    fm = train.algorithm in ("nft", "awm")
    need(not train.guard or (train.algorithm == "grpo" and sample.kind == "sde"),
         f"train.guard needs train.algorithm grpo and sample.kind sde (got {train.algorithm}, {sample.kind})")
    need(sample.kind != "ode" or fm,
         f"sample.kind ode records no log-probs: train.algorithm {train.algorithm} needs sde or cps "
         f"(ode is for nft / awm)")
    need(not (fm and sample.kind == "ode" and sample.shared_initial_noise),
         "sample.kind ode with sample.shared_initial_noise would make every image of a group identical "
         "(no reward spread); set sample.shared_initial_noise = false")
    need(train.nft_beta > 0, f"train.nft_beta ({train.nft_beta}) must be > 0")
    need(train.old_decay_rate >= 0, f"train.old_decay_rate ({train.old_decay_rate}) must be >= 0")
    need(0 <= train.old_decay_max < 1, f"train.old_decay_max ({train.old_decay_max}) must be in [0, 1)")
    need(train.old_decay_flat >= 0, f"train.old_decay_flat ({train.old_decay_flat}) must be >= 0")
    need(0 <= train.fm_timesteps <= sample.train_steps,
         f"train.fm_timesteps ({train.fm_timesteps}) must be in [0, sample.train_steps "
         f"({sample.train_steps})] (0 = all)")
    if train.optimizer == "adamw8bit":
        need(importlib.util.find_spec("bitsandbytes") is not None,
             "train.optimizer adamw8bit needs the bitsandbytes package (pip install 'fastflow[bnb]')")

    ev = cfg.eval
    need(ev.every >= 0, f"eval.every ({ev.every}) must be >= 0 (0 = only at the end)")
    need(ev.seeds >= 1, f"eval.seeds ({ev.seeds}) must be >= 1")
    need(ev.min_category_images >= 0, f"eval.min_category_images ({ev.min_category_images}) must be >= 0 (0 = off)")
    need(ev.seed >= 0, f"eval.seed ({ev.seed}) must be >= 0")
    need(ev.guidance_scale >= 0, f"eval.guidance_scale ({ev.guidance_scale}) must be >= 0 "
                                 f"(0 = sample.guidance_scale)")
    need(ev.batch_size >= 1, f"eval.batch_size ({ev.batch_size}) must be >= 1")
    need(ev.max_prompts >= 0, f"eval.max_prompts ({ev.max_prompts}) must be >= 0 (0 = all)")
    need(cfg.log.every >= 1, f"log.every ({cfg.log.every}) must be >= 1")
    need(cfg.checkpoint.every >= 0, f"checkpoint.every ({cfg.checkpoint.every}) must be >= 0 (0 = only at the end)")
    need(cfg.checkpoint.keep >= 1, f"checkpoint.keep ({cfg.checkpoint.keep}) must be >= 1")

    dist = cfg.distributed
    need(dist.cpu_ranks >= 0, f"distributed.cpu_ranks ({dist.cpu_ranks}) must be >= 0 (0 = auto)")
    need(dist.strategy != "none" or world_size == 1,
         f"distributed.strategy none runs a single process, but the world size is {world_size}")
    need(not dist.cpu_offload or dist.strategy in ("auto", "fsdp"),
         f"distributed.cpu_offload needs distributed.strategy fsdp (or auto), got {dist.strategy}")

    # Trained timesteps: floor(K * fraction); the epsilon keeps 10 * 0.3 = 3.0000000000000004 and
    # 100 * 0.29 = 28.999999999999996 on the side the user meant.
    k = sample.window_size or sample.train_steps
    trained = math.floor(k * train.timestep_fraction + 1e-9)
    k_name = "sample.window_size" if sample.window_size else "sample.train_steps"
    need(trained >= 1, f"train.timestep_fraction ({train.timestep_fraction}) trains no step: "
                       f"floor({k_name} ({k}) * {train.timestep_fraction}) = 0")

    # cps injects no noise on the last step (std = sigma_next * sin(.) = 0): its KL is undefined.
    window_reaches_end = (not sample.window_size or sample.window_start == -1
                          or sample.window_start + sample.window_size == sample.train_steps)
    need(not (sample.kind == "cps" and train.algorithm == "grpo" and train.beta > 0 and trained == k
                  and window_reaches_end),
         f"train.timestep_fraction ({train.timestep_fraction}) trains the last step, where sample.kind "
         f"cps has no noise and the KL (train.beta {train.beta}) is undefined: train fewer steps "
         f"(e.g. train.timestep_fraction 0.99)")

    # Batch arithmetic: images of one iteration -> ranks -> sampler calls -> train micro-batches
    # -> optimizer steps. Every split must be exact: a ragged last batch would change the loss
    # scale and (under FSDP) deadlock ranks that disagree on the number of steps.
    images = sample.prompts_per_iter * sample.group_size
    per_step = world_size * sample.batch_size
    need(images % per_step == 0,
         f"sample.prompts_per_iter * sample.group_size ({sample.prompts_per_iter} x {sample.group_size} = "
         f"{images} images) must split evenly over {world_size} rank(s) x sample.batch_size "
         f"({sample.batch_size}) = {per_step} images per sampler call")
    per_rank = images // world_size
    tbs = train.batch_size or sample.batch_size
    need(per_rank % tbs == 0,
         f"train.batch_size ({tbs}) must divide the {per_rank} images per rank "
         f"({images} images / {world_size} rank(s))")
    train_batches = per_rank // tbs
    need(train_batches % train.optimizer_steps == 0,
         f"train.optimizer_steps ({train.optimizer_steps}) must divide the {train_batches} training "
         f"micro-batches per rank ({per_rank} images / train batch {tbs})")

    # Rewards: imported here (it imports torch) so that `import fastflow.config` stays light.
    from fastflow import rewards as _rewards

    weights, options = cfg.reward.weights, cfg.reward.options
    need(len(weights) > 0, "reward.weights must name at least one reward, e.g. {shapes = 1.0}")
    known = sorted(_rewards.REGISTRY)
    for name, w in weights.items():
        if name not in _rewards.REGISTRY:
            hint = _suggest(name, known)
            tail = f" (did you mean {hint}?)" if hint else f" (known: {', '.join(known)})"
            raise ConfigError(f"config: reward.weights.{name} is not a registered reward{tail}")
        need(math.isfinite(w), f"reward.weights.{name} ({w}) must be finite")
    need(any(w != 0 for w in weights.values()), "reward.weights are all 0: nothing to optimise")
    devices = {"reward.device": cfg.reward.device}
    devices.update({f"reward.options.{n}.device": o.get("device") for n, o in options.items()
                    if isinstance(o, dict) and "device" in o})
    for key, dev in devices.items():
        need(isinstance(dev, str) and re.fullmatch(r"|cpu|cuda(:\d+)?", dev) is not None,
             f"{key} must be \"\" (the rank's device), cpu, cuda or cuda:N; got {_show(dev)}")
        need(world_size == 1 or not dev.startswith("cuda:"),
             f"{key} = {dev} would put every rank's reward on that one GPU at {world_size} ranks; use \"\" "
             f"(each rank's own GPU) or serve the reward (remote)")
    for name in options:
        if name not in weights:
            hint = _suggest(name, list(weights))
            tail = f" (did you mean reward.options.{hint}?)" if hint else ""
            raise ConfigError(f"config: reward.options.{name} is for a reward not in reward.weights{tail}")

    # Files last: the cheapest mistakes are reported first.
    from fastflow.data import load_prompts

    def prompt_check(split: str):
        """A check of one prompt against what model.kind can take (None: any text), so that a
        word outside a model's vocabulary fails here, not in the first rollout on every rank."""
        if model.kind == "shapes":
            from fastflow.shapes.world import check_prompt

            # The verifier parses every eval prompt; a training prompt needs the grammar when the
            # shapes reward judges it or category sampling must derive its category from the text.
            judged = weights.get("shapes", 0) != 0

            def check(prompt) -> None:
                tagged = prompt.metadata.get("category") or prompt.metadata.get("tag")
                check_prompt(prompt.text, grammar=split == "eval" or judged
                             or (sample.prompt_sampling == "category" and not tagged))
            return check
        if model.kind == "toy":
            from fastflow.models.toy import color_word
            return lambda prompt: color_word(prompt.text)
        return None

    from fastflow import prompt_sets

    for key in ("train_prompts", "eval_prompts"):
        p = getattr(cfg.data, key)
        if p:
            need(Path(p).suffix in (".txt", ".jsonl"), f"data.{key} must be a .txt or .jsonl file, got {_show(p, 300)}")
            try:  # a fetched prompt set (SET:FILE, verified against its pin) or a path (~ expanded)
                where = prompt_sets.resolve(p)
            except (FileNotFoundError, ValueError) as e:
                raise ConfigError(f"config: data.{key}: {e}") from None
            need(where.is_file(), f"data.{key} file not found: {_show(p, 300)}")
            try:  # a text file: cheap to read now, so a bad one never reaches the launched ranks
                load_prompts(p, check=prompt_check(key.split("_")[0]))
            except ValueError as e:
                raise ConfigError(f"config: data.{key}: {e}") from None
    if model.path and _looks_local(model.path):
        need(Path(model.path).expanduser().exists(), f"model.path not found: {_show(model.path, 300)}")

    return Derived(
        world_size=world_size,
        images_per_iter=images,
        images_per_rank=per_rank,
        sample_batches_per_rank=per_rank // sample.batch_size,
        train_batch_size=tbs,
        train_batches_per_rank=train_batches,
        grad_accum=train_batches // train.optimizer_steps,
        optimizer_steps_per_iter=train.inner_epochs * train.optimizer_steps,
        trained_timesteps=trained,
        eval_guidance_scale=ev.guidance_scale or sample.guidance_scale,
    )


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

USAGE = ("usage: python -m fastflow.train [CONFIG.toml] [--print-config] [--resume [PATH]] "
         "[--plan [--plan-gpus N] [--plan-gpu-memory SIZE]] [--no-plan-check] [--section.key VALUE ...]")


def options_help() -> str:
    """Every option with its type, default and help text (the body of ``--help``)."""
    defaults = config_to_dict(Config())
    out: list[str] = []
    for s in SECTIONS:
        out.append(f"\n[{s}]  {_doc(SECTIONS[s])}")
        for k, f in _fields(s).items():
            out.append(f"  --{s}.{k} {_type_name(_type_of(s, k)).upper()}  (default {_toml_value(defaults[s][k])})")
            out.append(f"      {_help_line(s, f)}")
    return "\n".join(out)


def help_text() -> str:
    """The full ``--help`` output."""
    return "\n".join([
        USAGE,
        "",
        "Train with Flow-GRPO. With no CONFIG the embedded shapes run is used.",
        "  CONFIG.toml          a TOML run config (sections and keys below)",
        "  --print-config       print the resolved config as TOML and exit",
        "  --resume [PATH]      resume: bare = the latest checkpoint of this run's directory;",
        "                       PATH = a run directory or checkpoint",
        "  --plan               print the per-rank memory plan (nothing loaded, no GPU needed) and",
        "                       exit: 0 = it fits, 1 = it does not (with the settings that would fit)",
        "  --plan-gpus N        plan for N ranks (default: $WORLD_SIZE or 1)",
        "  --plan-gpu-memory SIZE  GPU memory to plan against, e.g. 80GiB, 141GB (default: this",
        "                       machine's GPU, else 80 GiB)",
        "  --no-plan-check      on CUDA, start even when the plan says the run does not fit",
        "  --section.key VALUE  override one option; VALUE is a TOML literal (1e-4, true, [\"a\"],",
        "                       {shapes = 1.0}); text is accepted as is for string options",
        "  -h, --help           show this help",
        options_help(),
    ])


def parse_cli(argv: Sequence[str]) -> CliArgs:
    """Parse ``[CONFIG.toml] [--print-config] [--resume [PATH]] [--plan [--plan-gpus N]
    [--plan-gpu-memory SIZE]] [--no-plan-check] [--section.key VALUE ...]`` and load the config (not
    validated: call :func:`validate` with the world size).

    ``--help`` prints :func:`help_text` and exits with status 0. A value after ``--resume`` that
    ends in .toml is taken as the config file, not as the resume path.
    """
    argv = list(argv)
    config_path: str | None = None
    print_config = False
    resume: str | None = None
    overrides: list[str] = []
    plan, plan_gpus, plan_gpu_memory, plan_check = False, None, None, True
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok in ("-h", "--help"):
            print(help_text())
            raise SystemExit(0)
        flag, eq, inline = tok.partition("=")
        if flag in ("--plan-gpus", "--plan-gpu-memory"):
            value = inline if eq else (argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None)
            if not value:
                raise ConfigError(f"config: {flag} needs a value (e.g. {flag} {'8' if flag == '--plan-gpus' else '80GiB'})")
            i += 0 if eq else 1
            if flag == "--plan-gpus":
                if not value.isdigit() or int(value) < 1:
                    raise ConfigError(f"config: --plan-gpus must be an integer >= 1, got {_show(value)}")
                plan_gpus = int(value)
            else:
                if not _is_size(value):
                    raise ConfigError(f"config: --plan-gpu-memory must be a size such as 80GiB or 141GB, "
                                      f"got {_show(value)}")
                plan_gpu_memory = value
        elif tok == "--plan":
            plan = True
        elif tok == "--no-plan-check":
            plan_check = False
        elif tok == "--print-config":
            print_config = True
        elif tok == "--resume" or tok.startswith("--resume="):
            if tok.startswith("--resume="):
                resume = tok.split("=", 1)[1] or "auto"
            elif i + 1 < len(argv) and not argv[i + 1].startswith("-") and not argv[i + 1].endswith(".toml"):
                resume = argv[i + 1]
                i += 1
            else:
                resume = "auto"
        elif tok.startswith("--"):
            overrides.append(tok)
            if "=" not in tok and _takes_next(tok[2:], argv[i + 1] if i + 1 < len(argv) else None):
                overrides.append(argv[i + 1])
                i += 1
        elif tok.startswith("-") and not _is_number(tok):
            raise ConfigError(f"config: unknown flag {_show(tok)}; options are --section.key VALUE (see --help)")
        else:
            if config_path is not None:
                raise ConfigError(f"config: unexpected argument {_show(tok, 300)}; a config file "
                                  f"({config_path}) was already given")
            config_path = tok
        i += 1
    if (plan_gpus is not None or plan_gpu_memory is not None) and not plan:
        raise ConfigError("config: --plan-gpus / --plan-gpu-memory only go with --plan")
    cfg = load_config(config_path, overrides)
    return CliArgs(config=cfg, config_path=config_path, print_config=print_config, resume=resume,
                   overrides=tuple(overrides), plan=plan, plan_gpus=plan_gpus,
                   plan_gpu_memory=plan_gpu_memory, plan_check=plan_check)


def _is_size(text: str) -> bool:
    """A memory size as fastflow.plan.parse_size reads it: a positive number and an optional unit
    (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB; none = GiB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b|[kmgt]|b)?\s*", text, re.IGNORECASE)
    return m is not None and float(m.group(1)) > 0


def _is_number(tok: str) -> bool:
    try:
        float(tok)
        return True
    except ValueError:
        return False


# ----------------------------------------------------------------------------------------------
# Reference docs
# ----------------------------------------------------------------------------------------------

_MD_INTRO = """\
# Configuration reference

<!-- Generated by `python -m fastflow.config --markdown > docs/config.md`; do not edit by hand
     (tests/test_config.py fails when this file is out of date). -->

A run is one TOML file with the sections below. The schema lives in `fastflow/config.py` (one
dataclass per section); its defaults (the tables below) are the paper's: Flow-GRPO on SD3.5-Medium
with PickScore. `model.kind` selects a preset of defaults on top (`fastflow/presets.py`, listed at
the end): the embedded shapes task (the default kind: `python -m fastflow.train` with no file),
FLUX.1-dev, Qwen-Image and FLUX.2 [klein] with their published recipes. A config states only what
differs from its model's defaults; a file may start with `extends = "base.toml"` (a path relative
to the file) to build on another config, which may itself extend one. Resolution, later wins:
schema defaults, the kind's preset, the `extends` chain (base first), the file, the command line.
Table options (`reward.weights`, `reward.options`) are replaced whole, not merged.

```
python -m fastflow.train [CONFIG.toml] [--print-config] [--resume [PATH]] [--section.key VALUE ...]
torchrun --nproc_per_node 8 -m fastflow.train configs/pickscore.toml --train.lr 1e-4
python -m fastflow.train configs/pickscore.toml --plan --plan-gpus 8 --plan-gpu-memory 80GiB
```

- **Overrides** `--section.key VALUE` or `--section.key=VALUE` are applied after the file, in order.
  VALUE is a TOML literal (`1e-4`, `true`, `["to_q", "to_k"]`, `{shapes = 1.0}`); string options
  also take bare text (`--run.name my_run`). A boolean option given alone means `true`
  (`--model.compile`). One entry of a table option can be set with a longer key:
  `--reward.weights.ocr 0.5`, `--reward.options.ocr.engine rapidocr`.
- **`--print-config`** prints the resolved config as TOML (it loads back to the same config), each
  value followed by where it came from (`# from: default`, `preset shapes`, `file configs/x.toml`,
  `command line`), and exits; **`--resume`** alone resumes from the latest checkpoint of the run directory, `--resume PATH`
  from a given one.
- **`--plan`** prints the per-rank memory plan of the run (weights, gradients, optimizer state,
  FSDP2 gathers, rollout storage, activations, by phase) against the GPU's memory and exits: 0 when
  it fits, 1 when it does not (with the settings that would make it fit and what each saves). It
  loads nothing and needs no GPU: `--plan-gpus N` (default `$WORLD_SIZE` or 1) and
  `--plan-gpu-memory SIZE` (`80GiB`, `141GB`; default this machine's GPU, else 80 GiB). A run on
  CUDA makes the same plan at start-up and stops before loading when it cannot fit;
  `--no-plan-check` starts it anyway. See docs/scaling.md (Memory plan).
- **Validation** runs before any model is loaded. Every mistake stops the run with one line
  naming the key, for example:

  ```
  config: train.lrr is not an option of [train] (did you mean train.lr?)
  config: train.lr must be a float, got "abc"
  config: sample.eval_steps (5) must be >= sample.train_steps (10)
  ```

  Integers are accepted where a float is expected; booleans are not integers. Relative paths
  (`data.*`, local `model.path`) are read from the working directory.

## Batch arithmetic

One iteration samples `images = sample.prompts_per_iter * sample.group_size` images over all
ranks. With `W` ranks, every split must be exact:

| quantity | formula | paper SD3.5 (48 x 24, 32 ranks) |
|---|---|---|
| images per iteration | `prompts_per_iter * group_size` | 1152 |
| images per rank | `images / W` | 36 |
| sampler calls per rank | `images per rank / sample.batch_size` | 36 / 9 = 4 |
| training micro-batches per rank | `images per rank / train.batch_size` (0 = `sample.batch_size`) | 4 |
| optimizer steps per iteration | `inner_epochs * train.optimizer_steps` | 1 x 2 = 2 |
| micro-batches per optimizer step (`grad_accum`) | `micro-batches / train.optimizer_steps` | 4 / 2 = 2 |
| trained timesteps `K'` | `floor(K * timestep_fraction)`, `K = window_size or train_steps` | floor(10 * 0.99) = 9 |

The same file therefore runs on 1, 2, 8 or 32 ranks (on fewer ranks each rank does more sampler
calls and optimizer steps per iteration); a world size that does not divide the work is refused
with the numbers that fail.
"""


def render_markdown() -> str:
    """docs/config.md: usage notes plus one table per section (key, type, default, meaning)."""
    defaults = config_to_dict(Config())
    out = [_MD_INTRO]
    for s in SECTIONS:
        out.append(f"\n## [{s}]\n\n{_doc(SECTIONS[s])}\n")
        out.append("| key | type | default | meaning |")
        out.append("|---|---|---|---|")
        for k, f in _fields(s).items():
            default = _toml_value(defaults[s][k]).replace("|", "\\|")
            meaning = _help_line(s, f, static=True).replace("|", "\\|")
            out.append(f"| `{k}` | {_type_name(_type_of(s, k))} | `{default}` | {meaning} |")
    from fastflow import presets

    out.append("\n## Presets per model kind\n")
    out.append("What `model.kind` changes from the defaults above (`fastflow/presets.py`); a kind not "
               "listed (`sd3`) takes the defaults as they are.\n")
    out.append("| kind | options |")
    out.append("|---|---|")
    for kind, table in presets.PRESETS.items():
        if not table or (kind == "toy" and table is presets.PRESETS["shapes"]):
            continue
        items = ", ".join(f"`{sec}.{k} = {_toml_value(v)}`".replace("|", "\\|")
                          for sec, vals in table.items() for k, v in vals.items())
        out.append(f"| `{kind}`{' (and `toy`)' if kind == 'shapes' else ''} | {items} |")
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fastflow.config --markdown`` prints docs/config.md; otherwise the arguments are
    those of fastflow.train: the config is loaded, validated (world size 1, or $WORLD_SIZE) and
    printed as TOML."""
    import os

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv == ["--markdown"]:
        sys.stdout.write(render_markdown())
        return 0
    try:
        args = parse_cli(argv)
        derived = validate(args.config, int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    sys.stdout.write(to_toml(args.config))
    print(f"# derived: {dataclasses.asdict(derived)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
