"""OCR reward: target extraction, the score formula, and the rapidocr engine on rendered text."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastflow.rewards import build_reward
from fastflow.rewards.ocr import edit_distance, extract_target, text_score


def render(text: str, size=(256, 64), font_size=32) -> torch.Tensor:
    """Black text on white, large enough for the OCR model, as a [3, H, W] tensor in [0, 1]."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).text((12, (size[1] - font_size) // 2), text, fill="black",
                             font=ImageFont.load_default(size=font_size))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255


@pytest.mark.parametrize("prompt, target", [
    ('A neon sign that says "Open Late" above a door', "Open Late"),
    ("a poster reading “Big Sale” in red", "Big Sale"),
    ("a book titled «Les Mots»", "Les Mots"),
    ("a mug with 'Best Dad' on it, don't drop it", "Best Dad"),
    ('both "first" and "second"', "first"),
])
def test_extract_target(prompt, target):
    assert extract_target(prompt) == target


def test_extract_target_metadata_and_errors():
    assert extract_target("a shop sign", {"text": "BAKERY"}) == "BAKERY"
    with pytest.raises(ValueError, match="no quoted text"):
        extract_target("a dog that doesn't bark")
    with pytest.raises(ValueError, match="no quoted text"):
        extract_target('an empty quote ""')


def test_edit_distance_and_score():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "abc") == 0
    assert text_score("Hello World", "hello world") == 1.0          # case and spaces ignored
    assert text_score("xx HELLO WORLD yy", "Hello World") == 1.0    # substring -> 1
    assert text_score("HELO WORLD", "hello world") == pytest.approx(1 - 1 / 10)
    assert text_score("", "hello") == 0.0                           # distance capped at len
    assert text_score("completely different and long", "hi") == 0.0
    with pytest.raises(ValueError, match="empty"):
        text_score("abc", "   ")


# Small detector input and one thread keep the test fast on a busy CPU; the defaults read the
# same text, only slower.
FAST = {"Det.limit_side_len": 320, "EngineConfig.onnxruntime.intra_op_num_threads": 1}


@pytest.fixture(scope="module")
def ocr():
    return build_reward("ocr", "cpu", params=FAST)


def test_rapidocr_reads_rendered_text(ocr):
    images = torch.stack([render("FAST FLOW"), render("FAST FLOW"), render("HELLO"),
                          torch.ones(3, 64, 256)])
    prompts = ['a sign that says "Fast Flow"', 'a sign that says "Fast Flows"',
               'a sign that says "World"', 'a sign that says "Nothing"']
    scores = ocr(images, prompts, [{}] * 4)
    assert scores.dtype == torch.float32 and scores.shape == (4,)
    assert scores[0] == 1.0                                   # read exactly
    assert scores[1] == pytest.approx(1 - 1 / 9)              # one letter missing of 9
    assert scores[2] == pytest.approx(1 - 4 / 5)              # "hello" vs "world": distance 4
    assert scores[3] == 0.0                                   # blank image reads nothing


def test_ocr_errors(ocr):
    with pytest.raises(ValueError, match="no quoted text"):
        ocr(torch.ones(1, 3, 16, 16), ["a plain sign"], [{}])
    with pytest.raises(ValueError, match="unknown engine"):
        build_reward("ocr", engine="tesseract")


def test_paddleocr_missing_is_clear(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "paddleocr", None)
    with pytest.raises(ImportError, match="pip install paddleocr"):
        build_reward("ocr", engine="paddleocr")
