"""Data-parallel strategies for the trainer: FSDP2 sharding, DDP-style gradient sync, activation
checkpointing, 8-bit AdamW over sharded parameters, and memory accounting.

A Policy opts into sharding with an OPTIONAL hook:

    policy.parallel_modules() -> (root: nn.Module, blocks: list[nn.Module])
        the trained network and its repeated blocks (transformer blocks); FSDP2 shards each block,
        then the root (which picks up every parameter outside the blocks: embeddings, norms, heads);
    policy.reference_modules() -> (root, blocks)          (only for policies with a frozen copy)
        the frozen KL reference, sharded the same way so no rank holds a second full copy.

Policies whose reference is "the same network with the LoRA adapter disabled" need no
``reference_modules``: the reference shares the sharded base weights.

Strategies (``distributed.strategy``): ``none`` (one process), ``ddp`` (replicated weights, one
bucketed all-reduce of the gradients per optimizer step) and ``fsdp`` (FSDP2 ``fully_shard``:
parameters, gradients and optimizer state sharded; gradients reduce-scattered in backward).
``auto`` picks ``ddp`` when the trainable parameters are a small part of the network (LoRA) and
``fsdp`` for full fine-tuning.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterable, Iterator

import torch
from torch import Tensor, nn

from fastflow.distributed import DistInfo

log = logging.getLogger("fastflow.parallel")

# Above this share of trainable parameters a run counts as full fine-tuning (auto -> fsdp).
_FULL_FINETUNE_SHARE = 0.5


def is_dtensor(t) -> bool:
    """True for a torch.distributed DTensor (an FSDP2-sharded parameter, its grad or its state)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """This rank's part of ``t``: the local shard of a DTensor (a view sharing its storage), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def full(t: Tensor) -> Tensor:
    """The whole tensor (all-gathers a DTensor; every rank must call it)."""
    return t.full_tensor() if is_dtensor(t) else t


def full_state_dict(root: nn.Module) -> dict[str, Tensor]:
    """The whole state dict of an FSDP2-sharded ``root``, gathered shard by shard into host memory
    on rank 0 (the other ranks get an empty dict; every rank must call it). What an end-of-run
    export of a sharded run writes: no rank ever holds a second full copy on the accelerator."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def meta_copy(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of ``module``'s structure whose parameters and buffers live on the meta device (no
    memory), matrices cast to ``dtype`` and vectors to float32 when ``dtype`` is given; fill it with
    ``to_empty`` + ``copy_weights_``.
    For a frozen reference copy that must not exist in full on any rank before it is sharded."""
    import copy

    memo: dict[int, object] = {}
    for p in module.parameters():
        # Vectors (norm weights, biases) stay float32, as the trained master weights: layers such
        # as diffusers' RMSNorm return their weight's dtype, so a bf16 norm weight in the reference
        # would round where the fp32 policy does not, and the KL would not start at exactly 0.
        # They are a few bytes. (Under FSDP2 both copies are gathered in the compute dtype.)
        cast = p.dtype if dtype is None else (dtype if p.ndim >= 2 else torch.float32)
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta", dtype=cast), requires_grad=False)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return copy.deepcopy(module, memo)


@torch.no_grad()
def copy_weights_(dst: nn.Module, src: nn.Module) -> None:
    """Copy ``src``'s parameters and buffers into ``dst`` (same structure), casting to ``dst``'s
    dtypes. FSDP2-sharded pairs copy their local shards only (both must be sharded alike, e.g. by
    the same ``apply_fsdp`` call pattern); nothing is gathered."""
    sp, dp = dict(src.named_parameters()), dict(dst.named_parameters())
    if sp.keys() != dp.keys():
        raise ValueError(f"copy_weights_: the modules differ ({len(sp)} vs {len(dp)} parameters)")
    for n, d in dp.items():
        s_local, d_local = local(sp[n].detach()), local(d.detach())
        if s_local.shape != d_local.shape:
            raise ValueError(f"copy_weights_: {n} is laid out differently ({tuple(s_local.shape)} vs "
                             f"{tuple(d_local.shape)}): shard both copies the same way")
        d_local.copy_(s_local)
    sb = dict(src.named_buffers())
    for n, b in dst.named_buffers():
        b.copy_(sb[n])


def will_shard(cfg, world_size: int) -> bool:
    """Whether a run of ``cfg`` at ``world_size`` ranks will use FSDP2 (what resolve_strategy
    decides for the diffusers policies, whose trainable share is small for LoRA and all for full
    fine-tuning), known before the model is built: such a policy keeps its transformer in host
    memory for FSDP2 to place shard by shard, instead of a full copy on every device first."""
    strategy = cfg.distributed.strategy
    return world_size > 1 and (strategy == "fsdp" or (strategy == "auto" and cfg.model.finetune == "full"))


def policy_modules(policy) -> tuple[nn.Module, list[nn.Module]] | None:
    """The policy's ``parallel_modules()`` (root, blocks), or None when it has no such hook."""
    hook = getattr(policy, "parallel_modules", None)
    if hook is None:
        return None
    root, blocks = hook()
    if not isinstance(root, nn.Module) or not all(isinstance(b, nn.Module) for b in blocks):
        raise TypeError(f"{type(policy).__name__}.parallel_modules() must return (nn.Module, list[nn.Module])")
    return root, list(blocks)


def resolve_strategy(strategy: str, policy, world_size: int) -> str:
    """The strategy a run uses: ``none`` | ``ddp`` | ``fsdp`` (``auto`` resolved, see module doc)."""
    if strategy not in ("auto", "none", "ddp", "fsdp"):
        raise ValueError(f"distributed.strategy: unknown strategy {strategy!r}; known: auto, none, ddp, fsdp")
    if world_size == 1:
        return "none"  # nothing to shard or synchronise; FSDP at one rank only costs copies
    if strategy == "none":
        raise ValueError(f"distributed.strategy none runs a single process, but the world size is {world_size}")
    mods = policy_modules(policy)
    if strategy == "fsdp" and mods is None:
        raise ValueError(f"distributed.strategy fsdp: {type(policy).__name__} has no parallel_modules() "
                         f"hook to shard; use strategy ddp")
    if strategy != "auto":
        return strategy
    if mods is None:
        return "ddp"
    total = sum(p.numel() for p in mods[0].parameters())
    trained = sum(p.numel() for p in mods[0].parameters() if p.requires_grad)
    return "fsdp" if total and trained / total > _FULL_FINETUNE_SHARE else "ddp"


def apply_activation_checkpointing(blocks: Iterable[nn.Module]) -> None:
    """Recompute each block's activations in backward (composable; works under fully_shard).

    Apply before ``apply_fsdp`` so the checkpoint wraps the block's own forward."""
    from torch.distributed._composable import checkpoint

    for b in blocks:
        checkpoint(b)


def apply_fsdp(root: nn.Module, blocks: list[nn.Module], *, param_dtype: torch.dtype | None = None,
               cpu_offload: bool = False, reshard_after_forward: bool = True, mesh=None,
               master_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard ``root`` with FSDP2: ``fully_shard`` on every block, then on the root.

    ``param_dtype`` bf16 gathers bf16 weights for compute while the sharded master weights stay
    fp32 and gradients are reduced in fp32. ``master_dtype`` (float32 for full fine-tuning): the
    parameters that require grad are cast to it block by block, right before their block is
    sharded, so a model loaded in bf16 never exists as a full fp32 copy. ``cpu_offload`` keeps the
    shards (and hence the optimizer state) in host memory. ``reshard_after_forward`` governs
    training forwards; rollouts override it with ``gathered_for_rollout``. A module still in host
    memory is moved to the mesh's device block by block as it is sharded.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kw = {}
    if param_dtype is not None and param_dtype != torch.float32:
        # cast_forward_inputs off: FSDP2 would round every floating input of the root to bf16,
        # the float32 timestep included (SD3's t = 1000 sigma in steps of 4 near 1000), so a sharded
        # run would train at other times than one GPU or the stock pipeline; the policies cast
        # latents and embeddings to the compute dtype themselves.
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32,
                                               cast_forward_inputs=False)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy()
    if mesh is not None:
        kw["mesh"] = mesh
    def cast(module: nn.Module) -> None:
        if master_dtype is not None:
            for p in module.parameters():
                if p.requires_grad and p.dtype != master_dtype and not is_dtensor(p):
                    p.data = p.data.to(master_dtype)

    for b in blocks:
        cast(b)
        fully_shard(b, reshard_after_forward=reshard_after_forward, **kw)
    cast(root)
    fully_shard(root, reshard_after_forward=reshard_after_forward, **kw)
    return root


@contextlib.contextmanager
def gathered_for_rollout(roots: Iterable[nn.Module], reshard_after_forward: bool = True) -> Iterator[None]:
    """Keep FSDP2-gathered weights for a whole rollout, free them afterwards.

    A rollout runs every block once per denoising step; with ``reshard_after_forward`` the blocks
    would be all-gathered again at each of the T steps. Inside this context the first step gathers
    each block and later steps reuse it: one all-gather per block per rollout, at the price of
    holding the full (compute-dtype) weights while sampling, as inference would anyway. On exit
    the weights are freed and ``reshard_after_forward`` (the training setting) is restored.
    """
    from torch.distributed.fsdp import FSDPModule

    mods = [m for m in roots if isinstance(m, FSDPModule)]
    for m in mods:
        m.set_reshard_after_forward(False, recurse=True)
    try:
        yield
    finally:
        for m in mods:
            for sub in m.modules():
                if isinstance(sub, FSDPModule):
                    sub.reshard()
            m.set_reshard_after_forward(reshard_after_forward, recurse=True)


def broadcast_params_(params: Iterable[Tensor], info: DistInfo, src: int = 0) -> None:
    """Copy rank ``src``'s values of replicated (non-sharded) tensors to every rank."""
    if not info.enabled:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for p in params:
            if is_dtensor(p):
                continue  # a shard is already the one copy of its values
            dev = info.device if info.device.type == "cuda" else torch.device("cpu")
            buf = p.detach().to(dev)
            dist.broadcast(buf, src)
            p.copy_(buf)


def sync_gradients_(params: Iterable[Tensor], info: DistInfo, bucket_mb: float = 25.0) -> None:
    """Average replicated gradients over ranks: DDP's bucketed all-reduce, once per optimizer step.

    Gradients of FSDP2-sharded parameters (DTensors) are already reduce-scattered in backward and
    are skipped. Flattening into ~``bucket_mb`` buckets makes a few large collectives instead of
    one per tensor.
    """
    if not info.enabled:
        return
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    # Bucket over the fixed parameter list, never over "the grads this rank has": a rank whose
    # backward left some gradient unset (None) would otherwise build other buckets than its peers,
    # and the collectives would pair wrong sizes or hang. Which parameters have a gradient on ANY
    # rank is agreed first (one small all-reduce); those get zeros where a rank has none, the rest
    # stay None everywhere (so the optimizer skips them on every rank, as in a one-rank run).
    replicated = [p for p in params if not is_dtensor(p)]
    if not replicated:
        return
    dev = info.device if info.device.type == "cuda" else torch.device("cpu")
    present = torch.tensor([float(p.grad is not None) for p in replicated], device=dev)
    dist.all_reduce(present, op=dist.ReduceOp.SUM)
    grads = []
    for p, n in zip(replicated, present.tolist()):
        if n == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    limit = int(bucket_mb * 2**20)
    buckets: dict[tuple, list[list[Tensor]]] = {}
    for g in grads:  # one bucket list per (dtype, device): a flat buffer has one of each
        lst = buckets.setdefault((g.dtype, g.device), [[]])
        if lst[-1] and sum(x.numel() * x.element_size() for x in lst[-1]) + g.numel() * g.element_size() > limit:
            lst.append([])
        lst[-1].append(g)
    for lst in buckets.values():
        for bucket in lst:
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            flat.div_(info.world_size)
            for g, v in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                g.copy_(v)


# ------------------------------------------------------------------------------------ optimizers

class LocalShardOptimizer:
    """Runs an optimizer that only understands plain tensors (bitsandbytes' AdamW8bit) on the local
    shards of FSDP2 DTensor parameters.

    Each DTensor parameter gets a plain Parameter that aliases its local shard (same storage), so
    the inner optimizer's in-place update is the sharded update; the gradient's local shard is
    handed over before every step. Its state (8-bit moments, block scales) is per shard, so each
    rank keeps only its part. Plain parameters pass through unchanged.
    """

    def __init__(self, params: list[Tensor], factory):
        self.params = list(params)
        self.locals = [p if not is_dtensor(p) else nn.Parameter(p.detach().to_local(), requires_grad=True)
                       for p in self.params]
        self.inner = factory(self.locals)
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state

    def step(self) -> None:
        for p, q in zip(self.params, self.locals):
            if q is not p:
                # re-point the alias at the current shard: loading a checkpoint (DCP) or FSDP may
                # have given the DTensor new local storage since the last step
                q.data = p.detach().to_local()
                q.grad = None if p.grad is None else local(p.grad)
        self.inner.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p, q in zip(self.params, self.locals):
            p.grad = None
            q.grad = None

    def inner_param(self, p: Tensor) -> Tensor:
        """The tensor the inner optimizer keys its state by for parameter ``p``."""
        return self.locals[[id(x) for x in self.params].index(id(p))]

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def build_optimizer(params: list[Tensor], *, name: str, lr: float, betas: tuple[float, float],
                    weight_decay: float, eps: float):
    """AdamW for the trainer: ``adamw`` (torch; fused on CUDA, foreach on CPU; DTensor-aware) or
    ``adamw8bit`` (bitsandbytes; over local shards when the parameters are FSDP2 DTensors)."""
    kw = dict(lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError("train.optimizer='adamw8bit' needs bitsandbytes: pip install 'fastflow[bnb]'") from None
        shards = [p for p in params if is_dtensor(p)]
        if shards:
            # bitsandbytes keeps fp32 state for tensors under 4096 elements; it only sees shards
            # here, so scale the threshold to keep 8-bit state for the same (whole) tensors.
            n = shards[0].device_mesh.size()
            return LocalShardOptimizer(params, lambda ps: bnb.optim.AdamW8bit(ps, min_8bit_size=max(1, 4096 // n), **kw))
        return bnb.optim.AdamW8bit(params, **kw)
    if name != "adamw":
        raise ValueError(f"train.optimizer: unknown optimizer {name!r}; known: adamw, adamw8bit")
    on_cuda = all(local(p).is_cuda for p in params)
    return torch.optim.AdamW(params, fused=on_cuda or None, foreach=None if on_cuda else True, **kw)


# ---------------------------------------------------------------------------------------- memory

def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes this rank holds for ``tensors`` (a DTensor counts its local shard only)."""
    return sum(local(t).numel() * local(t).element_size() for t in tensors if isinstance(t, Tensor))


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of optimizer state on this rank (moments, 8-bit codes and block scales; shared
    quantization maps counted once)."""
    seen: set[int] = set()
    total = 0
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, Tensor) and id(v) not in seen:
                seen.add(id(v))
                total += tensor_bytes([v])
    return total


def training_memory(params: list[Tensor], optimizer) -> dict[str, int]:
    """This rank's bytes of trainable weights, their gradients and the optimizer state."""
    return {"params": tensor_bytes(params),
            "grads": tensor_bytes(p.grad for p in params if p.grad is not None),
            "optimizer": optimizer_state_bytes(optimizer)}


def peak_memory_bytes(device: torch.device) -> int | None:
    """Peak allocated accelerator memory since the last reset (None on CPU, where the allocator
    keeps no such counter)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return None
