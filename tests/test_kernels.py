"""Parity of the fused Triton kernels (fastflow.kernels via fastflow.ops) with the PyTorch reference.

On a CPU the kernels run through Triton's interpreter: TRITON_INTERPRET=1 must be set before the
kernel modules are decorated, so it is set here, before anything imports fastflow.kernels (and the
modules are re-imported if another test imported them compiled). With CUDA the same tests run the
compiled kernels on the GPU (the "cuda" device param) and the CPU variants skip.
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

if "fastflow.kernels" in sys.modules and not sys.modules["fastflow.kernels"].INTERPRETED \
        and os.environ.get("TRITON_INTERPRET") == "1":
    for name in [m for m in sys.modules if m == "fastflow.kernels" or m.startswith("fastflow.kernels.")]:
        del sys.modules[name]
kernels = importlib.import_module("fastflow.kernels")

from fastflow import grpo, ops, sde  # noqa: E402
from fastflow.sde import GuidedVelocity  # noqa: E402

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not kernels.INTERPRETED,
                                                 reason="kernels compiled for CUDA, not interpreted")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available() or kernels.INTERPRETED, reason="needs CUDA")]),
]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Both paths convert the inputs to float32 first, so forward values differ only by float32
# rounding order; gradients are rounded to the velocity's dtype, where one ulp can flip.
GRAD_RTOL = {"fp32": 1e-5, "bf16": 1e-2, "fp16": 2e-3}
# Odd, non-power-of-two latent shapes; the last spans several reduction chunks.
SHAPES = {"3x4x5x7": (3, 4, 5, 7), "2x1x33": (2, 1, 33), "2x3x37x41": (2, 3, 37, 41)}
# (sigma, sigma_next, guard): sigma == 1 (needs the guard), near 0, and per-sample mixed tensors.
SIGMAS = {
    "at_one": (1.0, 0.9, 0.9),
    "near_zero": (0.02, 0.0, None),
    "mixed": ("mixed", "mixed", 0.9),
}


@pytest.fixture(autouse=True)
def _triton_path(monkeypatch):
    monkeypatch.setenv("FASTFLOW_KERNELS", "triton")


def _sigmas(case, batch, device):
    s, s_next, guard = SIGMAS[case]
    if s == "mixed":  # one sample at sigma == 1, the others inside the grid
        s = torch.tensor([1.0, 0.55, 0.31, 0.8, 0.2][:batch], device=device)
        s_next = s - torch.tensor([0.1, 0.15, 0.3, 0.05, 0.2][:batch], device=device)
    return s, s_next, guard


def _velocity(shape, dtype, device, cfg, scale=4.5, requires_grad=False, gen=None):
    def t():
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(requires_grad)
    return GuidedVelocity(t(), t(), scale) if cfg else t()


def _rmse_close(out, ref, rtol, atol=1e-7, what=""):
    """RMSE of the difference within rtol of the reference's RMS (reductions / gradients)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    # Degenerate inputs (cps with KL at sigma_next == 0: std_t == 0) give inf / NaN in the
    # reference: the kernel must give the same non-finite values there, and match elsewhere.
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), finite), f"{what}: finiteness differs"
    assert torch.equal(out[torch.isinf(ref)], ref[torch.isinf(ref)]), f"{what}: infinities differ"
    out, ref = out[finite], ref[finite]
    if ref.numel() == 0:
        return
    err = (out - ref).pow(2).mean().sqrt().item()
    scale = ref.pow(2).mean().sqrt().item()
    assert err <= rtol * scale + atol, f"{what}: rmse {err:.3e} vs reference rms {scale:.3e}"


def _grads(v):
    return (v.uncond.grad, v.cond.grad) if isinstance(v, GuidedVelocity) else (v.grad,)


# ------------------------------------------------------------------------------------------------
# Rollout step
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "nocfg"])
@pytest.mark.parametrize("sigma_case", list(SIGMAS))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kind", ["sde", "cps", "ode"])
def test_sde_step_matches_reference(device, cfg, sigma_case, dtype, shape, kind):
    gen = torch.Generator().manual_seed(0)
    shp = SHAPES[shape]
    x = torch.randn(shp, generator=gen).to(device=device, dtype=DTYPES[dtype])
    v = _velocity(shp, DTYPES[dtype], device, cfg, gen=gen)
    noise = torch.randn(shp, generator=gen).to(device)
    s, s_next, guard = _sigmas(sigma_case, shp[0], device)
    kw = dict(noise_level=0.7, kind=kind, noise=noise, sigma_guard=guard)
    out = ops.sde_step(x, v, s, s_next, **kw)
    ref = sde.sde_step(x, v, s, s_next, **kw)
    assert out.prev_sample.dtype == torch.float32 and out.prev_sample.shape == x.shape
    torch.testing.assert_close(out.mean, ref.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.prev_sample, ref.prev_sample, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.std, ref.std, rtol=1e-6, atol=0)
    if kind == "ode":
        assert out.log_prob is None
    else:
        assert out.log_prob.shape == (shp[0],)
        _rmse_close(out.log_prob, ref.log_prob, 1e-5, what="log_prob")
        # Evaluating the sampled transition (prev_sample given) reproduces its log-prob exactly.
        again = ops.sde_step(x, v, s, s_next, noise_level=0.7, kind=kind, sigma_guard=guard,
                             prev_sample=out.prev_sample)
        assert torch.equal(again.log_prob, out.log_prob)


@pytest.mark.parametrize("device", DEVICES)
def test_sde_step_noncontiguous_inputs(device):
    gen = torch.Generator().manual_seed(1)
    traj = torch.randn(4, 3, 2, 5, 9, generator=gen).to(device)  # [B, K, ...]: slice a step
    x = traj[:, 1]
    v = torch.randn(4, 2, 9, 5, generator=gen).to(device).transpose(2, 3)  # strided inner dims
    noise = torch.randn(4, 2, 5, 9, generator=gen).to(device)
    assert not x.is_contiguous() and not v.is_contiguous()
    out = ops.sde_step(x, v, 0.6, 0.4, noise_level=0.7, noise=noise)
    ref = sde.sde_step(x, v, 0.6, 0.4, noise_level=0.7, noise=noise)
    torch.testing.assert_close(out.prev_sample, ref.prev_sample, rtol=1e-5, atol=1e-5)
    _rmse_close(out.log_prob, ref.log_prob, 1e-5, what="log_prob")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_sde_step_batch_invariant(device, kind):
    """Sample b's log-prob and next sample are bitwise the same at any batch size and position."""
    gen = torch.Generator().manual_seed(2)
    shp = (5, 3, 37, 41)  # several reduction chunks per sample
    x = torch.randn(shp, generator=gen).to(device)
    v = GuidedVelocity(torch.randn(shp, generator=gen).to(device), torch.randn(shp, generator=gen).to(device), 4.5)
    noise = torch.randn(shp, generator=gen).to(device)
    s = torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2], device=device)
    kw = dict(noise_level=0.7, kind=kind, sigma_guard=0.9)
    full = ops.sde_step(x, v, s, s - 0.1, noise=noise, **kw)
    for idx in ([3], [4, 1], [2, 0, 3]):
        i = torch.tensor(idx, device=device)
        part = ops.sde_step(x[i], GuidedVelocity(v.uncond[i], v.cond[i], 4.5), s[i], s[i] - 0.1,
                            noise=noise[i], **kw)
        assert torch.equal(part.log_prob, full.log_prob[i])
        assert torch.equal(part.prev_sample, full.prev_sample[i])


@pytest.mark.parametrize("device", DEVICES)
def test_sde_step_philox_noise(device):
    batch, shp = 2, (2, 8, 64, 16)  # 16384 draws
    x = torch.zeros(shp, device=device)
    v = torch.zeros(shp, device=device)
    seed = torch.tensor([1234], dtype=torch.int64, device=device)
    offset = torch.tensor([0], dtype=torch.int64, device=device)
    kw = dict(noise_level=0.7, seed=seed, sigma_guard=0.9)
    sigma, sigma_next = 0.5, 0.3
    a = ops.sde_step_philox(x, v, sigma, sigma_next, offset=offset, **kw)
    numel = x.numel()
    assert offset.item() == numel  # advanced in place for the next step / graph replay
    step_std = (a.std * (sigma - sigma_next) ** 0.5).reshape(batch, 1, 1, 1)
    eps = a.prev_sample / step_std  # mean is 0 for x = v = 0
    assert abs(eps.mean().item()) < 0.04 and abs(eps.std().item() - 1) < 0.03
    assert abs(eps.pow(3).mean().item()) < 0.1  # symmetric
    b = ops.sde_step_philox(x, v, sigma, sigma_next, offset=offset, **kw)
    assert not torch.allclose(a.prev_sample, b.prev_sample)  # a fresh offset gives fresh noise
    again = ops.sde_step_philox(x, v, sigma, sigma_next,
                                offset=torch.tensor([0], dtype=torch.int64, device=device), **kw)
    assert torch.equal(again.prev_sample, a.prev_sample)  # reproducible from (seed, offset)
    # Sample b draws counters offset + b * N + i: sample 1 at offset 0 is sample 0 at offset N.
    n = numel // batch
    shifted = ops.sde_step_philox(x[:1], v[:1], sigma, sigma_next,
                                  offset=torch.tensor([n], dtype=torch.int64, device=device), **kw)
    assert torch.equal(shifted.prev_sample[0], a.prev_sample[1])
    other = ops.sde_step_philox(x, v, sigma, sigma_next,
                                offset=torch.tensor([0], dtype=torch.int64, device=device),
                                noise_level=0.7, seed=seed + 1, sigma_guard=0.9)
    assert not torch.allclose(other.prev_sample, a.prev_sample)
    # Its log-prob is the reference's for the sample it produced.
    ref = sde.sde_step(x, v, sigma, sigma_next, noise_level=0.7, prev_sample=a.prev_sample)
    _rmse_close(a.log_prob, ref.log_prob, 1e-5, what="log_prob")


# ------------------------------------------------------------------------------------------------
# Training loss
# ------------------------------------------------------------------------------------------------


def _loss_case(device, dtype, shape, cfg, kl, kind, sigma_case, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shp = SHAPES[shape]
    x = torch.randn(shp, generator=gen).to(device)
    y = torch.randn(shp, generator=gen).to(device)
    s, s_next, guard = _sigmas(sigma_case, shp[0], device)
    v = _velocity(shp, DTYPES[dtype], device, cfg, gen=gen)
    vr = _velocity(shp, DTYPES[dtype], device, cfg, gen=gen) if kl else None
    # old log-probs near the current ones: ratios around 1, some clipped, some not.
    y = sde.sde_step(x, v, s, s_next, noise_level=0.7, kind=kind, sigma_guard=guard).prev_sample
    lp = sde.sde_step(x, v, s, s_next, noise_level=0.7, kind=kind, sigma_guard=guard, prev_sample=y).log_prob
    old = lp + 0.05 * torch.randn(shp[0], generator=gen).to(device)
    adv = torch.randn(shp[0], generator=gen).to(device)
    kw = dict(noise_level=0.7, clip_range=0.04, beta=0.04 if kl else 0.0, velocity_ref=vr, kind=kind,
              sigma_guard=guard)
    return x, y, v, s, s_next, old, adv, kw


def _run_loss(fn, x, y, v, s, s_next, old, adv, kw):
    parts = (v.uncond, v.cond) if isinstance(v, GuidedVelocity) else (v,)
    leaves = [p.detach().clone().requires_grad_() for p in parts]
    vel = GuidedVelocity(leaves[0], leaves[1], v.scale) if len(leaves) == 2 else leaves[0]
    loss, stats = fn(x, y, vel, s, s_next, old, adv, **kw)
    loss.backward()
    return loss, stats, [leaf.grad for leaf in leaves]


# cps with KL at sigma_next == 0 divides by std_t == 0 (inf in the reference too): no warnings.
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kl", [True, False], ids=["kl", "nokl"])
@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "nocfg"])
@pytest.mark.parametrize("sigma_case", list(SIGMAS))
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_grpo_step_loss_matches_reference(device, kl, cfg, sigma_case, dtype, kind):
    case = _loss_case(device, dtype, "3x4x5x7", cfg, kl, kind, sigma_case)
    loss, stats, grads = _run_loss(ops.grpo_step_loss, *case)
    loss_r, stats_r, grads_r = _run_loss(grpo.grpo_step_loss, *case)
    assert loss.shape == () and loss.dtype == torch.float32
    _rmse_close(loss, loss_r, 1e-5, atol=1e-6, what="loss")
    assert set(stats) == set(stats_r)
    for k in stats:
        _rmse_close(stats[k], stats_r[k], 1e-5, atol=1e-6, what=k)
    if kl:
        assert stats["kl"].item() > 0
    for g, gr in zip(grads, grads_r):
        assert g.dtype == gr.dtype and g.shape == gr.shape
        _rmse_close(g, gr, GRAD_RTOL[dtype], atol=1e-9, what="velocity grad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_grpo_step_loss_multichunk_noncontiguous(device, kind):
    """Several reduction chunks per sample, trajectory slices as inputs, CFG and KL."""
    gen = torch.Generator().manual_seed(3)
    shp = (2, 3, 37, 41)
    lat = torch.randn(2, 3, *shp[1:], generator=gen).to(device)
    x, y = lat[:, 0], lat[:, 2]
    assert not x.is_contiguous()
    v = _velocity(shp, torch.bfloat16, device, True, gen=gen)
    vr = _velocity(shp, torch.bfloat16, device, True, gen=gen)
    s, s_next = torch.tensor([1.0, 0.7], device=device), torch.tensor([0.9, 0.5], device=device)
    lp = sde.sde_step(x, v, s, s_next, noise_level=0.7, kind=kind, sigma_guard=0.9, prev_sample=y).log_prob
    old = lp + torch.tensor([0.01, -0.03], device=device)
    adv = torch.tensor([1.0, -0.5], device=device)
    kw = dict(noise_level=0.7, clip_range=0.02, beta=0.01, velocity_ref=vr, kind=kind, sigma_guard=0.9)
    loss, stats, grads = _run_loss(ops.grpo_step_loss, x, y, v, s, s_next, old, adv, kw)
    loss_r, stats_r, grads_r = _run_loss(grpo.grpo_step_loss, x, y, v, s, s_next, old, adv, kw)
    _rmse_close(loss, loss_r, 1e-5, atol=1e-6, what="loss")
    for k in stats:
        _rmse_close(stats[k], stats_r[k], 1e-5, atol=1e-6, what=k)
    for g, gr in zip(grads, grads_r):
        _rmse_close(g, gr, GRAD_RTOL["bf16"], atol=1e-9, what="velocity grad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_on_policy_ratio_is_exactly_one(device, kind):
    """The training kernel reproduces the rollout kernel's log-probs bitwise, also on a
    rearranged batch: ratio == 1 and approx_kl == 0 exactly on-policy."""
    gen = torch.Generator().manual_seed(4)
    shp = (4, 3, 37, 41)
    x = torch.randn(shp, generator=gen).to(device)
    v = _velocity(shp, torch.bfloat16, device, True, gen=gen)
    s = torch.tensor([1.0, 0.8, 0.5, 0.3], device=device)
    out = ops.sde_step(x, v, s, s - 0.1, noise_level=0.7, kind=kind, sigma_guard=0.9,
                       noise=torch.randn(shp, generator=gen).to(device), need_mean=False)
    assert out.mean is None
    i = torch.tensor([2, 0, 3], device=device)
    vi = GuidedVelocity(v.uncond[i].requires_grad_(), v.cond[i].requires_grad_(), 4.5)
    loss, stats = ops.grpo_step_loss(x[i], out.prev_sample[i], vi, s[i], s[i] - 0.1, out.log_prob[i],
                                     torch.tensor([1.0, -1.0, 0.5], device=device), noise_level=0.7,
                                     clip_range=1e-4, kind=kind, sigma_guard=0.9)
    assert stats["ratio_min"].item() == 1.0 and stats["ratio_max"].item() == 1.0
    assert stats["approx_kl"].item() == 0.0 and stats["clipfrac"].item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_grpo_step_loss_no_grad_to_samples_or_reference(device):
    case = _loss_case(device, "fp32", "2x1x33", False, True, "sde", "mixed")
    x, y, v, s, s_next, old, adv, kw = case
    x = x.clone().requires_grad_()
    kw["velocity_ref"] = kw["velocity_ref"].clone().requires_grad_()
    vel = v.clone().requires_grad_()
    loss, _ = ops.grpo_step_loss(x, y, vel, s, s_next, old, adv, **kw)
    loss.backward()
    assert vel.grad is not None and vel.grad.abs().sum() > 0
    assert x.grad is None and kw["velocity_ref"].grad is None


# ------------------------------------------------------------------------------------------------
# Real latent geometries
# ------------------------------------------------------------------------------------------------

# SD3.5 latents 16x64x64 (65,536 elements per sample, 16 reduction chunks), two samples with
# per-sample sigma tensors, one at sigma == 1; FLUX.1 at 1024 px, packed latents 4096 x 64
# (262,144 elements, 64 chunks), one sample with python-float sigmas (passed by value).
REAL = {"sd35_16x64x64": (2, 16, 64, 64), "flux_4096x64": (1, 4096, 64)}


def _real_sigmas(shape, device):
    if shape[0] == 2:
        s = torch.tensor([1.0, 0.55], device=device)
        return s, s - torch.tensor([0.1, 0.15], device=device), 0.9
    return 0.55, 0.45, None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "nocfg"])
@pytest.mark.parametrize("kind", ["sde", "cps"])
@pytest.mark.parametrize("geometry", list(REAL))
def test_sde_step_real_sizes(device, cfg, kind, geometry):
    gen = torch.Generator().manual_seed(7)
    shp = REAL[geometry]
    x = torch.randn(shp, generator=gen).to(device)
    v = _velocity(shp, torch.bfloat16, device, cfg, gen=gen)
    noise = torch.randn(shp, generator=gen).to(device)
    s, s_next, guard = _real_sigmas(shp, device)
    kw = dict(noise_level=0.7, kind=kind, noise=noise, sigma_guard=guard)
    out = ops.sde_step(x, v, s, s_next, **kw)
    ref = sde.sde_step(x, v, s, s_next, **kw)
    torch.testing.assert_close(out.mean, ref.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.prev_sample, ref.prev_sample, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.std, ref.std, rtol=1e-6, atol=0)
    _rmse_close(out.log_prob, ref.log_prob, 1e-5, what="log_prob")
    # The training kernel reproduces the rollout's log-prob bitwise at this size: ratio == 1.
    old = out.log_prob
    vg = GuidedVelocity(v.uncond.requires_grad_(), v.cond.requires_grad_(), v.scale) if cfg \
        else v.requires_grad_()
    _, stats = ops.grpo_step_loss(x, out.prev_sample, vg, s, s_next, old,
                                  torch.ones(shp[0], device=device), noise_level=0.7,
                                  clip_range=1e-4, kind=kind, sigma_guard=guard)
    assert stats["ratio_min"].item() == 1.0 and stats["ratio_max"].item() == 1.0


# CFG halves and a KL reference (every input the loss reads) at both sizes; the plain velocity
# without KL at the SD3.5 size only (the FLUX-size loss is the slowest interpreter case).
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["sde", "cps"])
@pytest.mark.parametrize("geometry,case", [("sd35_16x64x64", "cfg_kl"), ("sd35_16x64x64", "nocfg_nokl"),
                                           ("flux_4096x64", "cfg_kl")])
def test_grpo_step_loss_real_sizes(device, kind, geometry, case):
    cfg = kl = case == "cfg_kl"
    gen = torch.Generator().manual_seed(8)
    shp = REAL[geometry]
    x = torch.randn(shp, generator=gen).to(device)
    s, s_next, guard = _real_sigmas(shp, device)
    v = _velocity(shp, torch.bfloat16, device, cfg, gen=gen)
    vr = _velocity(shp, torch.bfloat16, device, cfg, gen=gen) if kl else None
    y = sde.sde_step(x, v, s, s_next, noise_level=0.7, kind=kind, sigma_guard=guard).prev_sample
    lp = sde.sde_step(x, v, s, s_next, noise_level=0.7, kind=kind, sigma_guard=guard, prev_sample=y).log_prob
    old = lp + 0.02 * torch.randn(shp[0], generator=gen).to(device)
    adv = torch.randn(shp[0], generator=gen).to(device)
    kw = dict(noise_level=0.7, clip_range=0.04, beta=0.04 if kl else 0.0, velocity_ref=vr, kind=kind,
              sigma_guard=guard)
    loss, stats, grads = _run_loss(ops.grpo_step_loss, x, y, v, s, s_next, old, adv, kw)
    loss_r, stats_r, grads_r = _run_loss(grpo.grpo_step_loss, x, y, v, s, s_next, old, adv, kw)
    _rmse_close(loss, loss_r, 1e-5, atol=1e-6, what="loss")
    for k in stats:
        _rmse_close(stats[k], stats_r[k], 1e-5, atol=1e-6, what=k)
    for g, gr in zip(grads, grads_r):
        assert g.dtype == gr.dtype == torch.bfloat16
        _rmse_close(g, gr, GRAD_RTOL["bf16"], atol=1e-9, what="velocity grad")


# ------------------------------------------------------------------------------------------------
# Launches: inside the table of specialisations, batch on grid axis 0, sigmas without copies
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def launches(monkeypatch):
    """Every Spec.launch the launchers make: (spec, grid, kwargs)."""
    specs = importlib.import_module("fastflow.kernels.specs")
    seen, launch = [], specs.Spec.launch

    def record(self, fn, grid, **kwargs):
        seen.append((self, grid, dict(kwargs)))
        return launch(self, fn, grid, **kwargs)

    monkeypatch.setattr(specs.Spec, "launch", record)
    return seen


def _key(spec, kwargs):
    """(constexprs, pointer dtypes) of a recorded launch, as the table enumerates them."""
    specs = importlib.import_module("fastflow.kernels.specs")
    const = spec.pick(**{k: v for k, v in kwargs.items() if k in spec.constexprs})
    dtypes = {n: specs.torch_dtype_name(kwargs[n].dtype) for n, kind in spec.args if kind == "ptr"}
    return repr(sorted(const.items())), repr(sorted(dtypes.items()))


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("device", DEVICES)
def test_launches_stay_inside_the_compiled_table(device, launches):
    """Whatever the callers pass (mixed dtypes included), every launch is a specialisation the
    compile check enumerates, with the batch on grid axis 0 and a sample's chunks on axis 1."""
    gen = torch.Generator().manual_seed(9)
    shp = (3, 3, 37, 41)  # three samples of two chunks
    n = 3 * 37 * 41
    dt = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}

    def t(dtype="f32"):
        return torch.randn(shp, generator=gen).to(device=device, dtype=dt[dtype])

    s = torch.tensor([1.0, 0.6, 0.3], device=device)
    seed = torch.tensor([3], dtype=torch.int64, device=device)
    for kind in ("sde", "cps", "ode"):
        for x_dt, u_dt, c_dt in (("f32", "bf16", "bf16"), ("f16", "bf16", "f16")):
            for v in (GuidedVelocity(t(u_dt), t(c_dt), 4.5), t(u_dt)):
                x = t(x_dt)
                for need_mean in (True, False):
                    kw = dict(noise_level=0.7, kind=kind, sigma_guard=0.9, need_mean=need_mean)
                    out = ops.sde_step(x, v, s, s - 0.1, noise=t("bf16"), **kw)
                    ops.sde_step(x, v, s, s - 0.1, prev_sample=out.prev_sample.to(torch.float16), **kw)
                    if kind != "ode":
                        ops.sde_step_philox(x, v, s, s - 0.1, seed=seed,
                                            offset=torch.zeros(1, dtype=torch.int64, device=device), **kw)
    for kind in ("sde", "cps"):
        for v_dt, r_dt in (("bf16", "f16"), ("f32", "bf16")):
            for cfg in (True, False):
                for ref in (GuidedVelocity(t(r_dt), t(r_dt), 3.0), t(r_dt), None):
                    y = sde.sde_step(t(), t(), s, s - 0.1, noise_level=0.7, kind=kind,
                                     sigma_guard=0.9).prev_sample
                    v = GuidedVelocity(t(v_dt), t(v_dt), 4.5) if cfg else t(v_dt)
                    parts = [p.requires_grad_() for p in _parts(v)]
                    loss, _ = ops.grpo_step_loss(t(), y, v, s, s - 0.1, torch.zeros(3, device=device),
                                                 torch.ones(3, device=device), noise_level=0.7,
                                                 clip_range=0.1, beta=0.04 if ref is not None else 0.0,
                                                 velocity_ref=ref, kind=kind, sigma_guard=0.9)
                    loss.backward()
                    assert all(p.grad.dtype == p.dtype for p in parts)
    enumerated = {}
    for spec, _, _ in launches:
        if spec.name not in enumerated:
            enumerated[spec.name] = {(repr(sorted(c.items())), repr(sorted(d.items())))
                                     for c, d, variant in spec.specialisations() if variant == "aligned"}
    assert {spec.name for spec, _, _ in launches} == {"_sde_step_kernel", "finalize_kernel",
                                                       "_fwd_kernel", "_bwd_kernel", "_loss_kernel"}
    for spec, grid, kwargs in launches:
        assert _key(spec, kwargs) in enumerated[spec.name], (spec.name, _key(spec, kwargs))
        if spec.name == "_loss_kernel":
            assert grid == (1,)
        elif spec.name == "finalize_kernel":
            assert grid == (3,)
        else:
            assert grid == (3, -(-n // 4096)) == (3, 2)


@pytest.mark.parametrize("device", DEVICES)
def test_sigmas_reach_the_kernel_without_copies(device, launches):
    """float32 device tensors are passed as they are; python floats (and one-element tensors held
    elsewhere) by value, with no device tensor made for them; every form gives the same bits."""
    gen = torch.Generator().manual_seed(10)
    shp = (2, 4, 9)
    x, v, noise = (torch.randn(shp, generator=gen).to(device) for _ in range(3))
    s_dev = torch.tensor([0.55, 0.55], device=device)
    forms = {"float": 0.55, "0-d": torch.tensor(0.55, device=device),
             "expanded": torch.tensor(0.55, device=device).expand(2), "per_sample": s_dev,
             "host_0d": torch.tensor(0.55)}  # on the host: by value for a CUDA launch
    by_value = {"float"} | ({"host_0d"} if device == "cuda" else set())
    outs = {}
    for name, sigma in forms.items():
        launches.clear()
        outs[name] = ops.sde_step(x, v, sigma, 0.4, noise_level=0.7, noise=noise, sigma_guard=0.9)
        (_, _, step), (_, _, fin) = launches
        for kw in (step, fin):
            if name in by_value:
                assert kw["sig_s"] == -1 and kw["sig_v"] == pytest.approx(0.55, abs=1e-7)
                assert kw["sig_ptr"] is kw["part_ptr" if "part_ptr" in kw else "part_lp_ptr"]
            else:
                assert kw["sig_ptr"].data_ptr() == sigma.data_ptr()  # no copy
                assert kw["sig_s"] == (1 if name == "per_sample" else 0)
            assert kw["nxt_s"] == -1 and kw["nxt_v"] == 0.4 and kw["grd_v"] == 0.9
    for name, out in outs.items():
        assert torch.equal(out.prev_sample, outs["float"].prev_sample), name
        assert torch.equal(out.log_prob, outs["float"].log_prob), name
        assert torch.equal(out.std, outs["float"].std), name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or kernels.INTERPRETED, reason="needs CUDA")
def test_device_sigmas_do_not_sync():
    """With sigma_guard given, a step with device sigmas makes no host-device synchronisation."""
    x, v, noise = (torch.randn(4, 16, 8, 8, device="cuda") for _ in range(3))
    s = torch.full((4,), 0.8, device="cuda")
    ops.sde_step(x, v, s, s - 0.1, noise_level=0.7, noise=noise, sigma_guard=0.9)  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.sde_step(x, v, s, s - 0.1, noise_level=0.7, noise=noise, sigma_guard=0.9, need_mean=False)
        ops.sde_step(x, v, 0.8, 0.7, noise_level=0.7, noise=noise, sigma_guard=0.9, need_mean=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("device", DEVICES)
def test_batch_and_sample_size_limits(device):
    """One clear error above CUDA's grid limits (batch on axis 0, chunks on axis 1), before anything
    is allocated: the over-limit inputs here are broadcast views of one element."""
    specs = importlib.import_module("fastflow.kernels.specs")
    one = torch.zeros(1, 1, device=device)
    big_batch = one.expand(specs.MAX_BATCH + 1, 1)
    with pytest.raises(ValueError, match="sde_step: batch 2147483648 exceeds the kernels' limit"):
        ops.sde_step(big_batch, big_batch, 0.5, 0.4, noise_level=0.7)
    lp = torch.zeros(1, device=device).expand(specs.MAX_BATCH + 1)
    with pytest.raises(ValueError, match="grpo_step_loss: batch 2147483648 exceeds"):
        ops.grpo_step_loss(big_batch, big_batch, big_batch, 0.5, 0.4, lp, lp, noise_level=0.7,
                           clip_range=1e-4)
    big_sample = one.expand(1, specs.MAX_ELEMENTS + 1)
    with pytest.raises(ValueError, match="elements per sample exceed the kernels' limit"):
        ops.sde_step(big_sample, big_sample, 0.5, 0.4, noise_level=0.7)


@pytest.mark.parametrize("device", DEVICES)
def test_loss_kernel_loops_over_a_large_batch(device):
    """The one-program loss kernel reads the batch 64 samples at a time: 130 samples (three
    loop iterations, the last partial) match the reference."""
    gen = torch.Generator().manual_seed(11)
    shp = (130, 2, 3)
    x = torch.randn(shp, generator=gen).to(device)
    v = torch.randn(shp, generator=gen).to(device)
    s = torch.rand(130, generator=gen).to(device) * 0.8 + 0.1
    y = sde.sde_step(x, v, s, s - 0.05, noise_level=0.7).prev_sample
    lp = sde.sde_step(x, v, s, s - 0.05, noise_level=0.7, prev_sample=y).log_prob
    old = lp + 0.05 * torch.randn(130, generator=gen).to(device)
    adv = torch.randn(130, generator=gen).to(device)
    kw = dict(noise_level=0.7, clip_range=0.04)
    loss, stats, grads = _run_loss(ops.grpo_step_loss, x, y, v, s, s - 0.05, old, adv, kw)
    loss_r, stats_r, grads_r = _run_loss(grpo.grpo_step_loss, x, y, v, s, s - 0.05, old, adv, kw)
    _rmse_close(loss, loss_r, 1e-5, atol=1e-6, what="loss")
    for k in stats:
        _rmse_close(stats[k], stats_r[k], 1e-5, atol=1e-6, what=k)
    assert 0 < stats["clipfrac"].item() < 1
    _rmse_close(grads[0], grads_r[0], 1e-5, atol=1e-9, what="velocity grad")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or kernels.INTERPRETED, reason="needs CUDA")
def test_batch_beyond_65535_runs_on_gpu():
    """Grid axis 1 stops at 65,535 programs: a larger batch runs because it is on axis 0."""
    batch = 65_537
    x, v, noise = (torch.randn(batch, 4, device="cuda") for _ in range(3))
    out = ops.sde_step(x, v, 0.5, 0.4, noise_level=0.7, noise=noise)
    ref = sde.sde_step(x, v, 0.5, 0.4, noise_level=0.7, noise=noise)
    torch.testing.assert_close(out.prev_sample, ref.prev_sample, rtol=1e-5, atol=1e-5)
    _rmse_close(out.log_prob, ref.log_prob, 1e-5, what="log_prob")
    vg = v.clone().requires_grad_()
    loss, stats = ops.grpo_step_loss(x, out.prev_sample, vg, 0.5, 0.4, out.log_prob,
                                     torch.ones(batch, device="cuda"), noise_level=0.7, clip_range=0.1)
    loss.backward()
    assert stats["ratio_min"].item() == 1.0 == stats["ratio_max"].item()
    assert torch.isfinite(vg.grad).all()


# ------------------------------------------------------------------------------------------------
# Dispatch and errors
# ------------------------------------------------------------------------------------------------


def test_backend_choice(monkeypatch):
    monkeypatch.setenv("FASTFLOW_KERNELS", "auto")
    assert ops.backend(torch.device("cpu")) == "torch"
    monkeypatch.setenv("FASTFLOW_KERNELS", "torch")
    assert ops.backend(torch.device("cuda")) == "torch"
    monkeypatch.setenv("FASTFLOW_KERNELS", "TRITON")
    assert ops.backend(torch.device("cpu")) == "triton"
    monkeypatch.setenv("FASTFLOW_KERNELS", "fast")
    with pytest.raises(ValueError, match="FASTFLOW_KERNELS"):
        ops.backend(torch.device("cpu"))


def test_torch_path_is_the_reference(monkeypatch):
    monkeypatch.setenv("FASTFLOW_KERNELS", "torch")
    gen = torch.Generator().manual_seed(5)
    x, v, n = (torch.randn(2, 3, 5, generator=gen) for _ in range(3))
    out = ops.sde_step(x, v, 0.5, 0.3, noise_level=0.7, noise=n, need_mean=False)
    ref = sde.sde_step(x, v, 0.5, 0.3, noise_level=0.7, noise=n)
    assert torch.equal(out.log_prob, ref.log_prob) and torch.equal(out.mean, ref.mean)
    with pytest.raises(RuntimeError, match="Triton path"):
        ops.sde_step_philox(x, v, 0.5, 0.3, noise_level=0.7, seed=torch.tensor([1]),
                            offset=torch.tensor([0]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "nocfg"])
@pytest.mark.parametrize("mode", ["sampled", "given_next"])
@pytest.mark.parametrize("kind", ["sde", "cps", "ode"])
def test_sde_step_under_autograd(device, cfg, mode, kind):
    """With gradients ops.sde_step keeps the kernel's values (bitwise those of a no-grad call)
    and gives the reference's gradients through prev_sample, log_prob and mean."""
    gen = torch.Generator().manual_seed(6)
    shp = (3, 2, 5, 7)
    x0 = torch.randn(shp, generator=gen).to(device)
    v0 = _velocity(shp, torch.bfloat16, device, cfg, gen=gen)
    noise = torch.randn(shp, generator=gen).to(device)
    y = torch.randn(shp, generator=gen).to(device) if mode == "given_next" else None
    s = torch.tensor([1.0, 0.6, 0.3], device=device)
    kw = dict(noise_level=0.7, kind=kind, sigma_guard=0.9, noise=noise, prev_sample=y)
    weights = [torch.randn(shp, generator=gen).to(device), torch.randn(3, generator=gen).to(device),
               torch.randn(shp, generator=gen).to(device)]
    with torch.no_grad():
        plain = ops.sde_step(x0, v0, s, s - 0.2, **kw)

    def run(fn):
        x = x0.clone().requires_grad_()
        parts = [p.detach().clone().requires_grad_() for p in _parts(v0)]
        v = GuidedVelocity(*parts, 4.5) if cfg else parts[0]
        out = fn(x, v, s, s - 0.2, **kw)
        total = (out.prev_sample * weights[0]).sum() + (out.mean * weights[2]).sum()
        if out.log_prob is not None:
            total = total + (out.log_prob * weights[1]).sum()
        total.backward()
        return out, [x.grad] + [p.grad for p in parts]

    out, grads = run(ops.sde_step)
    ref, grads_r = run(sde.sde_step)
    assert torch.equal(out.prev_sample, plain.prev_sample)
    if kind != "ode":
        assert torch.equal(out.log_prob, plain.log_prob)
    for g, gr in zip(grads, grads_r):
        assert g.dtype == gr.dtype
        _rmse_close(g, gr, GRAD_RTOL["bf16"] if g.dtype == torch.bfloat16 else 1e-5, atol=1e-9,
                    what="grad")


def _parts(v):
    return (v.uncond, v.cond) if isinstance(v, GuidedVelocity) else (v,)


@pytest.mark.parametrize("device", DEVICES)
def test_float64_takes_the_reference(device):
    x, v, n = (torch.randn(2, 3, dtype=torch.float64, device=device) for _ in range(3))
    out = ops.sde_step(x, v, 0.5, 0.3, noise_level=0.7, noise=n)
    assert out.prev_sample.dtype == torch.float64


@pytest.mark.parametrize("device", DEVICES)
def test_clear_errors(device):
    x = torch.randn(2, 3, 5, device=device)
    v = torch.randn(2, 3, 5, device=device)
    with pytest.raises(ValueError, match="sigma_guard"):
        ops.sde_step(x, v, 1.0, 0.9, noise_level=0.7)
    with pytest.raises(ValueError, match="sigma_guard"):
        ops.sde_step(x, v, torch.tensor([0.5, 1.0], device=device), 0.4, noise_level=0.7)
    with pytest.raises(ValueError, match="velocity shape"):
        ops.sde_step(x, v[:, :2], 0.5, 0.4, noise_level=0.7)
    with pytest.raises(ValueError, match="sigma has 3 entries"):
        ops.sde_step(x, v, torch.tensor([0.5, 0.4, 0.3], device=device), 0.2, noise_level=0.7)
    with pytest.raises(ValueError, match="kind must be"):
        ops.sde_step(x, v, 0.5, 0.4, noise_level=0.7, kind="ddim")
    with pytest.raises(ValueError, match="one-element int64"):
        ops.sde_step_philox(x, v, 0.5, 0.4, noise_level=0.7, seed=torch.tensor([1.0], device=device),
                            offset=torch.tensor([0], device=device))
    lp = torch.zeros(2, device=device)
    with pytest.raises(ValueError, match="'ode' has no log-prob"):
        ops.grpo_step_loss(x, x, v, 0.5, 0.4, lp, lp, noise_level=0.7, clip_range=1e-4, kind="ode")
    with pytest.raises(ValueError, match="shapes differ"):
        ops.grpo_step_loss(x, x, v, 0.5, 0.4, lp[:1], lp, noise_level=0.7, clip_range=1e-4)


# ------------------------------------------------------------------------------------------------
# Benchmark smoke run (CPU: the reference paths, a tiny size, seconds)
# ------------------------------------------------------------------------------------------------


def test_bench_kernels_cpu_smoke(tmp_path, monkeypatch, capsys):
    import json
    from pathlib import Path

    import importlib.util

    bench_dir = Path(__file__).resolve().parent.parent / "bench"
    monkeypatch.syspath_prepend(str(bench_dir))
    common = importlib.import_module("common")
    # Loaded from its path: the bare module name "kernels" is the repository's kernel package.
    spec = importlib.util.spec_from_file_location("fastflow_bench_kernels", bench_dir / "kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    bench.main(["--device", "cpu", "--cases", "tiny", "--reps", "1"])
    rows = [json.loads(line) for f in tmp_path.glob("kernels-*.jsonl") for line in f.read_text().splitlines()]
    assert {r["op"] for r in rows} == set(bench.BYTES)
    for r in rows:
        assert r["impl"] == "eager" and r["ms"] > 0 and r["gbps"] > 0
        assert r["torch"] == torch.__version__ and r["commit"] and r["date"]
    assert "eager PyTorch reference only" in capsys.readouterr().out
