"""The run's curve plot and its smoothing of the per-iteration train reward."""

from __future__ import annotations

import json

import pytest

from fastflow.metrics import moving_average, moving_average_window, plot_curves


def test_moving_average_is_the_trailing_mean():
    assert moving_average([1, 2, 3, 4, 5], 2) == [1.5, 2.5, 3.5, 4.5]
    assert moving_average([1, 2, 3], 3) == [2.0]
    assert moving_average([4.0, 7.0], 1) == [4.0, 7.0]
    with pytest.raises(ValueError, match="window 4"):
        moving_average([1, 2, 3], 4)


@pytest.mark.parametrize("n, window", [(10, 1), (39, 1), (40, 2), (1237, 61), (50000, 100)])
def test_smoothing_window_grows_with_the_run_and_is_capped(n, window):
    assert moving_average_window(n) == window


def test_plot_curves_writes_a_png_for_a_long_noisy_run(tmp_path):
    rows = [{"iteration": i, "reward_mean": (i % 7) / 7} for i in range(1, 301)]
    rows.insert(0, {"iteration": 0, "eval/category_mean/accuracy": 0.4})
    rows.append({"iteration": 300, "eval/category_mean/accuracy": 0.5})
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = plot_curves(path, tmp_path / "curves.png")
    assert out is not None and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_curves(tmp_path / "missing.jsonl", tmp_path / "none.png") is None
