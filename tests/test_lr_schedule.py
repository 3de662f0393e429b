"""fastflow.lr_schedule: warmup, constant / linear / cosine decay, endpoints and overrun."""

import math

import pytest

from fastflow.lr_schedule import lr_at


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_warmup_rises_linearly_to_the_peak_from_a_nonzero_first_step(kind):
    lrs = [lr_at(s, lr=1e-3, total_steps=100, kind=kind, warmup=4) for s in range(5)]
    assert lrs[:4] == pytest.approx([0.25e-3, 0.5e-3, 0.75e-3, 1e-3])
    assert lrs[4] == pytest.approx(1e-3)  # the first step after the warmup is at the peak


def test_constant_ignores_min_ratio():
    assert {lr_at(s, lr=2e-4, total_steps=10, min_ratio=0.1) for s in range(15)} == {2e-4}


@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_decay_reaches_min_ratio_at_the_last_step_and_stays_there(kind, warmup):
    total = 11
    lrs = [lr_at(s, lr=1.0, total_steps=total, kind=kind, warmup=warmup, min_ratio=0.1) for s in range(total + 5)]
    assert lrs[warmup] == pytest.approx(1.0)
    assert lrs[total - 1] == pytest.approx(0.1)
    assert lrs[total:] == pytest.approx([0.1] * 5)  # a run resumed with more iterations
    decay = lrs[warmup:total]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly decreasing


def test_linear_and_cosine_midpoints():
    # 9 steps after a warmup of 0: progress 0.5 at step 4
    assert lr_at(4, lr=1.0, total_steps=9, kind="linear", min_ratio=0.0) == pytest.approx(0.5)
    assert lr_at(4, lr=1.0, total_steps=9, kind="cosine", min_ratio=0.2) == pytest.approx(0.6)
    assert lr_at(2, lr=1.0, total_steps=9, kind="cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_a_run_no_longer_than_its_warmup_keeps_the_peak_after_it():
    assert lr_at(5, lr=1.0, total_steps=4, kind="cosine", warmup=4, min_ratio=0.0) == 1.0


def test_unknown_kind_is_one_clear_error():
    with pytest.raises(ValueError, match="unknown lr schedule 'step'"):
        lr_at(0, lr=1.0, total_steps=10, kind="step")
