"""Prompt files: ``.txt`` (one prompt per line) or ``.jsonl`` (one object per line with a "prompt"
key; every other key is per-prompt metadata handed to the rewards, e.g. GenEval's tags).

Both are read as UTF-8 (a leading byte-order mark is ignored); blank lines are skipped. In a
``.txt`` file a line whose first non-blank character is ``#`` is a comment and is skipped too, so
a prompt cannot start with ``#`` there (write it in a ``.jsonl`` file instead). A bad file fails
with one ValueError naming the file and line.

A prompt file may also be named as ``SET:FILE``, a file of one of the Flow-GRPO authors' prompt
sets (fastflow.prompt_sets), once fetched:

    python -m fastflow.data fetch pickscore|ocr|geneval|all [--force] [--base-url URL]
    python -m fastflow.data list

``fetch`` downloads the pinned files into the cache and checks them against their pins; a file
already there and intact is kept. Failures (no network, a checksum that differs) are one line and
exit status 1; bad arguments exit 2.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from fastflow import prompt_sets
from fastflow.prompt_sets import PinnedFile


@dataclass(frozen=True)
class Prompt:
    text: str
    metadata: dict = field(default_factory=dict, compare=False, hash=False)


def load_prompts(path: str | Path, check: Callable[[Prompt], None] | None = None) -> list[Prompt]:
    """The prompts of a ``.txt`` or ``.jsonl`` file (see the module docstring for the format;
    ``.txt`` lines starting with ``#`` are comments). ``check`` is called on every prompt; a
    ValueError it raises becomes ``"PATH:LINE: its message"``, e.g. a word outside a model's
    vocabulary. Raises FileNotFoundError for a missing file, ValueError (one line naming the file
    and line) for anything else. ``path`` may name a fetched prompt set file as ``SET:FILE``
    (e.g. ``pickscore:train.txt``); one not fetched yet raises FileNotFoundError saying what to run."""
    path = prompt_sets.resolve(path)
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


# ------------------------------------------------------------------------------ prompt set downloads

class FetchError(RuntimeError):
    """A prompt set file could not be downloaded or did not match its pin (one line)."""


def _opener_for(url: str) -> urllib.request.OpenerDirector:
    # Loopback never goes through an HTTP proxy set in the environment; other hosts may.
    host = urllib.parse.urlsplit(url).hostname
    handlers = [urllib.request.ProxyHandler({})] if host in ("127.0.0.1", "localhost", "::1") else []
    return urllib.request.build_opener(*handlers)


def fetch_file(f: PinnedFile, base_url: str | None = None, *, force: bool = False,
               timeout: float = 60.0) -> tuple[Path, bool]:
    """Download one pinned file into the cache unless an intact copy is there (``force``: always).
    Returns (path, downloaded). Raises FetchError naming the url and the cause; nothing is written
    unless every pin matches (the file is written to a temporary name and renamed)."""
    base = base_url or os.environ.get(prompt_sets.BASE_URL_ENV) or prompt_sets.DEFAULT_BASE_URL
    url = base.rstrip("/") + "/" + f.repo_path
    dest = prompt_sets.cached_path(f)
    if not force and dest.is_file() and prompt_sets.mismatch(f, dest.read_bytes()) is None:
        return dest, False
    limit = f.size if f.size is not None else prompt_sets.MAX_UNKNOWN_SIZE
    try:
        with _opener_for(url).open(urllib.request.Request(url, headers={"User-Agent": "fastflow"}),
                                   timeout=timeout) as resp:
            data = resp.read(limit + 1)
    except urllib.error.HTTPError as e:
        raise FetchError(f"cannot download {f.ref} from {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        cause = getattr(e, "reason", e)
        raise FetchError(f"cannot download {f.ref} from {url}: {cause} (no network? copy the file to "
                         f"{dest} by hand, or point --base-url / ${prompt_sets.BASE_URL_ENV} at a "
                         f"mirror)") from None
    if len(data) > limit:
        raise FetchError(f"{f.ref} from {url} is larger than {limit} bytes; not saved")
    why = prompt_sets.mismatch(f, data)
    if why is not None:
        raise FetchError(f"checksum mismatch for {f.ref} from {url}: {why}; not saved")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
        tmp.write_bytes(data)
        os.replace(tmp, dest)
    except OSError as e:
        raise FetchError(f"cannot write {dest}: {e.strerror or e}") from None
    return dest, True


def fetch_sets(names: Sequence[str], base_url: str | None = None, *, force: bool = False,
               timeout: float = 60.0, say: Callable[[str], None] = print) -> list[Path]:
    """Fetch every file of the named sets ("all" = every set); returns their paths."""
    wanted = sorted(prompt_sets.SETS) if "all" in names else list(dict.fromkeys(names))
    unknown = [n for n in wanted if n not in prompt_sets.SETS]
    if unknown:
        raise ValueError(f"unknown prompt set {unknown[0]!r}; known: {', '.join(sorted(prompt_sets.SETS))}, all")
    paths = []
    for name in wanted:
        for f in prompt_sets.SETS[name].values():
            path, downloaded = fetch_file(f, base_url, force=force, timeout=timeout)
            say(f"{f.ref:<30} {'downloaded' if downloaded else 'up to date':<11} {path}")
            paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastflow.data",
                                description="The Flow-GRPO authors' prompt sets, pinned and cached.")
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download prompt sets into the cache")
    f.add_argument("sets", nargs="+", metavar="SET", help=f"{', '.join(sorted(prompt_sets.SETS))} or all")
    f.add_argument("--force", action="store_true", help="download again even when the cached copy is intact")
    f.add_argument("--base-url", help=f"a mirror with the authors' layout (default: ${prompt_sets.BASE_URL_ENV}, "
                                      f"else {prompt_sets.DEFAULT_BASE_URL})")
    f.add_argument("--timeout", type=float, default=60.0, help="seconds per connection (default 60)")
    sub.add_parser("list", help="the sets, their files and whether they are fetched")
    args = p.parse_args(argv)
    if args.cmd == "list":
        for name, files in sorted(prompt_sets.SETS.items()):
            for pf in files.values():
                path = prompt_sets.cached_path(pf)
                state = "fetched" if path.is_file() else "not fetched"
                print(f"{pf.ref:<30} {state:<11} {path}")
        return 0
    try:
        if args.timeout <= 0:
            raise ValueError(f"--timeout must be > 0, got {args.timeout:g}")
        fetch_sets(args.sets, args.base_url, force=args.force, timeout=args.timeout)
    except ValueError as e:
        print(f"fastflow.data: {e}", file=sys.stderr)
        return 2
    except FetchError as e:
        print(f"fastflow.data: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
