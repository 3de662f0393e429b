"""Which weights of a diffusers transformer train and what the frozen
reference is: LoRA through peft (Gaussian init, the adapter-disabled view as the reference), full
fine-tuning with a frozen copy, and LoRA export in the format ``pipe.load_lora_weights`` reads.

LoRA is attached with diffusers' own ``ModelMixin.add_adapter`` (a peft ``LoraConfig``), so module
and parameter names stay those of the base model (``transformer_blocks.0.attn.to_q.lora_A.default
.weight``): they are the stable names of named_trainable_parameters, and the export needs no
renaming beyond peft's ``get_peft_model_state_dict``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

FINETUNE_MODES = ("lora", "full")


def check_targets(module: nn.Module, targets: Sequence[str]) -> None:
    """Raise a one-line error naming each LoRA target that matches no Linear of ``module``
    (peft's rule: a target matches a module whose name equals it or ends with ``"." + target``)."""
    if not targets:
        raise ValueError("LoRA targets: empty list (give module names such as 'attn.to_q')")
    names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise ValueError(f"model.lora_targets: no Linear layer matches {missing} in "
                         f"{type(module).__name__}")


def apply_lora(module: nn.Module, *, rank: int, alpha: float, targets: Sequence[str]) -> None:
    """Attach a peft LoRA adapter ("default") to a diffusers model, Gaussian-initialised as in
    the public code (A ~ N(0, 1/r), B = 0: the adapted model starts equal to the base).

    Only the LoRA weights require grad afterwards, and they are kept in float32 whatever the base
    dtype: optimizer updates of size lr * 1e-4 vanish in bf16 (peft casts the LoRA branch's input
    to the LoRA dtype and its output back, so a bf16 base model runs unchanged).
    """
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"model.lora_rank must be >= 1, got {rank}")
    if alpha <= 0:
        raise ValueError(f"model.lora_alpha must be > 0, got {alpha}")
    targets = list(targets)
    check_targets(module, targets)
    module.requires_grad_(False)
    module.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                  target_modules=targets))
    for name, p in module.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(torch.float32)
            p.requires_grad_(True)


@contextlib.contextmanager
def adapter_disabled(module: nn.Module) -> Iterator[None]:
    """Within the context ``module`` runs as its base model (every LoRA adapter bypassed)."""
    module.disable_adapters()
    try:
        yield
    finally:
        module.enable_adapters()


class Tuning:
    """The trained module of a policy and its frozen reference.

    finetune "lora": ``active`` is the LoRA-adapted transformer; the reference is the same module
    with the adapter disabled (no extra memory). finetune "full": every transformer weight trains
    (float32 master weights: the caller keeps the transformer in float32, or lets FSDP2 cast it
    block by block while sharding) and the reference is a frozen copy of the weights as they were
    before training, stored in ``reference_dtype`` (the compute dtype: it never trains).

    The full fine-tuning reference is first built on the meta device (structure only, no memory)
    and filled by :meth:`materialize_reference`: at once unless ``defer_reference``, else after
    the caller has sharded both copies (FSDP2), so each rank copies only its own shards and no rank
    ever holds a second full copy of the network. Materialize before any weight changes (a resumed
    checkpoint, an optimizer step): it copies the current weights.
    """

    def __init__(self, transformer: nn.Module, *, finetune: str, rank: int, alpha: float,
                 targets: Sequence[str], reference_dtype: torch.dtype | None = None,
                 defer_reference: bool = False):
        if finetune not in FINETUNE_MODES:
            raise ValueError(f"model.finetune must be one of {FINETUNE_MODES}, got {finetune!r}")
        self.finetune = finetune
        self.transformer = transformer
        self.ref_transformer: nn.Module | None = None
        if finetune == "lora":
            apply_lora(transformer, rank=rank, alpha=alpha, targets=targets)
        else:
            from fastflow.parallel import meta_copy

            transformer.requires_grad_(True)
            self.ref_transformer = meta_copy(transformer, reference_dtype).requires_grad_(False).eval()
            if not defer_reference:
                self.materialize_reference()
        self.active = transformer
        self._in_reference = False

    @property
    def reference_pending(self) -> bool:
        """True while the full fine-tuning reference is still an empty (meta) structure."""
        t = self.ref_transformer
        return t is not None and any(p.is_meta for p in t.parameters())

    def materialize_reference(self) -> None:
        """Fill the frozen reference with the transformer's current weights (local shards when
        both are FSDP2-sharded), on the device the transformer's weights live on. No-op for LoRA
        and once done."""
        if not self.reference_pending:
            return
        from fastflow.parallel import copy_weights_, local

        first = next(self.transformer.parameters())
        self.ref_transformer.to_empty(device=local(first).device)
        copy_weights_(self.ref_transformer, self.transformer)

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Context in which ``active`` computes the reference model."""
        if self._in_reference:  # nested: already the reference
            yield
            return
        if self.reference_pending:
            raise RuntimeError("the full fine-tuning reference was never materialized "
                               "(Tuning.materialize_reference after sharding)")
        self._in_reference = True
        try:
            if self.ref_transformer is not None:
                prev, self.active = self.active, self.ref_transformer
                try:
                    yield
                finally:
                    self.active = prev
            else:
                with adapter_disabled(self.transformer):
                    yield
        finally:
            self._in_reference = False

    def named_trainable_parameters(self, prefix: str = "transformer.") -> dict[str, nn.Parameter]:
        """Trainable parameters by ``prefix + parameter name`` (stable across runs)."""
        return {prefix + n: p for n, p in self.transformer.named_parameters() if p.requires_grad}


def lora_state_dict(module: nn.Module, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter's weights in peft's saved form (``...to_q.lora_A.weight``, no adapter name),
    taken from ``state_dict`` (the module's full state dict, e.g. gathered from FSDP shards) when
    given, else from the module itself."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(module, state_dict=state_dict)


def export_lora(pipeline_cls, module: nn.Module, directory, *, dtype: torch.dtype | None = None,
                weight_name: str = "pytorch_lora_weights.safetensors",
                state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Save ``module``'s LoRA adapter with ``pipeline_cls.save_lora_weights`` (e.g.
    StableDiffusion3Pipeline, FluxPipeline) so that ``pipe.load_lora_weights(directory)`` on a
    fresh pipeline of the base model reproduces the trained transformer.

    The adapter config (rank, alpha, targets) travels in the safetensors metadata: without it a
    loader would assume alpha == rank and scale the update by 1 instead of alpha / rank.
    dtype: cast the saved weights (e.g. torch.bfloat16 to halve the file); None keeps float32.
    state_dict: the module's full state dict to export from (a sharded run's gathered weights).
    Returns the path of the weights file.
    """
    if not getattr(module, "peft_config", None) or "default" not in module.peft_config:
        raise ValueError("export_lora: the model has no LoRA adapter (model.finetune must be 'lora')")
    state = lora_state_dict(module, state_dict)
    state = {k: v.detach().to(dtype or v.dtype).cpu().contiguous() for k, v in state.items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pipeline_cls.save_lora_weights(
        directory, transformer_lora_layers=state, weight_name=weight_name,
        transformer_lora_adapter_metadata=module.peft_config["default"].to_dict())
    return directory / weight_name
