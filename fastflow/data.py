"""Prompt files: ``.txt`` (one prompt per line) or ``.jsonl`` (one object per line with a "prompt"
key; every other key is per-prompt metadata handed to the rewards, e.g. GenEval's tags).

Both are read as UTF-8 (a leading byte-order mark is ignored); blank lines are skipped. In a
``.txt`` file a line whose first non-blank character is ``#`` is a comment and is skipped too, so
a prompt cannot start with ``#`` there (write it in a ``.jsonl`` file instead). A bad file fails
with one ValueError naming the file and line.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Prompt:
    text: str
    metadata: dict = field(default_factory=dict, compare=False, hash=False)


def load_prompts(path: str | Path, check: Callable[[Prompt], None] | None = None) -> list[Prompt]:
    """The prompts of a ``.txt`` or ``.jsonl`` file (see the module docstring for the format;
    ``.txt`` lines starting with ``#`` are comments). ``check`` is called on every prompt; a
    ValueError it raises becomes ``"PATH:LINE: its message"``, e.g. a word outside a model's
    vocabulary. Raises FileNotFoundError for a missing file, ValueError (one line naming the file
    and line) for anything else."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read prompt file {path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the prompt "
                         f"file as UTF-8") from None
    jsonl = path.suffix == ".jsonl"
    prompts: list[Prompt] = []
    for n, line in enumerate(io.StringIO(text, newline=None), 1):  # as open() splits lines
        line = line.strip()
        if not line or (not jsonl and line.startswith("#")):
            continue
        if jsonl:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise ValueError(f'{path}:{n}: each line needs a string "prompt" key')
            text_n = obj.pop("prompt")
            if not text_n.strip():
                raise ValueError(f'{path}:{n}: the "prompt" is empty')
            prompt = Prompt(text_n, obj)
        else:
            prompt = Prompt(line)
        if check is not None:
            try:
                check(prompt)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: {' '.join(str(e).split())}") from None
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"prompt file has no prompts: {path}")
    return prompts
