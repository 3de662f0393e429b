"""Client for the Flow-GRPO authors' reward servers (their ``reward-server`` project: GenEval and
DeQA behind Flask/gunicorn, each in its own environment), which speak pickle over HTTP:

    POST URL/   body: pickle of {"images": [JPEG bytes, ...], "meta_datas": [dict, ...],
                                 "only_strict": bool}                              (GenEval)
                      pickle of {"images": [JPEG bytes, ...]}                      (DeQA)
    200         body: pickle of {"scores": [float], "rewards": [float], "strict_rewards": [float],
                                 "group_rewards": {tag: [float]}, "group_strict_rewards": {...}}
                      pickle of {"outputs": [float]}                               (DeQA)
    500         body: the server's traceback as text

A pickle can run any code while it is read, so the reply is read with a restricted unpickler that
admits plain containers, numbers, strings and bytes only (None, bool, int, float, str, bytes,
bytearray, list, tuple, dict, set, frozenset): any class or function the reply names is refused
before it is looked up, and nothing of the reply runs. Requests are pickled here from plain data.

Options: url (default http://127.0.0.1:18085, the authors' GenEval port), protocol ("geneval" or
"deqa"), score (GenEval: "scores", the fraction of requirements met, the authors' training reward;
"strict_rewards", GenEval's 0/1 correctness; "rewards", the correctness under GenEval's original
rules, which the server computes only when asked), batch_size (64, as the authors), timeout (s
per request), deadline (s per call, retries included), backoff (first retry delay, s),
jpeg_quality (75, PIL's default, which the authors' client uses).
"""

from __future__ import annotations

import io
import pickle
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Sequence

import torch
from torch import Tensor

from fastflow.rewards._clip import to_uint8
from fastflow.rewards.remote import RemoteRewardError

PLAIN_TYPES = (type(None), bool, int, float, str, bytes, bytearray, list, tuple, dict, set, frozenset)
MAX_REPLY = 64 << 20  # bytes


class UnsafePickleError(pickle.UnpicklingError):
    """A reply that names a class or function (anything but plain data)."""


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module, name):  # every global: classes, functions, numpy scalars...
        raise UnsafePickleError(f"the reply names {module}.{name}; only plain containers, numbers, "
                                f"strings and bytes are accepted")

    def persistent_load(self, pid):
        raise UnsafePickleError("the reply holds a persistent id; only plain data is accepted")


def loads_plain(data: bytes):
    """Unpickle ``data`` admitting only PLAIN_TYPES (see the module docstring); raises
    UnsafePickleError for anything else, pickle.UnpicklingError for a malformed pickle."""
    try:
        obj = _PlainUnpickler(io.BytesIO(data)).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError,
            AttributeError, MemoryError) as e:
        raise pickle.UnpicklingError(f"malformed pickle ({type(e).__name__}: {e})") from None
    # Without find_class no opcode can build anything else; checked all the same, without recursion.
    stack, seen = [obj], set()
    while stack:
        x = stack.pop()
        if type(x) not in PLAIN_TYPES:
            raise UnsafePickleError(f"the reply holds a {type(x).__name__}; only plain data is accepted")
        if isinstance(x, (list, tuple, set, frozenset)) and id(x) not in seen:
            seen.add(id(x))
            stack.extend(x)
        elif isinstance(x, dict) and id(x) not in seen:
            seen.add(id(x))
            stack.extend(x.keys())
            stack.extend(x.values())
    return obj


def encode_jpeg(images: Tensor, quality: int = 75) -> list[bytes]:
    """[B, 3, H, W] floats in [0, 1] -> JPEG bytes, quantised as the authors' client does."""
    from PIL import Image

    out = []
    for arr in to_uint8(images):
        buf = io.BytesIO()
        Image.fromarray(arr, mode="RGB").save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def _opener_for(url: str) -> urllib.request.OpenerDirector:
    host = urllib.parse.urlsplit(url).hostname
    handlers = [urllib.request.ProxyHandler({})] if host in ("127.0.0.1", "localhost", "::1") else []
    return urllib.request.build_opener(*handlers)


class FlowGrpoServerReward:
    """Reward factory for a server of the authors' protocol (see the module docstring)."""

    SCORES = {"geneval": ("scores", "strict_rewards", "rewards"), "deqa": ("outputs",)}

    def __init__(self, device="cpu", url: str = "http://127.0.0.1:18085", protocol: str = "geneval",
                 score: str | None = None, batch_size: int = 64, timeout: float = 120.0,
                 deadline: float = 600.0, backoff: float = 0.25, jpeg_quality: int = 75):
        where = "flow_grpo server reward"
        if not url or not str(url).startswith(("http://", "https://")):
            raise ValueError(f"{where}: option url must be http(s)://host:port, got {url!r}")
        if protocol not in self.SCORES:
            raise ValueError(f"{where}: option protocol must be one of {', '.join(self.SCORES)}, got {protocol!r}")
        score = score or self.SCORES[protocol][0]
        if score not in self.SCORES[protocol]:
            raise ValueError(f"{where}: option score for protocol {protocol} must be one of "
                             f"{', '.join(self.SCORES[protocol])}, got {score!r}")
        try:
            self.batch_size, self.timeout, self.deadline = int(batch_size), float(timeout), float(deadline)
            self.backoff, self.jpeg_quality = float(backoff), int(jpeg_quality)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: batch_size, timeout, deadline, backoff and jpeg_quality must be "
                             f"numbers") from None
        if self.batch_size < 1 or self.timeout <= 0 or self.deadline <= 0 or self.backoff < 0:
            raise ValueError(f"{where}: batch_size, timeout and deadline must be positive, backoff >= 0")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"{where}: jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        self.url, self.protocol, self.score = str(url).rstrip("/"), protocol, score
        self._opener = _opener_for(self.url)

    def _body(self, images: Tensor, prompts: Sequence[str], metadata: Sequence[dict]) -> bytes:
        data: dict = {"images": encode_jpeg(images, self.jpeg_quality)}
        if self.protocol == "geneval":
            # The authors' server reads each entry's "prompt" and "tag"; a .jsonl prompt file's
            # "prompt" became the prompt text, so it is put back.
            data["meta_datas"] = [{**dict(m or {}), "prompt": m.get("prompt", p) if m else p}
                                  for p, m in zip(prompts, metadata)]
            data["only_strict"] = self.score != "rewards"
        return pickle.dumps(data, protocol=4)  # Python >= 3.4 reads it (the servers run 3.10)

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata=None) -> Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"flow_grpo server reward: {images.shape[0]} images but {len(prompts)} prompts")
        metadata = list(metadata) if metadata is not None else [{} for _ in prompts]
        stop = time.monotonic() + self.deadline
        scores: list[float] = []
        for i in range(0, len(prompts), self.batch_size):
            sl = slice(i, i + self.batch_size)
            body = self._body(images[sl], list(prompts[sl]), metadata[sl])
            scores.extend(self._post(body, stop, len(prompts[sl])))
        return torch.tensor(scores, dtype=torch.float32)

    def _post(self, body: bytes, stop: float, n: int) -> list[float]:
        where = f"flow_grpo server at {self.url}"
        delay, attempt, last = self.backoff, 0, "no attempt made"
        while True:
            remaining = stop - time.monotonic()
            if remaining <= 0:
                raise RemoteRewardError(f"{where}: no answer within the deadline of {self.deadline:g} s after "
                                        f"{attempt} attempt(s) (last error: {last})")
            attempt += 1
            req = urllib.request.Request(self.url + "/", data=body, method="POST",
                                         headers={"Content-Type": "application/octet-stream"})
            try:
                with self._opener.open(req, timeout=min(self.timeout, remaining)) as resp:
                    data = resp.read(MAX_REPLY + 1)
                if len(data) > MAX_REPLY:
                    raise RemoteRewardError(f"{where}: reply larger than {MAX_REPLY} bytes")
                return self._check(data, n, where)
            except urllib.error.HTTPError as e:
                text = _last_line(e.read(4096))
                if e.code < 500:  # the server's code answers 200 or 500; a 4xx is another server
                    raise RemoteRewardError(f"{where}: HTTP {e.code}: {text}") from None
                last = f"HTTP {e.code}: {text}"
            except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            time.sleep(max(0.0, min(delay, stop - time.monotonic())))
            delay = min(delay * 2, 10.0)

    def _check(self, data: bytes, n: int, where: str) -> list[float]:
        try:
            reply = loads_plain(data)
        except pickle.UnpicklingError as e:  # UnsafePickleError included: refused, never retried
            raise RemoteRewardError(f"{where}: reply refused: {e}") from None
        if not isinstance(reply, dict) or not isinstance(reply.get(self.score), (list, tuple)):
            keys = sorted(map(str, reply)) if isinstance(reply, dict) else type(reply).__name__
            raise RemoteRewardError(f"{where}: the reply has no list {self.score!r} (got {keys})")
        values = reply[self.score]
        if len(values) != n or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise RemoteRewardError(f"{where}: expected {n} numbers under {self.score!r}, got "
                                    f"{str(values)[:200]}")
        return [float(v) for v in values]


def _last_line(raw: bytes) -> str:
    """The last line of an error body (a Python traceback's exception line)."""
    lines = [ln.strip() for ln in raw.decode("utf-8", "replace").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no body)"
