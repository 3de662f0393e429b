"""Lazy registries: a name maps to ``"module:attribute"``, imported only when that name is used, so
that listing the models or rewards (config validation, ``--help``) imports none of their heavy
dependencies (diffusers, CLIP, OCR engines). Shared by fastflow.models and fastflow.rewards."""

from __future__ import annotations

import importlib


def resolve(spec: str):
    """The object that ``"package.module:attribute"`` names (the module imported now)."""
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)
