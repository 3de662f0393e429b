"""OCR reward (the paper's text-rendering reward).

target = the prompt's quoted text (or ``metadata["text"]`` when the prompt file gives it);
recognised = everything the OCR engine reads in the image. Both are lower-cased with whitespace
removed (the authors' normalisation), then

    reward = 1                                         if target is a substring of recognised
    reward = 1 - min(edit_distance, len) / len         otherwise (len = len(target))

Engines: "rapidocr" (default; ships its ONNX models, runs offline on a CPU) or "paddleocr"
(the authors' engine; optional, ``pip install paddleocr paddlepaddle``).
"""

from __future__ import annotations

import logging
import re
from typing import Sequence

import torch
from torch import Tensor

from fastflow.rewards._clip import check_images, to_uint8

log = logging.getLogger(__name__)

# Opening -> closing quote characters, tried in this order. Straight double quotes first (the
# paper's prompts use them); single quotes last and only as a matched pair that is not an
# apostrophe inside a word (so "don't" is not mistaken for a quote).
_PAIRS = [('"', '"'), ("“", "”"), ("„", "“"), ("«", "»"), ("「", "」"), ("‘", "’")]
_SINGLE = re.compile(r"(?<!\w)'(.+?)'(?!\w)")


def extract_target(prompt: str, metadata: dict | None = None) -> str:
    """The text the image should show: metadata["text"] if given, else the prompt's quoted text."""
    if metadata and isinstance(metadata.get("text"), str) and metadata["text"].strip():
        return metadata["text"]
    for open_q, close_q in _PAIRS:
        start = prompt.find(open_q)
        if start >= 0:
            end = prompt.find(close_q, start + 1)
            if end > start + 1:
                return prompt[start + 1:end]
    m = _SINGLE.search(prompt)
    if m:
        return m.group(1)
    raise ValueError(f"ocr reward: no quoted text to render in prompt {prompt!r} "
                     "(quote it, e.g. 'a sign that says \"OPEN\"', or give metadata \"text\")")


def normalize(text: str) -> str:
    """Lower-case and drop all whitespace (the authors' normalisation)."""
    return "".join(text.lower().split())


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions all cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def text_score(recognized: str, target: str) -> float:
    """1 - min(edit_distance, len) / len on normalised strings; 1 when target is a substring."""
    rec, tgt = normalize(recognized), normalize(target)
    if not tgt:
        raise ValueError(f"ocr reward: the target text {target!r} is empty after normalisation")
    dist = 0 if tgt in rec else min(edit_distance(rec, tgt), len(tgt))
    return 1.0 - dist / len(tgt)


class _RapidOcr:
    # No text-angle classifier (the authors run PaddleOCR with cls=False); quiet logs.
    DEFAULTS = {"Global.log_level": "error", "Global.use_cls": False}

    def __init__(self, device, params: dict | None = None):
        from rapidocr import RapidOCR

        self.engine = RapidOCR(params={**self.DEFAULTS, **(params or {})})

    def __call__(self, image) -> str:
        from PIL import Image

        out = self.engine(Image.fromarray(image))
        if not out.txts:
            return ""
        # Keep only confident pieces (the authors drop score <= 0), joined in reading order.
        return "".join(t for t, s in zip(out.txts, out.scores) if s > 0)


class _PaddleOcr:
    def __init__(self, device, params: dict | None = None):
        try:
            from paddleocr import PaddleOCR
        except ImportError:
            raise ImportError("ocr reward: engine 'paddleocr' needs `pip install paddleocr paddlepaddle` "
                              "(or use the default engine 'rapidocr')") from None
        kwargs = dict(use_angle_cls=False, lang="en", use_gpu=str(device).startswith("cuda"), show_log=False)
        self.engine = PaddleOCR(**{**kwargs, **(params or {})})

    def __call__(self, image) -> str:
        result = self.engine.ocr(image, cls=False)
        if not result or not result[0]:
            return ""
        return "".join(res[1][0] for res in result[0] if res[1][1] > 0)


ENGINES = {"rapidocr": _RapidOcr, "paddleocr": _PaddleOcr}


class OcrReward:
    """OCR reward. Options: engine ("rapidocr" | "paddleocr"); params, a dict handed to the engine
    (rapidocr: its dotted config keys, e.g. {"Det.limit_side_len": 320}; paddleocr: constructor
    keyword arguments)."""

    def __init__(self, device="cpu", engine: str = "rapidocr", params: dict | None = None):
        if engine not in ENGINES:
            raise ValueError(f"ocr reward: unknown engine {engine!r}; known: {', '.join(ENGINES)}")
        if params is not None and not isinstance(params, dict):
            raise ValueError(f"ocr reward: option params must be a table/dict, got {type(params).__name__}")
        self.read = ENGINES[engine](device, params)

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata=None) -> Tensor:
        check_images(images, prompts, "ocr")
        metadata = metadata if metadata is not None else [{} for _ in prompts]
        targets = [extract_target(p, m) for p, m in zip(prompts, metadata)]  # fail before OCR work
        scores = []
        for img, target in zip(to_uint8(images), targets):
            try:
                recognized = self.read(img)
            except Exception as e:  # one unreadable image must not end a training run
                log.warning("ocr reward: the OCR engine failed on an image (%s: %s); scoring it 0",
                            type(e).__name__, e)
                scores.append(0.0)
                continue
            scores.append(text_score(recognized, target))
        return torch.tensor(scores, dtype=torch.float32)
