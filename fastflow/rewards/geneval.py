"""GenEval reward: an object detector (Mask2Former via mmdet, as GenEval) + a CLIP colour
classifier check each image against its prompt's GenEval metadata.

The detector is the user's install (see docs/rewards.md): mmdet + mmcv + GenEval's
Mask2Former checkpoint. It is meant to run in its own process behind the reward server:

    python -m fastflow.rewards.serve --reward geneval --device cuda:0 \\
        --option detector_config=/path/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py \\
        --option detector_checkpoint=/path/mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth

Metadata per prompt is GenEval's (evaluation_metadata.jsonl): {"tag": ..., "include":
[{"class", "count", "color"?, "position": [relation, group]?}], "exclude": [{"class", "count"}]}.
Scores: strict=True gives GenEval's 0/1 correctness; strict=False (default, for training) gives
the fraction of include/exclude requirements met (1.0 exactly when the image is correct).
The scoring rules (thresholds, position test, colour crops) follow GenEval's evaluate_images.py.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from fastflow.rewards._clip import check_images, load_clip, to_uint8

THRESHOLD = 0.3            # detection confidence
COUNTING_THRESHOLD = 0.9   # stricter for "counting" prompts (GenEval)
MAX_OBJECTS = 16
POSITION_THRESHOLD = 0.1
COLORS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
COLOR_TEMPLATES = ["a photo of a {c} {obj}", "a photo of a {c}-colored {obj}", "a photo of a {c} object"]
CLIP_ID = "openai/clip-vit-large-patch14"

# An object: (box [x1, y1, x2, y2, score], mask HxW bool or None).
Obj = tuple


def select_objects(boxes: np.ndarray, masks, threshold: float) -> list[Obj]:
    """Detections of one class -> objects above ``threshold``, most confident first, at most MAX_OBJECTS."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
    order = np.argsort(-boxes[:, 4], kind="stable")
    order = [int(i) for i in order if boxes[i, 4] > threshold][:MAX_OBJECTS]
    return [(boxes[i], None if masks is None else masks[i]) for i in order]


def relative_position(obj_a: Obj, obj_b: Obj) -> set[str]:
    """Relations of A to B ("left of", "right of", "above", "below"), discounting object sizes."""
    boxes = np.array([obj_a[0][:4], obj_b[0][:4]], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rel = set()
    if dx < -0.5:
        rel.add("left of")
    if dx > 0.5:
        rel.add("right of")
    if dy < -0.5:
        rel.add("above")
    if dy > 0.5:
        rel.add("below")
    return rel


def evaluate(objects: dict[str, list[Obj]], metadata: dict,
             colors_of: Callable[[list[Obj], str], list[str]]) -> tuple[bool, float, list[str]]:
    """Check detected ``objects`` (class -> objects) against GenEval ``metadata``.

    Returns (strictly correct, fraction of requirements met, reasons for each failure).
    ``colors_of(objs, classname)`` names the colour of each object (the CLIP classifier)."""
    include, exclude = metadata.get("include", []), metadata.get("exclude", [])
    if not include and not exclude:
        raise ValueError(f"geneval reward: metadata has no include/exclude requirements: {metadata}")
    reasons: list[str] = []
    met = 0
    groups: list[list[Obj] | None] = []
    for req in include:
        name, count = req["class"], int(req["count"])
        found = objects.get(name, [])[:count]
        ok = len(found) >= count
        if not ok:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        if ok and "color" in req:
            colors = colors_of(found, name)
            if colors.count(req["color"]) < count:
                ok = False
                reasons.append(f"expected {req['color']} {name}>={count}, found {colors}")
        if ok and "position" in req:
            relation, target = req["position"]
            if target >= len(groups) or groups[target] is None:
                ok = False
                reasons.append(f"no target for {name} to be {relation}")
            else:
                for obj in found:
                    if any(relation not in relative_position(obj, t) for t in groups[target]):
                        ok = False
                        reasons.append(f"expected {name} {relation} target")
                        break
        groups.append(found if ok else None)
        met += ok
    for req in exclude:
        name, count = req["class"], int(req["count"])
        n = len(objects.get(name, []))
        if n >= count:
            reasons.append(f"expected {name}<{count}, found {n}")
        else:
            met += 1
    return not reasons, met / (len(include) + len(exclude)), reasons


class ClipColorClassifier:
    """Zero-shot colour of each detected object: crop its box, grey out what its mask excludes,
    compare with CLIP text embeddings of GenEval's colour templates (averaged per colour)."""

    def __init__(self, model, processor, background=(153, 153, 153)):
        self.model, self.processor, self.background = model, processor, background
        self._cache: dict[str, Tensor] = {}

    @torch.no_grad()
    def _classifier(self, classname: str) -> Tensor:
        if classname not in self._cache:
            from fastflow.rewards._clip import text_embeds

            rows = []
            for c in COLORS:
                emb = text_embeds(self.model, self.processor, [t.format(c=c, obj=classname) for t in COLOR_TEMPLATES])
                mean = emb.mean(0)
                rows.append(mean / mean.norm())
            self._cache[classname] = torch.stack(rows)
        return self._cache[classname]

    @torch.no_grad()
    def __call__(self, image: np.ndarray, objs: list[Obj], classname: str) -> list[str]:
        """Colour names for ``objs`` found in ``image`` (HWC uint8 RGB)."""
        from fastflow.rewards._clip import image_embeds

        if not objs:
            return []
        crops = []
        for box, mask in objs:
            img = image if mask is None else np.where(np.asarray(mask, bool)[..., None], image,
                                                      np.array(self.background, np.uint8))
            x1, y1, x2, y2 = (int(round(v)) for v in box[:4])
            crop = img[max(y1, 0):max(y2, y1 + 1), max(x1, 0):max(x2, x1 + 1)]
            crops.append(torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float() / 255)
        emb = torch.cat([image_embeds(self.model, self.processor, c[None]) for c in crops])
        best = (emb @ self._classifier(classname).T).argmax(1)
        return [COLORS[int(i)] for i in best]


def _mmdet_detector(config: str, checkpoint: str, device):
    """Load the detector with mmdet; return (detect(image) -> {class: (boxes[N,5], masks|None)})."""
    try:
        from mmdet.apis import inference_detector, init_detector
    except ImportError:
        raise ImportError("geneval reward: needs mmdet + mmcv and GenEval's detector checkpoint; "
                          "see docs/rewards.md (GenEval) for the install steps") from None
    model = init_detector(config, checkpoint, device=str(device))
    classes = list(getattr(model, "CLASSES", None) or model.dataset_meta["classes"])

    def detect(image: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
        result = inference_detector(model, image)
        if isinstance(result, tuple) or isinstance(result, list):  # mmdet 2.x: (bbox, segm) per class
            bbox, segm = result if isinstance(result, tuple) else (result, None)
            return {c: (np.asarray(bbox[i]), None if segm is None else np.asarray(segm[i]))
                    for i, c in enumerate(classes)}
        inst = result.pred_instances  # mmdet 3.x DetDataSample
        boxes = torch.cat([inst.bboxes, inst.scores[:, None]], 1).cpu().numpy()
        labels = inst.labels.cpu().numpy()
        masks = inst.masks.cpu().numpy() if "masks" in inst else None
        return {c: (boxes[labels == i], None if masks is None else masks[labels == i])
                for i, c in enumerate(classes)}

    return detect


class GenEvalReward:
    """GenEval reward. Options: detector_config, detector_checkpoint (required), clip (colour
    classifier CLIP id/path), strict (0/1 scores), threshold, counting_threshold."""

    def __init__(self, device="cpu", detector_config: str | None = None,
                 detector_checkpoint: str | None = None, clip: str = CLIP_ID, strict: bool = False,
                 threshold: float = THRESHOLD, counting_threshold: float = COUNTING_THRESHOLD,
                 detector: Callable | None = None):
        if detector is None:
            if not detector_config or not detector_checkpoint:
                raise ValueError("geneval reward: options detector_config and detector_checkpoint "
                                 "(GenEval's Mask2Former config and weights) are required")
            detector = _mmdet_detector(detector_config, detector_checkpoint, device)
        self.detect = detector
        model, processor = load_clip(clip, None, device, "float32")
        self.colors = ClipColorClassifier(model, processor)
        self.strict, self.threshold, self.counting_threshold = bool(strict), threshold, counting_threshold

    def __call__(self, images: Tensor, prompts: Sequence[str], metadata=None) -> Tensor:
        check_images(images, prompts, "geneval")
        if metadata is None or any(not m.get("include") and not m.get("exclude") for m in metadata):
            raise ValueError("geneval reward: every prompt needs GenEval metadata (include/exclude); "
                             "use a .jsonl prompt file such as GenEval's evaluation_metadata.jsonl")
        scores = []
        for image, meta in zip(to_uint8(images), metadata):
            thr = self.counting_threshold if meta.get("tag") == "counting" else self.threshold
            objects = {c: select_objects(b, m, thr) for c, (b, m) in self.detect(image).items()}
            correct, fraction, _ = evaluate(objects, meta, lambda objs, c: self.colors(image, objs, c))
            scores.append(float(correct) if self.strict else fraction)
        return torch.tensor(scores, dtype=torch.float32)
