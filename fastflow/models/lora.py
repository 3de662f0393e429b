"""What the diffusers policies (sd3, flux) share about *which* weights train and what the frozen
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


class TunedTransformerPolicy:
    """The training-side half of a diffusers policy (SD3, FLUX): trainable parameters, the KL
    reference, FSDP2 hooks and export. The subclass sets ``self.tuning`` (a Tuning) and
    ``self.transformer``, and names its pipeline class and its transformer blocks."""

    pipeline_class_name: str = ""  # e.g. "StableDiffusion3Pipeline": what loads the exported LoRA
    device: torch.device
    dtype: torch.dtype
    pipe: object

    def _blocks(self, transformer: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def text_encoders(self) -> list[nn.Module]:
        """The pipeline's text encoders (the subclass lists them)."""
        raise NotImplementedError

    def _encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # -- set-up ------------------------------------------------------------------------------
    def _place_text_encoders(self) -> None:
        """Text encoders frozen, in the compute dtype, on the device; the prompt cache over them."""
        from fastflow.models.prompt_cache import PromptCache
        from fastflow.models.sd3 import place

        for enc in self.text_encoders():
            place(enc, self.device, self.dtype).requires_grad_(False).eval()
        self._cache = PromptCache(self._encode, self.device)

    def _setup_transformer(self, transformer: nn.Module, *, finetune: str, lora_rank: int,
                           lora_alpha: float, targets: Sequence[str], compile: bool,
                           shard_later: bool) -> None:
        """Weights and placement of the trained transformer.

        LoRA: the frozen base in the compute dtype, the adapter in float32. Full fine-tuning:
        float32 master weights (AdamW updates of lr x 1e-2 relative size vanish in bf16) and a
        frozen reference copy in the compute dtype. ``shard_later`` (an FSDP2 run): the network
        stays in host memory as loaded; FSDP2 casts the trained weights to float32 and moves them
        to the device block by block while sharding, and the reference is filled shard by shard
        afterwards (``materialize_reference``), so no rank holds a full copy on its device first.
        """
        from fastflow.models.sd3 import place

        full = finetune == "full"
        if not shard_later:
            if full:  # the parameters become fp32 master weights (on the host, one at a time);
                for p in transformer.parameters():  # buffers (SD3.5's 432 MiB positional
                    p.data = p.data.to(torch.float32)  # table) stay as loaded
                transformer.to(self.device)
            else:
                place(transformer, self.device, self.dtype)
        elif not full and any(p.dtype != self.dtype for p in transformer.parameters()):
            transformer.to(dtype=self.dtype)
        self.transformer = transformer
        self.tuning = Tuning(transformer, finetune=finetune, rank=lora_rank, alpha=lora_alpha,
                             targets=targets, reference_dtype=self.dtype, defer_reference=shard_later)
        if compile:
            self.transformer.compile()
            if self.tuning.ref_transformer is not None:
                self.tuning.ref_transformer.compile()

    def materialize_reference(self) -> None:
        """Fill the full fine-tuning reference from the current (base) weights, after sharding;
        the trainer calls it before anything can change the weights. No-op for LoRA."""
        self.tuning.materialize_reference()

    # -- prompts -----------------------------------------------------------------------------
    @property
    def encoder_device(self) -> torch.device:
        """Where the text encoders are now (the device, or the host once offloaded)."""
        for enc in self.text_encoders():
            for p in enc.parameters():
                return p.device
        return self.device

    def cache_prompts(self, texts, *, cache_dir=None, info=None, offload: bool = False,
                      progress: bool = False) -> None:
        """Encode ``texts`` (a run's fixed prompt lists) once into an on-disk EmbeddingStore under
        ``cache_dir`` (None: into host memory on every rank, kept for the run), each rank a slice, keyed by the
        pipeline, the text encoders' weights and the encoding settings; later encode_prompts calls
        read them from there. ``offload``: then move the text encoders to host memory (prompts not
        in the lists are still encoded, on the CPU). Collective when ``info`` spans ranks."""
        from fastflow.models.prompt_cache import EmbeddingStore, module_fingerprint, store_key

        texts = list(dict.fromkeys(texts))
        if cache_dir is None:
            self._cache.warm(texts)  # host rows on this rank, kept for the run
        else:
            key = store_key(texts, pipeline=type(self.pipe).__name__,
                            path=str(getattr(getattr(self.pipe, "config", None), "_name_or_path", "")),
                            encoders=[module_fingerprint(e) for e in self.text_encoders()],
                            max_sequence_length=getattr(self, "max_sequence_length", None),
                            dtype=str(self.dtype))
            self._cache.store = EmbeddingStore.build(cache_dir, key, texts, self._encode, info,
                                                     progress=progress)
        if offload:
            self.offload_text_encoders()

    def offload_text_encoders(self) -> None:
        """Move the text encoders to host memory and release their device memory."""
        for enc in self.text_encoders():
            enc.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def named_trainable_parameters(self) -> dict[str, nn.Parameter]:
        """LoRA weights (or every transformer weight for full fine-tuning) by stable name."""
        return self.tuning.named_trainable_parameters()

    def reference(self):
        """Context: velocity() is the base model (LoRA disabled) or the frozen copy (full)."""
        return self.tuning.reference()

    def parallel_modules(self):
        """The transformer and its blocks, for FSDP2 sharding (fastflow.parallel)."""
        return self.transformer, self._blocks(self.transformer)

    def reference_modules(self):
        """The frozen reference copy (full fine-tuning), sharded like the transformer; None for
        LoRA, whose reference is the same sharded network with the adapter disabled."""
        t = self.tuning.ref_transformer
        return None if t is None else (t, self._blocks(t))

    def export(self, directory, state_dict: dict[str, torch.Tensor] | None = None):
        """End-of-run export (the trainer calls it with the EMA weights in place): the LoRA for
        ``<pipeline>.load_lora_weights(directory)``, or for full fine-tuning the whole transformer
        under ``directory/transformer`` (``from_pretrained`` format).

        state_dict: the transformer's full state dict, for a sharded (FSDP) run whose parameters
        are shards: the trainer gathers it on rank 0 (``fastflow.parallel.full_state_dict``)."""
        if self.tuning.finetune == "lora":
            return self.export_lora(directory, state_dict=state_dict)
        out = Path(directory) / "transformer"
        if state_dict is None:
            self.transformer.save_pretrained(out)
            return out
        # save_pretrained would read the module's (sharded) parameters: write the same layout
        # (config.json + diffusion_pytorch_model.safetensors) from the gathered weights.
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        self.transformer.save_config(out)
        save_file({k: v.contiguous() for k, v in state_dict.items()},
                  str(out / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        return out

    def export_lora(self, directory, dtype: torch.dtype | None = None,
                    state_dict: dict[str, torch.Tensor] | None = None):
        """Save the LoRA for ``<pipeline>.load_lora_weights(directory)`` (from ``state_dict``, the
        transformer's full state dict, when given)."""
        import diffusers

        return export_lora(getattr(diffusers, self.pipeline_class_name), self.transformer, directory,
                           dtype=dtype, state_dict=state_dict)
