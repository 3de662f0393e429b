"""Rollouts: the Policy protocol every model implements, and the reduced-step SDE sampler that records
what the training pass needs (FLOW_GRPO.md section 3).

The sampler and the trainer compute every transition through the same ``fastflow.ops.sde_step``
on the same float32 latents, so the first training pass on a fresh rollout reproduces its
log-probs (ratio == 1 on-policy; tests/test_rollout.py checks fp32 and bf16 autocast).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, ContextManager, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

from fastflow import ops
from fastflow.sde import Velocity

Cond = Mapping[str, Any]
"""Prompt conditioning: a mapping whose tensors are batch-first (``[B, ...]``); other values (ids,
metadata) are per-batch lists or scalars. ``index_cond`` slices it."""


@runtime_checkable
class Policy(Protocol):
    """What the sampler and the trainer need from a text-to-image flow model.

    Implementations: fastflow.models.toy (tests), fastflow.shapes (the embedded default), and
    over diffusers pipelines fastflow.models.sd3, flux, qwenimage and flux2_klein (registry:
    fastflow.models.REGISTRY).

    Optional hooks the trainer uses when present: ``default_prompts(split) -> list[Prompt]``
    (built-in prompt lists, split "train"/"eval"), ``eval_metrics(images, prompts, metadata) ->
    dict[str, Tensor[B]]`` (evaluation metrics, e.g. strict accuracy, instead of the reward),
    ``prompt_category(text) -> str`` (groups the evaluation table), ``export(directory)``
    (writes the trained weights in the model's native format at the end of a run; a policy that
    can be sharded, i.e. has ``parallel_modules``, takes ``export(directory, state_dict=...)``
    too: the sharded network's full state dict, gathered on the main rank) and
    ``sampling() -> ContextManager`` (around gradient-free rollouts and evaluations: velocity() may
    use a faster equivalent of the current weights, e.g. LoRA merged; its log-probs must match the
    training pass within float rounding).
    """

    #: per-sample latent shape, e.g. (16, 64, 64) for SD3.5 at 512 px.
    latent_shape: tuple[int, ...]

    def encode_prompts(self, prompts: Sequence[str]) -> Cond:
        """Conditioning for each prompt (batch-first). Negative/empty-prompt embeddings are the
        policy's own business (computed once and cached)."""

    def sigmas(self, num_steps: int) -> Tensor:
        """The descending time grid ``[num_steps + 1]`` from 1 to 0 (SD3: flow_sigmas(n, shift))."""

    def velocity(self, latents: Tensor, sigma: Tensor, cond: Cond, *, guidance_scale: float) -> Velocity:
        """The model's velocity at float32 ``latents`` ``[B, *latent_shape]`` and ``sigma`` ``[B]``.

        With classifier-free guidance return a GuidedVelocity (both halves; the SDE step combines
        them in float32), otherwise a Tensor. Inside ``reference()`` this is the frozen reference
        model's velocity."""

    def decode(self, latents: Tensor) -> Tensor:
        """Images ``[B, 3, H, W]`` float in [0, 1]."""

    def named_trainable_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The parameters the optimizer updates (LoRA weights, or all for full fine-tuning), by a
        stable name: checkpoints, EMA and LoRA export key on these names."""

    def reference(self) -> ContextManager[None]:
        """Context in which velocity() is the reference model (adapter disabled / frozen copy)."""


def index_cond(cond: Cond, index) -> dict[str, Any]:
    """Select samples of a conditioning mapping (tensors are indexed on dim 0; lists too)."""
    out = {}
    for k, v in cond.items():
        if isinstance(v, Tensor) and v.ndim > 0:
            out[k] = v[index]
        elif isinstance(v, (list, tuple)):
            idx = index.tolist() if isinstance(index, Tensor) else index
            out[k] = [v[i] for i in idx] if isinstance(idx, list) else v[idx]
        else:
            out[k] = v
    return out


def cat_cond(conds: Sequence[Cond]) -> dict[str, Any]:
    """Concatenate conditioning mappings along the batch."""
    out = {}
    for k, v in conds[0].items():
        if isinstance(v, Tensor) and v.ndim > 0:
            out[k] = torch.cat([c[k] for c in conds])
        elif isinstance(v, (list, tuple)):
            out[k] = [x for c in conds for x in c[k]]
        else:
            out[k] = v
    return out


@dataclass
class Trajectory:
    """What a rollout records, per sample, for the K SDE steps it may train on.

    latents / next_latents: ``[B, K, *latent_shape]`` float32: the state before and after each
        recorded transition (``x_j`` and ``x_{j+1}``).
    log_probs: ``[B, K]`` float32 log-prob of each recorded transition under the sampling policy.
    sigmas / sigmas_next: ``[K]`` the transition's times, on the latents' device (the training pass
        reads them there without a copy); step_indices: ``[K]`` its index in the grid (same device).
    sigma_guard: the grid's ``sigmas[1]`` (stands in for sigma == 1 in the SDE).
    final: ``[B, *latent_shape]`` the last state (decoded for rewards).
    prompt_ids: ``[B]`` long (index into the prompt list, the group id); cond: the conditioning.
    """

    latents: Tensor
    next_latents: Tensor
    log_probs: Tensor
    sigmas: Tensor
    sigmas_next: Tensor
    step_indices: Tensor
    sigma_guard: float
    final: Tensor
    prompt_ids: Tensor
    cond: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.final.shape[0]

    @property
    def num_steps(self) -> int:
        return self.sigmas.shape[0]

    def select(self, index: Tensor) -> "Trajectory":
        """The samples at ``index`` (a LongTensor over the batch)."""
        return Trajectory(self.latents[index], self.next_latents[index], self.log_probs[index],
                          self.sigmas, self.sigmas_next, self.step_indices, self.sigma_guard,
                          self.final[index], self.prompt_ids[index.to(self.prompt_ids.device)],
                          index_cond(self.cond, index))

    @staticmethod
    def cat(trajs: Sequence["Trajectory"]) -> "Trajectory":
        t0 = trajs[0]
        return Trajectory(torch.cat([t.latents for t in trajs]),
                          torch.cat([t.next_latents for t in trajs]),
                          torch.cat([t.log_probs for t in trajs]), t0.sigmas, t0.sigmas_next,
                          t0.step_indices, t0.sigma_guard, torch.cat([t.final for t in trajs]),
                          torch.cat([t.prompt_ids for t in trajs]), cat_cond([t.cond for t in trajs]))


def sde_window(num_steps: int, window_size: int | None, start: int | None) -> range:
    """The grid steps that are stochastic (and trained). None -> all steps (plain Flow-GRPO);
    otherwise ``[start, start + window_size)`` (Flow-GRPO-Fast / MixGRPO), the rest run the ODE."""
    if window_size is None or window_size >= num_steps:
        return range(num_steps)
    if window_size < 1:
        raise ValueError(f"window_size must be >= 1, got {window_size}")
    start = 0 if start is None else start
    if not 0 <= start <= num_steps - window_size:
        raise ValueError(f"window start {start} out of range for {num_steps} steps, size {window_size}")
    return range(start, start + window_size)


class _NoiseSource:
    """Standard normal noise per sample (one generator per seed) or per batch (one generator)."""

    def __init__(self, seeds: Tensor | None, generator: torch.Generator | None, device):
        self.device = torch.device(device)
        self.generator = generator
        self.gens = None
        if seeds is not None:
            self.gens = []
            for s in torch.as_tensor(seeds).reshape(-1).tolist():
                g = torch.Generator(device=self.device)
                g.manual_seed(int(s))
                self.gens.append(g)

    def draw(self, shape: Sequence[int]) -> Tensor:
        if self.gens is not None:
            if len(self.gens) != shape[0]:
                raise ValueError(f"{len(self.gens)} seeds for a batch of {shape[0]}")
            return torch.stack([torch.randn(tuple(shape[1:]), generator=g, dtype=torch.float32,
                                            device=self.device) for g in self.gens])
        dev = self.generator.device if self.generator is not None else self.device
        return torch.randn(tuple(shape), generator=self.generator, dtype=torch.float32,
                           device=dev).to(self.device)


@torch.no_grad()
def sample(
    policy: Policy,
    cond: Cond,
    *,
    num_steps: int,
    guidance_scale: float,
    noise_level: float,
    kind: str = "sde",
    generator: torch.Generator | None = None,
    seeds: Tensor | None = None,
    window: range | None = None,
    prompt_ids: Tensor | None = None,
    latents: Tensor | None = None,
    autocast: ContextManager | None = None,
    device=None,
) -> Trajectory:
    """Integrate from pure noise to t = 0 in ``num_steps`` steps and record the SDE transitions.

    kind: "sde" / "cps" for rollouts (steps outside ``window`` run the ODE); "ode" for
        evaluation (nothing recorded, no log-probs, never NaN).
    seeds: ``[B]`` one integer seed per sample: its initial noise and every step's noise come from
        its own generator, so a sample's trajectory does not depend on the batch it is drawn in,
        its position, or the number of ranks (preferred over ``generator``).
    latents: the initial noise ``[B, *latent_shape]``; drawn from ``seeds``/``generator`` when None.
    autocast: a context (e.g. bf16 autocast) around each model call; the trainer passes the same.
    """
    batch = _cond_batch(cond)
    device = device if device is not None else _cond_device(cond)
    noise_source = _NoiseSource(seeds, generator, device)
    if latents is None:
        latents = noise_source.draw((batch, *policy.latent_shape))
    x = latents.to(torch.float32)
    sigmas = policy.sigmas(num_steps).to(torch.float32)
    guard = float(sigmas[1])
    sigmas = sigmas.to(device)  # once: no host-to-device copy per step
    window = range(num_steps) if window is None else window
    record = kind != "ode"
    xs, xs_next, lps, rec = [], [], [], []
    for i in range(num_steps):
        s = sigmas[i].expand(batch)
        s_next = sigmas[i + 1].expand(batch)
        with autocast or contextlib.nullcontext():
            v = policy.velocity(x, s, cond, guidance_scale=guidance_scale)
        step_kind = kind if (record and i in window) else "ode"
        noise = noise_source.draw(x.shape) if step_kind != "ode" else None
        out = ops.sde_step(x, v, s, s_next, noise_level=noise_level, kind=step_kind, noise=noise,
                           sigma_guard=guard, need_mean=False)  # fused path: skip writing the mean
        if step_kind != "ode":
            xs.append(x)
            xs_next.append(out.prev_sample)
            lps.append(out.log_prob)
            rec.append(i)
        x = out.prev_sample
    shape = (batch, 0, *x.shape[1:])
    idx = torch.tensor(rec, dtype=torch.long, device=sigmas.device)
    return Trajectory(
        latents=torch.stack(xs, 1) if xs else x.new_zeros(shape),
        next_latents=torch.stack(xs_next, 1) if xs else x.new_zeros(shape),
        log_probs=torch.stack(lps, 1) if lps else x.new_zeros(batch, 0),
        sigmas=sigmas[idx], sigmas_next=sigmas[idx + 1], step_indices=idx, sigma_guard=guard,
        final=x,  # prompt ids on the latents' device: selecting micro-batches there never syncs
        prompt_ids=(prompt_ids if prompt_ids is not None else torch.arange(batch)).to(x.device),
        cond=dict(cond),
    )


def _cond_batch(cond: Cond) -> int:
    for v in cond.values():
        if isinstance(v, Tensor) and v.ndim > 0:
            return v.shape[0]
        if isinstance(v, (list, tuple)):
            return len(v)
    raise ValueError("conditioning has no batch-first tensor or list to size the batch")


def _cond_device(cond: Cond):
    for v in cond.values():
        if isinstance(v, Tensor):
            return v.device
    return torch.device("cpu")


def recompute_step(policy: Policy, traj: Trajectory, j: int, *, guidance_scale: float,
                   autocast: ContextManager | None = None, reference: bool = False) -> Velocity:
    """The (policy or reference) velocity at recorded step ``j`` of ``traj``, as in the rollout."""
    batch = traj.batch_size
    s = traj.sigmas[j].expand(batch).to(traj.latents.device)  # no-op: recorded on that device
    ctx = policy.reference() if reference else contextlib.nullcontext()
    with ctx, (autocast or contextlib.nullcontext()):
        return policy.velocity(traj.latents[:, j], s, traj.cond, guidance_scale=guidance_scale)
