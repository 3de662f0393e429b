"""The shapes world and its verifier: every clean render is judged correct for its prompt and wrong
for perturbed prompts; the spec's thresholds; the shipped prompt lists."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastflow.shapes import verifier, world
from fastflow.shapes.policy import PROMPT_FILES, default_prompts
from fastflow.shapes.reward import ShapesReward
from fastflow.shapes.world import COLORS, NUMBERS, RELATIONS, SHAPES, parse_prompt

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
NUM_WORD = {v: k for k, v in NUMBERS.items()}


def _other(items, *exclude):
    return next(i for i in items if i not in exclude)


def false_variants(text: str) -> list[str]:
    """Prompts that cannot be true of any image that makes ``text`` true."""
    s = parse_prompt(text)
    o = s.objects
    if s.category == "single_object":
        return [f"a {_other(SHAPES, o[0].shape)}", f"two {o[0].shape}s"]
    if s.category == "two_object":
        a, b = o[0].shape, o[1].shape
        c = _other(SHAPES, a, b)
        return [f"a {a} and a {c}", f"a {c} and a {b}", f"a {a}", f"two {a}s"]
    if s.category == "counting":
        n, sh = len(o), o[0].shape
        return [f"{NUM_WORD[m]} {sh}s" for m in NUMBERS.values() if m != n] + \
               [f"{NUM_WORD[n]} {_other(SHAPES, sh)}s", f"a {sh}"]
    if s.category == "colors":
        sh, col = o[0].shape, o[0].color
        return [f"a {_other(COLORS, col)} {sh}", f"a {col} {_other(SHAPES, sh)}", f"two {sh}s"]
    if s.category == "position":
        a, b = o[0].shape, o[1].shape
        return [f"a {a} {OPPOSITE[s.relation]} a {b}", f"a {b} {s.relation} a {a}",
                f"a {a} {s.relation} a {_other(SHAPES, a, b)}"]
    (a, ca), (b, cb) = (o[0].shape, o[0].color), (o[1].shape, o[1].color)
    return [f"a {cb} {a} and a {ca} {b}", f"a {_other(COLORS, ca, cb)} {a} and a {cb} {b}",
            f"a {ca} {a} and a {cb} {_other(SHAPES, a, b)}", f"a {ca} {a}"]


@pytest.mark.parametrize("shape", SHAPES)
def test_every_size_of_every_shape_reads_back_as_that_shape(shape):
    for d in range(world.MIN_SIZE, world.MAX_SIZE + 1):
        img = world.render([world.Placed(shape, "blue", 5, 9, d)])
        objs = verifier.detect_objects(img[None])[0]
        assert len(objs) == 1, (shape, d)
        assert objs[0].shape == shape and objs[0].color == "blue", (shape, d, objs[0])
        assert objs[0].area == int(world.shape_mask(shape, d).sum())


def test_every_grammar_prompt_renders_true_and_perturbations_false():
    rng = np.random.default_rng(7)
    prompts = [p for ps in world.all_prompts().values() for p in ps]
    assert len(prompts) == 126
    images, texts, wrong_imgs, wrong_texts = [], [], [], []
    for p in prompts:
        for _ in range(2):
            img = world.render(world.scene_for_prompt(p, rng))
            images.append(img)
            texts.append(p)
            for q in false_variants(p):
                wrong_imgs.append(img)
                wrong_texts.append(q)
    ok = verifier.is_correct(torch.stack(images), texts)
    assert ok.all(), [t for t, k in zip(texts, ok) if not k][:5]
    bad = verifier.is_correct(torch.stack(wrong_imgs), wrong_texts)
    assert not bad.any(), [t for t, k in zip(wrong_texts, bad) if k][:5]


def test_scenes_are_reproducible_and_respect_the_spec():
    a = world.sample_batch(16, np.random.default_rng(3))
    b = world.sample_batch(16, np.random.default_rng(3))
    assert a[1] == b[1] and torch.equal(a[0], b[0])
    rng = np.random.default_rng(11)
    for _ in range(40):
        objs = world.scene_for_prompt("four squares", rng)
        masks = [world.object_mask(o) for o in objs]
        assert all(world.MIN_SIZE <= o.d <= world.MAX_SIZE for o in objs)
        assert all(0 <= o.x and o.x + o.d <= world.SIZE and 0 <= o.y and o.y + o.d <= world.SIZE for o in objs)
        for i in range(len(masks)):
            for j in range(i + 1, len(masks)):   # no two touching, not even diagonally
                assert not (world._dilate(masks[i], 1) & masks[j]).any()


def test_pixel_rules_thresholds_and_small_specks():
    img = torch.ones(1, 3, 32, 32)
    # a 2x2 red speck (4 px < 6) is ignored; a 3x2 one (6 px) is an object (fill 1: a square)
    img[0, :, 1:3, 1:3] = torch.tensor(world.PALETTE["red"])[:, None, None]
    assert verifier.detect_objects(img)[0] == []
    img[0, :, 1:3, 1:4] = torch.tensor(world.PALETTE["red"])[:, None, None]
    objs = verifier.detect_objects(img)[0]
    assert len(objs) == 1 and objs[0].shape == "square" and objs[0].area == 6
    # a colour just inside / outside the 0.35 radius of green
    g = torch.tensor(world.PALETTE["green"])
    for delta, seen in ((0.34, True), (0.36, False)):
        x = torch.ones(1, 3, 32, 32)
        x[0, :, 10:20, 10:20] = (g + torch.tensor([0.0, 0.0, delta]))[:, None, None]
        assert (verifier.classify_pixels(x)[0, 15, 15] == COLORS.index("green")) == seen
    # 8-connectivity: two squares touching at a corner are one component (fill 0.5 -> triangle band)
    x = torch.ones(1, 3, 32, 32)
    x[0, :, 0:4, 0:4] = g[:, None, None]
    x[0, :, 4:8, 4:8] = g[:, None, None]
    objs = verifier.detect_objects(x)[0]
    assert len(objs) == 1 and objs[0].area == 32 and objs[0].fill == pytest.approx(0.5)


def test_fill_bands_and_unknown():
    assert verifier.shape_from_fill(0.88) == "square"
    assert verifier.shape_from_fill(0.879) == "circle"
    assert verifier.shape_from_fill(0.70) == "circle"
    assert verifier.shape_from_fill(0.68) == "unknown"
    assert verifier.shape_from_fill(0.35) == "triangle"
    assert verifier.shape_from_fill(0.65) == "unknown"
    assert verifier.shape_from_fill(0.2) == "unknown"


def test_position_margin_is_exactly_four_pixels():
    for dx, ok in ((4, True), (3, False)):
        # stacked vertically so they never touch; centroids: circle x 2 + 4, square x 2 + dx + 4
        objs = [world.Placed("circle", "red", 2, 2, 9), world.Placed("square", "blue", 2 + dx, 20, 9)]
        img = world.render(objs)[None]
        d = verifier.detect_objects(img)[0]
        sq = next(o for o in d if o.shape == "square")
        ci = next(o for o in d if o.shape == "circle")
        assert sq.cx - ci.cx == pytest.approx(dx)
        assert verifier.is_correct(img, ["a circle left of a square"]).item() == ok
        assert verifier.is_correct(img, ["a square right of a circle"]).item() == ok
        assert verifier.is_correct(img, ["a circle above a square"]).item()


def test_parse_errors_are_clear():
    for bad, word in (("a purple circle", "colour"), ("a circle and a circle", "differ"),
                      ("five circles", "grammar"), ("a hexagon", "shape"), ("two circle", "plural")):
        with pytest.raises(ValueError, match=word):
            parse_prompt(bad)
    with pytest.raises(ValueError, match="images but"):
        verifier.judge(torch.ones(2, 3, 32, 32), ["a circle"])


def test_shipped_prompt_lists_are_fixed_disjoint_and_cover_the_grammar():
    train = [p.text for p in default_prompts("train")]
    ev = [p.text for p in default_prompts("eval")]
    assert len(train) == len(set(train)) == 63 and len(ev) == len(set(ev)) == 63
    assert not set(train) & set(ev)
    assert set(train) | set(ev) == {p for ps in world.all_prompts().values() for p in ps}
    for split in (train, ev):
        assert {world.category_of(p) for p in split} == set(world.CATEGORIES)
    assert all(PROMPT_FILES[s].is_file() for s in ("train", "eval"))
    with pytest.raises(ValueError, match="split"):
        default_prompts("test")


def test_reward_strict_and_partial():
    rng = np.random.default_rng(5)
    img = world.render(world.scene_for_prompt("a red circle and a blue square", rng))[None]
    img2 = torch.cat([img, img])
    prompts = ["a red circle and a blue square", "a red circle and a green square"]
    strict = ShapesReward()(img2, prompts, [{}, {}])
    part = ShapesReward(partial=True)(img2, prompts, [{}, {}])
    assert strict.tolist() == [1.0, 0.0]
    assert part[0] == 1.0 and 0.0 < part[1] < 1.0
    assert part[1] == pytest.approx(2 / 3)   # count ok, red circle ok, green square missing
    with pytest.raises(ValueError, match="partial"):
        ShapesReward(partial="yes")


def test_reward_is_registered():
    from fastflow.rewards import WeightedReward
    rng = np.random.default_rng(1)
    img = world.render(world.scene_for_prompt("three triangles", rng))[None]
    total, parts = WeightedReward({"shapes": 1.0}, options={"shapes": {"partial": True}})(img, ["three triangles"])
    assert total.tolist() == [1.0] and parts["shapes"].tolist() == [1.0]
