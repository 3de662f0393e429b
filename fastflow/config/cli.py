"""The command line of fastflow.train: ``[CONFIG.toml] [--print-config] [--resume [PATH]] [--plan ...]
[--section.key VALUE ...]``, and its ``--help``."""

from __future__ import annotations

import re
from typing import Sequence

from .load import _takes_next, load_config
from .schema import CliArgs, Config, ConfigError, SECTIONS, _fields, _type_name, _type_of
from .values import _show
from .write import _doc, _help_line, _toml_value, config_to_dict


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
