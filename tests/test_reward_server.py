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


def _get_health(url: str, token: str | None = None):
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    with urllib.request.urlopen(urllib.request.Request(url + "/health", headers=headers), timeout=10) as r:
        return json.loads(r.read())


def test_health(toy_server):
    # No token needed (liveness probes), but a presented one is checked.
    assert _get_health(toy_server.url) == {"status": "ok", "reward": "toy_color", "token_required": True}
    assert _get_health(toy_server.url, TOKEN)["status"] == "ok"
    with pytest.raises(urllib.error.HTTPError) as e:
        _get_health(toy_server.url, "wrong")
    assert e.value.code == 401


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_check_health_up_down_wrong_token_wrong_reward(toy_server):
    from fastflow.rewards.remote import check_health

    assert check_health(toy_server.url, TOKEN, reward="toy_color")["reward"] == "toy_color"
    with pytest.raises(RemoteRewardError, match="rejected the token"):
        check_health(toy_server.url, "wrong")
    with pytest.raises(RemoteRewardError, match="requires a token"):
        check_health(toy_server.url, None)
    with pytest.raises(RemoteRewardError, match="serves 'toy_color', the config expects 'ocr'"):
        check_health(toy_server.url, TOKEN, reward="ocr")
    down = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    with pytest.raises(RemoteRewardError, match=f"{down} is unreachable: .*refused"):
        check_health(down)
    t0 = time.monotonic()
    with pytest.raises(RemoteRewardError, match=r"unreachable \(waited 1 s\)"):
        check_health(down, wait=1.0)
    assert 0.9 <= time.monotonic() - t0 < 3


def test_check_served_rewards_names_the_reward_url_and_cause(toy_server, monkeypatch):
    from fastflow.config import ConfigError
    from fastflow.rewards.remote import check_served_rewards

    monkeypatch.delenv("FASTFLOW_REWARD_TOKEN", raising=False)
    good = {"url": toy_server.url, "reward": "toy_color", "token": TOKEN, "startup_wait": 0}
    assert check_served_rewards({"remote": 1.0, "toy_color": 0.5}, {"remote": good}) is None
    assert check_served_rewards({"shapes": 1.0}, {}) is None  # nothing served: nothing asked
    down = f"http://127.0.0.1:{_free_port()}"
    up = toy_server.url
    cases = [({**good, "url": down}, f"reward remote: remote reward at {down} is unreachable: .*refused"),
             ({**good, "token": "wrong"}, f"reward remote: remote reward at {up}: the server rejected the token"),
             ({**good, "reward": "pickscore"},
              f"reward remote: remote reward at {up}: serves 'toy_color', the config expects 'pickscore'"),
             ({**good, "url": "localhost:1"}, "reward.options.remote: remote reward: option url must be http"),
             ({**good, "tokn": "x"}, "reward.options.remote.tokn is not an option of a served reward")]
    for opts, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as e:
            check_served_rewards({"remote": 1.0}, {"remote": opts})
        assert isinstance(e.value, ConfigError) and "\n" not in str(e.value)


def test_check_health_waits_for_a_server_that_is_still_starting():
    from fastflow.rewards.remote import check_health

    port = _free_port()
    result: list = []
    waiter = threading.Thread(target=lambda: result.append(
        check_health(f"http://127.0.0.1:{port}", reward="toy_color", wait=60)), daemon=True)
    waiter.start()
    time.sleep(0.5)  # the check is already retrying when the server starts
    server = Server("toy_color", "--port", str(port))
    try:
        waiter.join(30)
        assert result and result[0]["reward"] == "toy_color" and result[0]["token_required"] is False
    finally:
        server.stop()


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


def test_server_refuses_a_negative_content_length_at_once(toy_server):
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(toy_server.url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(f"POST /score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                  f"Content-Length: -5\r\n\r\n".encode())
        chunks = []   # before: the handler read until EOF and never answered
        while chunk := s.recv(4096):   # the server closes the connection after the reply
            chunks.append(chunk)
        reply = b"".join(chunks).decode()
    assert reply.startswith("HTTP/1.1 400") and "Content-Length -5" in reply


@pytest.mark.parametrize("argv, cause", [
    (["--reward", "nope"], "unknown reward 'nope'; known: "),
    (["--reward", "toy_color", "--port", "70000"], "--port must be in [0, 65535], got 70000"),
    (["--reward", "toy_color", "--max-body-mb", "0"], "--max-body-mb must be >= 1, got 0"),
    (["--reward", "toy_color", "--device", "gpu0"], "--device 'gpu0' is not a device"),
    (["--reward", "toy_color", "--port", "0", "--option", "colour=red"],
     "--option for toy_color: ColorReward.__init__() got an unexpected keyword argument 'colour'"),
    (["--reward", "toy_color", "--port", "0", "--token-file", "/nonexistent/token"],
     "--token-file: no such file: /nonexistent/token"),
])
def test_server_cli_bad_input_is_one_line_and_exit_2(argv, cause, capsys):
    from fastflow.rewards import serve

    with pytest.raises(SystemExit) as e:
        serve.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fastflow.rewards.serve: {cause}")


def test_server_cli_port_in_use_fails_before_the_reward_loads(monkeypatch, capsys):
    import socket

    from fastflow.rewards import serve

    def refuse(*a, **k):
        raise AssertionError("the reward was built before the port was bound")
    monkeypatch.setattr(serve, "build_reward", refuse)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as e:
            serve.main(["--reward", "toy_color", "--port", str(port)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"fastflow.rewards.serve: 127.0.0.1:{port}: ")
    assert "in use" in err and len(err.strip().splitlines()) == 1
