"""Host any registered reward in its own process, over HTTP with JSON + PNG (never pickle).

    python -m fastflow.rewards.serve --reward ocr [--port 8765] [--host 127.0.0.1]
        [--token-file F | env FASTFLOW_REWARD_TOKEN] [--device cuda:0] [--option key=value ...]

Endpoints: GET /health -> {"status": "ok", "reward": NAME}; POST /score (see fastflow.rewards.wire).
With a token, /score needs the header ``Authorization: Bearer TOKEN`` (compared in constant time).
Binds to 127.0.0.1 unless --host says otherwise. Prints one line "serving REWARD on http://HOST:PORT"
once ready (with --port 0 the OS picks the port, and that line tells it).
"""

from __future__ import annotations

import argparse
import hmac
import json
import logging
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from fastflow.rewards import REGISTRY, build_reward
from fastflow.rewards.wire import parse_request

log = logging.getLogger("fastflow.rewards.serve")
TOKEN_ENV = "FASTFLOW_REWARD_TOKEN"


def parse_option(text: str) -> tuple[str, object]:
    """"key=value" -> (key, value); the value is read as JSON when it parses (numbers, booleans), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--option needs key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def read_token(token_file: str | None) -> str | None:
    """The shared token from --token-file, else $FASTFLOW_REWARD_TOKEN, else None (no auth)."""
    if token_file:
        path = Path(token_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--token-file: no such file: {path}")
        token = path.read_text().strip()
        if not token:
            raise ValueError(f"--token-file: {path} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


class RewardServer(ThreadingHTTPServer):
    """An HTTP server around one reward. Calls into the reward are serialised by a lock (models
    and OCR engines are not all thread-safe); decoding and encoding run concurrently."""

    daemon_threads = True

    def __init__(self, address, name: str, reward, token: str | None, max_body: int = 256 << 20):
        super().__init__(address, _Handler)
        self.name, self.reward, self.token, self.max_body = name, reward, token, max_body
        self.lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # route through logging instead of raw stderr
        log.debug("%s " + fmt, self.address_string(), *args)

    def _reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path.rstrip("/") == "/health":
            self._reply(200, {"status": "ok", "reward": self.server.name})
        else:
            self._reply(404, {"error": f"unknown path {self.path}; use GET /health or POST /score"})

    def do_POST(self):
        if self.path.rstrip("/") != "/score":
            return self._reply(404, {"error": f"unknown path {self.path}; use POST /score"})
        token = self.server.token
        if token is not None:
            auth = self.headers.get("Authorization", "")
            given = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
            if not hmac.compare_digest(given.encode(), token.encode()):
                return self._reply(401, {"error": "missing or wrong token"})
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._reply(411, {"error": "Content-Length required"})
        if length > self.server.max_body:
            return self._reply(413, {"error": f"body of {length} bytes exceeds {self.server.max_body}"})
        try:
            images, prompts, metadata = parse_request(json.loads(self.rfile.read(length)))
        except (ValueError, json.JSONDecodeError) as e:
            return self._reply(400, {"error": f"bad request: {e}"})
        try:
            with self.server.lock, torch.no_grad():
                scores = self.server.reward(images, prompts, metadata)
            scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1).tolist()
        except (ValueError, KeyError) as e:  # the reward rejected this input: do not retry
            return self._reply(422, {"error": f"{type(e).__name__}: {e}"})
        except Exception as e:  # a failure inside the reward: 5xx, the client may retry
            log.exception("reward %s failed", self.server.name)
            return self._reply(500, {"error": f"{type(e).__name__}: {e}"})
        if len(scores) != len(prompts):
            return self._reply(500, {"error": f"reward returned {len(scores)} scores for {len(prompts)} images"})
        self._reply(200, {"scores": scores, "reward": self.server.name})


def main(argv=None) -> None:
    """Command-line entry point: parse arguments, build the reward, serve until interrupted."""
    p = argparse.ArgumentParser(prog="python -m fastflow.rewards.serve", description=__doc__.split("\n")[0])
    p.add_argument("--reward", required=True, help=f"registered reward: {', '.join(sorted(REGISTRY))}")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765, help="0 lets the OS pick a free port")
    p.add_argument("--token-file", help=f"file holding the shared token (else ${TOKEN_ENV})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--option", action="append", type=parse_option, default=[],
                   metavar="KEY=VALUE", help="reward factory option (repeatable)")
    p.add_argument("--max-body-mb", type=int, default=256)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        token = read_token(args.token_file)
        reward = build_reward(args.reward, args.device, **dict(args.option))
        server = RewardServer((args.host, args.port), args.reward, reward, token, args.max_body_mb << 20)
    except (ValueError, FileNotFoundError, ImportError, OSError) as e:
        sys.exit(f"fastflow.rewards.serve: {e}")
    if token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without a token: anyone who can reach it can use the reward", args.host)
    host, port = server.server_address[:2]
    print(f"serving {args.reward} on http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
