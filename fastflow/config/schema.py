"""The schema: one dataclass per TOML section, each field with its default and help text (``opt``), the
derived quantities (``Derived``) and the parsed command line (``CliArgs``); type introspection of the fields."""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

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
                                        "(-|v - (eps - x0)|^2), t (times t) or ghuber (the published run's "
                                        "generalised Huber: -t ((e + 1e-10)^q - 1e-10^q) / q of the squared "
                                        "error e, q = awm_ghuber_power).", choices=("uniform", "t", "ghuber"))
    awm_ghuber_power: float = opt(0.25, "awm, weighting ghuber: the power q in (0, 1] (published: 0.25; 1 = "
                                        "the t weighting).")
    ema_kl_beta: float = opt(0.0, "awm: weight (>= 0) of a v-based KL to the EMA policy, mean |v - v_ema|^2 "
                                  "(the published run's ema_kl_beta 1); needs train.ema, whose decay and "
                                  "interval define that policy. One more no-grad forward per training time.")


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
