"""Client for a reward served by ``python -m fastflow.rewards.serve`` (registered as "remote").

    [reward] weights = {remote = 1.0}
    [reward.options.remote] url = "http://127.0.0.1:8765"  reward = "ocr"  deadline = 600

Batches images, retries connection errors, timeouts and 5xx replies with exponential backoff, and
fails with one clear error once ``deadline`` seconds have passed for a call. 4xx replies (wrong
token, bad input) fail at once: retrying would not help.

Before a run, :func:`check_served_rewards` asks every served reward's ``GET /health`` whether it
is up, serves the expected reward and accepts the token, so that a wrong url, port or token is
one line before the model loads rather than an error on every rank after the first rollout.
"""

from __future__ import annotations

import inspect
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


def _opener_for(url: str) -> urllib.request.OpenerDirector:
    # Loopback never goes through an HTTP proxy set in the environment; other hosts may.
    host = urllib.parse.urlsplit(url).hostname
    handlers = [urllib.request.ProxyHandler({})] if host in ("127.0.0.1", "localhost", "::1") else []
    return urllib.request.build_opener(*handlers)


def _refused(e: BaseException) -> bool:
    """A connection error that a server still starting up gives (nothing listens yet, or it is
    too busy loading to answer): worth waiting for, unlike an unknown host name."""
    reason = getattr(e, "reason", e)
    return isinstance(reason, (ConnectionRefusedError, ConnectionResetError, socket.timeout, TimeoutError))


def check_health(url: str, token: str | None = None, timeout: float = 10.0, *, reward: str | None = None,
                 wait: float = 0.0) -> dict:
    """``GET url/health`` of a reward server; returns its reply ({"status": "ok", "reward": NAME,
    "token_required": bool}). Checks that it serves ``reward`` (when given) and accepts ``token``
    (sent when given: a server with a token checks a presented one, 401 when wrong, and says
    whether it needs one). A refused or timed-out connection is retried for up to ``wait``
    seconds (a server that is still loading its model). Raises RemoteRewardError, one line
    naming the url and the cause."""
    url = str(url).rstrip("/")
    where = f"remote reward at {url}"
    opener = _opener_for(url)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    stop = time.monotonic() + max(0.0, float(wait))
    while True:
        req = urllib.request.Request(url + "/health", headers=headers, method="GET")
        try:
            with opener.open(req, timeout=timeout) as resp:
                reply = json.loads(resp.read())
            break
        except urllib.error.HTTPError as e:
            message = _error_text(e)
            if e.code == 401:
                raise RemoteRewardError(f"{where}: the server rejected the token (HTTP 401); set option "
                                        f"token/token_file or ${TOKEN_ENV}") from None
            if e.code == 404:
                raise RemoteRewardError(f"{where}: no /health endpoint (HTTP 404); is it a "
                                        f"python -m fastflow.rewards.serve server?") from None
            if e.code < 500 or time.monotonic() >= stop:
                raise RemoteRewardError(f"{where}: /health answered HTTP {e.code}: {message}") from None
        except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError) as e:
            if not _refused(e) or time.monotonic() >= stop:
                cause = getattr(e, "reason", e)
                waited = f" (waited {wait:g} s)" if wait > 0 and _refused(e) else ""
                raise RemoteRewardError(f"{where} is unreachable{waited}: {cause}; is the server "
                                        f"(python -m fastflow.rewards.serve) running there?") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RemoteRewardError(f"{where}: /health did not answer JSON; is it a "
                                    f"python -m fastflow.rewards.serve server?") from None
        time.sleep(max(0.0, min(0.5, stop - time.monotonic())))
    if not isinstance(reply, dict) or reply.get("status") != "ok":
        raise RemoteRewardError(f"{where}: /health answered {str(reply)[:200]!r}, not status ok")
    if reward is not None and reply.get("reward") != reward:
        raise RemoteRewardError(f"{where}: serves {reply.get('reward')!r}, the config expects {reward!r}")
    if reply.get("token_required") and not token:
        raise RemoteRewardError(f"{where}: the server requires a token; set option token/token_file or "
                                f"${TOKEN_ENV}")
    return reply


def check_served_rewards(weights: dict[str, float], options: dict[str, dict] | None = None) -> None:
    """Check every served reward of ``reward.weights`` (those the registry maps to RemoteReward)
    with :func:`check_health`: reachable, the expected reward (option ``reward``), the token
    accepted. Each server gets up to its ``startup_wait`` option (s) to come up. Raises ValueError
    (fastflow.config.ConfigError) with one line naming the reward, the url and the cause; call it
    before anything heavy loads."""
    from fastflow.config import ConfigError
    from fastflow.rewards import REGISTRY

    options = options or {}
    for name in weights:
        spec = REGISTRY.get(name)
        if spec != f"{__name__}:RemoteReward" and spec is not RemoteReward:
            continue
        opts = dict(options.get(name) or {})
        opts.pop("device", None)  # a served reward loads nothing here
        known = [k for k in inspect.signature(RemoteReward).parameters if k != "device"]
        unknown = sorted(set(opts) - set(known))
        if unknown:
            raise ConfigError(f"config: reward.options.{name}.{unknown[0]} is not an option of a served reward "
                              f"(options: {', '.join(known)})")
        try:
            client = RemoteReward(**opts)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"config: reward.options.{name}: {e}") from None
        try:
            client.check_health()
        except RemoteRewardError as e:
            raise ConfigError(f"config: reward {name}: {e}") from None


class RemoteReward:
    """Reward factory for a served reward. Options: url (required), reward (expected name, checked
    against the server's), token / token_file (else $FASTFLOW_REWARD_TOKEN), timeout (s per request),
    deadline (s per call, retries included), batch_size, backoff (first retry delay, s),
    startup_wait (s the pre-run health check waits for a server that is not up yet)."""

    def __init__(self, device="cpu", url: str | None = None, reward: str | None = None,
                 token: str | None = None, token_file: str | None = None, timeout: float = 120.0,
                 deadline: float = 600.0, batch_size: int = 64, backoff: float = 0.25,
                 startup_wait: float = 60.0):
        if not url or not str(url).startswith(("http://", "https://")):
            raise ValueError(f"remote reward: option url must be http(s)://host:port, got {url!r}")
        if token is None and token_file:
            path = Path(token_file).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"remote reward: token_file not found: {path}")
            token = path.read_text().strip()
        self.token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self.url = str(url).rstrip("/")
        self._opener = _opener_for(self.url)
        self.reward = reward
        try:
            self.timeout, self.deadline = float(timeout), float(deadline)
            self.batch_size, self.backoff = int(batch_size), float(backoff)
            self.startup_wait = float(startup_wait)
        except (TypeError, ValueError):
            raise ValueError("remote reward: timeout, deadline, batch_size, backoff and startup_wait must be "
                             "numbers") from None
        if self.batch_size < 1 or self.deadline <= 0 or self.timeout <= 0:
            raise ValueError("remote reward: batch_size, timeout and deadline must be positive")
        if self.backoff < 0 or self.startup_wait < 0:
            raise ValueError("remote reward: backoff and startup_wait must be >= 0")

    def check_health(self, wait: float | None = None) -> dict:
        """:func:`check_health` of this client's server, reward name and token; ``wait`` defaults
        to the ``startup_wait`` option."""
        return check_health(self.url, self.token, min(self.timeout, 10.0), reward=self.reward,
                            wait=self.startup_wait if wait is None else wait)

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
