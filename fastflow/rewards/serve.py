"""Host any registered reward in its own process, over HTTP with JSON + PNG (never pickle), on
Starlette and uvicorn (the `serve` extra: pip install 'fastflow[serve]').

    python -m fastflow.rewards.serve --reward ocr [--port 8765] [--host 127.0.0.1]
        [--token-file F | env FASTFLOW_REWARD_TOKEN] [--device cuda:0] [--option key=value ...]
        [--max-batch-images 256] [--batch-wait-ms 20]

Endpoints: GET /health -> {"status": "ok", "reward": NAME, "token_required": BOOL}; POST /score (see
fastflow.rewards.wire); GET /metrics -> counters and timings (JSON). With a token, /score and
/metrics need the header ``Authorization: Bearer TOKEN`` (compared in constant time). /health
answers without one (liveness probes need no secret), but checks a token that a request presents
(401 when wrong), so a client can test its token before a run (fastflow.rewards.remote.check_health).

Requests from concurrent clients are batched: while the reward scores one batch, the requests that
arrive wait, and the next batch takes all of them (up to --max-batch-images images of one size),
so eight training ranks that send at once are scored as one model batch. An idle server waits
--batch-wait-ms after a request for others to join it. If a batch of several requests fails, each
request is scored again on its own, so that one bad request gets its own error and the others
their scores.

Binds to 127.0.0.1 unless --host says otherwise. The port is bound before the reward loads (a port
in use fails at once; clients that connect meanwhile wait in the listen queue). Prints one line
"serving REWARD on http://HOST:PORT" once ready (with --port 0 the OS picks the port, and that
line tells it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import socket
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import torch

from fastflow.rewards import REGISTRY, build_reward
from fastflow.rewards.wire import parse_request

log = logging.getLogger("fastflow.rewards.serve")
TOKEN_ENV = "FASTFLOW_REWARD_TOKEN"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


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


class RewardRejected(Exception):
    """The reward refused this input (its ValueError / KeyError): HTTP 422, not retried."""


# ------------------------------------------------------------------------------------ batching

@dataclass
class _Job:
    images: torch.Tensor
    prompts: list[str]
    metadata: list[dict]
    future: asyncio.Future
    queued: float = field(default_factory=time.perf_counter)

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class Stats:
    """What /metrics reports."""

    started: float = field(default_factory=time.time)
    requests: int = 0
    images: int = 0
    batches: int = 0
    batch_requests_max: int = 0
    batch_images_max: int = 0
    model_s: float = 0.0
    queue_s: float = 0.0       # summed over requests: arrival to the start of their batch
    decode_s: float = 0.0      # summed over requests: JSON + PNG decoding
    errors: dict = field(default_factory=lambda: defaultdict(int))  # by HTTP status
    retried_alone: int = 0     # requests scored again on their own after their batch failed

    def as_dict(self, name: str, max_batch: int, wait_ms: float) -> dict:
        n, b = max(self.requests, 1), max(self.batches, 1)
        return {
            "reward": name, "uptime_s": round(time.time() - self.started, 3),
            "requests": self.requests, "images": self.images, "batches": self.batches,
            "mean_batch_requests": self.requests / b if self.batches else 0.0,
            "mean_batch_images": self.images / b if self.batches else 0.0,
            "max_batch_requests": self.batch_requests_max, "max_batch_images": self.batch_images_max,
            "model_s": round(self.model_s, 6),
            "model_images_per_s": self.images / self.model_s if self.model_s > 0 else 0.0,
            "mean_queue_ms": 1e3 * self.queue_s / n if self.requests else 0.0,
            "mean_decode_ms": 1e3 * self.decode_s / n if self.requests else 0.0,
            "errors": dict(self.errors), "retried_alone": self.retried_alone,
            "max_batch_images_setting": max_batch, "batch_wait_ms_setting": wait_ms,
        }


class Batcher:
    """Merges concurrent requests into model batches and runs the reward in one worker thread
    (models and OCR engines are not all thread-safe; one batch at a time also keeps one GPU busy
    with one large batch rather than several small ones)."""

    def __init__(self, reward, max_images: int = 256, wait_s: float = 0.02, stats: Stats | None = None):
        self.reward, self.max_images, self.wait_s = reward, max_images, wait_s
        self.stats = stats or Stats()
        self._queue: asyncio.Queue[_Job] | None = None
        self._held: list[_Job] = []  # requests that did not fit the last batch, in arrival order
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._worker.shutdown(wait=False, cancel_futures=True)

    async def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> tuple[list[float], dict]:
        """The scores of one request and its batch's timing ({"batch_requests", "batch_images",
        "queue_ms", "model_ms"}). Raises RewardRejected or the reward's error."""
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(images, prompts, metadata, fut))
        return await fut

    async def _next_batch(self) -> list[_Job]:
        first = self._held.pop(0) if self._held else await self._queue.get()
        batch, n = [first], len(first)
        if self.max_images <= 0:  # batching off: one request per model call
            return batch
        shape = tuple(first.images.shape[1:])
        held, self._held = self._held, []
        deadline = time.perf_counter() + self.wait_s
        while n < self.max_images:
            if held:
                job = held.pop(0)
            else:
                try:
                    job = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    try:
                        job = await asyncio.wait_for(self._queue.get(), remaining)
                    except (asyncio.TimeoutError, TimeoutError):
                        break
            if tuple(job.images.shape[1:]) != shape:
                self._held.append(job)  # another image size: a later batch
            elif n + len(job) > self.max_images:
                self._held.append(job)  # the batch is full: it opens the next one
                break
            else:
                batch.append(job)
                n += len(job)
        self._held.extend(held)  # in arrival order after those set aside above
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            batch = [j for j in batch if not j.future.cancelled()]  # a client that went away
            if not batch:
                continue
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._worker, self._run, batch)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - handed to the waiting requests
                results = [e] * len(batch)
            model_s = time.perf_counter() - t0
            st = self.stats
            st.batches += 1
            st.batch_requests_max = max(st.batch_requests_max, len(batch))
            st.batch_images_max = max(st.batch_images_max, sum(len(j) for j in batch))
            st.model_s += model_s
            timing = {"batch_requests": len(batch), "batch_images": sum(len(j) for j in batch),
                      "model_ms": round(1e3 * model_s, 3)}
            for job, res in zip(batch, results):
                st.queue_s += t0 - job.queued
                if job.future.done():
                    continue
                if isinstance(res, BaseException):
                    job.future.set_exception(res)
                else:
                    job.future.set_result((res, {**timing, "queue_ms": round(1e3 * (t0 - job.queued), 3)}))

    def _call(self, images, prompts, metadata) -> list[float]:
        try:
            with torch.no_grad():
                scores = self.reward(images, prompts, metadata)
        except (ValueError, KeyError) as e:
            raise RewardRejected(f"{type(e).__name__}: {e}") from None
        scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1).tolist()
        if len(scores) != len(prompts):
            raise RuntimeError(f"reward returned {len(scores)} scores for {len(prompts)} images")
        return scores

    def _run(self, batch: list[_Job]) -> list:
        """In the worker thread: one call for the whole batch; when it fails and the batch holds
        several requests, one call per request (so only the request at fault gets the error)."""
        if len(batch) == 1:
            j = batch[0]
            try:
                return [self._call(j.images, j.prompts, j.metadata)]
            except Exception as e:  # noqa: BLE001
                return [e]
        try:
            scores = self._call(torch.cat([j.images for j in batch]), [p for j in batch for p in j.prompts],
                                [m for j in batch for m in j.metadata])
        except Exception:  # noqa: BLE001 - find the request at fault
            self.stats.retried_alone += len(batch)
            out = []
            for j in batch:
                try:
                    out.append(self._call(j.images, j.prompts, j.metadata))
                except Exception as e:  # noqa: BLE001
                    out.append(e)
            return out
        out, i = [], 0
        for j in batch:
            out.append(scores[i:i + len(j)])
            i += len(j)
        return out


# ------------------------------------------------------------------------------------ the app

def build_app(name: str, reward, token: str | None, *, max_body: int = 256 << 20,
              max_batch_images: int = 256, batch_wait_s: float = 0.02):
    """The Starlette app serving ``reward`` under ``name``. ``reward`` may be None and set later
    as ``app.state.batcher.reward`` (the port is bound before the model loads)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    stats = Stats()
    batcher = Batcher(reward, max_batch_images, batch_wait_s, stats)

    def reply(status: int, payload: dict, close: bool = False) -> JSONResponse:
        if status >= 400:
            stats.errors[status] += 1
        return JSONResponse(payload, status_code=status, headers={"Connection": "close"} if close else None)

    def token_ok(request: Request) -> bool:
        auth = request.headers.get("authorization", "")
        given = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
        return hmac.compare_digest(given.encode(), token.encode())

    async def health(request: Request):
        if token is not None and "authorization" in request.headers and not token_ok(request):
            return reply(401, {"error": "wrong token"})
        return JSONResponse({"status": "ok", "reward": name, "token_required": token is not None})

    async def metrics(request: Request):
        if token is not None and not token_ok(request):
            return reply(401, {"error": "missing or wrong token"})
        return JSONResponse(stats.as_dict(name, max_batch_images, 1e3 * batch_wait_s))

    async def score(request: Request):
        # Refusals before the body is read close the connection, so that unread body bytes are
        # never parsed as the next request.
        if token is not None and not token_ok(request):
            return reply(401, {"error": "missing or wrong token"}, close=True)
        length_text = request.headers.get("content-length")
        if length_text is None:
            return reply(411, {"error": "Content-Length required"}, close=True)
        try:
            length = int(length_text)
        except ValueError:
            return reply(400, {"error": f"bad request: Content-Length {length_text!r}"}, close=True)
        if length > max_body:
            return reply(413, {"error": f"body of {length} bytes exceeds {max_body}"}, close=True)
        body = await request.body()
        t0 = time.perf_counter()
        try:
            images, prompts, metadata = await run_in_threadpool(lambda: parse_request(json.loads(body)))
        except (ValueError, json.JSONDecodeError, UnicodeDecodeError) as e:
            return reply(400, {"error": f"bad request: {e}"})
        stats.decode_s += time.perf_counter() - t0
        stats.requests += 1
        stats.images += len(prompts)
        try:
            scores, timing = await batcher.score(images, prompts, metadata)
        except RewardRejected as e:  # the reward rejected this input: do not retry
            return reply(422, {"error": str(e)})
        except Exception as e:  # noqa: BLE001 - a failure inside the reward: 5xx, the client may retry
            log.error("reward %s failed: %s: %s", name, type(e).__name__, e)
            return reply(500, {"error": f"{type(e).__name__}: {e}"})
        return JSONResponse({"scores": scores, "reward": name, "timing": timing})

    async def not_found(request: Request, exc):
        status = getattr(exc, "status_code", 404)
        return reply(status, {"error": f"{request.method} {request.url.path}: use GET /health, GET /metrics "
                                       f"or POST /score"})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()

    app = Starlette(routes=[Route("/health", health, methods=["GET"]), Route("/metrics", metrics, methods=["GET"]),
                            Route("/score", score, methods=["POST"])],
                    exception_handlers={404: not_found, 405: not_found}, lifespan=lifespan)
    app.state.batcher, app.state.stats = batcher, stats
    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: the OS picks one). Raises OSError."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


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
    p.add_argument("--max-batch-images", type=int, default=256,
                   help="images per model batch across concurrent requests; 0 = no batching (default 256)")
    p.add_argument("--batch-wait-ms", type=float, default=20.0,
                   help="how long an idle server waits for more requests to join a batch (default 20)")
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
    if args.max_batch_images < 0:
        _fail(f"--max-batch-images must be >= 0, got {args.max_batch_images}")
    if not 0 <= args.batch_wait_ms <= 10_000:
        _fail(f"--batch-wait-ms must be in [0, 10000], got {args.batch_wait_ms:g}")
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        _fail(f"--device {args.device!r} is not a device (cpu, cuda, cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        _fail(f"--device {args.device}: CUDA is not available here")
    try:
        import uvicorn
        import starlette  # noqa: F401
    except ImportError as e:
        _fail(f"the reward server needs the serve extra: pip install 'fastflow[serve]' ({e})")
    try:
        token = read_token(args.token_file)
    except (ValueError, FileNotFoundError) as e:
        _fail(e)
    try:
        sock = bind(args.host, args.port)
    except OSError as e:
        _fail(f"{args.host}:{args.port}: {e.strerror or e}")
    try:
        reward = build_reward(args.reward, args.device, **dict(args.option))
    except TypeError as e:  # an --option the reward's factory does not take
        sock.close()
        _fail(f"--option for {args.reward}: {e}")
    except (ValueError, FileNotFoundError, ImportError, OSError) as e:
        sock.close()
        _fail(e)
    if token is None and args.host not in LOOPBACK:
        log.warning("serving on %s without a token: anyone who can reach it can use the reward", args.host)
    app = build_app(args.reward, reward, token, max_body=args.max_body_mb << 20,
                    max_batch_images=args.max_batch_images, batch_wait_s=args.batch_wait_ms / 1e3)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets=sockets)
            if not self.should_exit:
                print(f"serving {args.reward} on http://{shown}:{port}", flush=True)

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_keep_alive=30)
    try:
        asyncio.run(_Server(config).serve(sockets=[sock]))
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()


if __name__ == "__main__":
    main()
