"""Loading: the schema's defaults, the model kind's preset (fastflow.presets), the config file and its
``extends`` chain, the command-line overrides, and where each value came from."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Sequence

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser under its backport name
    import tomli as tomllib  # type: ignore[no-redef]

from .schema import Config, ConfigError, SECTIONS, _fields, _model_kinds, _type_of
from .values import (_coerce, _coerce_field, _override_value, _parse_literal, _resolve, _show,
    _unknown_key, _unknown_section)


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
