"""The rollout captured as a CUDA graph: fastflow.rollout.sample() with its Python and launch
overhead removed.

On CUDA the reduced-step rollout (every step's transformer forward with its CFG batch, the fused
SDE step kernel, the log-prob recording) is captured once per shape, one graph per grid step and
step kind (SDE or ODE), and replayed step by step:

    sampler = GraphedSampler(policy)                       # mode="graph" (default), noise="auto"
    traj = sampler(cond, num_steps=10, guidance_scale=4.5, noise_level=0.7, seeds=seeds,
                   autocast=torch.autocast("cuda", dtype=torch.bfloat16))
    traj = graphed_sample(policy, cond, ...)               # the same, sample()'s signature

A captured program is keyed by everything that changes the kernels it launches: batch, latent
shape, step count, guidance scale, noise level, kind, noise mode, forward context (autocast dtype,
attention kernels) and the conditioning's shapes/dtypes. The SDE window is not: it picks which of
a step's two graphs runs, so a random window per iteration (Flow-GRPO-Fast) replays one program
and captures at most two graphs per step over a whole run. Inputs are copied into static buffers
before each replay and the outputs are copied out after it, so a returned Trajectory is never
overwritten by a later replay.

Noise (``noise=``):
- "host": the initial latents and every step's noise are drawn exactly as sample() draws them
  (one generator per sample seed, or the batch generator) into a static noise buffer before the
  replay. Results equal sample()'s within kernel rounding, and keep its guarantee that a sample's
  trajectory does not depend on its batch.
- "philox": the step noise is drawn inside the fused kernel by Philox from a seed and an offset
  held in device tensors (fastflow.ops.sde_step_philox). Each call sets a fresh seed (from the
  seeds, the generator or torch's default generator) and the kernel advances the offset in the
  graph, so every replay has fresh noise and nothing is copied. The stream is not sample()'s, and
  it depends on the sample's position in the batch.
- "auto" (default): "host" when per-sample ``seeds`` are given (the trainer's case), else "philox".

Modes (``mode=``): "graph" explicit torch.cuda.CUDAGraph per step (default: predictable, one
replay per step); "compile" torch.compile(policy.velocity, mode="reduce-overhead") inside sample()'s loop;
"static" runs the captured program's code without capturing it (for debugging and for checking
the program on a CPU); "eager" plain sample().

Whenever capture is impossible (not CUDA, fused kernels off, a policy that says it cannot be
captured, a policy sharded with FSDP2 (``sharded=True``: its weights move to new memory every
rollout), an error during capture) the call falls back to fastflow.rollout.sample() and the
reason is logged once (logger "fastflow.graphs"); ``sampler.last_path`` / ``last_reason`` tell
which path the last call took. With ``required=True`` (``sample.cuda_graph = "required"``) it
raises the reason instead; ``check(device)`` raises it before the first rollout.

Captured weights are read at replay time, so in-place optimizer updates are seen; if a trainable
parameter is replaced by a new tensor (``p.data = ...``) the programs are captured again.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections import OrderedDict
from typing import Any, ContextManager

import torch
from torch import Tensor

from fastflow import ops
from fastflow.rollout import Cond, Policy, Trajectory, _cond_batch, _cond_device, _NoiseSource, sample
from fastflow.runtime import ForwardContext, attention_context  # noqa: F401  (attention_context: re-exported)

log = logging.getLogger("fastflow.graphs")

MODES = ("graph", "compile", "static", "eager")
NOISE_MODES = ("auto", "host", "philox")


def _freeze(value):
    """A hashable stand-in for a non-tensor conditioning value (lists become tuples)."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    hash(value)  # raises TypeError for unhashable values: the caller falls back to eager
    return value


def _autocast_dtype(autocast) -> Any:
    if autocast is None:
        return None
    if isinstance(autocast, ForwardContext):
        return autocast.key
    if isinstance(autocast, torch.autocast):
        return (autocast.device, autocast.fast_dtype, bool(autocast._enabled))
    return ("opaque", id(autocast))


def _fresh_autocast(autocast) -> ContextManager:
    """A context equal to ``autocast`` but with the cast cache off: cached weight casts made
    during a capture would be freed on exit while the graph still points at them."""
    if autocast is None:
        return contextlib.nullcontext()
    if isinstance(autocast, ForwardContext):
        return autocast.without_cast_cache()
    if isinstance(autocast, torch.autocast):
        return torch.autocast(autocast.device, dtype=autocast.fast_dtype,
                              enabled=bool(autocast._enabled), cache_enabled=False)
    return autocast


class _Program:
    """One rollout shape: static buffers, and one captured graph per (grid step, step kind).

    Capturing step by step makes the SDE window data, not shape: a step runs either its SDE or
    its ODE graph, so one program serves every window (Flow-GRPO-Fast's random window included)
    with at most two graphs per grid step, captured the first time a window needs them.
    Each graph reads the state from ``self.x``, writes the next state back into it and its
    recorded transition into per-step buffers; nothing a graph allocates outlives its replay,
    so the graphs share one memory pool and replay in any order.
    """

    def __init__(self, policy: Policy, *, batch: int, num_steps: int, guidance_scale: float,
                 noise_level: float, kind: str, noise: str, cond: Cond, autocast,
                 device: torch.device):
        self.policy, self.device = policy, device
        self.batch, self.num_steps, self.kind = batch, num_steps, kind
        self.guidance_scale, self.noise_level, self.noise = guidance_scale, noise_level, noise
        self.autocast = autocast
        self.sigmas = policy.sigmas(num_steps).to(torch.float32)
        self.sig_dev = self.sigmas.to(device)
        self.guard = float(self.sigmas[1])
        shape = (batch, *policy.latent_shape)
        f32 = dict(dtype=torch.float32, device=device)
        records = kind != "ode"
        self.x0 = torch.zeros(shape, **f32)
        self.x = torch.zeros(shape, **f32)  # the state every step graph reads and rewrites
        self.noise_buf = torch.zeros((num_steps, *shape), **f32) if noise == "host" and records else None
        self.seed = torch.zeros(1, dtype=torch.int64, device=device)
        self.offset = torch.zeros(1, dtype=torch.int64, device=device)
        self.cond = {key: (v.detach().clone() if isinstance(v, Tensor) else v) for key, v in cond.items()}
        # per grid step: the transition's input, output and log-prob (SDE steps write them)
        self.rec_latents = torch.zeros((num_steps, *shape), **f32) if records else None
        self.rec_next = torch.zeros((num_steps, *shape), **f32) if records else None
        self.rec_log_probs = torch.zeros((num_steps, batch), **f32) if records else None
        self.graphs: dict[tuple[int, str], torch.cuda.CUDAGraph] = {}
        self.pool = None

    def step_kinds(self, window: range) -> list[str]:
        record = self.kind != "ode"
        return [self.kind if (record and i in window) else "ode" for i in range(self.num_steps)]

    def load(self, x0: Tensor, cond: Cond, noise_source: _NoiseSource | None, seed: int,
             step_kinds: list[str]) -> None:
        """Copy this call's inputs into the static buffers."""
        self.x0.copy_(x0)
        self.x.copy_(x0)
        for key, v in cond.items():
            if isinstance(v, Tensor):
                self.cond[key].copy_(v)
        if self.noise_buf is not None:
            for i, k in enumerate(step_kinds):  # sample()'s draw order: one draw per SDE step
                if k != "ode":
                    self.noise_buf[i].copy_(noise_source.draw(self.x0.shape))
        self.seed.fill_(seed)
        self.offset.zero_()

    def step(self, i: int, step_kind: str) -> None:
        """Grid step ``i`` as ``step_kind`` on the static buffers; what one graph captures."""
        x = self.x
        s = self.sig_dev[i].expand(self.batch)
        s_next = self.sig_dev[i + 1].expand(self.batch)
        with _fresh_autocast(self.autocast):
            v = self.policy.velocity(x, s, self.cond, guidance_scale=self.guidance_scale)
        common = dict(noise_level=self.noise_level, kind=step_kind, sigma_guard=self.guard,
                      need_mean=False)
        if step_kind == "ode":
            out = ops.sde_step(x, v, s, s_next, **common)
        elif self.noise == "host":
            out = ops.sde_step(x, v, s, s_next, noise=self.noise_buf[i], **common)
        else:
            out = ops.sde_step_philox(x, v, s, s_next, seed=self.seed, offset=self.offset, **common)
        if step_kind != "ode":
            self.rec_latents[i].copy_(x)
            self.rec_next[i].copy_(out.prev_sample)
            self.rec_log_probs[i].copy_(out.log_prob)
        self.x.copy_(out.prev_sample)

    def capture(self, step_kinds: list[str], warmup: int = 2, stream=None) -> int:
        """Capture the step graphs ``step_kinds`` needs and the program lacks (each warmed up on
        a side stream first: compiles kernels, sizes workspaces); returns how many were new.
        Warm-ups overwrite the static buffers: load the inputs afterwards."""
        missing = [(i, k) for i, k in enumerate(step_kinds) if (i, k) not in self.graphs]
        if not missing:
            return 0
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        stream = stream if stream is not None else torch.cuda.Stream(device=self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                for i, k in missing:
                    self.step(i, k)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        for i, k in missing:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.step(i, k)
            self.graphs[(i, k)] = graph
        return len(missing)

    def run(self, step_kinds: list[str], captured: bool) -> None:
        for i, k in enumerate(step_kinds):
            if captured:
                self.graphs[(i, k)].replay()
            else:
                self.step(i, k)

    def trajectory(self, step_kinds: list[str], cond: Cond, prompt_ids: Tensor | None) -> Trajectory:
        """The outputs of the last run, copied out of the static buffers."""
        recorded = [i for i, k in enumerate(step_kinds) if k != "ode"]
        idx = torch.tensor(recorded, dtype=torch.long, device=self.device)
        shape = (self.batch, 0, *self.x.shape[1:])
        if recorded:
            latents = torch.stack([self.rec_latents[i] for i in recorded], 1)
            nxt = torch.stack([self.rec_next[i] for i in recorded], 1)
            log_probs = torch.stack([self.rec_log_probs[i] for i in recorded], 1)
        else:
            latents, nxt = self.x.new_zeros(shape), self.x.new_zeros(shape)
            log_probs = self.x.new_zeros(self.batch, 0)
        return Trajectory(
            latents=latents, next_latents=nxt, log_probs=log_probs, sigmas=self.sig_dev[idx],
            sigmas_next=self.sig_dev[idx + 1], step_indices=idx, sigma_guard=self.guard,
            final=self.x.clone(),
            prompt_ids=(prompt_ids if prompt_ids is not None else torch.arange(self.batch)).to(self.device),
            cond=dict(cond))


class _CompiledVelocity:
    """A stand-in Policy whose velocity is torch.compile(mode="reduce-overhead"); every other
    attribute is the wrapped policy's, so sample() runs unchanged around it."""

    def __init__(self, policy: Policy):
        self._policy = policy
        self._compiled = torch.compile(policy.velocity, mode="reduce-overhead", dynamic=False)

    def __getattr__(self, name):
        return getattr(self._policy, name)

    def velocity(self, latents, sigma, cond, *, guidance_scale):
        # Each call is a new step of the cudagraph tree: the previous outputs were consumed by
        # the SDE step already.
        torch.compiler.cudagraph_mark_step_begin()
        return self._compiled(latents, sigma, cond, guidance_scale=guidance_scale)


class GraphedSampler:
    """fastflow.rollout.sample() for one policy, captured as CUDA graphs; see the module docstring.

    mode: "graph" | "compile" | "static" | "eager"; noise: "auto" | "host" | "philox";
    max_programs: how many captured shapes are kept (least recently used dropped; each holds its
    activations' memory). The attention kernels and compute dtype are the call's ``autocast``
    (a fastflow.runtime.ForwardContext: the same one the training recompute uses).
    """

    def __init__(self, policy: Policy, *, mode: str = "graph", noise: str = "auto",
                 max_programs: int = 4, warmup: int = 2, sharded: bool = False,
                 required: bool = False):
        if mode not in MODES:
            raise ValueError(f"GraphedSampler mode must be one of {MODES}, got {mode!r}")
        if noise not in NOISE_MODES:
            raise ValueError(f"GraphedSampler noise must be one of {NOISE_MODES}, got {noise!r}")
        if max_programs < 1:
            raise ValueError(f"max_programs must be >= 1, got {max_programs}")
        self.policy, self.mode, self.noise = policy, mode, noise
        self.sharded, self.required = sharded, required
        self._on_cuda = False  # device of the last call: decides how loud a fallback is
        self.max_programs, self.warmup = max_programs, warmup
        self.programs: OrderedDict[tuple, _Program] = OrderedDict()
        self.failed: dict[tuple, str] = {}
        self.captures = 0
        self.last_path: str | None = None
        self.last_reason: str | None = None
        self._logged: set[str] = set()
        self._param_ptrs: dict[str, int] | None = None
        self._compiled: _CompiledVelocity | None = None
        self._stream = None

    def drop(self, kind: str | None = None) -> int:
        """Forget the captured programs (of ``kind`` only, e.g. "ode" for evaluation), releasing
        their graphs and memory pools: the trainer drops the evaluation's after each evaluation,
        so its larger batch does not keep memory reserved while training. Returns how many."""
        keys = [k for k, p in self.programs.items() if kind is None or p.kind == kind]
        for k in keys:
            del self.programs[k]
        if keys and torch.cuda.is_available():
            torch.cuda.empty_cache()
        return len(keys)

    # -- decisions ---------------------------------------------------------------------------
    def _fallback_reason(self, device: torch.device) -> str | None:
        if self.mode == "eager":
            return "mode='eager' requested"
        if self.mode == "static":
            return None
        if device.type != "cuda" or not torch.cuda.is_available():
            what = "CUDA graphs" if self.mode == "graph" else "torch.compile reduce-overhead"
            return f"device {device} is not CUDA ({what} need a CUDA device)"
        if getattr(self.policy, "supports_cuda_graphs", True) is False:
            return f"{type(self.policy).__name__} declares supports_cuda_graphs = False"
        if self.sharded:
            return ("the policy is sharded (FSDP2): its weights are gathered into new memory for "
                    "every rollout, which a captured graph would not follow")
        if self.mode == "graph" and ops.backend(device) != "triton":
            return ("the fused SDE kernels are off (FASTFLOW_KERNELS=torch or no triton): the "
                    "reference step synchronises with the host, which a capture forbids")
        return None

    def check(self, device) -> None:
        """Raise ValueError (one line) when ``required`` and rollouts on ``device`` would not be
        captured; the trainer calls it at start-up, before the first rollout."""
        reason = self._fallback_reason(torch.device(device))
        if self.required and reason is not None:
            raise ValueError(f"sample.cuda_graph = required, but the rollout would run eagerly: {reason}")

    def _note(self, path: str, reason: str | None) -> None:
        if reason and self.required and path == "eager":
            raise RuntimeError(f"sample.cuda_graph = required, but the rollout runs eagerly: {reason}")
        self.last_path, self.last_reason = path, reason
        if reason and reason not in self._logged:
            self._logged.add(reason)
            # Expected off CUDA (info); on a GPU the user asked for graphs and did not get them (warning).
            level = logging.WARNING if self._on_cuda else logging.INFO
            log.log(level, "rollout runs eagerly (fastflow.rollout.sample): %s", reason)

    def _noise_mode(self, seeds) -> str:
        if self.noise != "auto":
            return self.noise
        return "host" if seeds is not None else "philox"

    def _params_moved(self) -> bool:
        """True when a trainable parameter now lives in other memory than at capture time."""
        hook = getattr(self.policy, "named_trainable_parameters", None)
        if hook is None:  # nothing to compare
            return False
        ptrs = {n: p.data_ptr() for n, p in hook().items()}
        moved = self._param_ptrs is not None and ptrs != self._param_ptrs
        self._param_ptrs = ptrs
        return moved

    # -- the call ----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, cond: Cond, *, num_steps: int, guidance_scale: float, noise_level: float,
                 kind: str = "sde", generator: torch.Generator | None = None,
                 seeds: Tensor | None = None, window: range | None = None,
                 prompt_ids: Tensor | None = None, latents: Tensor | None = None,
                 autocast: ContextManager | None = None, device=None) -> Trajectory:
        """Same arguments and result as fastflow.rollout.sample (``policy`` is the sampler's)."""
        kw = dict(num_steps=num_steps, guidance_scale=guidance_scale, noise_level=noise_level,
                  kind=kind, generator=generator, seeds=seeds, window=window,
                  prompt_ids=prompt_ids, latents=latents, autocast=autocast, device=device)
        device = torch.device(device if device is not None else _cond_device(cond))
        self._on_cuda = device.type == "cuda"
        reason = self._fallback_reason(device)
        if reason is not None:
            self._note("eager", reason)
            return sample(self.policy, cond, **kw)
        if self.mode == "compile":
            if self._compiled is None:
                self._compiled = _CompiledVelocity(self.policy)
            self._note("compile", None)
            return sample(self._compiled, cond, **kw)

        batch = _cond_batch(cond)
        window = range(num_steps) if window is None else window
        noise = self._noise_mode(seeds)
        if noise == "philox" and kind != "ode" and ops.backend(device) != "triton":
            raise RuntimeError("GraphedSampler noise='philox' needs the fused kernels "
                               "(CUDA, or FASTFLOW_KERNELS=triton with TRITON_INTERPRET=1)")
        try:
            cond_sig = tuple(sorted(
                (k, ("t", tuple(v.shape), v.dtype, v.device.type)) if isinstance(v, Tensor)
                else (k, ("v", _freeze(v))) for k, v in cond.items()))
        except TypeError as e:
            self._note("eager", f"conditioning has an unhashable non-tensor value ({e})")
            return sample(self.policy, cond, **kw)
        # The window is not part of the key: it only picks which step graphs a call replays.
        key = (batch, tuple(self.policy.latent_shape), num_steps, float(guidance_scale),
               float(noise_level), kind, noise, _autocast_dtype(autocast), cond_sig, str(device))
        if key in self.failed:
            self._note("eager", self.failed[key])
            return sample(self.policy, cond, **kw)
        if self._params_moved():
            log.info("trainable parameters were replaced: captured rollouts are rebuilt")
            self.programs.clear()

        program = self.programs.get(key)
        if program is None:
            program = _Program(self.policy, batch=batch, num_steps=num_steps,
                               guidance_scale=guidance_scale, noise_level=noise_level, kind=kind,
                               noise=noise, cond=cond, autocast=autocast, device=device)
            self.programs[key] = program
            while len(self.programs) > self.max_programs:
                self.programs.popitem(last=False)
        else:
            self.programs.move_to_end(key)
        step_kinds = program.step_kinds(window)
        if self.mode == "graph":
            try:  # before any noise is drawn: a failure leaves sample() the same noise
                if self._stream is None:  # one warm-up stream (each new one costs a workspace)
                    self._stream = torch.cuda.Stream(device=device)
                self.captures += program.capture(step_kinds, self.warmup, self._stream)
            except Exception as e:  # noqa: BLE001 - any capture failure means eager
                msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                self.failed[key] = f"capture failed: {type(e).__name__}: {msg}"
                self.programs.pop(key, None)
                self._note("eager", self.failed[key])
                return sample(self.policy, cond, **kw)

        source = _NoiseSource(seeds, generator, device)
        x0 = latents if latents is not None else source.draw((batch, *self.policy.latent_shape))
        seed = self._philox_seed(seeds, generator) if noise == "philox" else 0
        program.load(x0.to(device), cond, source, seed, step_kinds)
        program.run(step_kinds, captured=self.mode == "graph")
        self._note(self.mode, None)
        return program.trajectory(step_kinds, cond, prompt_ids)

    @staticmethod
    def _philox_seed(seeds, generator) -> int:
        """A fresh Philox seed for one call: from the per-sample seeds (deterministic), else drawn
        from the generator (or torch's default one)."""
        if seeds is not None:
            return hash(tuple(int(s) for s in torch.as_tensor(seeds).reshape(-1).tolist())) & (2**62 - 1)
        dev = generator.device if generator is not None else torch.device("cpu")
        return int(torch.randint(0, 2**62, (1,), generator=generator, device=dev))


_SAMPLERS: "weakref.WeakKeyDictionary[Any, GraphedSampler]" = weakref.WeakKeyDictionary()


def sampler_for(policy: Policy, **options) -> GraphedSampler:
    """The GraphedSampler of ``policy`` (one per policy, created with ``options`` on first use)."""
    s = _SAMPLERS.get(policy)
    if s is None:
        s = GraphedSampler(policy, **options)
        _SAMPLERS[policy] = s
    return s


def graphed_sample(policy: Policy, cond: Cond, **kwargs) -> Trajectory:
    """A drop-in for fastflow.rollout.sample(policy, cond, ...): the same arguments and result,
    through the policy's GraphedSampler (default options: explicit CUDA graph, noise "auto")."""
    return sampler_for(policy)(cond, **kwargs)
