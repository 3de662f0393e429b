"""The pretraining script: reproducible from a seed, resumable to the same weights, exportable; and
its training data are true captions."""

from __future__ import annotations

import json

import numpy as np
import torch

from fastflow.shapes import pretrain, verifier
from fastflow.shapes.model import load_model
from fastflow.shapes.world import sample_batch

TINY = ["--channels", "8,16,16", "--batch", "4", "--eval-seeds", "1", "--eval-steps", "2",
        "--warmup", "2", "--ckpt-minutes", "100", "--eval-minutes", "100"]


def _run(out, steps, prompts):
    pretrain.main(["--out", str(out), "--max-steps", str(steps), "--eval-prompts", str(prompts), *TINY])
    return torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)


def test_pretrain_is_reproducible_resumable_and_exports(tmp_path):
    prompts = tmp_path / "eval.txt"
    prompts.write_text("# two held-out prompts\na red circle\ntwo squares\n")
    a = _run(tmp_path / "a", 3, prompts)
    b = _run(tmp_path / "b", 3, prompts)
    assert a["step"] == b["step"] == 3
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    _run(tmp_path / "c", 2, prompts)
    c = _run(tmp_path / "c", 3, prompts)          # resumed from step 2
    assert c["step"] == 3
    for k in a["model"]:
        torch.testing.assert_close(c["model"][k], a["model"][k], rtol=1e-5, atol=1e-6)
    for k in a["ema"]:
        torch.testing.assert_close(c["ema"][k], a["ema"][k], rtol=1e-5, atol=1e-6)
    evals = [json.loads(line)["eval"] for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()
             if "eval" in line]
    assert evals and {"colors", "counting", "overall"} <= set(evals[-1])
    dest = tmp_path / "w" / "base.safetensors"
    pretrain.main(["--out", str(tmp_path / "a"), "--export", str(dest)])
    model = load_model(dest)
    assert model.cfg.channels == (8, 16, 16)
    for k, v in model.state_dict().items():   # the best EMA (the only eval was at the end)
        torch.testing.assert_close(v, a["ema"][k])


def test_training_batches_are_true_captions():
    images, caps = sample_batch(32, np.random.default_rng([0, 5]))
    assert images.shape == (32, 3, 32, 32) and len(caps) == 32
    assert verifier.is_correct(images, caps).all()
