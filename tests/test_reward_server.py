"""The reward server and its client, for real: servers run as subprocesses on loopback."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from fastflow.rewards import build_reward
from fastflow.rewards.remote import RemoteRewardError
from fastflow.rewards.wire import decode_images, encode_images, parse_request

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token-for-tests"
OCR_FAST = {"Det.limit_side_len": 320, "EngineConfig.onnxruntime.intra_op_num_threads": 1}


class Server:
    """``python -m fastflow.rewards.serve`` in a subprocess on an OS-chosen loopback port."""

    def __init__(self, reward: str, *args: str, env: dict | None = None, startup_s: float = 60):
        cmd = [sys.executable, "-m", "fastflow.rewards.serve", "--reward", reward, "--port", "0",
               "--device", "cpu", *args]
        full_env = {k: v for k, v in os.environ.items() if k != "FASTFLOW_REWARD_TOKEN"}
        full_env.update({"OMP_NUM_THREADS": "1", **(env or {})})  # a token only when asked for
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(startup_s)
        if not lines or not lines[0].startswith("serving"):
            self.stop()
            raise RuntimeError(f"server did not start: {lines} {self.proc.stderr.read()[-2000:]}")
        self.url = lines[0].split(" on ")[1].strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def toy_server():
    s = Server("toy_color", env={"FASTFLOW_REWARD_TOKEN": TOKEN})
    yield s
    s.stop()


def quantised(n: int, size=8, seed=0) -> torch.Tensor:
    """Images on the 1/255 grid, which PNG carries exactly."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float() / 255


COLOR_PROMPTS = ["a red", "a blue", "a green", "a yellow", "a white", "a black", "a red"]


def test_wire_round_trip_is_exact():
    images = quantised(3, size=5)
    assert torch.equal(decode_images(encode_images(images)), images)
    with pytest.raises(ValueError, match=r"images\[0\] is not a valid base64 PNG"):
        decode_images([base64.b64encode(b"not an image").decode()])
    with pytest.raises(ValueError, match="2 images, 1 prompts"):
        parse_request({"images": encode_images(images[:2]), "prompts": ["a"]})


def test_health(toy_server):
    with urllib.request.urlopen(toy_server.url + "/health", timeout=10) as r:
        assert json.loads(r.read()) == {"status": "ok", "reward": "toy_color"}


def test_remote_equals_in_process_with_batching(toy_server):
    images = quantised(len(COLOR_PROMPTS))
    local = build_reward("toy_color")(images, COLOR_PROMPTS, None)
    remote = build_reward("remote", url=toy_server.url, reward="toy_color", token=TOKEN,
                          batch_size=3, deadline=30)
    got = remote(images, COLOR_PROMPTS, [{"i": i} for i in range(len(COLOR_PROMPTS))])
    assert got.dtype == torch.float32
    assert torch.equal(got, local)


def test_token_from_file_and_env(toy_server, tmp_path, monkeypatch):
    images = quantised(2)
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    a = build_reward("remote", url=toy_server.url, token_file=str(path))(images, COLOR_PROMPTS[:2], None)
    monkeypatch.setenv("FASTFLOW_REWARD_TOKEN", TOKEN)
    b = build_reward("remote", url=toy_server.url)(images, COLOR_PROMPTS[:2], None)
    assert torch.equal(a, b)


def test_wrong_or_missing_token_fails_at_once(toy_server, monkeypatch):
    monkeypatch.delenv("FASTFLOW_REWARD_TOKEN", raising=False)
    for token in ("wrong", None):
        remote = build_reward("remote", url=toy_server.url, token=token, deadline=30)
        t0 = time.monotonic()
        with pytest.raises(RemoteRewardError, match="rejected the token"):
            remote(quantised(1), ["a red"], None)
        assert time.monotonic() - t0 < 5  # 401 is not retried


def test_reward_errors_and_name_mismatch_are_clear(toy_server):
    remote = build_reward("remote", url=toy_server.url, token=TOKEN, deadline=30)
    with pytest.raises(RemoteRewardError, match=r"HTTP 422: \w+Error: .*purple"):
        remote(quantised(1), ["a purple"], None)   # toy_color knows no purple
    wrong = build_reward("remote", url=toy_server.url, token=TOKEN, reward="ocr")
    with pytest.raises(RemoteRewardError, match="serves 'toy_color'.*expects 'ocr'"):
        wrong(quantised(1), ["a red"], None)
    req = urllib.request.Request(toy_server.url + "/score", data=b"{not json", method="POST",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 400 and "bad request" in json.loads(e.value.read())["error"]


def test_ocr_remote_equals_in_process():
    from test_rewards_ocr import render

    server = Server("ocr", "--option", "params=" + json.dumps(OCR_FAST))
    try:
        images = torch.stack([render("FAST FLOW"), render("HELLO")])
        prompts = ['a sign "Fast Flow"', 'a sign "World"']
        local = build_reward("ocr", params=OCR_FAST)(images, prompts, None)
        remote = build_reward("remote", url=server.url, reward="ocr", batch_size=1, deadline=60)(images, prompts, None)
        assert torch.equal(remote, local)
        assert local[0] == 1.0 and local[1] < 1.0
    finally:
        server.stop()


def test_shapes_remote_equals_in_process():
    if not (ROOT / "fastflow" / "shapes" / "reward.py").is_file():
        pytest.skip("fastflow/shapes/reward.py does not exist yet")
    server = Server("shapes")
    try:
        images = torch.ones(2, 3, 32, 32)
        images[0, :, 10:19, 10:19] = torch.tensor([0.86, 0.08, 0.08])[:, None, None]
        images = (images * 255).round() / 255
        prompts = ["a square", "a circle"]
        local = build_reward("shapes")(images, prompts, None)
        assert torch.equal(build_reward("remote", url=server.url, deadline=30)(images, prompts, None), local)
    finally:
        server.stop()


def test_killed_server_fails_within_deadline():
    server = Server("toy_color")
    remote = build_reward("remote", url=server.url, reward="toy_color", deadline=2.0, backoff=0.05)
    images = quantised(2)
    assert remote(images, COLOR_PROMPTS[:2], None).shape == (2,)
    server.stop()  # the server dies mid-run: the next call retries, then gives up at the deadline
    t0 = time.monotonic()
    with pytest.raises(RemoteRewardError, match=r"no answer within the deadline of 2 s after \d+ attempt"):
        remote(images, COLOR_PROMPTS[:2], None)
    elapsed = time.monotonic() - t0
    assert 1.9 <= elapsed < 4.0


def test_server_cli_errors():
    r = subprocess.run([sys.executable, "-m", "fastflow.rewards.serve", "--reward", "nope", "--port", "0"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "unknown reward 'nope'" in r.stderr
    with pytest.raises(ValueError, match="option url"):
        build_reward("remote", url="127.0.0.1:1")
    with pytest.raises(FileNotFoundError, match="token_file not found"):
        build_reward("remote", url="http://127.0.0.1:1", token_file="/nonexistent/token")
