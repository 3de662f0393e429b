"""Every compile-time specialisation of the fused kernels, in one table.

The launchers (sde_step.py, grpo_loss.py, _common.py) launch each kernel through ``Spec.launch``,
which checks the constexpr values, every pointer's dtype and every integer's range against this
table before the launch, so nothing outside the table reaches a kernel. The compile check
(``python -m fastflow.kernels.compile_report``, run by tests/test_kernel_compile.py) compiles
everything ``Spec.enumerate`` yields for sm_80 and sm_90, and compares each table entry with its
kernel's parameters, so a new constexpr, pointer or flag cannot escape it.

Two kinds of variation Triton adds on its own, per launch, are covered as follows:
- pointer dtypes: fixed float32 except the velocity roles, which take every dtype in FLOATS
  (the launchers convert other inputs to float32 first: exact, and never needed by the sampler or
  the trainer, whose latents and noise are float32);
- integer values: Triton specialises an integer argument equal to 1 as a constant and marks
  pointers and integers divisible by 16. The enumeration compiles every combination with all of
  them divisible by 16 (``aligned``: the real latent sizes), and every constexpr combination once
  more with none divisible (``unaligned``: odd test shapes) and once with every integer that can
  be 1 equal to 1 (``ones``: a one-element, one-sample launch). The per-sample scalar strides are
  never specialised (``do_not_specialize``), so a sigma given as a float, one tensor element or
  one per sample runs the same binary.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

F32, BF16, F16, I64 = "fp32", "bf16", "fp16", "i64"
#: Input dtypes the velocity roles accept (and the compile check covers).
FLOATS = (F32, BF16, F16)

KIND_IDS = {"sde": 0, "cps": 1, "ode": 2}
NOISE_TENSOR, NOISE_PHILOX, NOISE_GIVEN_NEXT = 0, 1, 2

#: Warps of every kernel; fixed because tl.sum's order follows the thread layout. Eight warps
#: hold a 1024-element block as four elements per thread: no register spills on sm_80 / sm_90
#: (four warps spilled a few bytes in some specialisations), and float32 and 16-bit loads share a
#: layout (no conversion through shared memory).
NUM_WARPS = 8
#: Options of every launch (and of every compile in the check). FMA contraction is off so that each
#: floating-point operation rounds as written, as in the PyTorch reference and the interpreter.
LAUNCH_OPTIONS = {"num_warps": NUM_WARPS, "enable_fp_fusion": False}

#: Reduction geometry of the per-element kernels: a program sums ITERS blocks of BLOCK elements of
#: one sample, whatever the sample's size (shorter samples are masked).
BLOCK, ITERS = 1024, 4
CHUNK = BLOCK * ITERS
#: Loop widths of the per-sample finalize kernel (chunk partials) and the batch-wide loss kernel.
BLOCK_C, BLOCK_B = 64, 64

#: CUDA's grid limits (any GPU of compute capability >= 3.0): 2**31 - 1 programs on axis 0,
#: 65,535 on axes 1 and 2. The batch runs on axis 0, a sample's chunks on axis 1.
MAX_GRID_X, MAX_GRID_Y = 2**31 - 1, 65535
MAX_BATCH = MAX_GRID_X
MAX_ELEMENTS = MAX_GRID_Y * CHUNK  # per sample

#: The integer range of an i32 kernel argument (larger values would compile an i64 variant).
I32_MIN, I32_MAX = -(2**31), 2**31 - 1


def check_grid(batch: int, chunks: int, what: str) -> None:
    """One clear error when a launch would exceed CUDA's grid limits."""
    if batch > MAX_BATCH:
        raise ValueError(f"{what}: batch {batch} exceeds the kernels' limit {MAX_BATCH} "
                         "(CUDA grid axis 0)")
    if chunks > MAX_GRID_Y:
        raise ValueError(f"{what}: {chunks * CHUNK} elements per sample exceed the kernels' limit "
                         f"{MAX_ELEMENTS} ({MAX_GRID_Y} chunks of {CHUNK}, CUDA grid axis 1)")


def torch_dtype_name(dtype) -> str:
    """'fp32' / 'bf16' / 'fp16' / 'i64' for a torch dtype, else its repr (never in the table)."""
    import torch

    return {torch.float32: F32, torch.bfloat16: BF16, torch.float16: F16,
            torch.int64: I64}.get(dtype, repr(dtype))


@dataclass(frozen=True)
class Spec:
    """One kernel's specialisations.

    args: the kernel's parameters in order, each "ptr", "f32" (a python float), "i32" or
        "constexpr"; the compile check asserts this equals the kernel's signature.
    constexprs: each constexpr's allowed values; ``derived`` fills those computed from others.
    valid: whether the launchers can request a combination (the rest is never compiled, and
        ``pick`` refuses it).
    pointer_role: (pointer, constexprs) -> a fixed dtype (F32, I64) or a role name in ``roles``.
    roles: each role's dtypes.
    ones: integer arguments that are 1 in a one-element, one-sample launch.
    no_specialize: integer arguments Triton must not specialise on value.
    """

    name: str
    module: str
    args: tuple[tuple[str, str], ...]
    constexprs: dict[str, tuple]
    pointer_role: Callable[[str, dict], str]
    roles: dict[str, tuple[str, ...]] = field(default_factory=dict)
    valid: Callable[[dict], bool] = lambda c: True
    derived: Callable[[dict], dict] = lambda c: {}
    ones: tuple[str, ...] = ()
    no_specialize: tuple[str, ...] = ()

    # -- what the launchers call -------------------------------------------------------------
    def pick(self, **given) -> dict:
        """The full constexpr assignment for the given flags; a combination outside the table
        raises (so the compile check, which enumerates the table, has compiled it)."""
        const = {k: v for k, v in ((k, vals[0]) for k, vals in self.constexprs.items())
                 if len(self.constexprs[k]) == 1}
        const.update(given)
        const.update(self.derived(const))
        for k, v in const.items():
            if k not in self.constexprs or v not in self.constexprs[k]:
                raise ValueError(f"{self.name}: constexpr {k}={v!r} is not in kernels/specs.py")
        if set(const) != set(self.constexprs) or not self.valid(const):
            raise ValueError(f"{self.name}: constexprs {const} are not a specialisation in "
                             "kernels/specs.py")
        return const

    def launch(self, fn, grid, **kwargs) -> None:
        """Check every argument against the table, then launch ``fn[grid]`` with the table's
        constexprs (given as flags in kwargs) and LAUNCH_OPTIONS."""
        const = self.pick(**{k: kwargs.pop(k) for k in list(kwargs) if k in self.constexprs})
        role_dtypes = {}
        for name, kind in self.args:
            if kind == "constexpr":
                continue
            v = kwargs[name]
            if kind == "ptr":
                want = self.pointer_role(name, const)
                allowed = self.roles.get(want, (want,))
                got = torch_dtype_name(v.dtype)
                if got not in allowed:
                    raise TypeError(f"{self.name}: {name} is {got}, the table allows {allowed}")
                # The pointers of one role share a dtype (the compile check compiles them so).
                if role_dtypes.setdefault(want, got) != got:
                    raise TypeError(f"{self.name}: the {want} pointers mix {role_dtypes[want]} "
                                    f"and {got}")
            elif kind == "i32":
                if not isinstance(v, int) or not I32_MIN <= v <= I32_MAX:
                    raise ValueError(f"{self.name}: {name}={v!r} is not an int32")
            elif not isinstance(v, float):
                raise TypeError(f"{self.name}: {name} must be a python float, got {type(v).__name__}")
        if len(kwargs) != sum(kind != "constexpr" for _, kind in self.args):
            raise TypeError(f"{self.name}: unexpected arguments "
                            f"{sorted(set(kwargs) - {n for n, _ in self.args})}")
        fn[grid](**kwargs, **const, **LAUNCH_OPTIONS)

    # -- what the compile check calls --------------------------------------------------------
    def combinations(self):
        """Every constexpr assignment the launchers can request."""
        free = {k: v for k, v in self.constexprs.items()}
        names = list(free)
        seen = []
        for values in itertools.product(*(free[k] for k in names)):
            const = dict(zip(names, values))
            if const != {**const, **self.derived(const)} or not self.valid(const):
                continue
            seen.append(const)
        return seen

    def specialisations(self):
        """(constexprs, pointer dtypes, variant) for every specialisation to compile."""
        out = []
        for const in self.combinations():
            ptrs = [n for n, kind in self.args if kind == "ptr"]
            roles = {n: self.pointer_role(n, const) for n in ptrs}
            used = sorted({r for r in roles.values() if r in self.roles})
            for choice in itertools.product(*(self.roles[r] for r in used)):
                pick = dict(zip(used, choice))
                out.append((const, {n: pick.get(r, r) for n, r in roles.items()}, "aligned"))
            # Value specialisations once per combination, at the first dtype of each role that is
            # not float32 (the sampler's and trainer's bf16 velocity).
            base = {r: next((d for d in self.roles[r] if d != F32), self.roles[r][0]) for r in used}
            dtypes = {n: base.get(r, r) for n, r in roles.items()}
            out.append((const, dtypes, "unaligned"))
            out.append((const, dtypes, "ones"))
        return out

    def signature(self, dtypes: dict, variant: str):
        """(signature, attrs, constexpr values of specialised integers) for triton's ASTSource."""
        sig, attrs, ones = {}, {}, {}
        for i, (name, kind) in enumerate(self.args):
            if kind == "ptr":
                sig[name] = "*" + dtypes[name]
            elif kind == "f32":
                sig[name] = "fp32"
            elif kind == "i32":
                if variant == "ones" and name in self.ones and name not in self.no_specialize:
                    sig[name] = "constexpr"
                    ones[name] = 1
                    continue
                sig[name] = "i32"
            else:
                sig[name] = "constexpr"
                continue
            if variant != "unaligned" and kind != "f32" and name not in self.no_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
        return sig, attrs, ones


def _args(spec: str) -> tuple[tuple[str, str], ...]:
    """'a:ptr b:i32 ...' -> (("a", "ptr"), ("b", "i32"), ...)."""
    return tuple(tuple(item.split(":")) for item in spec.split())


_SIGMA_ARGS = "sig_ptr:ptr sig_s:i32 sig_v:f32 nxt_ptr:ptr nxt_s:i32 nxt_v:f32 " \
              "grd_ptr:ptr grd_s:i32 grd_v:f32 a:f32 sin_a:f32"
_SIGMA_STRIDES = ("sig_s", "nxt_s", "grd_s")


def _sde_role(name: str, c: dict) -> str:
    if name in ("u_ptr", "c_ptr"):
        return "velocity"
    if name in ("seed_ptr", "off_ptr"):
        return I64 if c["NOISE"] == NOISE_PHILOX else F32
    return F32


SDE_STEP = Spec(
    name="_sde_step_kernel", module="fastflow.kernels.sde_step",
    args=_args("x_ptr:ptr sx:i32 u_ptr:ptr su:i32 c_ptr:ptr sc:i32 w:f32 n_ptr:ptr sn_:i32 "
               "y_ptr:ptr sy:i32 seed_ptr:ptr off_ptr:ptr out_ptr:ptr mean_ptr:ptr part_ptr:ptr "
               + _SIGMA_ARGS + " N:i32 C:i32 KIND:constexpr CFG:constexpr NOISE:constexpr "
               "WRITE_OUT:constexpr WRITE_MEAN:constexpr BLOCK:constexpr ITERS:constexpr"),
    constexprs={"KIND": (0, 1, 2), "CFG": (False, True),
                "NOISE": (NOISE_TENSOR, NOISE_PHILOX, NOISE_GIVEN_NEXT),
                "WRITE_OUT": (False, True), "WRITE_MEAN": (False, True),
                "BLOCK": (BLOCK,), "ITERS": (ITERS,)},
    # The ODE step draws no noise: the launcher never asks for Philox with it, nor launches it
    # for a given next sample without the mean (nothing to compute).
    valid=lambda c: c["KIND"] != KIND_IDS["ode"] or (
        c["NOISE"] == NOISE_TENSOR or (c["NOISE"] == NOISE_GIVEN_NEXT and c["WRITE_MEAN"])),
    # A given next sample is not written again.
    derived=lambda c: {"WRITE_OUT": c["NOISE"] != NOISE_GIVEN_NEXT},
    pointer_role=_sde_role, roles={"velocity": FLOATS},
    ones=("sx", "su", "sc", "sn_", "sy", "N", "C"), no_specialize=_SIGMA_STRIDES,
)


def _loss_role(name: str, c: dict) -> str:
    if name in ("u_ptr", "c_ptr", "du_ptr", "dc_ptr"):
        return "velocity"
    if name in ("ru_ptr", "rc_ptr"):
        return "reference" if c["HAS_KL"] else F32
    return F32


_LOSS_CONSTEXPRS = {"KIND": (0, 1), "CFG": (False, True), "REF_CFG": (False, True),
                    "HAS_KL": (False, True), "BLOCK": (BLOCK,), "ITERS": (ITERS,)}


def _loss_valid(c: dict) -> bool:
    return c["HAS_KL"] or not c["REF_CFG"]  # REF_CFG only means something with a reference


GRPO_FWD = Spec(
    name="_fwd_kernel", module="fastflow.kernels.grpo_loss",
    args=_args("x_ptr:ptr sx:i32 y_ptr:ptr sy:i32 u_ptr:ptr su:i32 c_ptr:ptr sc:i32 w:f32 "
               "ru_ptr:ptr sru:i32 rc_ptr:ptr src:i32 wr:f32 part_lp_ptr:ptr part_kl_ptr:ptr "
               + _SIGMA_ARGS + " N:i32 C:i32 KIND:constexpr CFG:constexpr REF_CFG:constexpr "
               "HAS_KL:constexpr BLOCK:constexpr ITERS:constexpr"),
    constexprs=_LOSS_CONSTEXPRS, valid=_loss_valid, pointer_role=_loss_role,
    roles={"velocity": FLOATS, "reference": FLOATS},
    ones=("sx", "sy", "su", "sc", "sru", "src", "N", "C"), no_specialize=_SIGMA_STRIDES,
)

GRPO_BWD = Spec(
    name="_bwd_kernel", module="fastflow.kernels.grpo_loss",
    args=_args("x_ptr:ptr sx:i32 y_ptr:ptr sy:i32 u_ptr:ptr su:i32 c_ptr:ptr sc:i32 w:f32 "
               "ru_ptr:ptr sru:i32 rc_ptr:ptr src:i32 wr:f32 du_ptr:ptr dc_ptr:ptr dlp_ptr:ptr "
               "g_ptr:ptr kl_coef:f32 " + _SIGMA_ARGS + " N:i32 KIND:constexpr CFG:constexpr "
               "REF_CFG:constexpr HAS_KL:constexpr BLOCK:constexpr ITERS:constexpr"),
    constexprs=_LOSS_CONSTEXPRS, valid=_loss_valid, pointer_role=_loss_role,
    roles={"velocity": FLOATS, "reference": FLOATS},
    ones=("sx", "sy", "su", "sc", "sru", "src", "N"), no_specialize=_SIGMA_STRIDES,
)

FINALIZE = Spec(
    name="finalize_kernel", module="fastflow.kernels._common",
    args=_args("part_lp_ptr:ptr part_kl_ptr:ptr lp_ptr:ptr kl_ptr:ptr std_ptr:ptr "
               + _SIGMA_ARGS + " N:i32 C:i32 KIND:constexpr HAS_KL:constexpr BLOCK_C:constexpr"),
    # The ODE step has no log-prob: sde_step returns before finalizing it.
    constexprs={"KIND": (0, 1), "HAS_KL": (False, True), "BLOCK_C": (BLOCK_C,)},
    pointer_role=lambda name, c: F32, ones=("N", "C"), no_specialize=_SIGMA_STRIDES,
)

GRPO_LOSS = Spec(
    name="_loss_kernel", module="fastflow.kernels.grpo_loss",
    args=_args("lp_ptr:ptr kl_ptr:ptr old_ptr:ptr adv_ptr:ptr dlp_ptr:ptr loss_ptr:ptr "
               "stats_ptr:ptr B:i32 lo:f32 hi:f32 clip:f32 beta:f32 "
               "HAS_KL:constexpr BLOCK_B:constexpr"),
    constexprs={"HAS_KL": (False, True), "BLOCK_B": (BLOCK_B,)},
    pointer_role=lambda name, c: F32, ones=("B",),
)

#: Every kernel the launchers launch.
SPECS = (SDE_STEP, FINALIZE, GRPO_FWD, GRPO_BWD, GRPO_LOSS)
