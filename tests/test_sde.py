"""fastflow.sde against diffusers and against an independent float64 transcription of FLOW_GRPO.md
section 2 (the sigma grid, the three step kinds, dtypes, the sigma == 1 guard, gradients)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastflow.sde import GuidedVelocity, StepOutput, flow_sigmas, kl_to_reference, sde_step

# ----------------------------------------------------------------------------------------------
# flow_sigmas


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5, 1.7, 2.3, 7.0],
                         ids=lambda s: f"shift{s:g}")
def test_flow_sigmas_equal_diffusers_bitwise(shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    mismatched = []
    for n in range(1, 101):
        sched = FlowMatchEulerDiscreteScheduler(shift=shift)
        sched.set_timesteps(n)
        ours = flow_sigmas(n, shift)
        ref = sched.sigmas
        if ours.dtype != ref.dtype or ours.shape != ref.shape or not torch.equal(ours, ref):
            mismatched.append(n)
    assert not mismatched, f"flow_sigmas != diffusers for shift {shift} at n = {mismatched}"


@pytest.mark.parametrize("n", [1, 2, 3, 10, 40, 100], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("shift", [1.0, 3.0, 0.7], ids=lambda s: f"shift{s:g}")
def test_flow_sigmas_shape_and_order(n, shift):
    s = flow_sigmas(n, shift)
    assert s.shape == (n + 1,) and s.dtype == torch.float32
    assert s[0].item() == 1.0
    assert s[-1].item() == 0.0
    assert bool((s[1:] < s[:-1]).all()), f"not strictly descending: {s}"


@pytest.mark.parametrize("n", [0, -1, -10], ids=lambda n: f"n{n}")
def test_flow_sigmas_rejects_bad_step_count(n):
    with pytest.raises(ValueError, match="num_steps"):
        flow_sigmas(n, 1.0)


@pytest.mark.parametrize("shift", [0.0, -1.0, -3.0], ids=lambda s: f"shift{s:g}")
def test_flow_sigmas_rejects_bad_shift(shift):
    with pytest.raises(ValueError, match="shift"):
        flow_sigmas(10, shift)


# ----------------------------------------------------------------------------------------------
# An independent float64 transcription of FLOW_GRPO.md section 2 (numpy, per sample).

LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))


def ref_step(x, v, sigma, sigma_next, a, kind, eps=None, prev=None, guard=None):
    """Returns (prev_sample, mean, std_t, log_prob) as float64 numpy arrays.

    x, v, eps, prev: [B, ...]; sigma, sigma_next, guard: per-sample sequences of length B.
    """
    x = np.asarray(x, np.float64)
    v = np.asarray(v, np.float64)
    B = x.shape[0]
    sigma = np.broadcast_to(np.asarray(sigma, np.float64), (B,))
    sigma_next = np.broadcast_to(np.asarray(sigma_next, np.float64), (B,))
    guard = None if guard is None else np.broadcast_to(np.asarray(guard, np.float64), (B,))
    out_prev, out_mean, out_std, out_lp = [], [], [], []
    for i in range(B):
        xi, vi, s, sn = x[i], v[i], float(sigma[i]), float(sigma_next[i])
        dt = sn - s
        if kind == "ode":
            mean = xi + vi * dt
            std_t, nxt, lp = 0.0, (mean if prev is None else np.asarray(prev[i], np.float64)), None
        elif kind == "sde":
            s_den = s if s < 1 else float(guard[i])
            std_t = a * math.sqrt(s / (1 - s_den))
            mean = xi * (1 + std_t**2 / (2 * s) * dt) + vi * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
            step = std_t * math.sqrt(-dt)
            nxt = mean + step * eps[i] if prev is None else np.asarray(prev[i], np.float64)
            lp = np.mean(-((nxt - mean) ** 2) / (2 * step**2) - math.log(step) - LOG_SQRT_2PI)
        elif kind == "cps":
            std_t = sn * math.sin(a * math.pi / 2)
            x0 = xi - s * vi
            x1 = xi + (1 - s) * vi
            mean = (1 - sn) * x0 + math.sqrt(sn**2 - std_t**2) * x1
            nxt = mean + std_t * eps[i] if prev is None else np.asarray(prev[i], np.float64)
            lp = -np.mean((nxt - mean) ** 2)
        else:
            raise AssertionError(kind)
        out_prev.append(nxt)
        out_mean.append(mean)
        out_std.append(std_t)
        out_lp.append(lp)
    lp = None if kind == "ode" else np.array(out_lp)
    return np.stack(out_prev), np.stack(out_mean), np.array(out_std), lp


def _np(t):
    return t.detach().to(torch.float64).numpy()


def _assert_close(actual: torch.Tensor, expected: np.ndarray, rtol: float, atol: float, what: str):
    np.testing.assert_allclose(_np(actual), expected, rtol=rtol, atol=atol, err_msg=what)


def _assert_matches_ref(out: StepOutput, ref, rtol, atol, kind):
    prev, mean, std, lp = ref
    _assert_close(out.prev_sample, prev, rtol, atol, "prev_sample")
    _assert_close(out.mean, mean, rtol, atol, "mean")
    _assert_close(out.std, std, rtol, atol, "std")
    if kind == "ode":
        assert out.log_prob is None
    else:
        assert out.log_prob.shape == (prev.shape[0],)
        _assert_close(out.log_prob, lp, rtol, atol, "log_prob")


def _inputs(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    eps = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, v, eps


GRID = flow_sigmas(10, 3.0)
SHAPE = (4, 3, 5, 6)
# float32 math compared to float64: a few ulps of float32 on O(1) quantities; the log_prob is a
# mean of terms like eps^2/2 that are O(1) too.
F32_TOL = dict(rtol=2e-5, atol=2e-5)
F64_TOL = dict(rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("a", [0.7, 0.9], ids=lambda a: f"a{a}")
@pytest.mark.parametrize("sigma_form", ["float", "tensor_per_sample"])
@pytest.mark.parametrize("kind", ["sde", "cps", "ode"])
def test_sde_step_matches_float64_formula(kind, sigma_form, a):
    x, v, eps = _inputs(SHAPE)
    if sigma_form == "float":
        sig, sig_next = float(GRID[3]), float(GRID[4])
        ref_sig, ref_next = [sig] * 4, [sig_next] * 4
    else:
        # every sample at a different step of the grid, including the last one (sigma_next 0) for
        # kinds where that is well defined
        idx = torch.tensor([1, 4, 7, 9 if kind != "sde" else 8])
        sig, sig_next = GRID[idx], GRID[idx + 1]
        ref_sig, ref_next = sig.tolist(), sig_next.tolist()
    out = sde_step(x, v, sig, sig_next, noise_level=a, kind=kind, noise=eps)
    assert out.prev_sample.dtype == torch.float32 and out.mean.dtype == torch.float32
    assert out.std.shape == (4,)
    ref = ref_step(_np(x), _np(v), ref_sig, ref_next, a, kind, eps=_np(eps))
    _assert_matches_ref(out, ref, kind=kind, **F32_TOL)


@pytest.mark.parametrize("kind", ["sde", "cps", "ode"])
def test_sde_step_per_sample_sigmas_are_not_shared(kind):
    """A [B] sigma must give each sample its own step: equal to B separate scalar calls."""
    x, v, eps = _inputs((3, 2, 4), torch.float64)
    sig, sig_next = GRID[[2, 5, 8]].double(), GRID[[3, 6, 9]].double()
    batched = sde_step(x, v, sig, sig_next, noise_level=0.7, kind=kind, noise=eps)
    for i in range(3):
        single = sde_step(x[i:i + 1], v[i:i + 1], float(sig[i]), float(sig_next[i]),
                          noise_level=0.7, kind=kind, noise=eps[i:i + 1])
        torch.testing.assert_close(batched.prev_sample[i:i + 1], single.prev_sample, **F64_TOL)
        torch.testing.assert_close(batched.std[i:i + 1], single.std, **F64_TOL)
    assert len(set(batched.std.tolist())) == (1 if kind == "ode" else 3)


@pytest.mark.parametrize("kind", ["sde", "cps", "ode"])
def test_float64_inputs_stay_float64(kind):
    x, v, eps = _inputs(SHAPE, torch.float64)
    idx = torch.tensor([1, 3, 5, 7])
    sig, sig_next = GRID[idx].double(), GRID[idx + 1].double()
    out = sde_step(x, v, sig, sig_next, noise_level=0.7, kind=kind, noise=eps)
    for name in ("prev_sample", "mean", "std"):
        assert getattr(out, name).dtype == torch.float64, name
    if kind != "ode":
        assert out.log_prob.dtype == torch.float64
    ref = ref_step(_np(x), _np(v), sig.tolist(), sig_next.tolist(), 0.7, kind, eps=_np(eps))
    _assert_matches_ref(out, ref, kind=kind, **F64_TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["sde", "cps", "ode"])
def test_low_precision_inputs_use_float32_math(kind, dtype):
    # large-ish magnitudes: bf16/fp16 arithmetic here would be off by ~1e-2 relative
    x, v, eps = _inputs(SHAPE, dtype)
    x, v = (x * 30).to(dtype), (v * 30).to(dtype)
    idx = torch.tensor([1, 2, 6, 8])
    sig, sig_next = GRID[idx], GRID[idx + 1]
    out = sde_step(x, v, sig, sig_next, noise_level=0.7, kind=kind, noise=eps)
    for name in ("prev_sample", "mean", "std"):
        assert getattr(out, name).dtype == torch.float32, name
    if kind != "ode":
        assert out.log_prob.dtype == torch.float32
    ref = ref_step(_np(x), _np(v), sig.tolist(), sig_next.tolist(), 0.7, kind, eps=_np(eps))
    prev, mean, std, lp = ref
    scale = np.abs(mean).max()
    _assert_close(out.prev_sample, prev, 2e-5, 2e-5 * scale, "prev_sample")
    _assert_close(out.mean, mean, 2e-5, 2e-5 * scale, "mean")
    _assert_close(out.std, std, 2e-5, 2e-5, "std")
    if kind == "sde":
        _assert_close(out.log_prob, lp, 2e-5, 2e-5, "log_prob")
    elif kind == "cps":
        # -(prev - mean)^2 with prev - mean = std * eps: absolute error ~ ulp(mean) * |prev - mean|
        _assert_close(out.log_prob, lp, 1e-4, 1e-4 * scale, "log_prob")


# ----------------------------------------------------------------------------------------------
# The sigma == 1 guard


def test_sigma_one_uses_guard_in_denominator_only():
    x, v, eps = _inputs((2, 3, 4), torch.float64)
    grid = flow_sigmas(10, 3.0).double()
    guard = float(grid[1])
    out = sde_step(x, v, 1.0, guard, noise_level=0.7, kind="sde", noise=eps, sigma_guard=guard)
    ref = ref_step(_np(x), _np(v), [1.0, 1.0], [guard, guard], 0.7, "sde", eps=_np(eps),
                   guard=guard)
    _assert_matches_ref(out, ref, kind="sde", **F64_TOL)
    assert torch.isfinite(out.prev_sample).all() and torch.isfinite(out.log_prob).all()
    # Using the guard everywhere (also in the numerator and in the drift) is a different step:
    # this makes sure the comparison above can tell the two apart.
    wrong_std = 0.7 * math.sqrt(guard / (1 - guard))
    dt = guard - 1.0
    wrong_mean = (_np(x) * (1 + wrong_std**2 / (2 * guard) * dt)
                  + _np(v) * (1 + wrong_std**2 * (1 - guard) / (2 * guard)) * dt)
    assert abs(out.std[0].item() - wrong_std) > 1e-3
    assert np.abs(_np(out.mean) - wrong_mean).max() > 1e-3


def test_sigma_one_guard_applies_only_to_samples_at_one():
    x, v, eps = _inputs((3, 2, 5), torch.float64)
    grid = flow_sigmas(10, 3.0).double()
    guard = float(grid[1])
    sig = torch.tensor([1.0, float(grid[2]), 1.0], dtype=torch.float64)
    sig_next = torch.tensor([guard, float(grid[3]), guard], dtype=torch.float64)
    out = sde_step(x, v, sig, sig_next, noise_level=0.7, kind="sde", noise=eps, sigma_guard=guard)
    ref = ref_step(_np(x), _np(v), sig.tolist(), sig_next.tolist(), 0.7, "sde", eps=_np(eps),
                   guard=[guard] * 3)
    _assert_matches_ref(out, ref, kind="sde", **F64_TOL)
    # the guard is ignored where sigma < 1
    no_one = sde_step(x[1:2], v[1:2], sig[1:2], sig_next[1:2], noise_level=0.7, kind="sde",
                      noise=eps[1:2])
    torch.testing.assert_close(out.prev_sample[1:2], no_one.prev_sample, **F64_TOL)


@pytest.mark.parametrize("sigma_form", ["float", "tensor_with_one"])
def test_sigma_one_without_guard_is_a_clear_error(sigma_form):
    x, v, eps = _inputs((2, 4))
    sig = 1.0 if sigma_form == "float" else torch.tensor([0.5, 1.0])
    with pytest.raises(ValueError, match="sigma_guard"):
        sde_step(x, v, sig, 0.4, noise_level=0.7, kind="sde", noise=eps)


@pytest.mark.parametrize("kind", ["cps", "ode"])
def test_sigma_one_needs_no_guard_for_other_kinds(kind):
    x, v, eps = _inputs((2, 4))
    out = sde_step(x, v, 1.0, float(GRID[1]), noise_level=0.7, kind=kind, noise=eps)
    assert torch.isfinite(out.prev_sample).all()
    ref = ref_step(_np(x), _np(v), [1.0] * 2, [float(GRID[1])] * 2, 0.7, kind, eps=_np(eps))
    _assert_matches_ref(out, ref, kind=kind, **F32_TOL)


# ----------------------------------------------------------------------------------------------
# Interface behaviour


def test_guided_velocity_combine_is_u_plus_w_c_minus_u():
    g = torch.Generator().manual_seed(3)
    u = torch.randn(2, 3, 4, generator=g).to(torch.bfloat16)
    c = torch.randn(2, 3, 4, generator=g).to(torch.bfloat16)
    gv = GuidedVelocity(u, c, 4.5)
    assert gv.shape == c.shape
    combined = gv.combine()
    assert combined.dtype == torch.float32
    u64, c64 = u.double(), c.double()
    torch.testing.assert_close(combined.double(), u64 + 4.5 * (c64 - u64), rtol=1e-6, atol=1e-6)
    assert gv.combine(torch.float64).dtype == torch.float64
    torch.testing.assert_close(gv.combine(torch.float64), u64 + 4.5 * (c64 - u64),
                               rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("sample_dtype", [torch.bfloat16, torch.float32, torch.float64],
                         ids=["bf16", "fp32", "fp64"])
@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_sde_step_with_guided_velocity_equals_combined_tensor(kind, sample_dtype):
    x, _, eps = _inputs((2, 3, 4), sample_dtype)
    g = torch.Generator().manual_seed(5)
    u = torch.randn(2, 3, 4, generator=g).to(torch.bfloat16)
    c = torch.randn(2, 3, 4, generator=g).to(torch.bfloat16)
    gv = GuidedVelocity(u, c, 4.5)
    math_dtype = torch.float64 if sample_dtype == torch.float64 else torch.float32
    a = sde_step(x, gv, 0.6, 0.5, noise_level=0.7, kind=kind, noise=eps)
    b = sde_step(x, gv.combine(math_dtype), 0.6, 0.5, noise_level=0.7, kind=kind, noise=eps)
    assert torch.equal(a.prev_sample, b.prev_sample) and torch.equal(a.log_prob, b.log_prob)
    # and the combine is not done in bf16 (which would round u + w (c - u) to 8 bits)
    bf16_combined = (u + 4.5 * (c - u)).to(math_dtype)
    c_bf16 = sde_step(x, bf16_combined, 0.6, 0.5, noise_level=0.7, kind=kind, noise=eps)
    assert not torch.equal(a.mean, c_bf16.mean)


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_generator_reproducibility_and_given_noise(kind):
    x, v, _ = _inputs((3, 8))
    run = lambda seed: sde_step(x, v, 0.7, 0.6, noise_level=0.7, kind=kind,
                                generator=torch.Generator().manual_seed(seed))
    first, again, other = run(11), run(11), run(12)
    assert torch.equal(first.prev_sample, again.prev_sample)
    assert torch.equal(first.log_prob, again.log_prob)
    assert not torch.equal(first.prev_sample, other.prev_sample)
    # the generator draws the standard normal noise of the given-noise path
    eps = torch.randn((3, 8), generator=torch.Generator().manual_seed(11))
    given = sde_step(x, v, 0.7, 0.6, noise_level=0.7, kind=kind, noise=eps)
    assert torch.equal(first.prev_sample, given.prev_sample)


@pytest.mark.parametrize("kind", ["sde", "cps", "ode"])
def test_given_prev_sample_is_evaluated_and_returned_unchanged(kind):
    x, v, _ = _inputs((3, 2, 5))
    prev = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(9))
    out = sde_step(x, v, 0.7, 0.6, noise_level=0.8, kind=kind, prev_sample=prev)
    assert out.prev_sample.dtype == prev.dtype and torch.equal(out.prev_sample, prev)
    ref = ref_step(_np(x), _np(v), 0.7, 0.6, 0.8, kind, prev=_np(prev))
    _assert_matches_ref(out, ref, kind=kind, **F32_TOL)


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_log_prob_treats_prev_sample_as_constant(kind):
    x, v, eps = _inputs((2, 3, 4), torch.float64)
    v = v.clone().requires_grad_(True)
    prev = (x + 0.1 * eps).clone().requires_grad_(True)
    out = sde_step(x, v, 0.7, 0.6, noise_level=0.7, kind=kind, prev_sample=prev)
    out.log_prob.sum().backward()
    assert prev.grad is None, "a gradient reached prev_sample through log_prob"
    assert v.grad is not None and v.grad.abs().sum() > 0
    # sampling mode: the log_prob's gradient is the one of the fixed drawn sample (if the sample
    # were not detached, (x_next - mean) = std * eps would not depend on v and the gradient of the
    # quadratic term would vanish)
    v2 = v.detach().clone().requires_grad_(True)
    drawn = sde_step(x, v2, 0.7, 0.6, noise_level=0.7, kind=kind, noise=eps)
    (g_sampled,) = torch.autograd.grad(drawn.log_prob.sum(), v2)
    v3 = v.detach().clone().requires_grad_(True)
    fixed = sde_step(x, v3, 0.7, 0.6, noise_level=0.7, kind=kind,
                     prev_sample=drawn.prev_sample.detach())
    (g_fixed,) = torch.autograd.grad(fixed.log_prob.sum(), v3)
    assert g_fixed.abs().max() > 1e-3
    torch.testing.assert_close(g_sampled, g_fixed, rtol=1e-12, atol=1e-12)


def test_log_prob_is_mean_over_non_batch_dims():
    x, v, _ = _inputs((3, 2, 5, 7), torch.float64)
    prev = torch.randn(3, 2, 5, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sig, sig_next = 0.7, 0.6
    out = sde_step(x, v, sig, sig_next, noise_level=0.7, kind="sde", prev_sample=prev)
    step_std = out.std * math.sqrt(sig - sig_next)
    normal = torch.distributions.Normal(out.mean.detach(), step_std.reshape(3, 1, 1, 1))
    total = normal.log_prob(prev).sum(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob.detach(), total / (2 * 5 * 7), rtol=1e-12, atol=1e-12)
    # the same step on a reshaped latent gives the same (shape-independent) mean
    flat = sde_step(x.reshape(3, -1), v.reshape(3, -1), sig, sig_next, noise_level=0.7,
                    kind="sde", prev_sample=prev.reshape(3, -1))
    torch.testing.assert_close(flat.log_prob, out.log_prob, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("where", ["sigma_one", "last_step"])
def test_ode_has_no_log_prob_and_stays_finite(where):
    x, v, _ = _inputs((2, 3, 4))
    grid = flow_sigmas(10, 1.0)
    sig, sig_next = (1.0, float(grid[1])) if where == "sigma_one" else (float(grid[-2]), 0.0)
    out = sde_step(x, v, sig, sig_next, noise_level=0.7, kind="ode")
    assert out.log_prob is None
    assert torch.isfinite(out.prev_sample).all() and torch.isfinite(out.mean).all()
    assert torch.equal(out.std, torch.zeros(2))
    torch.testing.assert_close(out.prev_sample, x + v * (sig_next - sig), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["sampled", "prev_given"])
def test_cps_last_step_is_finite(mode):
    x, v, eps = _inputs((2, 3, 4))
    grid = flow_sigmas(10, 3.0)
    sig = float(grid[-2])
    kw = dict(noise=eps) if mode == "sampled" else dict(prev_sample=x - sig * v + 0.01 * eps)
    out = sde_step(x, v, sig, 0.0, noise_level=0.7, kind="cps", **kw)
    assert torch.isfinite(out.prev_sample).all() and torch.isfinite(out.log_prob).all()
    # sigma_next = 0: the step lands on the predicted x0 deterministically
    torch.testing.assert_close(out.mean, x - sig * v, rtol=1e-6, atol=1e-6)
    assert torch.equal(out.std, torch.zeros(2))
    if mode == "sampled":
        torch.testing.assert_close(out.prev_sample, out.mean, rtol=0, atol=0)


def test_sde_last_step_is_finite():
    x, v, eps = _inputs((2, 3, 4))
    grid = flow_sigmas(10, 3.0)
    out = sde_step(x, v, float(grid[-2]), 0.0, noise_level=0.7, kind="sde", noise=eps)
    assert torch.isfinite(out.prev_sample).all() and torch.isfinite(out.log_prob).all()


def test_bad_arguments_raise_clear_errors():
    x, v, _ = _inputs((3, 4))
    with pytest.raises(ValueError, match="kind"):
        sde_step(x, v, 0.5, 0.4, noise_level=0.7, kind="euler")
    with pytest.raises(ValueError, match="velocity shape"):
        sde_step(x, v[:, :2], 0.5, 0.4, noise_level=0.7)
    with pytest.raises(ValueError, match="sigma has 2 entries"):
        sde_step(x, v, torch.tensor([0.5, 0.6]), 0.4, noise_level=0.7)


# ----------------------------------------------------------------------------------------------
# Gradients


def _gradcheck_inputs(kind, at_one=False):
    x, v, eps = _inputs((2, 3, 4), torch.float64, seed=21)
    grid = flow_sigmas(10, 3.0).double()
    if at_one:
        sig, sig_next = grid[[0, 0]], grid[[1, 1]]
    else:
        sig, sig_next = grid[[2, 6]], grid[[3, 7]]
    guard = float(grid[1])
    with torch.no_grad():
        prev = sde_step(x, v + 0.3 * eps, sig, sig_next, noise_level=0.7, kind=kind, noise=eps,
                        sigma_guard=guard).prev_sample
    return x, v.clone().requires_grad_(True), sig, sig_next, prev, guard


@pytest.mark.parametrize("at_one", [False, True], ids=["mid_grid", "sigma_one"])
@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_gradcheck_log_prob_wrt_velocity(kind, at_one):
    x, v, sig, sig_next, prev, guard = _gradcheck_inputs(kind, at_one)

    def f(vel):
        return sde_step(x, vel, sig, sig_next, noise_level=0.7, kind=kind, prev_sample=prev,
                        sigma_guard=guard).log_prob

    assert torch.autograd.gradcheck(f, (v,), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_gradcheck_kl_to_reference_wrt_velocity(kind):
    x, v, sig, sig_next, prev, guard = _gradcheck_inputs(kind)
    v_ref = v.detach() + 0.2 * torch.randn(v.shape, generator=torch.Generator().manual_seed(4),
                                           dtype=torch.float64)
    ref = sde_step(x, v_ref, sig, sig_next, noise_level=0.7, kind=kind, prev_sample=prev)

    def f(vel):
        out = sde_step(x, vel, sig, sig_next, noise_level=0.7, kind=kind, prev_sample=prev)
        return kl_to_reference(out.mean, ref.mean, out.std)

    assert torch.autograd.gradcheck(f, (v,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_log_prob_gradient_matches_closed_form():
    """d log_prob / d v for kind "sde", by hand: mean over dims of (x' - mu)/s^2 * dmu/dv."""
    x, v, sig, sig_next, prev, _ = _gradcheck_inputs("sde")
    out = sde_step(x, v, sig, sig_next, noise_level=0.7, kind="sde", prev_sample=prev)
    (g,) = torch.autograd.grad(out.log_prob.sum(), v)
    s, sn = sig.reshape(2, 1, 1), sig_next.reshape(2, 1, 1)
    dt = sn - s
    std_t = 0.7 * torch.sqrt(s / (1 - s))
    dmu_dv = (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    step_var = std_t**2 * (-dt)
    expected = (prev - out.mean.detach()) / step_var * dmu_dv / (3 * 4)
    torch.testing.assert_close(g, expected, rtol=1e-10, atol=1e-12)


def test_kl_to_reference_formula():
    g = torch.Generator().manual_seed(8)
    m = torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    m_ref = torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    std = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    kl = kl_to_reference(m, m_ref, std)
    expected = [((m[i] - m_ref[i]) ** 2).mean().item() / (2 * std[i].item() ** 2) for i in range(3)]
    np.testing.assert_allclose(kl.numpy(), expected, rtol=1e-13)
    assert kl_to_reference(m, m, std).abs().max() == 0
    # a float std broadcasts over the batch
    np.testing.assert_allclose(kl_to_reference(m, m_ref, 0.5).numpy(),
                               kl_to_reference(m, m_ref, torch.full((3,), 0.5,
                                                                    dtype=torch.float64)).numpy())


def test_kl_times_dt_is_exact_gaussian_kl():
    """The public code's KL equals the exact KL of the two equal-variance Gaussian transitions
    times |dt| (FLOW_GRPO.md section 5)."""
    x, v, sig, sig_next, prev, _ = _gradcheck_inputs("sde")
    v = v.detach()
    v_ref = v + 0.1
    a = sde_step(x, v, sig, sig_next, noise_level=0.7, kind="sde", prev_sample=prev)
    b = sde_step(x, v_ref, sig, sig_next, noise_level=0.7, kind="sde", prev_sample=prev)
    step_std = (a.std * torch.sqrt(sig - sig_next)).reshape(2, 1, 1).expand_as(a.mean)
    exact = torch.distributions.kl_divergence(torch.distributions.Normal(a.mean, step_std),
                                              torch.distributions.Normal(b.mean, step_std))
    exact = exact.mean(dim=(1, 2))
    torch.testing.assert_close(kl_to_reference(a.mean, b.mean, a.std), exact * (sig - sig_next),
                               rtol=1e-12, atol=1e-14)
