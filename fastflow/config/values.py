"""Values: coercing TOML / command-line values to a field's type, and the one-line errors that name a
bad key or value (with a suggestion for a mistyped one)."""

from __future__ import annotations

import difflib
import typing
from typing import Any, Sequence

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser under its backport name
    import tomli as tomllib  # type: ignore[no-redef]

from .schema import ConfigError, SECTIONS, _fields, _type_of, _type_phrase
from .write import _toml_value


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
