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
    # refused by the HTTP layer (h11) before the app sees it, and the connection closed
    assert reply.startswith("HTTP/1.1 400") and "Invalid HTTP request" in reply


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


# ------------------------------------------------------------------------------ batching

class Recorder:
    """A reward that scores each image by its mean and remembers the size of every call."""

    def __init__(self, reject: str | None = None, delay: float = 0.0):
        self.calls: list[int] = []
        self.reject, self.delay = reject, delay

    def __call__(self, images, prompts, metadata):
        self.calls.append(len(prompts))
        if self.reject in prompts:
            raise ValueError(f"cannot score {self.reject!r}")
        time.sleep(self.delay)
        return images.mean(dim=(1, 2, 3))


def _batched(reward, jobs, **kw):
    """Send every (images, prompts) job at once through a Batcher; returns the results or errors."""
    import asyncio

    from fastflow.rewards.serve import Batcher

    async def go():
        b = Batcher(reward, **kw)
        b.start()
        try:
            return await asyncio.gather(*[b.score(im, pr, [{} for _ in pr]) for im, pr in jobs],
                                        return_exceptions=True), b.stats
        finally:
            await b.stop()
    return asyncio.run(go())


def test_concurrent_requests_form_one_model_batch():
    rec = Recorder()
    jobs = [(quantised(2, seed=i), [f"r{i}a", f"r{i}b"]) for i in range(8)]  # 8 ranks, 2 images each
    results, stats = _batched(rec, jobs, max_images=256, wait_s=0.05)
    assert rec.calls == [16]  # one model call for the 8 requests
    for (images, _), (scores, timing) in zip(jobs, results):
        assert scores == images.mean(dim=(1, 2, 3)).tolist()  # each request gets its own scores back
        assert timing["batch_requests"] == 8 and timing["batch_images"] == 16
    assert stats.batches == 1 and stats.batch_requests_max == 8


def test_batches_respect_the_image_cap_and_image_size_and_can_be_off():
    rec = Recorder()
    jobs = [(quantised(3, seed=i), ["p"] * 3) for i in range(6)]
    _batched(rec, jobs, max_images=9, wait_s=0.05)
    assert rec.calls == [9, 9]  # three requests of 3 images per batch
    rec = Recorder()
    mixed = [(quantised(1, size=8), ["a"]), (quantised(1, size=16), ["b"]), (quantised(1, size=8), ["c"])]
    results, _ = _batched(rec, mixed, max_images=256, wait_s=0.05)
    assert sorted(rec.calls) == [1, 2] and all(not isinstance(r, Exception) for r in results)
    rec = Recorder()
    _batched(rec, jobs, max_images=0, wait_s=0.05)
    assert rec.calls == [3] * 6  # --max-batch-images 0: one request per call


def test_a_bad_request_fails_alone_and_the_others_are_scored():
    from fastflow.rewards.serve import RewardRejected

    rec = Recorder(reject="purple")
    jobs = [(quantised(1, seed=i), ["purple" if i == 2 else "red"]) for i in range(4)]
    results, stats = _batched(rec, jobs, max_images=256, wait_s=0.05)
    assert isinstance(results[2], RewardRejected) and "cannot score 'purple'" in str(results[2])
    for i in (0, 1, 3):
        assert results[i][0] == jobs[i][0].mean(dim=(1, 2, 3)).tolist()
    assert rec.calls == [4, 1, 1, 1, 1] and stats.retried_alone == 4


def test_server_batches_concurrent_clients_and_reports_metrics():
    server = Server("toy_color", "--batch-wait-ms", "1500", env={"FASTFLOW_REWARD_TOKEN": TOKEN})
    try:
        images = [quantised(2, seed=i) for i in range(8)]
        prompts = ["a red", "a blue"]
        body = [json.dumps({"images": encode_images(im), "prompts": prompts}).encode() for im in images]
        start = threading.Barrier(8)
        replies: list = [None] * 8

        def client(i):
            req = urllib.request.Request(server.url + "/score", data=body[i], method="POST",
                                         headers={"Authorization": f"Bearer {TOKEN}"})
            start.wait()
            with urllib.request.urlopen(req, timeout=60) as r:
                replies[i] = json.loads(r.read())
        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        local = build_reward("toy_color")
        for im, rep in zip(images, replies):
            assert rep["scores"] == local(im, prompts, None).tolist() and rep["reward"] == "toy_color"
        assert max(rep["timing"]["batch_requests"] for rep in replies) == 8  # all 8 in one model batch
        req = urllib.request.Request(server.url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            m = json.loads(r.read())
        assert m["requests"] == 8 and m["images"] == 16 and m["batches"] == 1 and m["max_batch_requests"] == 8
        assert m["mean_batch_images"] == 16 and m["model_s"] > 0 and m["errors"] == {}
        with pytest.raises(urllib.error.HTTPError) as e:  # metrics need the token
            urllib.request.urlopen(server.url + "/metrics", timeout=10)
        assert e.value.code == 401
        with pytest.raises(urllib.error.HTTPError) as e:  # unknown paths: a JSON error
            urllib.request.urlopen(server.url + "/nope", timeout=10)
        assert e.value.code == 404 and "use GET /health" in json.loads(e.value.read())["error"]
    finally:
        server.stop()


def test_server_refuses_a_body_over_the_limit_before_reading_it(toy_server):
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(toy_server.url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(f"POST /score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                  f"Content-Length: {300 << 20}\r\n\r\n".encode())  # 300 MiB announced, none sent
        chunks = []
        while chunk := s.recv(4096):
            chunks.append(chunk)
    reply = b"".join(chunks).decode()
    assert reply.startswith("HTTP/1.1 413") and "exceeds" in reply


def test_server_without_the_serve_extra_is_one_line(monkeypatch, capsys):
    from fastflow.rewards import serve

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn -> ImportError
    with pytest.raises(SystemExit) as e:
        serve.main(["--reward", "toy_color", "--port", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert err[0].startswith("fastflow.rewards.serve: the reward server needs the serve extra: pip install 'fastflow[serve]'")


# ------------------------------------------------------------------------------ the authors' protocol

class AuthorsStandIn:
    """A loopback stand-in for the authors' GenEval server (POST / with pickle in and out): scores
    each JPEG by its mean red, strict = red > 0.5, and answers 500 with a traceback on bad input.
    ``reply`` overrides the pickled reply (to send what a hostile server would)."""

    def __init__(self, reply: bytes | None = None):
        import http.server
        import pickle

        import numpy as np
        from PIL import Image

        from fastflow.rewards.flow_grpo_server import loads_plain

        self.requests: list[dict] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                data = loads_plain(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(data)
                try:
                    reds = []
                    for jpeg in data["images"]:
                        with Image.open(io.BytesIO(jpeg), formats=["jpeg"]) as im:
                            reds.append(float(np.asarray(im.convert("RGB"))[..., 0].mean()) / 255)
                    tags = [m["tag"] for m in data["meta_datas"]]
                    _ = [m["prompt"] for m in data["meta_datas"]]  # the authors' server reads it
                    body = pickle.dumps({"scores": reds, "rewards": [0.0] * len(reds),
                                         "strict_rewards": [float(r > 0.5) for r in reds],
                                         "group_rewards": {t: [1.0] for t in tags},
                                         "group_strict_rewards": {t: [1.0] for t in tags}})
                    status = 200
                except Exception:
                    import traceback
                    body, status = traceback.format_exc().encode(), 500
                if outer.reply is not None and status == 200:
                    body = outer.reply
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.reply = reply
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _red_images():
    images = torch.zeros(3, 3, 16, 16)
    images[0, 0] = 1.0   # red
    images[1, 0] = 0.25  # dark red
    images[2, 2] = 1.0   # blue
    return images


def test_authors_protocol_client_against_a_loopback_stand_in():
    from fastflow.rewards.flow_grpo_server import FlowGrpoServerReward

    server = AuthorsStandIn()
    try:
        meta = [{"tag": "colors", "include": [{"class": "apple", "count": 1, "color": "red"}]}] * 3
        prompts = ["a photo of a red apple", "a photo of a dark apple", "a photo of a blue apple"]
        dense = FlowGrpoServerReward(url=server.url, batch_size=2)(_red_images(), prompts, meta)
        assert dense.dtype == torch.float32 and dense.shape == (3,)
        assert dense[0] > 0.95 and 0.2 < dense[1] < 0.3 and dense[2] < 0.05  # JPEG's rounding, not exact
        assert len(server.requests) == 2 and [len(r["images"]) for r in server.requests] == [2, 1]
        first = server.requests[0]
        assert first["only_strict"] is True and all(isinstance(b, bytes) and b[:2] == b"\xff\xd8" for b in first["images"])
        assert [m["prompt"] for m in first["meta_datas"]] == prompts[:2]  # put back for the server
        assert first["meta_datas"][0]["include"] == meta[0]["include"]
        strict = FlowGrpoServerReward(url=server.url, score="strict_rewards")(_red_images(), prompts, meta)
        assert strict.tolist() == [1.0, 0.0, 0.0]
        with pytest.raises(RemoteRewardError, match=r"no answer within the deadline of 1 s .*"
                                                    r"last error: HTTP 500: KeyError: 'tag'"):
            FlowGrpoServerReward(url=server.url, deadline=1.0, backoff=0.05)(_red_images()[:1], ["x"], [{}])
    finally:
        server.close()


class _Hostile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_authors_protocol_client_never_unpickles_objects(tmp_path):
    import pickle

    import numpy as np

    from fastflow.rewards.flow_grpo_server import FlowGrpoServerReward, UnsafePickleError, loads_plain

    marker = tmp_path / "pwned"
    hostile = pickle.dumps({"scores": [_Hostile(str(marker))]})
    assert loads_plain(pickle.dumps({"a": [1, 2.5, "x", b"y", None, True, (1,), {3}, frozenset()]})) == \
        {"a": [1, 2.5, "x", b"y", None, True, (1,), {3}, frozenset()]}
    for bad, named in [(hostile, "posix.mkdir"), (pickle.dumps({"scores": [np.float64(0.5)]}), "numpy"),
                       (pickle.dumps(torch.zeros(1)), "torch")]:
        with pytest.raises(UnsafePickleError, match=f"names {named}"):
            loads_plain(bad)
    assert not marker.exists()
    server = AuthorsStandIn(reply=hostile)
    try:
        client = FlowGrpoServerReward(url=server.url, deadline=30)
        with pytest.raises(RemoteRewardError, match=r"reply refused: the reply names posix.mkdir; only plain "
                                                    r"containers, numbers, strings and bytes") as e:
            client(_red_images()[:1], ["a red apple"], [{"tag": "colors"}])
        assert "\n" not in str(e.value) and len(server.requests) == 1  # refused, not retried
        assert not marker.exists()  # nothing of the reply ran
        server.reply = pickle.dumps({"scores": ["high"]})
        with pytest.raises(RemoteRewardError, match=r"expected 1 numbers under 'scores'"):
            client(_red_images()[:1], ["a red apple"], [{"tag": "colors"}])
    finally:
        server.close()


def test_authors_protocol_client_options_are_checked():
    from fastflow.rewards.flow_grpo_server import FlowGrpoServerReward

    with pytest.raises(ValueError, match="option url must be http"):
        FlowGrpoServerReward(url="127.0.0.1:18085")
    with pytest.raises(ValueError, match="option score for protocol geneval must be one of scores, "
                                         "strict_rewards, rewards, got 'accuracy'"):
        FlowGrpoServerReward(score="accuracy")
    with pytest.raises(ValueError, match="option protocol must be one of geneval, deqa"):
        FlowGrpoServerReward(protocol="llava")
    assert FlowGrpoServerReward(protocol="deqa").score == "outputs"


def test_serve_bench_measures_the_three_modes():
    from fastflow.rewards.serve_bench import bench

    rows = bench("toy_color", ["--device", "cpu", "--batch-wait-ms", "500"], clients=4, requests=1, images=2,
                 size=8, warmup=0)
    assert [r["mode"] for r in rows] == ["sequential", "concurrent", "batched"]
    assert all(r["images"] == 8 and r["images_per_s"] > 0 for r in rows)
    assert rows[0]["mean_batch_images"] == rows[1]["mean_batch_images"] == 2  # one request per model call
    assert rows[2]["mean_batch_images"] > 2  # the four clients' requests merged
