"""Weights & Biases logging, offline (WANDB_MODE=offline writes the run locally, no network): every
metric, the eval tables and image grids, and a resumed run continuing the same wandb run. The
records are read back from wandb's own run files."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch

pytest.importorskip("wandb")  # the `wandb` extra (part of `dev`)

from fastflow import train as train_mod  # noqa: E402
from fastflow.config import ConfigError, load_config, validate  # noqa: E402
from fastflow.distributed import DistInfo  # noqa: E402
from fastflow.metrics import MetricsLogger, check_wandb, read_metrics  # noqa: E402

SOLO = DistInfo(0, 1, 0, torch.device("cpu"))


def toy_cfg(out: Path, *extra: str):
    overrides = ["--model.kind", "toy", "--reward.weights", "{toy_color=1.0}", "--sample.group_size", "4",
                 "--sample.prompts_per_iter", "3", "--sample.batch_size", "6", "--sample.train_steps", "4",
                 "--sample.eval_steps", "4", "--sample.guidance_scale", "1.5", "--eval.every", "2",
                 "--eval.seeds", "2", "--eval.min_category_images", "0", "--checkpoint.every", "2",
                 "--log.progress", "false", "--log.tensorboard", "false", "--run.output_dir", str(out),
                 "--run.name", "toy", "--train.batch_size", "0", "--sample.window_size", "0",
                 "--run.max_minutes", "0", "--log.wandb", "true", "--log.wandb_project", "fastflow-tests",
                 "--log.wandb_tags", '["toy", "ci"]', *extra]
    cfg = load_config(None, overrides)
    return cfg, validate(cfg, 1)


def wandb_records(path: Path):
    """The protobuf records of a .wandb file (a LevelDB-style log: 7-byte file header, 32 KiB
    blocks, each record chunk with a 7-byte header: crc32, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind == 1:
            whole = chunk
        elif kind == 2:
            pending = chunk
            continue
        elif kind == 3:
            pending += chunk
            continue
        else:
            whole, pending = pending + chunk, b""
        r = pb.Record()
        r.ParseFromString(whole)
        yield r


def read_wandb_run(run_dir: Path) -> dict:
    """Per offline run folder (in start order): its run record and history rows."""
    out = []
    for d in sorted((run_dir / "wandb").glob("offline-run-*")):
        (f,) = d.glob("run-*.wandb")
        run, history = None, []
        for r in wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                run = r.run
            elif kind == "history":
                history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        out.append({"dir": d, "run": run, "history": history})
    return out


def test_offline_run_logs_every_metric_tables_grids_and_resume_continues_it(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg, d = toy_cfg(tmp_path, "--run.iterations", "2")
    t = train_mod.Trainer(cfg, d, SOLO)
    t.run()
    rd = t.run_dir
    state = json.loads((rd / "wandb.json").read_text())
    cfg4, d4 = toy_cfg(tmp_path, "--run.iterations", "4")
    resumed = train_mod.Trainer(cfg4, d4, SOLO, resume="auto")
    assert resumed.run_dir == rd and resumed.iteration == 2
    resumed.run()

    first, second = read_wandb_run(rd)
    # one wandb run: the resumed run went on under the stored id
    assert first["run"].run_id == second["run"].run_id == state["id"]
    assert json.loads((rd / "wandb.json").read_text())["id"] == state["id"]
    for part in (first, second):
        run = part["run"]
        assert run.project == "fastflow-tests" and run.display_name == "toy" and list(run.tags) == ["toy", "ci"]
        config = {i.key: json.loads(i.value_json) for i in run.config.update}
        assert config["reward"]["weights"] == {"toy_color": 1.0} and config["log"]["wandb"] is True
    assert config["run"]["iterations"] == 4  # the resumed run's own config

    # every numeric metric of metrics.jsonl reached wandb, at its iteration (the x axis)
    history = first["history"] + second["history"]
    by_it: dict[int, dict] = {}
    for h in history:
        by_it.setdefault(h["iteration"], {}).update(h)
    rows = read_metrics(rd / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [0, 1, 2, 2, 3, 4, 4]  # each part ends with its final eval
    for row in rows:
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        logged = by_it[row["iteration"]]
        assert {k: logged.get(k) for k in numbers} == pytest.approx(numbers), row["iteration"]
    assert max(h["iteration"] for h in first["history"]) == 2
    assert min(h["iteration"] for h in second["history"]) == 3  # the resumed part starts after the checkpoint

    # eval tables at every eval, the before/after table at the end, and the grids
    tables = [h for h in history if "eval/table/_type" in h]
    assert [h["iteration"] for h in tables] == [0, 2, 4]  # before, the first part's final, the last
    table0 = json.loads((first["dir"] / "files" / tables[0]["eval/table/path"]).read_text())
    overall = dict(zip(table0["columns"], next(r for r in table0["data"] if r[0] == "overall")))
    row0 = read_metrics(rd / "metrics.jsonl")[0]
    assert overall["reward"] == pytest.approx(row0["eval/overall/reward"])
    (final,) = [h for h in second["history"] if "eval/before_after/_type" in h]
    table = json.loads((second["dir"] / "files" / final["eval/before_after/path"]).read_text())
    assert table["columns"] == ["category", "metric", "before", "after", "delta"]
    before = next(r for r in rows if r["iteration"] == 0)
    after = rows[-1]
    cells = {(c, m): (b, a, dl) for c, m, b, a, dl in table["data"]}
    assert cells[("overall", "reward")][0] == pytest.approx(before["eval/overall/reward"])
    assert cells[("overall", "reward")][1] == pytest.approx(after["eval/overall/reward"])
    assert cells[("overall", "reward")][2] == pytest.approx(after["eval/overall/reward"] - before["eval/overall/reward"])
    images = [(k.split("/_type")[0], h["iteration"]) for h in history for k in h
              if k.endswith("/_type") and h[k] == "image-file"]
    assert images == [("samples/before", 0), ("samples/after", 2), ("samples/before_after", 2), ("samples/after", 4)]
    for h in history:
        for k, v in h.items():
            if k.endswith("/path") and k.startswith("samples/"):
                part = first if h in first["history"] else second
                assert (part["dir"] / "files" / v).is_file()


def test_without_wandb_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg, _ = toy_cfg(tmp_path, "--log.wandb", "false")
    logger = MetricsLogger(tmp_path / "run", tensorboard=False, config=cfg)
    (tmp_path / "run").mkdir()
    logger.log(1, {"reward_mean": 0.5})
    logger.close()
    assert logger.wandb is None and not (tmp_path / "run" / "wandb").exists()
    assert not (tmp_path / "run" / "wandb.json").exists()
    # a rank other than the main one never starts wandb, even with log.wandb
    cfg2, _ = toy_cfg(tmp_path)
    other = MetricsLogger(tmp_path / "run2", enabled=False, config=cfg2)
    assert other.wandb is None and not (tmp_path / "run2").exists()


def test_missing_wandb_package_is_one_line_before_any_run_directory(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg, _ = toy_cfg(tmp_path)
    with pytest.raises(ConfigError, match=r"log.wandb = true needs the wandb package: pip install 'fastflow\[wandb\]'"):
        check_wandb(cfg.log)
    code = train_mod.main(["--model.kind", "toy", "--reward.weights", "{toy_color=1.0}", "--log.wandb", "true",
                           "--run.output_dir", str(tmp_path / "runs"), "--sample.window_size", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "needs the wandb package" in err[0], err
    assert not (tmp_path / "runs").exists()


def test_close_returns_once_wandb_has_written_the_run(tmp_path, monkeypatch):
    """MetricsLogger.close() waits for wandb's service: the run's file is complete (run record, every
    row, the exit record) the moment close() returns, and a resumed logger started at once logs to
    the same run. wandb's finish() alone returns before the service has written the file: read at
    once, about one resumed part in two was still empty."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg, _ = toy_cfg(tmp_path)
    for trial in range(5):
        rd = tmp_path / f"run{trial}"
        rd.mkdir()
        for part in range(2):
            logger = MetricsLogger(rd, tensorboard=False, config=cfg)
            for i in range(3):
                logger.log(3 * part + i, {"reward_mean": 0.1 * i})
            logger.close()
        parts = read_wandb_run(rd)
        assert len(parts) == 2, trial
        for part, got in enumerate(parts):
            (f,) = got["dir"].glob("run-*.wandb")
            kinds = [r.WhichOneof("record_type") for r in wandb_records(f)]
            assert got["run"] is not None and "exit" in kinds, (trial, part, kinds)
            assert [h["iteration"] for h in got["history"]] == [3 * part, 3 * part + 1, 3 * part + 2], (trial, part)
        assert parts[0]["run"].run_id == parts[1]["run"].run_id
