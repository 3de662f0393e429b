"""CLIP-based rewards (pickscore, clipscore, aesthetic) on tiny random CLIP models built offline.

Each model is saved with save_pretrained and loaded through the same loading code users take; the
scores are checked against embeddings computed by hand from the model's own modules.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fastflow.rewards import build_reward


def _byte_chars() -> list[str]:
    # The same byte -> unicode table CLIP's BPE tokenizer uses.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def make_tiny_clip(path: Path, projection_dim: int = 16, image_size: int = 32, seed: int = 0) -> Path:
    """Write a tiny CLIPModel + CLIPProcessor (character-level vocab, no merges) to ``path``."""
    from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor,
                              CLIPTokenizer)

    path.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)

    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokens), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=len(tokens) - 2, eos_token_id=len(tokens) - 1,
                         pad_token_id=len(tokens) - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=image_size, patch_size=8),
        projection_dim=projection_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("clip16") / "m", projection_dim=16)


@pytest.fixture(scope="module")
def clip768_dir(tmp_path_factory) -> Path:
    # The aesthetic head expects a ViT-L/14's 768-d embedding; only the projection is that wide.
    return make_tiny_clip(tmp_path_factory.mktemp("clip768") / "m", projection_dim=768, seed=1)


PROMPTS = ["a red cat", "two dogs on a sofa", "an empty room"]


def _images(seed=0, size=(40, 48)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(len(PROMPTS), 3, *size, generator=g)


def _by_hand(path: Path, images, prompts):
    """Normalised image/text embeddings through the model's modules, and its exp'd logit scale."""
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    model, proc = CLIPModel.from_pretrained(path).eval(), CLIPProcessor.from_pretrained(path)
    pils = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for im in images]
    pix = proc(images=pils, return_tensors="pt")["pixel_values"]
    tok = proc(text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        img = model.visual_projection(model.vision_model(pixel_values=pix).pooler_output)
        txt = model.text_projection(model.text_model(input_ids=tok["input_ids"],
                                                     attention_mask=tok["attention_mask"]).pooler_output)
        logits = model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                       pixel_values=pix).logits_per_image
    img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
    return img, txt, model.logit_scale.exp().item(), logits


def test_pickscore_formula(clip_dir):
    images = _images()
    reward = build_reward("pickscore", "cpu", model=str(clip_dir), processor=str(clip_dir))
    got = reward(images, PROMPTS, [{}] * 3)
    img, txt, scale, logits = _by_hand(clip_dir, images, PROMPTS)
    want = scale * (img * txt).sum(-1) / 26
    assert got.dtype == torch.float32 and got.shape == (3,)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # The same number from CLIP's own forward pass (logits_per_image = exp(scale) * cos).
    torch.testing.assert_close(got, logits.diag() / 26, rtol=1e-4, atol=1e-5)
    assert scale == pytest.approx(math.exp(2.6592), rel=1e-4)  # CLIP's initial temperature 1/0.07


def test_pickscore_batches_and_prompt_matching(clip_dir):
    images = _images(seed=3)
    whole = build_reward("pickscore", model=str(clip_dir), processor=str(clip_dir))(images, PROMPTS, None)
    small = build_reward("pickscore", model=str(clip_dir), processor=str(clip_dir), batch_size=2)
    torch.testing.assert_close(small(images, PROMPTS, None), whole, rtol=1e-4, atol=1e-5)
    # Scores depend on the prompt: swapping prompts changes them.
    swapped = small(images, PROMPTS[::-1], None)
    assert not torch.allclose(swapped, whole)


def test_clipscore_convention(clip_dir):
    images = _images(seed=1)
    got = build_reward("clipscore", model=str(clip_dir))(images, PROMPTS, None)
    img, txt, _, _ = _by_hand(clip_dir, images, PROMPTS)
    torch.testing.assert_close(got, (img * txt).sum(-1).clamp_min(0), rtol=1e-4, atol=1e-5)
    assert bool((got >= 0).all()) and bool((got <= 1).all())


def test_rewards_reject_bad_shapes(clip_dir):
    reward = build_reward("clipscore", model=str(clip_dir))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        reward(torch.rand(2, 1, 8, 8), ["a", "b"], None)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        reward(torch.rand(2, 3, 8, 8), ["a"], None)
    with pytest.raises(ValueError, match="unknown dtype"):
        build_reward("clipscore", model=str(clip_dir), dtype="float8")


def _head_state(seed=0):
    from fastflow.rewards.aesthetic import AestheticMLP

    torch.manual_seed(seed)
    return AestheticMLP().state_dict()


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_aesthetic_matches_mlp_on_normalised_embedding(clip768_dir, tmp_path, fmt):
    from fastflow.rewards.aesthetic import AestheticMLP

    state = _head_state()
    path = tmp_path / f"head.{fmt}"
    if fmt == "pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file
        save_file(state, str(path))
    images = _images(seed=2)
    got = build_reward("aesthetic", weights=str(path), clip=str(clip768_dir))(images, PROMPTS, None)
    img, _, _, _ = _by_hand(clip768_dir, images, PROMPTS)
    head = AestheticMLP().eval()
    head.load_state_dict(state)
    with torch.no_grad():
        want = head(img).squeeze(1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # By hand through the layers too (dropout is inactive in eval): five affine maps in a row.
    x = img
    for i in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    torch.testing.assert_close(got, x.squeeze(1), rtol=1e-4, atol=1e-5)


def test_aesthetic_clear_errors(clip_dir, clip768_dir, tmp_path):
    with pytest.raises(ValueError, match="option 'weights'"):
        build_reward("aesthetic", clip=str(clip768_dir))
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        build_reward("aesthetic", weights=str(tmp_path / "missing.pth"), clip=str(clip768_dir))
    bad = tmp_path / "bad.pth"
    torch.save({"w": torch.zeros(3)}, bad)
    with pytest.raises(ValueError, match="does not hold the aesthetic MLP head"):
        build_reward("aesthetic", weights=str(bad), clip=str(clip768_dir))
    good = tmp_path / "good.pth"
    torch.save(_head_state(), good)
    with pytest.raises(ValueError, match="projection_dim 16"):
        build_reward("aesthetic", weights=str(good), clip=str(clip_dir))


def test_imagereward_missing_package_is_clear(monkeypatch):
    # None in sys.modules makes the import fail as if the optional extra were not installed.
    monkeypatch.setitem(__import__("sys").modules, "ImageReward", None)
    with pytest.raises(ImportError, match="pip install image-reward"):
        build_reward("imagereward")
