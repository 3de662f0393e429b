"""The Flow-GRPO authors' prompt sets, pinned: where they are published, their checksums, where they
are cached, and how a config names them.

A config names a file of a set as ``SET:FILE`` (``data.train_prompts = "pickscore:train.txt"``);
``python -m fastflow.data fetch SET`` downloads the set once into the cache
(``$FASTFLOW_CACHE/prompts``, else ``$XDG_CACHE_HOME/fastflow/prompts``, else
``~/.cache/fastflow/prompts``). Every download and every later read is checked against the pins
below, so a run always trains on the bytes the authors published at the pinned commit.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

AUTHORS_REPO = "yifan123/flow_grpo"
AUTHORS_COMMIT = "ac4c86e8cae021841f1fde853d340e0db67690dd"  # 2025-07-18, the prompt files as of their first commit
DEFAULT_BASE_URL = f"https://raw.githubusercontent.com/{AUTHORS_REPO}/{AUTHORS_COMMIT}/"
BASE_URL_ENV = "FASTFLOW_PROMPTS_URL"  # a mirror with the same layout (dataset/SET/FILE)


@dataclass(frozen=True)
class PinnedFile:
    """One published prompt file. ``git_blob`` is the object id of the file in the authors' tree at
    AUTHORS_COMMIT (SHA-1 over ``b"blob SIZE\\0" + bytes``, as git computes it); ``sha256`` is the
    SHA-256 of the bytes where it was computed from that tree (None where it was not). A download
    must match every pin that is given."""

    set: str
    name: str            # file name inside the set (the FILE of SET:FILE)
    repo_path: str       # path in the authors' repository
    git_blob: str
    sha256: str | None = None
    size: int | None = None  # bytes, where known

    @property
    def ref(self) -> str:
        return f"{self.set}:{self.name}"


def _pins(*files: PinnedFile) -> dict[str, dict[str, PinnedFile]]:
    out: dict[str, dict[str, PinnedFile]] = {}
    for f in files:
        out.setdefault(f.set, {})[f.name] = f
    return out


# sha256 and sizes computed from the blobs of the authors' tree at AUTHORS_COMMIT; the object ids
# are that tree's. Two files (ocr/train.txt, geneval/train_metadata.jsonl) are pinned by their
# object id alone: git's SHA-1 of the content, which a download must reproduce exactly.
SETS: dict[str, dict[str, PinnedFile]] = _pins(
    PinnedFile("pickscore", "train.txt", "dataset/pickscore/train.txt",
               git_blob="a437bd921c03fbc00c4e7ce148ae2d28fcd6e49b",
               sha256="2f425adcbb9a6d0feee7c6c448e1cb83a1f71deca9434b803907e2578eca837f", size=2906730),
    PinnedFile("pickscore", "test.txt", "dataset/pickscore/test.txt",
               git_blob="45f05231b969fb5f74c8debd606b22cd3be27f8e",
               sha256="d75c025fa451866e70f7e36243f7cdd93095523cb51f5f9651f2ce3236d20262", size=239891),
    PinnedFile("ocr", "train.txt", "dataset/ocr/train.txt",
               git_blob="3ce0521b77b0a9031191d66ecc36ebaaf27a3922"),
    PinnedFile("ocr", "test.txt", "dataset/ocr/test.txt",
               git_blob="8deb4f8d8f2e863f45353354243669b3c991a6a2",
               sha256="4dd8caf3ab6ade73bd376c7d14c6ca49b6eacfb1bd321e22c40714ae4a98d4dc", size=217565),
    PinnedFile("geneval", "train_metadata.jsonl", "dataset/geneval/train_metadata.jsonl",
               git_blob="0b97e8a6802c08fc7537cd00c76ae79c851bddcb"),
    PinnedFile("geneval", "test_metadata.jsonl", "dataset/geneval/test_metadata.jsonl",
               git_blob="27cdaf5cc1356fe15aeadbb8df55682ca74228f0",
               sha256="cec4b24b9fee7bac21c8f787054ecc8dc9ff831674037713a4cd35e0f0a74a28", size=340835),
)
MAX_UNKNOWN_SIZE = 256 << 20  # a file without a size pin may be at most this large


def cache_dir() -> Path:
    """Where prompt sets are kept: ``$FASTFLOW_CACHE/prompts``, else
    ``$XDG_CACHE_HOME/fastflow/prompts`` (``~/.cache/fastflow/prompts``)."""
    if os.environ.get("FASTFLOW_CACHE"):
        return Path(os.environ["FASTFLOW_CACHE"]).expanduser() / "prompts"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "fastflow" / "prompts"


def parse_ref(value: str) -> PinnedFile | None:
    """The pinned file that ``value`` names as ``SET:FILE``, or None when ``value`` is not of that
    form (a plain path). Raises ValueError (one line) for an unknown set or file."""
    text = str(value)
    head, sep, tail = text.partition(":")
    if not sep or not head.isidentifier():
        return None  # a path ("./a:b.txt", "dir/a:b.txt")
    if head not in SETS:
        if Path(text).expanduser().exists():  # a file that happens to have a colon in its name
            return None
        raise ValueError(f"{text}: unknown prompt set {head!r}; known: {', '.join(sorted(SETS))}")
    files = SETS[head]
    if tail not in files:
        raise ValueError(f"{text}: prompt set {head} has no file {tail!r}; its files: "
                         f"{', '.join(f'{head}:{n}' for n in files)}")
    return files[tail]


def cached_path(f: PinnedFile) -> Path:
    return cache_dir() / f.set / f.name


def git_blob_id(data: bytes) -> str:
    """git's object id of a file with these bytes (``git hash-object``)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def mismatch(f: PinnedFile, data: bytes) -> str | None:
    """None when ``data`` matches every pin of ``f``, else the first difference in words."""
    if f.size is not None and len(data) != f.size:
        return f"{len(data)} bytes, expected {f.size}"
    if f.sha256 is not None:
        got = hashlib.sha256(data).hexdigest()
        if got != f.sha256:
            return f"sha256 {got}, expected {f.sha256}"
    got = git_blob_id(data)
    if got != f.git_blob:
        return f"git object id {got}, expected {f.git_blob}"
    return None


def resolve(value: str | Path) -> Path:
    """The file that a data.*_prompts value names: a fetched, verified ``SET:FILE`` from the cache,
    or the path itself (``~`` expanded). Raises FileNotFoundError for a set file that has not been
    fetched and ValueError for an unknown name or a cached file whose checksum differs (one line
    each, saying what to run)."""
    f = parse_ref(str(value))
    if f is None:
        return Path(value).expanduser()
    path = cached_path(f)
    if not path.is_file():
        raise FileNotFoundError(f"prompt set file {f.ref} is not fetched yet (looked for {path}); run "
                                f"python -m fastflow.data fetch {f.set}")
    why = mismatch(f, path.read_bytes())
    if why is not None:
        raise ValueError(f"prompt set file {path} does not match its pin ({why}); run "
                         f"python -m fastflow.data fetch {f.set} to download it again")
    return path
