"""The plan's measuring instruments, on the CPU: the peak of what a function allocates (torch's
memory profiler), a profiler session split into named phases, and the bytes autograd saves for
backward, attributed to the block whose forward saved them.

These count bytes; they do not interpret them (fit.py and measure.py do).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Sequence

import torch
from torch import nn


def _memory_events(prof) -> list[tuple[int, int]]:
    """(time, +bytes / -bytes) of every CPU allocator event of a profiler session, in order."""
    return sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]")


def peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak bytes of CPU memory allocated by ``fn`` and alive together (torch's profiler with
    profile_memory: every allocation and free of the CPU allocator, replayed in order), above
    what was allocated before the call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cur = peak = 0
    for _, n in _memory_events(prof):
        cur += n
        peak = max(peak, cur)
    return peak


class Timeline:
    """One CPU profiler session (profile_memory) split into named phases: for each phase, the peak
    of what was allocated within it and alive together, and what it left allocated, both above
    the bytes alive when it began. One session for many phases: starting a profiler session costs
    far more than the small forwards measured."""

    def __enter__(self) -> "Timeline":
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        self.phases: dict[str, tuple[int, int]] = {}
        return self

    def phase(self, name: str):
        from torch.profiler import record_function

        return record_function(f"fastflow.plan:{name}")

    def __exit__(self, *exc) -> None:
        self._prof.__exit__(*exc)
        if exc[0] is not None:
            return
        spans = []
        for e in self._prof.profiler.kineto_results.events():
            if e.name().startswith("fastflow.plan:"):
                spans.append((e.start_ns(), e.start_ns() + e.duration_ns(), e.name().split(":", 1)[1]))
        mem = _memory_events(self._prof)
        for lo, hi, name in spans:
            cur = base = peak = 0
            started = False
            for t, n in mem:
                if t < lo:
                    cur += n
                    continue
                if not started:
                    base, peak, started = cur, cur, True
                if t > hi:
                    break
                cur += n
                peak = max(peak, cur)
            if not started:
                base = peak = cur
            self.phases[name] = (peak - base, cur - base)


def _cast_source(t: torch.Tensor):
    """The parameter a saved tensor is an autocast copy of (through views), else None: autocast
    saves its bf16 copies of float32 weights for backward, and those are weight bytes (one per
    weight, whatever the batch), not activations."""
    gf = t.grad_fn
    for _ in range(6):
        if gf is None:
            return None
        nxt = [n[0] for n in gf.next_functions if n[0] is not None]
        if type(gf).__name__ == "ToCopyBackward0":
            if len(nxt) == 1 and type(nxt[0]).__name__ == "AccumulateGrad":
                return nxt[0].variable
            return None
        if len(nxt) != 1:
            return None
        gf = nxt[0]
    return None


class SavedTensors:
    """Counts what autograd saves for backward while a forward runs and still holds when it
    returns, each storage once: bytes by
    the block (index into ``blocks``) whose forward saved it (None: outside every block), each
    block's input bytes (what a checkpointed block keeps for its recompute), and the names of
    the parameters whose autocast copies were saved (weight copies, told apart from activations).
    The model's own parameters and buffers are never counted: they are weights."""

    def __init__(self, model: nn.Module, blocks: Sequence[nn.Module]):
        self.model, self.blocks = model, list(blocks)
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.owned = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}

    def __call__(self, fn: Callable[[], Any]) -> tuple[dict, dict, set[str]]:
        current: list[int | None] = [None]
        seen: dict[int, tuple[int | None, int] | None] = {}
        inputs: dict[int, int] = {}
        casts: set[str] = set()
        hooks = []
        for i, b in enumerate(self.blocks):
            def pre(m, args, kwargs, i=i):
                current[0] = i
                # the tensor inputs of the block: what checkpointing keeps for its recompute
                # (rotary embeddings, a tuple shared by every block, are not a tensor here)
                inputs[i] = sum(t.untyped_storage().nbytes() for t in [*args, *kwargs.values()]
                                if isinstance(t, torch.Tensor))
            hooks.append(b.register_forward_pre_hook(pre, with_kwargs=True))
            hooks.append(b.register_forward_hook(lambda m, a, out: current.__setitem__(0, None)))

        refs: dict[int, list] = {}

        def pack(t):
            st = t.untyped_storage()
            key = st._cdata
            if key not in self.owned:
                refs.setdefault(key, []).append(weakref.ref(t))
            if key not in self.owned and key not in seen:
                src = _cast_source(t)
                if src is not None:
                    casts.add(self.names.get(id(src), "?"))
                    seen[key] = None
                else:
                    seen[key] = (current[0], st.nbytes())
            return t

        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = fn()
        finally:
            for h in hooks:
                h.remove()
        # what the forward saved for a branch whose output it discarded (Qwen-Image's last block's
        # text stream) was freed with that branch's graph before the forward returned: not held
        live = {k for k, rs in refs.items() if any(r() is not None for r in rs)}
        del out
        per: dict[int | None, int] = {}
        for k, v in seen.items():
            if v is not None and k in live:
                per[v[0]] = per.get(v[0], 0) + v[1]
        return per, inputs, casts
