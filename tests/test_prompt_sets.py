"""Prompt sets: pinned downloads into the cache, checked against their pins, served here by a
loopback HTTP server (no network); configs name them as SET:FILE."""

from __future__ import annotations

import hashlib
import http.server
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from fastflow import data, prompt_sets
from fastflow.data import fetch_sets, load_prompts, main
from fastflow.prompt_sets import PinnedFile, git_blob_id, parse_ref

ROOT = Path(__file__).resolve().parents[1]
TRAIN = b"a photo of a cat\na photo of a dog\n"
TEST = b'{"prompt": "a photo of two cats", "tag": "counting"}\n'


class Mirror:
    """A loopback HTTP server over a folder, counting the requests it answers."""

    def __init__(self, root: Path):
        self.paths: list[str] = []
        mirror = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **k):
                super().__init__(*a, directory=str(root), **k)

            def log_message(self, *a):
                pass

            def do_GET(self):
                mirror.paths.append(self.path)
                super().do_GET()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTFLOW_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(prompt_sets.BASE_URL_ENV, raising=False)
    return tmp_path / "cache" / "prompts"


def _pin(set_, name, data_: bytes, *, sha=True) -> PinnedFile:
    return PinnedFile(set_, name, f"dataset/{set_}/{name}", git_blob=git_blob_id(data_),
                      sha256=hashlib.sha256(data_).hexdigest() if sha else None,
                      size=len(data_) if sha else None)


@pytest.fixture
def fake_set(tmp_path, monkeypatch, cache):
    """A set "toyset" pinned to files that a loopback mirror serves (one pinned by sha256 and
    size, one by its git object id only, as two of the authors' files are)."""
    root = tmp_path / "mirror"
    (root / "dataset" / "toyset").mkdir(parents=True)
    (root / "dataset" / "toyset" / "train.txt").write_bytes(TRAIN)
    (root / "dataset" / "toyset" / "test.jsonl").write_bytes(TEST)
    pins = {"train.txt": _pin("toyset", "train.txt", TRAIN),
            "test.jsonl": _pin("toyset", "test.jsonl", TEST, sha=False)}
    monkeypatch.setitem(prompt_sets.SETS, "toyset", pins)
    mirror = Mirror(root)
    yield mirror, root
    mirror.close()


def test_git_blob_id_is_gits():
    # `git hash-object` of an empty file and of "hello\n"
    assert git_blob_id(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
    assert git_blob_id(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_every_pin_is_well_formed():
    names = {"pickscore": {"train.txt", "test.txt"}, "ocr": {"train.txt", "test.txt"},
             "geneval": {"train_metadata.jsonl", "test_metadata.jsonl"}}
    assert {s: set(f) for s, f in prompt_sets.SETS.items()} == names
    for files in prompt_sets.SETS.values():
        for f in files.values():
            assert f.repo_path == f"dataset/{f.set}/{f.name}"
            assert len(f.git_blob) == 40 and int(f.git_blob, 16) >= 0
            assert f.sha256 is None or (len(f.sha256) == 64 and int(f.sha256, 16) >= 0)
    assert len(prompt_sets.AUTHORS_COMMIT) == 40
    assert prompt_sets.DEFAULT_BASE_URL == ("https://raw.githubusercontent.com/yifan123/flow_grpo/"
                                            f"{prompt_sets.AUTHORS_COMMIT}/")


def test_fetch_caches_verifies_and_loads_by_name(fake_set, cache):
    mirror, _ = fake_set
    lines: list[str] = []
    paths = fetch_sets(["toyset"], mirror.url, say=lines.append)
    assert paths == [cache / "toyset" / "train.txt", cache / "toyset" / "test.jsonl"]
    assert paths[0].read_bytes() == TRAIN and paths[1].read_bytes() == TEST
    assert sorted(mirror.paths) == ["/dataset/toyset/test.jsonl", "/dataset/toyset/train.txt"]
    assert all("downloaded" in line for line in lines)
    assert [p.text for p in load_prompts("toyset:train.txt")] == ["a photo of a cat", "a photo of a dog"]
    (p,) = load_prompts("toyset:test.jsonl")
    assert p.text == "a photo of two cats" and p.metadata == {"tag": "counting"}
    # A second fetch keeps the intact copies without asking the server; --force asks again.
    lines.clear()
    fetch_sets(["toyset"], mirror.url, say=lines.append)
    assert len(mirror.paths) == 2 and all("up to date" in line for line in lines)
    fetch_sets(["toyset"], mirror.url, force=True, say=lines.append)
    assert len(mirror.paths) == 4


def test_a_cached_file_that_changed_is_refused_and_fetched_again(fake_set, cache):
    mirror, _ = fake_set
    fetch_sets(["toyset"], mirror.url, say=lambda s: None)
    path = cache / "toyset" / "test.jsonl"  # pinned by its git object id only
    path.write_bytes(TEST.replace(b"two", b"three"))
    with pytest.raises(ValueError, match=r"does not match its pin \(git object id [0-9a-f]{40}, expected "
                                         r".*run python -m fastflow.data fetch toyset") as e:
        load_prompts("toyset:test.jsonl")
    assert "\n" not in str(e.value)
    fetch_sets(["toyset"], mirror.url, say=lambda s: None)
    assert path.read_bytes() == TEST and len(mirror.paths) == 3


def test_checksum_mismatch_is_one_line_and_saves_nothing(fake_set, cache, capsys):
    mirror, root = fake_set
    (root / "dataset" / "toyset" / "train.txt").write_bytes(TRAIN.replace(b"dog", b"cow"))
    assert main(["fetch", "toyset", "--base-url", mirror.url]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastflow.data: checksum mismatch for toyset:train.txt from "
                                               f"{mirror.url}dataset/toyset/train.txt: sha256 ")
    assert not (cache / "toyset").exists()  # nothing written, not even a partial file


def test_the_real_pins_refuse_other_bytes(tmp_path, cache, capsys):
    """The shipped pins against a mirror holding files of the same names but other content."""
    for f in prompt_sets.SETS["pickscore"].values():
        dest = tmp_path / "mirror" / f.repo_path
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(b"x" * f.size)  # the right size, other bytes: the sha256 pin catches it
    mirror = Mirror(tmp_path / "mirror")
    try:
        assert main(["fetch", "pickscore", "--base-url", mirror.url]) == 1
    finally:
        mirror.close()
    err = capsys.readouterr().err.strip().splitlines()
    want = prompt_sets.SETS["pickscore"]["train.txt"].sha256
    assert len(err) == 1 and "checksum mismatch for pickscore:train.txt" in err[0] and f"expected {want}" in err[0]
    assert not (cache / "pickscore" / "train.txt").exists()


def test_offline_is_one_line(cache):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    r = subprocess.run([sys.executable, "-m", "fastflow.data", "fetch", "all", "--base-url",
                        f"http://127.0.0.1:{port}/"], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={**os.environ, "FASTFLOW_CACHE": str(cache.parent)})
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"fastflow.data: cannot download geneval:train_metadata.jsonl from "
                               f"http://127.0.0.1:{port}/dataset/geneval/train_metadata.jsonl: ")
    assert "refused" in lines[0] and "no network?" in lines[0]


@pytest.mark.parametrize("argv, code, cause", [
    (["fetch", "pickscores"], 2, "fastflow.data: unknown prompt set 'pickscores'; known: geneval, ocr, pickscore, all"),
    (["fetch", "ocr", "--timeout", "0"], 2, "fastflow.data: --timeout must be > 0, got 0"),
])
def test_bad_arguments_are_one_line(argv, code, cause, capsys, cache):
    assert main(argv) == code
    assert capsys.readouterr().err.strip() == cause


def test_list_says_what_is_fetched(fake_set, cache, capsys):
    mirror, _ = fake_set
    data.fetch_file(prompt_sets.SETS["toyset"]["train.txt"], mirror.url)
    assert main(["list"]) == 0
    out = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()}
    assert out["toyset:train.txt"][0] == "fetched" and out["toyset:test.jsonl"][:2] == ["not", "fetched"]
    assert out["pickscore:train.txt"][-1] == str(cache / "pickscore" / "train.txt")


def test_names_not_fetched_or_unknown_say_what_to_do(cache):
    with pytest.raises(FileNotFoundError, match=r"prompt set file pickscore:train.txt is not fetched yet "
                                                r"\(looked for .*\); run python -m fastflow.data fetch pickscore"):
        load_prompts("pickscore:train.txt")
    with pytest.raises(ValueError, match=r"prompt set pickscore has no file 'train'; its files: "
                                         r"pickscore:train.txt, pickscore:test.txt"):
        load_prompts("pickscore:train")
    with pytest.raises(ValueError, match="unknown prompt set 'pickscor'; known: geneval, ocr, pickscore"):
        load_prompts("pickscor:train.txt")


def test_custom_prompt_files_keep_working(tmp_path, monkeypatch, cache):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("a red square\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "pickscore:train.txt").write_text("a blue circle\n")  # a colon inside a folder
    (tmp_path / "odd:name.txt").write_text("a green star\n")                  # not a set's name
    assert [p.text for p in load_prompts("mine.txt")] == ["a red square"]
    assert [p.text for p in load_prompts(tmp_path / "mine.txt")] == ["a red square"]
    assert [p.text for p in load_prompts("sub/pickscore:train.txt")] == ["a blue circle"]
    assert [p.text for p in load_prompts("odd:name.txt")] == ["a green star"]
    with pytest.raises(FileNotFoundError, match="prompt file not found: missing.txt"):
        load_prompts("missing.txt")


PAPER = {"pickscore.toml": "pickscore", "flux_pickscore.toml": "pickscore", "ocr.toml": "ocr",
         "geneval.toml": "geneval"}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_name_the_authors_sets(name):
    from fastflow.config import load_config

    cfg = load_config(str(ROOT / "configs" / name))
    train, test = parse_ref(cfg.data.train_prompts), parse_ref(cfg.data.eval_prompts)
    assert train is not None and test is not None, (cfg.data.train_prompts, cfg.data.eval_prompts)
    assert train.set == test.set == PAPER[name]
    assert train.name.startswith("train") and test.name.startswith("test")


def test_a_config_names_a_fetched_set_and_validates(fake_set, cache):
    """The paper launch line works after one fetch: validate() resolves SET:FILE from the cache
    (and refuses it, in one line naming the fetch command, before the fetch)."""
    from fastflow.config import ConfigError, load_config, validate

    cfg = load_config(None, ["--model.kind", "sd3", "--reward.weights", "{toy_color=1.0}",
                             "--data.train_prompts", "toyset:train.txt", "--data.eval_prompts", "toyset:train.txt"])
    with pytest.raises(ConfigError, match="fetch toyset"):
        validate(cfg)
    mirror, _ = fake_set
    fetch_sets(["toyset"], mirror.url, say=lambda line: None)
    validate(cfg)
