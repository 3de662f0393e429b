"""DiffusionNFT (Zheng et al., "DiffusionNFT: Online Diffusion Reinforcement with Forward
Process", arXiv 2509.16117), as its public code (NVlabs/DiffusionNFT, scripts/train_nft_sd3.py)
computes it.

Per iteration: the old (sampling) policy ``v_old`` generates clean images with any sampler; each
reward becomes an optimality probability ``r = clip(A, -c, c) / (2c) + 1/2`` from its
group-relative advantage ``A`` (``c = train.adv_clip``); every clean image ``x_0`` is re-noised
at training times ``t`` (fastflow.objectives.forward) and the trained velocity ``v`` enters two
implicit policies,

    v+ = beta v + (1 - beta) v_old          (positive)
    v- = (1 + beta) v_old - beta v          (negative, the reflection of v+ about v_old)

whose clean-image predictions ``x0± = x_t - t v±`` are regressed onto ``x_0``, each normalised by
its own detached mean absolute error (the paper's adaptive weighting):

    L = c * mean_i [ r_i ||x0+ - x_0||^2 / w+  +  (1 - r_i) ||x0- - x_0||^2 / w- ] / beta
        + kl_beta * mean_i ||v - v_ref||^2

(``||.||^2`` and ``w`` are means over the sample's elements). The old policy follows the trained
one after every iteration, ``old <- decay old + (1 - decay) current`` with ``decay =
min(rate * max(step - flat, 0), max)`` at optimizer step ``step`` (:func:`old_decay`; the public
code's decay types 1 and 2). Training is CFG-free: the trained velocity is the conditional one.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def optimality(advantages: Tensor, adv_clip: float) -> Tensor:
    """Rewards -> optimality probabilities: ``clip(A, -c, c) / (2c) + 0.5``, in [0, 1]."""
    a = advantages.clamp(-adv_clip, adv_clip)
    return (a / adv_clip / 2.0 + 0.5).clamp(0.0, 1.0)


def old_decay(step: int, *, rate: float, max_decay: float, flat: int) -> float:
    """The old policy's EMA decay at optimizer step ``step``: 0 for the first ``flat`` steps, then
    rising by ``rate`` per step up to ``max_decay``. The public configs: rate 0.001, max 0.5,
    flat 0 (type 1, GenEval / PickScore) and rate 0.0075, max 0.999, flat 75 (type 2, OCR)."""
    if step < flat:
        return 0.0
    return min((step - flat) * rate, max_decay)


def _mean(x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def nft_loss(v: Tensor, v_old: Tensor, x_t: Tensor, x0: Tensor, t: Tensor, r: Tensor, *, beta: float,
             adv_clip: float, v_ref: Tensor | None = None, kl_beta: float = 0.0
             ) -> tuple[Tensor, dict[str, Tensor]]:
    """The DiffusionNFT loss of one batch at one training time per sample.

    v: ``[B, ...]`` the trained velocity at ``x_t`` (differentiable); v_old / v_ref: the old
    policy's and the reference model's (detached; v_ref only with ``kl_beta > 0``); x0: the clean
    images; t: ``[B]`` times; r: ``[B]`` optimality probabilities (:func:`optimality`).
    Returns the loss and detached stats (positive / negative terms, KL, ``old_deviation`` =
    mean ``(v - v_old)^2``).
    """
    if kl_beta > 0 and v_ref is None:
        raise ValueError("nft_loss: kl_beta > 0 needs v_ref (the reference model's velocity)")
    v_old = v_old.detach().to(v.dtype)
    x0 = x0.to(v.dtype)
    tb = t.to(v.dtype).reshape(-1, *([1] * (v.ndim - 1)))
    r = r.detach().to(v.dtype)
    pos_v = beta * v + (1 - beta) * v_old
    neg_v = (1 + beta) * v_old - beta * v
    x0_pos = x_t.to(v.dtype) - tb * pos_v
    x0_neg = x_t.to(v.dtype) - tb * neg_v
    with torch.no_grad():  # the adaptive weights, in float64 as the public code
        w_pos = _mean((x0_pos.double() - x0.double()).abs()).clamp(min=1e-5).to(v.dtype)
        w_neg = _mean((x0_neg.double() - x0.double()).abs()).clamp(min=1e-5).to(v.dtype)
    pos = _mean((x0_pos - x0) ** 2) / w_pos
    neg = _mean((x0_neg - x0) ** 2) / w_neg
    per_sample = (r * pos + (1 - r) * neg) / beta
    loss = adv_clip * per_sample.mean()
    stats = {"nft/positive": pos.detach().mean(), "nft/negative": neg.detach().mean(),
             "nft/old_deviation": _mean((v.detach() - v_old) ** 2).mean()}
    if kl_beta > 0:
        kl = _mean((v - v_ref.detach().to(v.dtype)) ** 2)
        loss = loss + kl_beta * kl.mean()
        stats["kl"] = kl.detach().mean()
    else:
        stats["kl"] = torch.zeros((), device=v.device, dtype=v.dtype)
    return loss, stats


def nft_loss_reference(v, v_old, x_t, x0, t, r, *, beta, adv_clip, v_ref=None, kl_beta=0.0) -> Tensor:
    """The same loss in float64, sample by sample, written from the formulas of the module
    docstring (for tests)."""
    total = torch.zeros((), dtype=torch.float64)
    n = v.shape[0]
    for i in range(n):
        vi, oi, xi, ci = v[i].double(), v_old[i].double().detach(), x_t[i].double(), x0[i].double()
        ti, ri = float(t[i]), float(r[i])
        x0p = xi - ti * (beta * vi + (1 - beta) * oi)
        x0n = xi - ti * ((1 + beta) * oi - beta * vi)
        wp = max(float((x0p - ci).detach().abs().mean()), 1e-5)
        wn = max(float((x0n - ci).detach().abs().mean()), 1e-5)
        term = (ri * ((x0p - ci) ** 2).mean() / wp + (1 - ri) * ((x0n - ci) ** 2).mean() / wn) / beta
        total = total + adv_clip * term / n
        if kl_beta > 0:
            total = total + kl_beta * ((vi - v_ref[i].double().detach()) ** 2).mean() / n
    return total


class OldPolicy:
    """DiffusionNFT's old (sampling) policy: a float32 copy of the trainable weights, swapped in
    for rollouts and for ``v_old``, and moved towards the trained weights after each iteration.
    Starts equal to the trained weights (the public code copies them in before the first epoch)."""

    def __init__(self, named_params: dict[str, torch.nn.Parameter]):
        self.params = named_params
        self.shadow = {n: p.detach().clone().float() for n, p in named_params.items()}

    @torch.no_grad()
    def step(self, decay: float) -> None:
        """``old <- decay * old + (1 - decay) * current`` (decay 0: the old policy becomes current)."""
        if not 0 <= decay < 1:
            raise ValueError(f"old-policy decay must be in [0, 1), got {decay}")
        for n, p in self.params.items():
            self.shadow[n].mul_(decay).add_(p.detach().float(), alpha=1 - decay)

    @contextlib.contextmanager
    def applied(self):
        """The old weights in the model for the duration (the current ones wait in host memory)."""
        from fastflow.ema import swapped_in

        with swapped_in(self.params, self.shadow):
            yield

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = set(self.shadow) - set(state)
        if missing:
            raise ValueError(f"old-policy state lacks {len(missing)} parameters, e.g. {sorted(missing)[0]}")
        for n in self.shadow:
            self.shadow[n].copy_(state[n])
