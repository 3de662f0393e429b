"""The transformer's activation model, measured on scaled copies (scaled.py) and extrapolated to
the real width, depth, LoRA rank, batch and token counts.

Two measured quantities:

- **saved bytes**: what autograd keeps from a training forward for its backward, per block kind.
  They are sums of tensors whose sizes are products of (batch, tokens, width, rank), so a linear
  least-squares fit in those products is exact (residual ~1e-12) and extrapolates exactly; the
  test suite checks it on a wider, deeper model than it was fitted on. Each block's input bytes
  (what activation checkpointing keeps) are fitted the same way.
- **transients**: working sets above what is saved (a no-grad forward, a backward, a
  checkpointed forward and backward), from CPU profiler peaks of copies at two widths and two
  batches at the real token counts, linear in the width and the batch from there on. These are
  the estimate part of the activations; docs/memory.md states their error.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from fastflow.plan.arch import clean, transformer_blocks
from fastflow.plan.cache import cached
from fastflow.plan.profiler import SavedTensors, Timeline
from fastflow.plan.scaled import (build_scaled, forward, head_dims, scaled_config, scaled_inputs,
                                  transient_config, variant_keys)


def lstsq(rows: list[list[float]], ys: list[float]) -> tuple[list[float], float]:
    """Least squares in float64; returns the coefficients and the largest relative residual."""
    X = torch.tensor(rows, dtype=torch.float64)
    y = torch.tensor(ys, dtype=torch.float64)
    sol = torch.linalg.lstsq(X, y[:, None], driver="gelsd").solution[:, 0]
    resid = (X @ sol - y).abs() / y.abs().clamp_min(1.0)
    return sol.tolist(), float(resid.max()) if len(ys) else 0.0


_SHARED = 6  # batch-independent features: [ni*s, ni, nt*s, nt, s, 1]


def _feats(s: float, r: float, B: int, ni: int, nt: int, lora: bool) -> list[float]:
    """Features of the saved-bytes fit: per sample (x B) linear in the token counts, the width
    scale ``s`` and the LoRA rank ``r``; then batch-independent terms (tensors shared by the batch,
    e.g. FLUX's rotary embeddings)."""
    per = [ni * s, ni, nt * s, nt, s, 1.0] + ([ni * r, nt * r, r] if lora else [])
    shared = [ni * s, ni, nt * s, nt, s, 1.0]
    return [B * f for f in per] + shared


def _shared_part(coef: list[float], lora: bool, s: float, ni: int, nt: int) -> float:
    n = 9 if lora else 6
    return sum(c * f for c, f in zip(coef[n:], [ni * s, ni, nt * s, nt, s, 1.0]))


@dataclass
class TransformerActivations:
    """The fitted saved-bytes model of one (architecture, fine-tuning mode, dtypes)."""

    family: str
    lora: bool
    variants: dict[str, dict]          # fit key -> {"saved": coef, "inp": coef}
    outside: list[float]               # saved outside every block (embedders, final norm)
    casts: dict[str, list[str]]        # fit key (or "outside") -> parameter names (within the block)
    fit_residual: float
    block_variants: list[str]          # the real model's blocks, in order

    def _eval(self, coef, s, r, B, ni, nt) -> float:
        return sum(c * f for c, f in zip(coef, _feats(s, r, B, ni, nt, self.lora)))

    def block_keys(self) -> list[str]:
        """The fit key of each real block: "first", then each block's kind."""
        return ["first"] + self.block_variants[1:]

    def _sum(self, what: str, B: int, ni: int, nt: int, r: int) -> float:
        keys = self.block_keys()
        # tensors the blocks share (e.g. rotary embeddings) belong to the first block that saves
        # them, so a kind's batch-independent part is not multiplied by its count
        return sum(keys.count(k) * (self._eval(c[what], 1.0, r, B, ni, nt)
                                    - (0 if k == "first" else _shared_part(c[what], self.lora, 1.0, ni, nt)))
                   for k, c in self.variants.items())

    def saved(self, B: int, ni: int, nt: int, r: int) -> int:
        """Bytes saved for backward by one training forward of ``B`` samples at full width."""
        return round(max(self._eval(self.outside, 1.0, r, B, ni, nt) + self._sum("saved", B, ni, nt, r), 0))

    def held_with_checkpointing(self, B: int, ni: int, nt: int, r: int) -> int:
        """Bytes held after a forward with activation checkpointing: every block's inputs (kept
        for its recompute) plus what is saved outside the blocks."""
        return round(max(self._eval(self.outside, 1.0, r, B, ni, nt) + self._sum("inp", B, ni, nt, r), 0))


def _cast_map(model, blocks, order, names: set[str]) -> dict[str, list[str]]:
    """Cast parameter names by block kind (names relative to the block) and "outside": the plan
    maps them back onto the real model's parameters to size the autocast copies."""
    prefixes = {}
    for n, m in model.named_modules():
        for i, b in enumerate(blocks):
            if m is b:
                prefixes[n + "."] = order[i]
    out: dict[str, list[str]] = {}
    for name in names:
        for pre, kind in prefixes.items():
            if name.startswith(pre):
                out.setdefault(kind, []).append(name[len(pre):])
                break
        else:
            out.setdefault("outside", []).append(name)
    return {k: sorted(v) for k, v in out.items()}


class _Threads:
    """At most two intra-op threads while measuring: the numbers do not depend on it, and the
    machine the plan runs on is often busy."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(min(self.n, 2))

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def measure_transformer(family: str, config: dict, *, lora: bool, targets: list[str], dtype: torch.dtype,
                        trainable_dtype: torch.dtype, alpha_ratio: float = 2.0) -> TransformerActivations:
    """Fit the saved-bytes model on scaled copies: two head dims (scaled.head_dims: 4 and 8, or 8
    and 16 where the rotary axes need it) and LoRA ranks 2 and 4 at a few batch / token counts;
    enough points to determine every feature of _feats."""
    variants = variant_keys(family, config)
    h1, h2 = head_dims(family)
    pts = [(h1, 2), (h2, 2), (h1, 4)] if lora else [(h1, 0), (h2, 0)]
    tokens = [(16, 4, 1), (64, 4, 1), (16, 12, 1), (16, 4, 2), (64, 4, 2), (16, 12, 2)]
    rows: list[tuple] = []
    casts: dict[str, list[str]] = {}
    with _Threads():
        for hd, r in pts:
            scfg, s, order = scaled_config(family, config, hd, variants)
            model = build_scaled(family, scfg, lora, r, alpha_ratio, targets, trainable_dtype, dtype)
            blocks = transformer_blocks(family, model)
            counter = SavedTensors(model, blocks)
            for ni, nt, B in tokens:
                kw = scaled_inputs(family, scfg, B, ni, nt, dtype)
                per, inp, cast_names = counter(lambda: forward(model, kw, dtype))
                rows.append((s, r, B, ni, nt, per, inp))
                if not casts:
                    casts = _cast_map(model, blocks, order, cast_names)
    feats = [_feats(s, r, B, ni, nt, lora) for s, r, B, ni, nt, _, _ in rows]
    coef: dict[str, dict] = {}
    worst = 0.0
    for i, kind in enumerate(order):
        saved, res1 = lstsq(feats, [row[5].get(i, 0) for row in rows])
        inp, res2 = lstsq(feats, [row[6].get(i, 0) for row in rows])
        coef[kind] = {"saved": saved, "inp": inp}
        worst = max(worst, res1, res2)
    outside, res = lstsq(feats, [row[5].get(None, 0) for row in rows])
    return TransformerActivations(family, lora, coef, outside, casts, max(worst, res), variants)


def wgrad_tmp(named_numels: Sequence[tuple[str, int]], cast_names: Iterable[str], dtype: torch.dtype) -> int:
    """The largest weight-gradient temporary of a backward: the gradient of a weight's compute-
    dtype copy and its float32 cast (the float32 gradient alone when the weight computes as is).
    Taken out of the scaled copies' peaks and added back at full size: it scales with the largest
    weight, not with the width factor."""
    cast = set(cast_names)
    best = 0
    for n, numel in named_numels:
        per = numel * (dtype.itemsize + 4) if n in cast else numel * 4
        best = max(best, per)
    return best


def measure_transients(family: str, config: dict, *, lora: bool, targets: list[str], dtype: torch.dtype,
                       trainable_dtype: torch.dtype, rank: int, ni: int, nt: int, alpha_ratio: float = 2.0) -> dict:
    """Working sets at the real token counts ``ni`` / ``nt``, from CPU profiler peaks of scaled
    copies at two widths and batches of 2 and 4, as (slope per sample, intercept) at full width:

    - ``inference``: a no-grad forward (rollout, evaluation, the KL reference);
    - ``backward``: a backward's peak above what the forward left saved, its largest weight-
      gradient temporary taken out (added back at full size by the plan);
    - with activation checkpointing on every block: ``ckpt_forward`` (a forward's peak above what it
      leaves held, the weight casts the autocast cache holds meanwhile taken out) and
      ``ckpt_backward`` (a backward's peak above the held bytes: one block recomputed and
      differentiated at a time)."""
    from fastflow.parallel import apply_activation_checkpointing

    variants = variant_keys(family, config)
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    w1 = min(inner, 64) - min(inner, 64) % 2
    widths = [w1, min(inner, 2 * w1)] if w1 < inner else [inner]
    res: dict[tuple, dict] = {}
    with _Threads():
        for width in widths:
            scfg, s = transient_config(family, config, variants, width)
            if family == "sd3":  # the positional embedding must cover the image
                side = int(round(math.sqrt(ni)))
                scfg["pos_embed_max_size"] = max(scfg["pos_embed_max_size"], side)
                scfg["sample_size"] = max(scfg.get("sample_size", 16), side)
            r = max(1, round(rank * s))
            plain = build_scaled(family, scfg, lora, r, alpha_ratio, targets, trainable_dtype, dtype)
            ckpt = build_scaled(family, scfg, lora, r, alpha_ratio, targets, trainable_dtype, dtype)
            apply_activation_checkpointing(transformer_blocks(family, ckpt))
            kw2 = scaled_inputs(family, scfg, 2, ni, nt, dtype)
            _, _, cast_names = SavedTensors(plain, transformer_blocks(family, plain))(
                lambda: forward(plain, kw2, dtype))
            cast_bytes = sum(p.numel() * dtype.itemsize for n, p in plain.named_parameters() if n in cast_names)
            wgrad = wgrad_tmp([(n, p.numel()) for n, p in plain.named_parameters() if p.requires_grad],
                              cast_names, dtype) if not lora else 0
            inputs = {B: scaled_inputs(family, scfg, B, ni, nt, dtype) for B in (2, 4)}
            for model in (plain, ckpt):  # gradients exist from now on, as from the second backward on
                forward(model, inputs[2], dtype).float().square().mean().backward()
            with Timeline() as tl:
                for B, kw in inputs.items():
                    with torch.no_grad(), tl.phase(f"inference{B}"):
                        forward(plain, kw, dtype, cache=False)
                    for name, model in (("plain", plain), ("ckpt", ckpt)):
                        kept: list = []
                        with tl.phase(f"{name}-forward{B}"):
                            kept.append(forward(model, kw, dtype))
                        loss = kept.pop().float().square().mean()
                        with tl.phase(f"{name}-backward{B}"):
                            loss.backward()
                        del loss
            ph = tl.phases
            for B in inputs:
                fwd_peak, held = ph[f"ckpt-forward{B}"]
                res[(s, B)] = {"inference": ph[f"inference{B}"][0],
                               "backward": max(ph[f"plain-backward{B}"][0] - wgrad, 0),
                               "ckpt_forward": max(fwd_peak - held - cast_bytes, 0),
                               "ckpt_backward": max(ph[f"ckpt-backward{B}"][0] - wgrad, 0)}
    ss = sorted({s for s, _ in res})

    def full_width(name, B):  # linear in the width, extrapolated to the full width (s = 1)
        if len(ss) == 1:
            return res[(ss[0], B)][name]
        s1, s2 = ss
        a, b = res[(s1, B)][name], res[(s2, B)][name]
        return a + (b - a) * (1 - s1) / (s2 - s1)

    out = {}
    for name in ("inference", "backward", "ckpt_forward", "ckpt_backward"):
        t2, t4 = full_width(name, 2), full_width(name, 4)
        slope = (t4 - t2) / 2
        out[name] = [slope, t2 - 2 * slope]
    return out


def transient_at(coef: list[float], B: int) -> int:
    slope, intercept = coef
    return int(max(slope * B + intercept, 0))


# --------------------------------------------------------------------------- cached entry points

def _key(family, config, lora, targets, dtype, trainable_dtype) -> dict:
    return {"family": family, "config": clean(config), "lora": lora, "targets": sorted(targets) if lora else [],
            "dtype": str(dtype), "trainable_dtype": str(trainable_dtype)}


def transformer_activations(family: str, config: dict, *, lora: bool, targets: list[str],
                            dtype: torch.dtype, trainable_dtype: torch.dtype) -> TransformerActivations:
    """The saved-bytes model of this transformer (cache.py: measured once)."""
    key = _key(family, config, lora, targets, dtype, trainable_dtype)
    value = cached("transformer", key, lambda: dataclasses.asdict(measure_transformer(
        family, config, lora=lora, targets=targets, dtype=dtype, trainable_dtype=trainable_dtype)))
    value = dict(value)
    value["block_variants"] = variant_keys(family, config)
    return TransformerActivations(**value)


def transients(family: str, config: dict, *, lora: bool, targets: list[str], dtype: torch.dtype,
               trainable_dtype: torch.dtype, rank: int, ni: int, nt: int) -> dict:
    """The working sets of this transformer at these token counts (cache.py: measured once)."""
    key = {**_key(family, config, lora, targets, dtype, trainable_dtype), "rank": rank if lora else 0,
           "ni": ni, "nt": nt}
    return cached("transient", key, lambda: measure_transients(
        family, config, lora=lora, targets=targets, dtype=dtype, trainable_dtype=trainable_dtype,
        rank=rank, ni=ni, nt=nt))
