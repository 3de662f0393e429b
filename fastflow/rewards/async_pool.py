"""Rewards evaluated in the background, so the trainer scores batch k while it samples batch k+1.

    pool = AsyncReward(WeightedReward({"ocr": 1.0}))
    fut = pool.submit(images, prompts, metadata)   # returns at once
    ...                                            # sample the next batch
    total, parts = fut.result()                    # [B] and {name: [B]}, float32 on the CPU

Threads suffice: torch and onnxruntime release the GIL in their kernels, and HTTP waits (remote
rewards) release it too. Images are cloned (on their own device) at submit time, so the caller may
reuse or overwrite its buffers (e.g. a CUDA graph's static output) right after ``submit`` returns.
"""

from __future__ import annotations

import itertools
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence

from torch import Tensor


class RewardEvaluationError(RuntimeError):
    """A reward failed in the background; the original exception is its ``__cause__``."""


class AsyncReward:
    """Wrap a WeightedReward (or any ``(images, prompts, metadata) -> (total, parts)`` callable)."""

    def __init__(self, weighted_reward, max_workers: int = 1):
        if max_workers < 1:
            raise ValueError(f"AsyncReward: max_workers must be >= 1, got {max_workers}")
        self.reward = weighted_reward
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="fastflow-reward")
        self._ids = itertools.count()

    def submit(self, images: Tensor, prompts: Sequence[str],
               metadata: Sequence[dict] | None = None) -> Future:
        """Start scoring; returns a Future of ``(total, parts)``. Errors surface at ``result()``
        as RewardEvaluationError naming the batch and the reward's own message."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"AsyncReward.submit: {images.shape[0]} images but {len(prompts)} prompts")
        # Copy now: the caller may overwrite its buffers while we score.
        images = images.detach().clone()
        prompts = list(prompts)
        metadata = [dict(m) for m in metadata] if metadata is not None else None
        return self._pool.submit(self._run, next(self._ids), images, prompts, metadata)

    def _run(self, batch: int, images, prompts, metadata):
        try:
            return self.reward(images, prompts, metadata)
        except Exception as e:
            raise RewardEvaluationError(
                f"reward evaluation of batch {batch} ({len(prompts)} images) failed: "
                f"{type(e).__name__}: {e}") from e

    def close(self, wait: bool = True) -> None:
        """Stop accepting work; with wait, finish what is queued."""
        self._pool.shutdown(wait=wait, cancel_futures=not wait)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
