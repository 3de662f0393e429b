"""Model registry: ``model.kind`` in the config -> a Policy (fastflow.rollout.Policy).

Entries are "module:factory" strings imported lazily, so a run of the shapes task never imports
diffusers. Each factory takes ``(cfg, device)`` (the whole fastflow.config.Config) and returns a
Policy.
"""

from __future__ import annotations

from fastflow.registry import resolve  # noqa: F401  (re-exported)

REGISTRY: dict[str, str] = {
    "toy": "fastflow.models.toy:build_policy",
    "shapes": "fastflow.shapes.policy:build_policy",
    "sd3": "fastflow.models.sd3:build_policy",
    "flux": "fastflow.models.flux:build_policy",
    "qwenimage": "fastflow.models.qwenimage:build_policy",
    "flux2_klein": "fastflow.models.flux2_klein:build_policy",
}


# Image sides a model takes are multiples of this (VAE downsampling x transformer patch): checked
# by fastflow.config.validate before the weights load. Kinds with a fixed size are absent.
RESOLUTION_MULTIPLE: dict[str, int] = {"sd3": 16, "flux": 16, "qwenimage": 16, "flux2_klein": 16}


def build_policy(cfg, device):
    kind = cfg.model.kind
    if kind not in REGISTRY:
        raise ValueError(f"model.kind: unknown model {kind!r}; known: {', '.join(sorted(REGISTRY))}")
    return resolve(REGISTRY[kind])(cfg, device)
