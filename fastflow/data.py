"""Prompt files: ``.txt`` (one prompt per line) or ``.jsonl`` (one object per line with a "prompt"
key; every other key is per-prompt metadata handed to the rewards, e.g. GenEval's tags)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Prompt:
    text: str
    metadata: dict = field(default_factory=dict, compare=False, hash=False)


def load_prompts(path: str | Path) -> list[Prompt]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    prompts: list[Prompt] = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or (path.suffix != ".jsonl" and line.startswith("#")):
                continue
            if path.suffix == ".jsonl":
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                    raise ValueError(f'{path}:{n}: each line needs a string "prompt" key')
                text = obj.pop("prompt")
                prompts.append(Prompt(text, obj))
            else:
                prompts.append(Prompt(line))
    if not prompts:
        raise ValueError(f"prompt file has no prompts: {path}")
    return prompts
