"""What every diffusers transformer policy (SD3.5, FLUX.1, Qwen-Image, FLUX.2 [klein]) shares:
loading a pipeline in a dtype, placing modules on a device without needless casts, and
TunedTransformerPolicy, the training-side half of a policy (trainable parameters, the KL
reference, text-encoder placement and the prompt cache, FSDP2 hooks, export). Each model's module
adds its prompt encoding, its velocity and its sigmas."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from fastflow import runtime
from fastflow.models.lora import Tuning, export_lora


def parse_dtype(name: str) -> torch.dtype:
    """``"bfloat16"`` -> torch.bfloat16 (model.dtype's allowed names)."""
    return runtime.parse_dtype(name)


def _dtype_kwarg() -> str:
    """The name diffusers' loaders take the dtype under: ``dtype`` where it exists (``torch_dtype``
    is deprecated there), ``torch_dtype`` in the releases before it."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return "torch_dtype"
    return "dtype"


def load_pipeline(pipeline_cls, path: str, dtype: torch.dtype):
    """``pipeline_cls.from_pretrained(path)`` (hub id or local directory) or ``from_single_file``
    for a single weights file; a failure becomes one line naming model.path."""
    kw = {_dtype_kwarg(): dtype}
    try:
        if os.path.isfile(path):
            return pipeline_cls.from_single_file(path, **kw)
        return pipeline_cls.from_pretrained(path, **kw)
    except Exception as e:  # noqa: BLE001 - re-raised with the config key that caused it
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"model.path {path!r}: cannot load a {pipeline_cls.__name__}: {first}") from e


def place(module: torch.nn.Module, device, dtype: torch.dtype) -> torch.nn.Module:
    """Move ``module`` to ``device`` and cast it to ``dtype`` only when it is not already in it
    (diffusers warns on every cast, even a no-op one). The cast happens on the host side of the
    move when it widens (no second, wider copy on the device)."""
    widen = any(p.dtype != dtype and p.dtype.itemsize < dtype.itemsize for p in module.parameters())
    if widen:
        module.to(dtype=dtype)
    module.to(device)
    if any(p.dtype != dtype for p in module.parameters()):
        module.to(dtype=dtype)
    return module


def _model_cfg(cfg):
    m = cfg.model
    targets = list(getattr(m, "lora_targets", []) or [])
    return m, targets


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """The resolution-dependent shift ``mu`` of the FLUX.1 and Qwen-Image pipelines: linear in the
    number of image tokens."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len


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
