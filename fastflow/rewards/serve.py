"""Host any registered reward in its own process, over HTTP with JSON + PNG (never pickle).

    python -m fastflow.rewards.serve --reward ocr [--port 8765] [--host 127.0.0.1]
        [--token-file F | env FASTFLOW_REWARD_TOKEN] [--device cuda:0] [--option key=value ...]

Endpoints: GET /health -> {"status": "ok", "reward": NAME, "token_required": BOOL}; POST /score (see
fastflow.rewards.wire). With a token, /score needs the header ``Authorization: Bearer TOKEN``
(compared in constant time). /health answers without one (liveness probes need no secret), but
checks a token that a request presents (401 when wrong), so a client can test its token before a
run (fastflow.rewards.remote.check_health).
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
from typing import NoReturn

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

    def handle_error(self, request, client_address):
        # A client that vanished or stalled mid-request is its own problem: one line, no traceback.
        log.warning("request from %s failed: %s", client_address[0], sys.exc_info()[1])


class _Handler(BaseHTTPRequestHandler):
    server: RewardServer
    protocol_version = "HTTP/1.1"
    timeout = 300  # s of socket silence before a stalled client's thread gives up (e.g. a short body)

    def log_message(self, fmt, *args):  # route through logging instead of raw stderr
        log.debug("%s " + fmt, self.address_string(), *args)

    def _reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _token_ok(self) -> bool:
        auth = self.headers.get("Authorization", "")
        given = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
        return hmac.compare_digest(given.encode(), self.server.token.encode())

    def _refuse(self, status: int, message: str) -> None:
        """An error reply before the body was read: close the connection, so that unread body
        bytes are never parsed as the next request."""
        self.close_connection = True
        self._reply(status, {"error": message})

    def do_GET(self):
        if self.path.rstrip("/") == "/health":
            token = self.server.token
            if token is not None and "Authorization" in self.headers and not self._token_ok():
                return self._reply(401, {"error": "wrong token"})
            self._reply(200, {"status": "ok", "reward": self.server.name, "token_required": token is not None})
        else:
            self._reply(404, {"error": f"unknown path {self.path}; use GET /health or POST /score"})

    def do_POST(self):
        if self.path.rstrip("/") != "/score":
            return self._refuse(404, f"unknown path {self.path}; use POST /score")
        if self.server.token is not None and not self._token_ok():
            return self._refuse(401, "missing or wrong token")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return self._refuse(411, "Content-Length required")
        if length < 0:
            return self._refuse(400, f"bad request: Content-Length {length}")
        if length > self.server.max_body:
            return self._refuse(413, f"body of {length} bytes exceeds {self.server.max_body}")
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


def _fail(message) -> NoReturn:
    print(f"fastflow.rewards.serve: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)


def main(argv=None) -> None:
    """Command-line entry point: check the arguments, bind the port, build the reward, serve until
    interrupted. Bad input is one line on stderr and exit code 2, before the reward's model loads."""
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
    # Cheap checks first, then the port (a port in use fails in a second, not after the model
    # loaded); clients that connect while the reward loads wait in the listen queue.
    if args.reward not in REGISTRY:
        _fail(f"unknown reward {args.reward!r}; known: {', '.join(sorted(REGISTRY))}")
    if not 0 <= args.port <= 65535:
        _fail(f"--port must be in [0, 65535], got {args.port}")
    if args.max_body_mb < 1:
        _fail(f"--max-body-mb must be >= 1, got {args.max_body_mb}")
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        _fail(f"--device {args.device!r} is not a device (cpu, cuda, cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        _fail(f"--device {args.device}: CUDA is not available here")
    try:
        token = read_token(args.token_file)
        server = RewardServer((args.host, args.port), args.reward, None, token, args.max_body_mb << 20)
    except (ValueError, FileNotFoundError, OSError) as e:
        _fail(f"{args.host}:{args.port}: {e}" if isinstance(e, OSError) and not isinstance(e, FileNotFoundError)
              else e)
    try:
        server.reward = build_reward(args.reward, args.device, **dict(args.option))
    except TypeError as e:  # an --option the reward's factory does not take
        server.server_close()
        _fail(f"--option for {args.reward}: {e}")
    except (ValueError, FileNotFoundError, ImportError, OSError) as e:
        server.server_close()
        _fail(e)
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
