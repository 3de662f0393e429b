"""Where the plan's architectures come from: the model's own configuration files (a local
pipeline folder, a local Hugging Face cache copy of the hub id) or, so that planning works
offline, the published configs shipped in ``published/*.json``; and meta-device instances of the
diffusers / transformers classes built from them (no memory, no weights).

Nothing here downloads: a hub id without a local copy is planned from its shipped config.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

PUBLISHED = Path(__file__).resolve().with_name("published")
REWARDS_FILE = "rewards.json"  # reward model configs, beside the transformer configs


class PlanError(ValueError):
    """The plan cannot be made (an architecture or a setting it does not know); one line."""


@dataclass
class Arch:
    """What the plan knows of a diffusers model: its family (the model.kind: "sd3", "flux",
    "qwenimage", "flux2_klein"), the transformer's config, each text encoder's class and config, the
    VAE's config, and where they came from. ``root``: the local pipeline folder (its tokenizer sizes
    Qwen-Image's text length), "" for a shipped config; ``distilled``: a step-distilled FLUX.2
    [klein] (its pipeline runs no CFG)."""

    family: str
    name: str
    source: str
    transformer: dict
    text_encoders: dict[str, tuple[str, dict]]
    vae: dict
    tokenizer_max_length: int = 77
    root: str = ""
    distilled: bool = False


def clean(cfg: dict) -> dict:
    """A config without its ``_name`` entries (diffusers' bookkeeping, not constructor args)."""
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def shipped_archs() -> dict[str, dict]:
    """The published configs shipped with fastflow, by name (rewards.json aside)."""
    out = {}
    for p in sorted(PUBLISHED.glob("*.json")):
        if p.name != REWARDS_FILE:
            d = json.loads(p.read_text(encoding="utf-8"))
            out[d["name"]] = d
    return out


def reward_data() -> dict:
    """rewards.json: CLIP configs of the in-process reward models and the parameter counts of
    those fastflow does not build itself."""
    return json.loads((PUBLISHED / REWARDS_FILE).read_text(encoding="utf-8"))


def _shipped_for(hub_id: str) -> dict | None:
    for d in shipped_archs().values():
        if hub_id in d["hub_ids"]:
            return d
    return None


def _arch_from_dir(family: str, root: Path, source: str) -> Arch:
    def read(sub: str) -> dict | None:
        p = root / sub / "config.json"
        return json.loads(p.read_text(encoding="utf-8")) if p.is_file() else None

    tcfg = read("transformer")
    vcfg = read("vae")
    if tcfg is None or vcfg is None:
        raise PlanError(f"model.path {root}: no transformer/config.json and vae/config.json (a diffusers "
                        f"pipeline folder is needed to plan it)")
    encoders = {}
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        c = read(name)
        if c is not None:
            cls = (c.get("architectures") or [None])[0]
            if cls is None:
                raise PlanError(f"model.path {root}: {name}/config.json names no architecture")
            encoders[name] = (cls, c)
    max_len = 77
    tok = root / "tokenizer" / "tokenizer_config.json"
    if tok.is_file():
        max_len = int(json.loads(tok.read_text(encoding="utf-8")).get("model_max_length", 77) or 77)
        max_len = max_len if max_len < 10**6 else 77  # transformers' "no limit" sentinel is ~1e30
    index = root / "model_index.json"
    distilled = bool(json.loads(index.read_text(encoding="utf-8")).get("is_distilled", False)) if index.is_file() else False
    return Arch(family, root.name, source, tcfg, encoders, vcfg, max_len, str(root), distilled)


def _arch_from_shipped(d: dict, source: str, hub_id: str = "") -> Arch:
    enc = {n: (e["class"], e["config"]) for n, e in d["text_encoders"].items()}
    return Arch(d["family"], d["name"], source, d["transformer"], enc, d["vae"],
                distilled=hub_id in d.get("distilled_hub_ids", ()))


DIFFUSERS_KINDS = ("sd3", "flux", "qwenimage", "flux2_klein")  # the policies over diffusers pipelines
TRANSFORMER_CLASS = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel",
                     "qwenimage": "QwenImageTransformer2DModel", "flux2_klein": "Flux2Transformer2DModel"}


def _model_module(kind: str):
    import importlib

    if kind not in DIFFUSERS_KINDS:
        raise PlanError(f"model.kind {kind}: not a diffusers model kind")
    return importlib.import_module(f"fastflow.models.{kind}")


def _hub_cache_dir(repo_id: str) -> Path | None:
    """A local snapshot of ``repo_id`` in the Hugging Face cache, when one holds the configs
    (nothing is downloaded: try_to_load_from_cache only looks)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with diffusers
        return None
    try:
        hit = try_to_load_from_cache(repo_id, "transformer/config.json")
    except Exception:  # noqa: BLE001 - a malformed id: no local copy
        return None
    if isinstance(hit, str) and os.path.isfile(hit):
        root = Path(hit).parent.parent
        if (root / "vae" / "config.json").is_file():
            return root
    return None


def resolve_arch(kind: str, path: str) -> Arch:
    """The architecture of ``model.kind`` / ``model.path``: a local pipeline folder's configs, else a
    local Hugging Face cache copy of the hub id, else the shipped published config of that id."""
    default = _model_module(kind).DEFAULT_PATH
    path = path or default
    p = Path(path).expanduser()
    if p.is_dir():
        return _arch_from_dir(kind, p, f"configs in {p}")
    if p.is_file():
        # a single weights file: the pipeline's other parts come from the hub config, so the
        # default's published config describes it (the trainer loads it the same way)
        d = _shipped_for(default)
        if d is None:
            raise PlanError(f"model.path {path}: a single weights file; no published config to plan it with")
        return _arch_from_shipped(d, f"shipped config of {default} (model.path is a single file)", default)
    local = _hub_cache_dir(path)
    if local is not None:
        return _arch_from_dir(kind, local, f"the local Hugging Face copy of {path}")
    d = _shipped_for(path)
    if d is None:
        known = ", ".join(i for a in shipped_archs().values() for i in a["hub_ids"])
        raise PlanError(f"model.path {path}: no local copy and no shipped config (known: {known}); "
                        f"give a local pipeline folder as model.path to plan it")
    if d["family"] != kind:
        raise PlanError(f"model.path {path} is a {d['family']} model, but model.kind is {kind}")
    return _arch_from_shipped(d, f"shipped config {d['name']} ({path})", path)


# ------------------------------------------------------------------------ meta-device instances

def quiet() -> contextlib.ExitStack:
    """diffusers / transformers log at model construction (e.g. dtype casts); silenced here,
    where the models are only measured."""
    import importlib

    stack = contextlib.ExitStack()
    for name in ("diffusers", "transformers"):
        importlib.import_module(name)  # its import sets its logger's level: import first, then lower it
        lg = logging.getLogger(name)
        prev = lg.level
        lg.setLevel(logging.ERROR)
        stack.callback(lg.setLevel, prev)
    return stack


@contextlib.contextmanager
def skip_init():
    """torch.nn.init's initialisers as no-ops: on the meta device they only cost time (peft's
    Gaussian LoRA initialisation of Qwen-Image's 720 adapted layers takes seconds there)."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda tensor, *a, **k: tensor)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def meta_diffusers(class_name: str, config: dict) -> nn.Module:
    """A diffusers model built from ``config`` on the meta device (no memory)."""
    import diffusers

    cls = getattr(diffusers, class_name)
    with quiet(), torch.device("meta"), skip_init():
        return cls.from_config(clean(config))


def meta_transformers(class_name: str, config: dict, dtype: torch.dtype | None = None) -> nn.Module:
    """A transformers model built from ``config`` on the meta device; ``dtype``: as
    ``from_pretrained(dtype=...)`` builds it, with that default dtype (so buffers computed in
    float32 on purpose, e.g. rotary frequencies, stay float32 as they do there)."""
    import transformers

    cls = getattr(transformers, class_name)
    cfg = cls.config_class(**clean(config))
    prev = torch.get_default_dtype()
    try:
        if dtype is not None:
            torch.set_default_dtype(dtype)
        with quiet(), torch.device("meta"), skip_init():
            return cls(cfg)
    finally:
        torch.set_default_dtype(prev)


def transformer_blocks(family: str, transformer: nn.Module) -> list[nn.Module]:
    """The transformer's blocks in forward order (FSDP2's units, checkpointing's units)."""
    if family in ("sd3", "qwenimage"):
        return list(transformer.transformer_blocks)
    return list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)


def default_targets(kind: str) -> list[str]:
    """The LoRA targets a policy uses when model.lora_targets is empty."""
    return list(_model_module(kind).PAPER_TARGETS)


def clip_config(model_id: str, data: dict) -> dict | None:
    """A CLIP reward model's config: a local folder's config.json, else the shipped one, else None."""
    p = Path(model_id).expanduser()
    if (p / "config.json").is_file():
        c = json.loads((p / "config.json").read_text(encoding="utf-8"))
        keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                "max_position_embeddings", "hidden_act", "patch_size", "image_size", "projection_dim")
        return {"name": p.name, "config": {
            "projection_dim": c.get("projection_dim", 512),
            "text_config": {k: v for k, v in c.get("text_config", {}).items() if k in keep},
            "vision_config": {k: v for k, v in c.get("vision_config", {}).items() if k in keep}}}
    return data["clip_models"].get(model_id)
