"""GenEval reward: its scoring rules on known detections, and its clear errors.

The detector itself (mmdet + GenEval's Mask2Former) is a user install and is not available here;
the scoring side is exercised with a detector callable that returns fixed boxes.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from fastflow.rewards import build_reward
from fastflow.rewards.geneval import evaluate, relative_position, select_objects


def obj(x1, y1, x2, y2, score=0.99):
    return (np.array([x1, y1, x2, y2, score], dtype=np.float64), None)


def no_colors(objs, name):
    raise AssertionError("no colour requirement here")


def test_relative_position():
    left, right = obj(0, 40, 20, 60), obj(80, 40, 100, 60)
    assert relative_position(left, right) == {"left of"}
    assert relative_position(right, left) == {"right of"}
    top, bottom = obj(40, 0, 60, 20), obj(40, 80, 60, 100)
    assert relative_position(top, bottom) == {"above"}
    # Overlapping boxes whose centres differ by less than 10% of their sizes: no relation.
    assert relative_position(obj(0, 0, 50, 50), obj(2, 2, 52, 52)) == set()
    # Diagonal: both components past 0.5 of the unit offset.
    assert relative_position(obj(0, 0, 10, 10), obj(90, 90, 100, 100)) == {"left of", "above"}


def test_select_objects_threshold_and_order():
    boxes = np.array([[0, 0, 1, 1, 0.5], [0, 0, 2, 2, 0.95], [0, 0, 3, 3, 0.2]])
    got = select_objects(boxes, None, 0.3)
    assert [o[0][4] for o in got] == [0.95, 0.5]
    assert [o[0][4] for o in select_objects(boxes, None, 0.9)] == [0.95]
    assert select_objects(np.zeros((0, 5)), None, 0.3) == []


def test_evaluate_counting_exclude_and_partial_credit():
    meta = {"tag": "counting", "include": [{"class": "dog", "count": 3}],
            "exclude": [{"class": "dog", "count": 4}]}
    three = {"dog": [obj(0, 0, 1, 1)] * 3}
    assert evaluate(three, meta, no_colors)[:2] == (True, 1.0)
    correct, frac, reasons = evaluate({"dog": [obj(0, 0, 1, 1)] * 2}, meta, no_colors)
    assert (correct, frac) == (False, 0.5) and reasons == ["expected dog>=3, found 2"]
    correct, frac, reasons = evaluate({"dog": [obj(0, 0, 1, 1)] * 4}, meta, no_colors)
    assert (correct, frac) == (False, 0.5) and reasons == ["expected dog<4, found 4"]


def test_evaluate_colors_and_positions():
    meta = {"tag": "position", "include": [{"class": "cat", "count": 1},
                                           {"class": "dog", "count": 1, "position": ["right of", 0]}]}
    cat, dog = obj(0, 40, 20, 60), obj(80, 40, 100, 60)
    assert evaluate({"cat": [cat], "dog": [dog]}, meta, no_colors)[:2] == (True, 1.0)
    correct, frac, reasons = evaluate({"cat": [dog], "dog": [cat]}, meta, no_colors)
    assert (correct, frac) == (False, 0.5) and reasons == ["expected dog right of target"]
    # No target group (the cat is missing): the position requirement fails too.
    assert evaluate({"dog": [dog]}, meta, no_colors)[:2] == (False, 0.0)

    meta = {"tag": "color_attr", "include": [{"class": "car", "count": 1, "color": "red"},
                                             {"class": "bus", "count": 1, "color": "blue"}]}
    colors = {"car": "red", "bus": "green"}
    correct, frac, reasons = evaluate({"car": [cat], "bus": [dog]}, meta,
                                      lambda objs, name: [colors[name]] * len(objs))
    assert (correct, frac) == (False, 0.5) and "expected blue bus>=1" in reasons[0]
    with pytest.raises(ValueError, match="no include/exclude"):
        evaluate({}, {"tag": "x"}, no_colors)


def test_reward_end_to_end_with_a_given_detector(tmp_path):
    from test_rewards_clip import make_tiny_clip

    clip = make_tiny_clip(tmp_path / "clip")
    found = {"cat": (np.array([[2, 2, 10, 10, 0.95], [20, 2, 30, 10, 0.5]]), None),
             "dog": (np.zeros((0, 5)), None)}
    metas = [{"tag": "counting", "include": [{"class": "cat", "count": 2}]},   # 2nd cat below 0.9
             {"tag": "two_object", "include": [{"class": "cat", "count": 2}]},
             {"tag": "two_object", "include": [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}]},
             {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}]}]
    images, prompts = torch.rand(4, 3, 32, 32), ["p"] * 4
    partial = build_reward("geneval", clip=str(clip), detector=lambda image: found)
    strict = build_reward("geneval", clip=str(clip), detector=lambda image: found, strict=True)
    p, s = partial(images, prompts, metas), strict(images, prompts, metas)
    assert p[:3].tolist() == [0.0, 1.0, 0.5] and s[:3].tolist() == [0.0, 1.0, 0.0]
    # Colour comes from the CLIP classifier (random here): the score is 0 or 1 and agrees in both modes.
    assert p[3].item() in (0.0, 1.0) and p[3] == s[3]
    with pytest.raises(ValueError, match="needs GenEval metadata"):
        partial(images[:1], ["p"], [{}])


def test_clear_errors_without_detector(monkeypatch):
    with pytest.raises(ValueError, match="detector_config and detector_checkpoint"):
        build_reward("geneval")
    monkeypatch.setitem(sys.modules, "mmdet", None)
    monkeypatch.setitem(sys.modules, "mmdet.apis", None)
    with pytest.raises(ImportError, match="needs mmdet"):
        build_reward("geneval", detector_config="c.py", detector_checkpoint="w.pth")
