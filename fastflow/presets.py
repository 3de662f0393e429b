"""Defaults per model kind: what ``model.kind`` selects on top of the schema's defaults.

The schema's defaults (fastflow/config/schema.py) are the paper's: Flow-GRPO on SD3.5-Medium with
PickScore, the authors' published settings. A config then states only what differs from its
model's recipe. Each preset below is one model's published recipe where it differs from the paper's:

- ``shapes`` (and ``toy``): the embedded CPU task; ``./dev train`` with no config runs it;
- ``flux``: the authors' FLUX.1-dev recipe (LoRA r 64, 6 training steps, guidance 3.5, noise 0.9);
- ``qwenimage``: the public Qwen-Image Flow-GRPO recipe (noise 1.2, a 2-step SDE window, no KL,
  FSDP2 with activation checkpointing);
- ``flux2_klein``: Flow-Factory's FLUX.2 [klein] base recipe (384 px, a 1-step window, no KL,
  per-group advantage std).

Resolution order, later wins: the schema's defaults, the preset of the resolved ``model.kind``,
the config files (a file's ``extends`` first), the command line. ``--print-config`` shows where
each value came from.
"""

from __future__ import annotations

from typing import Any

#: The embedded shapes task's values (CPU, float32, the shipped base model, its grammar prompts
#: and exact verifier, a 15-minute budget).
SHAPES: dict[str, dict[str, Any]] = {
    "run": {"name": "shapes", "seed": 0, "iterations": 300, "max_minutes": 15.0},
    "model": {"path": "", "dtype": "float32", "lora_rank": 16, "lora_alpha": 32.0},
    "sample": {"train_steps": 8, "eval_steps": 20, "group_size": 8, "prompts_per_iter": 12,
               "batch_size": 16, "shared_initial_noise": True, "window_size": 2},
    "train": {"lr": 1e-3, "batch_size": 16, "optimizer_steps": 1, "beta": 0.04, "timestep_fraction": 1.0,
              "ema_every": 1},
    "data": {"train_prompts": "", "eval_prompts": ""},
    "reward": {"weights": {"shapes": 1.0}},
    "eval": {"every": 75, "seeds": 8, "min_category_images": 96, "batch_size": 128},
    "checkpoint": {"every": 50},
    "distributed": {"cpu_ranks": 0},
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "sd3": {},
    "shapes": SHAPES,
    "toy": SHAPES,
    "flux": {
        "run": {"name": "flux"},
        "model": {"path": "black-forest-labs/FLUX.1-dev", "lora_rank": 64, "lora_alpha": 128.0},
        "sample": {"train_steps": 6, "eval_steps": 28, "guidance_scale": 3.5, "noise_level": 0.9,
                   "batch_size": 3},
        "train": {"batch_size": 3},
    },
    "qwenimage": {
        "run": {"name": "qwenimage"},
        "model": {"path": "Qwen/Qwen-Image", "lora_rank": 64, "lora_alpha": 128.0},
        "sample": {"eval_steps": 50, "guidance_scale": 4.0, "noise_level": 1.2, "group_size": 16,
                   "prompts_per_iter": 32, "batch_size": 4, "window_size": 2, "window_start": -1},
        "train": {"batch_size": 4, "beta": 0.0, "timestep_fraction": 1.0, "ema": False},
        "eval": {"every": 30, "batch_size": 4},
        "checkpoint": {"every": 30},
        "distributed": {"strategy": "fsdp", "activation_checkpointing": True},
    },
    "flux2_klein": {
        "run": {"name": "flux2_klein"},
        "model": {"path": "black-forest-labs/FLUX.2-klein-base-4B", "lora_rank": 64, "lora_alpha": 128.0,
                  "resolution": 384},
        "sample": {"train_steps": 8, "eval_steps": 28, "guidance_scale": 4.0, "group_size": 16,
                   "batch_size": 4, "window_size": 1, "window_start": -1},
        "train": {"batch_size": 4, "beta": 0.0, "global_std": False, "timestep_fraction": 1.0},
        "eval": {"every": 20},
        "checkpoint": {"every": 20},
    },
}


def preset(kind: str) -> dict[str, dict[str, Any]]:
    """The preset of ``kind`` ({section: {key: value}}; empty for a kind whose recipe is the
    schema's, SD3.5)."""
    return PRESETS.get(kind, {})
