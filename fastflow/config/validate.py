"""Validation: every check a config must pass before anything heavy loads (choices, ranges, batch
arithmetic over the world size, files, packages), each failure one line naming the key."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

from fastflow import models as _models
from .schema import Config, ConfigError, Derived, SECTIONS, _choices, _fields
from .values import _coerce_field, _show, _suggest


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or path.endswith((".safetensors", ".pt"))


def need(ok: bool, msg: str) -> None:
    """Raise ConfigError with ``msg`` (one line, "config: " first) unless ``ok``."""
    if not ok:
        raise ConfigError(f"config: {msg}")


def _check_run(cfg: Config, world_size: int) -> None:
    """[run]: seed, length, budget, names."""
    run = cfg.run
    need(run.seed >= 0, f"run.seed ({run.seed}) must be >= 0")
    need(run.iterations >= 1, f"run.iterations ({run.iterations}) must be >= 1")
    need(run.max_minutes >= 0,
         f"run.max_minutes ({run.max_minutes}) must be >= 0 (0 = no budget)")
    need(run.name.strip() != "" and "/" not in run.name and "\\" not in run.name,
         f"run.name ({_show(run.name)}) must be a non-empty directory name without slashes")
    need(run.output_dir.strip() != "", "run.output_dir must not be empty")


def _check_model(cfg: Config, world_size: int) -> None:
    """[model]: LoRA, resolution (the model's multiple), shift."""
    model = cfg.model
    need(model.lora_rank >= 1, f"model.lora_rank ({model.lora_rank}) must be >= 1")
    need(model.lora_alpha > 0, f"model.lora_alpha ({model.lora_alpha}) must be > 0")
    need(all(t.strip() for t in model.lora_targets), "model.lora_targets must not contain empty names")
    need(model.resolution >= 1, f"model.resolution ({model.resolution}) must be >= 1")
    multiple = _models.RESOLUTION_MULTIPLE.get(model.kind)
    if multiple:  # VAE downsampling x transformer patch: checked before the weights load
        need(model.resolution % multiple == 0,
             f"model.resolution ({model.resolution}) must be a multiple of {multiple} for {model.kind}")
    need(model.shift >= 0, f"model.shift ({model.shift}) must be >= 0 (0 = the model's default)")


def _check_sample(cfg: Config, world_size: int) -> None:
    """[sample]: steps, guidance, noise level by step kind, groups, batches, the SDE window."""
    sample = cfg.sample
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


def _check_train(cfg: Config, world_size: int) -> None:
    """[train]: optimizer, loss terms, EMA, the algorithm and the step kinds it needs."""
    sample, train = cfg.sample, cfg.train
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
    need(0 < train.awm_ghuber_power <= 1, f"train.awm_ghuber_power ({train.awm_ghuber_power}) must be in (0, 1]")
    need(train.ema_kl_beta >= 0, f"train.ema_kl_beta ({train.ema_kl_beta}) must be >= 0")
    need(train.ema_kl_beta == 0 or (train.algorithm == "awm" and train.ema),
         f"train.ema_kl_beta ({train.ema_kl_beta}) needs train.algorithm awm and train.ema = true "
         f"(got {train.algorithm}, ema {str(train.ema).lower()})")
    if train.optimizer == "adamw8bit":
        need(importlib.util.find_spec("bitsandbytes") is not None,
             "train.optimizer adamw8bit needs the bitsandbytes package (pip install 'fastflow[bnb]')")


def _check_eval_log_checkpoint(cfg: Config, world_size: int) -> None:
    """[eval], [log], [checkpoint]: intervals, seeds, batches."""
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


def _check_distributed(cfg: Config, world_size: int) -> None:
    """[distributed]: the strategy against the world size, CPU ranks, offload."""
    dist = cfg.distributed
    need(dist.cpu_ranks >= 0, f"distributed.cpu_ranks ({dist.cpu_ranks}) must be >= 0 (0 = auto)")
    need(dist.strategy != "none" or world_size == 1,
         f"distributed.strategy none runs a single process, but the world size is {world_size}")
    need(not dist.cpu_offload or dist.strategy in ("auto", "fsdp"),
         f"distributed.cpu_offload needs distributed.strategy fsdp (or auto), got {dist.strategy}")


#: The range checks of each section, in schema order (validate runs them after the types).
SECTION_CHECKS = (_check_run, _check_model, _check_sample, _check_train, _check_eval_log_checkpoint,
                  _check_distributed)


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
    for check in SECTION_CHECKS:  # ranges, section by section, in schema order
        check(cfg, world_size)
    ev = cfg.eval

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
