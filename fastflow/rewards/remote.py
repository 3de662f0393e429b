"""Client for a reward served by ``python -m fastflow.rewards.serve`` (registered as "remote").

    [reward] weights = {remote = 1.0}
    [reward.options.remote] url = "http://127.0.0.1:8765"  reward = "ocr"  deadline = 600

Batches images, retries connection errors, timeouts and 5xx replies with exponential backoff, and
fails with one clear error once ``deadline`` seconds have passed for a call. 4xx replies (wrong
token, bad input) fail at once: retrying would not help.
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from fastflow.rewards.wire import encode_images

TOKEN_ENV = "FASTFLOW_REWARD_TOKEN"


class RemoteRewardError(RuntimeError):
    """A served reward could not be evaluated."""


class RemoteReward:
    """Reward factory for a served reward. Options: url (required), reward (expected name, checked
    against the server's), token / token_file (else $FASTFLOW_REWARD_TOKEN), timeout (s per request),
    deadline (s per call, retries included), batch_size, backoff (first retry delay, s)."""

    def __init__(self, device="cpu", url: str | None = None, reward: str | None = None,
                 token: str | None = None, token_file: str | None = None, timeout: float = 120.0,
                 deadline: float = 600.0, batch_size: int = 64, backoff: float = 0.25):
        if not url or not str(url).startswith(("http://", "https://")):
            raise ValueError(f"remote reward: option url must be http(s)://host:port, got {url!r}")
        if token is None and token_file:
            path = Path(token_file).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"remote reward: token_file not found: {path}")
            token = path.read_text().strip()
        self.token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self.url = str(url).rstrip("/")
        # Loopback never goes through an HTTP proxy set in the environment; other hosts may.
        host = urllib.parse.urlsplit(self.url).hostname
        handlers = [urllib.request.ProxyHandler({})] if host in ("127.0.0.1", "localhost", "::1") else []
        self._opener = urllib.request.build_opener(*handlers)
        self.reward = reward
        self.timeout, self.deadline = float(timeout), float(deadline)
        self.batch_size, self.backoff = int(batch_size), float(backoff)
        if self.batch_size < 1 or self.deadline <= 0 or self.timeout <= 0:
            raise ValueError("remote reward: batch_size, timeout and deadline must be positive")

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata=None) -> Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"remote reward: {images.shape[0]} images but {len(prompts)} prompts")
        metadata = list(metadata) if metadata is not None else [{} for _ in prompts]
        stop = time.monotonic() + self.deadline
        scores: list[float] = []
        for i in range(0, len(prompts), self.batch_size):
            body = {"images": encode_images(images[i:i + self.batch_size]),
                    "prompts": list(prompts[i:i + self.batch_size]),
                    "metadata": metadata[i:i + self.batch_size]}
            scores.extend(self._post(json.dumps(body).encode(), stop, len(body["prompts"])))
        return torch.tensor(scores, dtype=torch.float32)

    def _post(self, data: bytes, stop: float, n: int) -> list[float]:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        delay, attempt, last = self.backoff, 0, "no attempt made"
        while True:
            remaining = stop - time.monotonic()
            if remaining <= 0:
                raise RemoteRewardError(
                    f"remote reward at {self.url}: no answer within the deadline of {self.deadline:g} s "
                    f"after {attempt} attempt(s) (last error: {last})")
            attempt += 1
            req = urllib.request.Request(self.url + "/score", data=data, headers=headers, method="POST")
            try:
                with self._opener.open(req, timeout=min(self.timeout, remaining)) as resp:
                    reply = json.loads(resp.read())
                return self._check(reply, n)
            except urllib.error.HTTPError as e:
                message = _error_text(e)
                if e.code == 401:
                    raise RemoteRewardError(f"remote reward at {self.url}: the server rejected the token "
                                            f"(HTTP 401); set option token/token_file or ${TOKEN_ENV}") from None
                if e.code < 500:
                    raise RemoteRewardError(f"remote reward at {self.url}: HTTP {e.code}: {message}") from None
                last = f"HTTP {e.code}: {message}"
            except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError,
                    json.JSONDecodeError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            time.sleep(max(0.0, min(delay, stop - time.monotonic())))
            delay = min(delay * 2, 10.0)

    def _check(self, reply: dict, n: int) -> list[float]:
        if self.reward is not None and reply.get("reward") != self.reward:
            raise RemoteRewardError(f"remote reward at {self.url}: serves {reply.get('reward')!r}, "
                                    f"the config expects {self.reward!r}")
        scores = reply.get("scores")
        if not isinstance(scores, list) or len(scores) != n:
            raise RemoteRewardError(f"remote reward at {self.url}: malformed reply (expected {n} scores)")
        return [float(s) for s in scores]


def _error_text(e: urllib.error.HTTPError) -> str:
    try:
        return json.loads(e.read()).get("error", e.reason)
    except Exception:
        return str(e.reason)
