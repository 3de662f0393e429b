"""Typed run configuration: TOML file -> dataclasses -> ``--section.key value`` overrides -> checks.

A run is described by one :class:`Config` with a section per concern (``[run]``, ``[model]``,
``[sample]``, ...). Every field has a default (the paper's SD3.5-M recipe; ``model.kind`` then
selects its preset, fastflow.presets: the embedded shapes run is the default kind, so
``python -m fastflow.train`` works with no file) and a help text (rendered by ``--help``,
``--print-config`` and docs/config.md).

    cfg = load_config("configs/pickscore.toml", ["--train.lr", "1e-4", "--sample.kind=cps"])
    derived = validate(cfg, world_size=8)        # raises ConfigError (one line naming the key)

One job per module: ``schema`` (the dataclasses), ``values`` (coercion and one-line errors),
``load`` (defaults, presets, files, ``extends``, overrides), ``write`` (TOML out), ``validate``,
``cli`` (fastflow.train's command line) and ``docs`` (docs/config.md). This package re-exports
their names.

Everything here is cheap: no model, no weights and no torch import, so a mistyped key fails in
well under a second instead of after minutes of loading.
"""

from __future__ import annotations

from .schema import (ConfigError, opt, _model_kinds, RunConfig, ModelConfig, SampleConfig, TrainConfig,
    DataConfig, RewardConfig, EvalConfig, LogConfig, CheckpointConfig, DistributedConfig, Config, Derived,
    CliArgs, SECTIONS, _HINTS, _fields, _type_of, _choices, _type_name, _type_phrase)  # noqa: F401
from .values import (_show, _coerce_field, _coerce, _all_keys, _suggest, _unknown_section, _unknown_key,
    _resolve, _parse_literal, _override_value)  # noqa: F401
from .write import _BARE_KEY, _toml_key, _toml_value, sources_of, config_to_dict, to_toml, _doc, _help_line  # noqa: F401
from .load import (_read_toml, _apply_table, _kind_in, preset_config, config_from_dict, MAX_EXTENDS,
    _file_layers, _takes_next, _split_overrides, apply_overrides, load_config)  # noqa: F401
from .validate import _looks_local, validate  # noqa: F401
from .cli import USAGE, options_help, help_text, parse_cli, _is_size, _is_number  # noqa: F401
from .docs import _MD_INTRO, render_markdown, main  # noqa: F401

__all__ = [
    "ConfigError",
    "opt",
    "RunConfig",
    "ModelConfig",
    "SampleConfig",
    "TrainConfig",
    "DataConfig",
    "RewardConfig",
    "EvalConfig",
    "LogConfig",
    "CheckpointConfig",
    "DistributedConfig",
    "Config",
    "Derived",
    "CliArgs",
    "SECTIONS",
    "sources_of",
    "config_to_dict",
    "to_toml",
    "preset_config",
    "config_from_dict",
    "MAX_EXTENDS",
    "apply_overrides",
    "load_config",
    "validate",
    "USAGE",
    "options_help",
    "help_text",
    "parse_cli",
    "render_markdown",
    "main",
]
