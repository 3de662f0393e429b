"""Writing: a Config as nested dicts and as a TOML document that loads back to the same Config."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from typing import Any

from .schema import Config, SECTIONS, _choices, _fields


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
