"""The shapes Policy (fastflow.rollout.Policy) over the shipped base model, registered as
``model.kind = "shapes"``.

Fine-tuning: ``lora`` (peft LoRA adapters on the attention projections and the residual blocks'
convolutions) or ``full`` (every weight). In both modes the KL reference is a frozen copy of the
base weights taken at construction (for LoRA it computes exactly what the adapter-disabled
network would, without the adapters' overhead: 0.84M parameters, 3.4 MB).

Speed on a CPU: the weights are kept channels-last (oneDNN's convolutions run about 25 % faster
that way), and rollouts / evaluations run inside ``sampling()``, a gradient-free copy with the
LoRA product merged into the weights, which skips the adapters' extra convolutions (about 1.3x).
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from fastflow.data import Prompt
from fastflow.sde import GuidedVelocity, flow_sigmas
from fastflow.shapes import verifier
from fastflow.shapes.model import ShapesFlowModel, load_model, save_model
from fastflow.shapes.world import category_of, parse_prompt

HERE = Path(__file__).resolve().parent
DEFAULT_WEIGHTS = HERE / "weights" / "base.safetensors"
PROMPT_FILES = {"train": HERE / "prompts_train.txt", "eval": HERE / "prompts_eval.txt"}
DEFAULT_SHIFT = 1.0
DEFAULT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out", "conv1", "conv2"]
"""Module names (suffixes) that get LoRA when ``model.lora_targets`` is empty: every attention
projection (text encoder and UNet) and both convolutions of every residual block."""


def default_prompts(split: str) -> list[Prompt]:
    """The shipped prompt list of a split ("train" or "eval")."""
    if split not in PROMPT_FILES:
        raise ValueError(f"unknown prompt split {split!r}; known: train, eval")
    lines = PROMPT_FILES[split].read_text(encoding="utf-8").splitlines()
    texts = [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]
    return [Prompt(t, {"category": category_of(t)}) for t in texts]


class ShapesPolicy:
    """The shapes model behind the Policy protocol. ``model`` is a loaded ShapesFlowModel."""

    latent_shape = (3, 32, 32)

    def __init__(self, model: ShapesFlowModel, *, finetune: str = "lora", lora_rank: int = 32,
                 lora_alpha: float = 64.0, lora_targets: Sequence[str] = (), shift: float = DEFAULT_SHIFT,
                 compile: bool = False, device="cpu"):
        if finetune not in ("lora", "full"):
            raise ValueError(f"model.finetune: unknown mode {finetune!r}; known: lora, full")
        if shift <= 0:
            raise ValueError(f"model.shift must be > 0 for the shapes model, got {shift}")
        self.device = torch.device(device)
        self.finetune = finetune
        self.shift = float(shift)
        self.compile = bool(compile)
        self.model = model.to(self.device)
        # The reference (KL) is a frozen plain copy of the base weights in both modes: for LoRA it
        # equals the adapter-disabled network and runs without the adapters' per-layer overhead.
        self._ref_model = copy.deepcopy(self.model).requires_grad_(False).eval()
        self._ref_model.to(memory_format=torch.channels_last)
        if finetune == "lora":
            self._inject_lora(lora_rank, lora_alpha, list(lora_targets) or DEFAULT_LORA_TARGETS)
        else:
            self.model.requires_grad_(True)
        self.model.to(memory_format=torch.channels_last)  # conv weights NHWC: faster on oneDNN
        if self.compile:
            _compile_networks(self.model)
            _compile_networks(self._ref_model)
        self._active = self.model
        self._merged: ShapesFlowModel | None = None  # sampling(): the LoRA-merged copy, reused
        self._uncond = self.model.encode([""], self.device)

    # -------------------------------------------------------------------------------- set-up
    def _inject_lora(self, rank: int, alpha: float, targets: list[str]) -> None:
        from peft import LoraConfig, inject_adapter_in_model
        if rank < 1:
            raise ValueError(f"model.lora_rank must be >= 1, got {rank}")
        names = {n.rsplit(".", 1)[-1] for n, _ in self.model.named_modules()}
        missing = [t for t in targets if t not in names]
        if missing:
            raise ValueError(f"model.lora_targets: no module named {missing} in the shapes model; "
                             f"e.g. {', '.join(DEFAULT_LORA_TARGETS)}")
        self.model.requires_grad_(False)
        # init_lora_weights=True: B = 0, so the adapted model starts exactly at the base model
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                                           init_lora_weights=True), self.model)
        self.model.to(self.device)

    # -------------------------------------------------------------------------------- protocol
    def encode_prompts(self, prompts: Sequence[str]) -> dict:
        """Token ids and masks (``[B, 8]``); a clear error for words outside the grammar."""
        return self.model.encode(list(prompts), self.device)

    def sigmas(self, num_steps: int) -> Tensor:
        return flow_sigmas(num_steps, self.shift)

    def velocity(self, latents: Tensor, sigma: Tensor, cond: dict, *, guidance_scale: float):
        """``v = (x - x0_hat) / sigma`` (float32); with guidance, one batched pass of [uncond; cond]."""
        ids, mask = cond["ids"], cond["mask"]
        net = self._active
        if guidance_scale == 1.0:
            return net.velocity(latents, sigma, ids, mask)
        b = latents.shape[0]
        u_ids = self._uncond["ids"].expand(b, -1)
        u_mask = self._uncond["mask"].expand(b, -1)
        v = net.velocity(torch.cat([latents, latents]), torch.cat([sigma, sigma]),
                         torch.cat([u_ids, ids]), torch.cat([u_mask, mask]))
        uncond, cond_v = v.chunk(2)
        return GuidedVelocity(uncond, cond_v, guidance_scale)

    def decode(self, latents: Tensor) -> Tensor:
        return ((latents.float() + 1) / 2).clamp(0, 1)

    def named_trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    @contextlib.contextmanager
    def reference(self):
        """The frozen base weights (for LoRA: what the adapter-disabled network computes)."""
        prev, self._active = self._active, self._ref_model
        try:
            yield
        finally:
            self._active = prev

    @contextlib.contextmanager
    def sampling(self):
        """Context for gradient-free sampling (rollouts, evaluation): ``velocity()`` runs a plain
        copy of the current weights with the LoRA product merged in, so the adapters' extra
        matmuls and convolutions are skipped. The copy differs from the adapter path by float
        rounding only (W x + B A x vs (W + B A) x): a rollout's log-probs are reproduced by the
        training pass to about 1e-6, far inside any clip range. Full fine-tuning has nothing to
        merge and samples the trained model itself."""
        if self.finetune == "full" or self._active is not self.model:
            yield
            return
        with torch.no_grad():
            if self._merged is None:
                self._merged = ShapesFlowModel(self.model.cfg).to(self.device).requires_grad_(False).eval()
                self._merged.to(memory_format=torch.channels_last)
                if self.compile:
                    _compile_networks(self._merged)
            self._merged.load_state_dict(self._merged_state())
        self._active = self._merged
        try:
            yield
        finally:
            self._active = self.model

    def _merged_state(self) -> dict[str, Tensor]:
        """The current weights as a plain ShapesFlowModel state dict (LoRA merged)."""
        if self.finetune == "full":
            return self.model.state_dict()
        with torch.no_grad():
            merged = copy.deepcopy(self.model)
            for m in merged.modules():
                if hasattr(m, "merge") and hasattr(m, "lora_A"):
                    m.merge()
            return {n.replace(".base_layer.", "."): v for n, v in merged.state_dict().items()
                    if "lora_" not in n}

    # -------------------------------------------------------------------------------- hooks
    def default_prompts(self, split: str) -> list[Prompt]:
        """The shipped train / held-out eval prompt lists (with their category)."""
        return default_prompts(split)

    def prompt_category(self, text: str) -> str:
        return category_of(text)

    def eval_metrics(self, images: Tensor, texts: Sequence[str], metas=None) -> dict[str, Tensor]:
        """Per image: strict 0/1 ``accuracy`` and the ``partial`` fraction of conditions met."""
        conds = verifier.judge(images, list(texts))
        return {"accuracy": torch.tensor([float(all(c)) for c in conds]),
                "partial": torch.tensor([sum(c) / len(c) for c in conds])}

    def merged_model(self) -> ShapesFlowModel:
        """A plain ShapesFlowModel with the current weights (LoRA merged in)."""
        fresh = ShapesFlowModel(self.model.cfg)
        fresh.load_state_dict(self._merged_state())
        return fresh

    def export(self, out_dir: str | Path) -> Path:
        """Write the current (merged) weights to ``out_dir/model.safetensors``; loadable as
        ``model.path`` or ``python -m fastflow.evaluate --checkpoint``."""
        path = Path(out_dir) / "model.safetensors"
        save_model(self.merged_model(), path)
        return path


def _compile_networks(model: ShapesFlowModel) -> None:
    """``model.compile``: torch.compile the text encoder and the UNet in place (their weights stay
    the module's own, so loading a state dict into them later needs no recompile). Measured on a
    one-thread CPU (2.13, batch 32 forward): 0.9x, i.e. slower, so the shapes configs leave it off."""
    model.text.compile()
    model.unet.compile()


def resolve_weights(path: str) -> Path:
    """``model.path`` -> a weights file: "" = the shipped base model; a directory = its
    model.safetensors (as written by ShapesPolicy.export)."""
    p = Path(path) if path else DEFAULT_WEIGHTS
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.is_file():
        hint = (" (the shipped base model is missing: export one with python -m fastflow.shapes.pretrain "
                "--out RUN --export fastflow/shapes/weights/base.safetensors)") if not path else ""
        raise FileNotFoundError(f"model.path: shapes weights not found: {p}{hint}")
    return p


def build_policy(cfg, device) -> ShapesPolicy:
    """The registry factory: reads cfg.model.{path, finetune, lora_rank, lora_alpha, lora_targets,
    shift, compile} (model.dtype is applied by the caller's autocast; weights stay float32)."""
    m = cfg.model
    model = load_model(resolve_weights(getattr(m, "path", "")), device)
    return ShapesPolicy(model, finetune=m.finetune, lora_rank=m.lora_rank, lora_alpha=m.lora_alpha,
                        lora_targets=list(getattr(m, "lora_targets", []) or []),
                        shift=getattr(m, "shift", 0.0) or DEFAULT_SHIFT,
                        compile=getattr(m, "compile", False), device=device)


def check_prompts(texts: Sequence[str]) -> None:
    """Raise a clear error for the first prompt outside the grammar."""
    for t in texts:
        parse_prompt(t)
