"""fastflow.kernels: fused Triton kernels for Flow-GRPO (installed from the repository's kernels/).

- sde_step.sde_step: the rollout step (CFG combine, optional in-kernel Philox noise, log-prob).
- grpo_loss.grpo_step_loss: the training objective (log-prob, KL, clipped loss, stats) with a
  one-pass backward to the velocity.

Import needs triton. Set TRITON_INTERPRET=1 before importing to run them on CPU tensors through
Triton's interpreter (the parity tests do); ``INTERPRETED`` records which mode they were built in.
Use them through fastflow.ops, which picks them or the PyTorch reference.

specs.py holds every compile-time specialisation the launchers can request (they launch through
it); ``python -m fastflow.kernels.compile_report`` compiles them all for sm_80 and sm_90 without a
GPU. docs/kernels.md describes the kernels, their specialisations and their numerics.
"""

if __name__ == "kernels":
    # Imported under the bare name through the repository root on sys.path (`python -m ...` from a
    # checkout) by a library probing for the unrelated PyPI package `kernels` (transformers,
    # bitsandbytes, diffusers). Look like an empty namespace package, which those probes treat as
    # "not installed", and import nothing: our kernels load only as fastflow.kernels.
    __file__ = None
    __path__ = []
else:
    from ._common import INTERPRETED, geometry  # noqa: F401
    from .grpo_loss import grpo_step_loss  # noqa: F401
    from .sde_step import sde_step, sde_step_differentiable  # noqa: F401
