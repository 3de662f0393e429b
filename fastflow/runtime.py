"""How a model's forward pass runs: compute dtype (autocast) and attention kernels, as one reusable
context shared by every forward of a run.

The rollout, the training recompute of its log-probs and the KL reference must run the *same*
kernels: a log-prob recorded under cuDNN attention and recomputed under the math backend (or under
another autocast dtype) differs by rounding, and with Flow-GRPO's clip range of 1e-4 rounding
alone clips samples on the very first, on-policy pass. So the trainer builds one ForwardContext
from the config and hands it to every forward: ``sample``, ``recompute_step`` (policy and
reference) and the CUDA-graph sampler (which captures with the autocast weight-cast cache off).

    fwd = ForwardContext("cuda", torch.bfloat16, attention="sdpa")
    with fwd:                       # reusable and re-entrant, like torch.autocast
        v = policy.velocity(x, sigma, cond, guidance_scale=4.5)
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import ContextManager

import torch

ATTENTION = ("auto", "sdpa", "flash", "none")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def attention_context(attention: str, device: torch.device) -> ContextManager:
    """The attention kernels the transformer runs with on ``device``.

    "sdpa": PyTorch's scaled_dot_product_attention restricted to its fast backends in priority
    order cuDNN, flash, memory-efficient (math only as the last resort); "flash": additionally
    diffusers' flash-attn backend for models that dispatch through it (needs the flash_attn
    package); "auto": "flash" when flash_attn is installed, else "sdpa"; "none": leave as is.
    Off CUDA every choice is a no-op.
    """
    if attention not in ATTENTION:
        raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
    device = torch.device(device)
    if device.type != "cuda" or attention == "none":
        return contextlib.nullcontext()
    if attention == "auto":
        attention = "flash" if importlib.util.find_spec("flash_attn") is not None else "sdpa"
    stack = contextlib.ExitStack()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
             SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    stack.enter_context(sdpa_kernel(order, set_priority=True))
    if attention == "flash":
        if importlib.util.find_spec("flash_attn") is None:
            raise RuntimeError("attention='flash' needs the flash_attn package")
        from diffusers.models.attention_dispatch import attention_backend

        stack.enter_context(attention_backend("flash"))
    return stack


def parse_dtype(dtype) -> torch.dtype:
    """A torch dtype or one of model.dtype's names ("float32", "bfloat16", "float16")."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


class ForwardContext:
    """Autocast to ``dtype`` (none for float32) plus the ``attention`` kernels on ``device``.

    Reusable and re-entrant (each ``with`` opens its own stack). ``key`` identifies what it changes
    about the kernels (CUDA-graph programs are keyed by it); ``without_cast_cache()`` is the same
    context with autocast's weight-cast cache off, for CUDA-graph capture (cached casts made during
    a capture are freed on exit while the graph still points at them).
    """

    def __init__(self, device, dtype=torch.float32, attention: str = "none", *,
                 cast_cache: bool = True):
        if attention not in ATTENTION:
            raise ValueError(f"attention must be one of {ATTENTION}, got {attention!r}")
        self.device = torch.device(device)
        self.dtype = parse_dtype(dtype)
        self.attention = attention
        self.cast_cache = cast_cache
        self._stacks: list[contextlib.ExitStack] = []

    @property
    def key(self) -> tuple:
        return ("forward", self.device.type, self.dtype, self.attention, self.cast_cache)

    def without_cast_cache(self) -> "ForwardContext":
        return ForwardContext(self.device, self.dtype, self.attention, cast_cache=False)

    def __enter__(self) -> "ForwardContext":
        stack = contextlib.ExitStack()
        if self.dtype != torch.float32:
            stack.enter_context(torch.autocast(self.device.type, dtype=self.dtype,
                                               cache_enabled=self.cast_cache))
        stack.enter_context(attention_context(self.attention, self.device))
        self._stacks.append(stack)
        return self

    def __exit__(self, *exc) -> None:
        self._stacks.pop().close()

    def __repr__(self) -> str:
        return f"ForwardContext({self.device.type}, {self.dtype}, attention={self.attention!r})"


def forward_context(cfg, device) -> ForwardContext:
    """The run's ForwardContext: ``model.dtype`` autocast and ``model.attention`` kernels."""
    return ForwardContext(device, cfg.model.dtype, cfg.model.attention)


def compute_autocast(device, dtype: torch.dtype) -> ContextManager:
    """Autocast to ``dtype`` on ``device`` unless float32 or autocast is already on there.

    For policies whose trained weights stay float32 (full fine-tuning keeps fp32 master weights)
    while they compute in bf16: a caller without a ForwardContext still gets bf16 compute, and
    inside one (or inside a CUDA-graph capture, whose cast cache is off) nothing changes.
    """
    device = torch.device(device)
    if dtype == torch.float32 or torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
