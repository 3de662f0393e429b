"""AsyncReward: background scoring gives the synchronous results, and failures surface clearly."""

from __future__ import annotations

import threading

import pytest
import torch

from fastflow.rewards import WeightedReward
from fastflow.rewards.async_pool import AsyncReward, RewardEvaluationError

PROMPTS = ["a red", "a blue", "a green", "a white"]


def batch(seed: int) -> torch.Tensor:
    return torch.rand(len(PROMPTS), 3, 4, 4, generator=torch.Generator().manual_seed(seed))


def test_results_equal_synchronous():
    reward = WeightedReward({"toy_color": 2.0})
    batches = [batch(s) for s in range(3)]
    with AsyncReward(reward, max_workers=2) as pool:
        futures = [pool.submit(b, PROMPTS, [{}] * 4) for b in batches]
        for b, fut in zip(batches, futures):
            total, parts = fut.result(timeout=30)
            want_total, want_parts = reward(b, PROMPTS, [{}] * 4)
            assert torch.equal(total, want_total) and torch.equal(parts["toy_color"], want_parts["toy_color"])
            assert torch.equal(total, 2.0 * parts["toy_color"])


def test_submit_returns_before_scoring_and_copies_images():
    started, release = threading.Event(), threading.Event()

    def slow(images, prompts, metadata):
        started.set()
        assert release.wait(30)
        return images.mean(dim=(1, 2, 3)), {}

    images = batch(0)
    want = images.mean(dim=(1, 2, 3))
    with AsyncReward(slow) as pool:
        fut = pool.submit(images, PROMPTS)
        assert started.wait(30) and not fut.done()   # the caller is free to sample meanwhile
        images.fill_(0.0)                            # overwrite the caller's buffer
        release.set()
        total, _ = fut.result(timeout=30)
    assert torch.equal(total, want)


def test_exceptions_propagate_with_a_clear_message():
    reward = WeightedReward({"toy_color": 1.0})
    with AsyncReward(reward) as pool:
        ok = pool.submit(batch(0), PROMPTS)
        bad = pool.submit(batch(1), ["a red", "a blue", "a purple", "a white"])
        assert ok.result(timeout=30)[0].shape == (4,)
        with pytest.raises(RewardEvaluationError, match=r"batch 1 \(4 images\) failed: \w+Error: .*purple") as e:
            bad.result(timeout=30)
        assert e.value.__cause__ is not None
        # The pool keeps working after a failure.
        assert pool.submit(batch(2), PROMPTS).result(timeout=30)[0].shape == (4,)


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_workers"):
        AsyncReward(lambda *a: None, max_workers=0)
    with AsyncReward(lambda *a: None) as pool, pytest.raises(ValueError, match="4 images but 2 prompts"):
        pool.submit(batch(0), PROMPTS[:2])
