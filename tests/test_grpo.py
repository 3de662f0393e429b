"""fastflow.grpo against hand and numpy computations of FLOW_GRPO.md sections 4-5: group-relative
advantages, group statistics, the clipped surrogate (values, gradient, stats) and the composed
per-timestep loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastflow.grpo import clipped_policy_loss, group_advantages, group_stats, grpo_step_loss
from fastflow.sde import GuidedVelocity, flow_sigmas, kl_to_reference, sde_step

# ----------------------------------------------------------------------------------------------
# Advantages


def np_advantages(rewards, ids, global_std, eps=1e-4, clip=5.0):
    """The public code's per-prompt normalisation, written with numpy (np.std is ddof=0)."""
    r = np.asarray(rewards, np.float64)
    ids = np.asarray(ids)
    adv = np.empty_like(r)
    for g in np.unique(ids):
        m = ids == g
        std = np.std(r) if global_std else np.std(r[m])
        adv[m] = (r[m] - r[m].mean()) / (std + eps)
    return np.clip(adv, -clip, clip)


def _shuffled_groups(seed, sizes=(4, 6, 3, 5), ids=(17, -2, 5, 1000)):
    rng = np.random.default_rng(seed)
    group_ids = np.concatenate([[i] * n for i, n in zip(ids, sizes)])
    rewards = np.concatenate([rng.normal(loc=i % 7, scale=0.5 + k, size=n)
                              for k, (i, n) in enumerate(zip(ids, sizes))])
    perm = rng.permutation(len(rewards))  # groups interleaved in arbitrary order
    return torch.tensor(rewards[perm], dtype=torch.float32), group_ids[perm]


@pytest.mark.parametrize("eps", [1e-4, 0.3], ids=lambda e: f"eps{e:g}")
@pytest.mark.parametrize("global_std", [False, True], ids=["group_std", "global_std"])
def test_group_advantages_match_numpy(global_std, eps):
    rewards, ids = _shuffled_groups(0)
    adv = group_advantages(rewards, torch.as_tensor(ids), global_std=global_std, eps=eps)
    assert adv.dtype == torch.float32 and adv.shape == rewards.shape
    expected = np_advantages(rewards.double().numpy(), ids, global_std, eps=eps)
    assert np.abs(expected).max() < 5  # this case is about the normalisation, not the clip
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-6, atol=1e-7)


def test_group_ids_may_be_any_labels_in_any_order():
    rewards, ids = _shuffled_groups(1)
    base = group_advantages(rewards, torch.as_tensor(ids), global_std=False)
    # relabel the groups (different values, different sort order): same advantages
    relabel = {17: 3, -2: 99, 5: 0, 1000: -7}
    other = group_advantages(rewards, [relabel[int(i)] for i in ids], global_std=False)
    assert torch.equal(base, other)
    # permuting the samples permutes the advantages
    perm = torch.randperm(len(rewards), generator=torch.Generator().manual_seed(0))
    permuted = group_advantages(rewards[perm], torch.as_tensor(ids)[perm], global_std=False)
    torch.testing.assert_close(permuted, base[perm], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("global_std", [False, True], ids=["group_std", "global_std"])
def test_group_advantages_are_clipped(global_std):
    # one outlier among 29 equal rewards: (r - mean) / std = sqrt(29) ~ 5.39 > 5 per group,
    # and far more against a small global std
    rewards = torch.tensor([0.0] * 29 + [1.0] + [0.0, 0.01, 0.02, 0.03] * 10)
    ids = [0] * 30 + [1, 2, 3, 4] * 10
    adv = group_advantages(rewards, ids, global_std=global_std)
    expected = np_advantages(rewards.double().numpy(), ids, global_std)
    unclipped = np_advantages(rewards.double().numpy(), ids, global_std, clip=np.inf)
    assert unclipped[29] > 5
    assert adv[29].item() == 5.0
    np.testing.assert_allclose(adv.numpy(), expected, rtol=1e-6, atol=1e-7)
    # the clip is symmetric and its bound is a parameter
    assert group_advantages(-rewards, ids, global_std=global_std)[29].item() == -5.0
    assert group_advantages(rewards, ids, global_std=global_std, clip=2.0).abs().max() == 2.0


@pytest.mark.parametrize("reward_dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("global_std", [False, True], ids=["group_std", "global_std"])
def test_all_equal_groups_get_zero_advantages(global_std, reward_dtype):
    # 0.1 and 0.7 are not exact binary fractions: in float64 the group mean of 3 or 7 copies is
    # not exactly the value, which must still give exactly zero advantages
    rewards = torch.tensor([0.1] * 3 + [0.7] * 7 + [0.0, 1.0, 0.5], dtype=reward_dtype)
    ids = [4] * 3 + [9] * 7 + [2] * 3
    adv = group_advantages(rewards, ids, global_std=global_std)
    assert torch.equal(adv[:10], torch.zeros(10)), adv[:10]
    assert adv[10] < 0 < adv[11] and adv[12] == 0  # the varied group keeps its signal
    stats = group_stats(rewards, ids)
    assert stats["zero_std_ratio"] == pytest.approx(2 / 3, abs=0)
    assert stats["num_groups"] == 3


def test_group_stats_match_numpy():
    rewards, ids = _shuffled_groups(2)
    rewards = torch.cat([rewards, torch.full((4,), 0.25)])
    ids = np.concatenate([ids, [33] * 4])
    stats = group_stats(rewards, ids)
    r = rewards.double().numpy()
    stds = [np.std(r[ids == g]) for g in np.unique(ids)]
    assert stats["num_groups"] == 5
    assert stats["zero_std_ratio"] == pytest.approx(1 / 5, abs=0)
    assert stats["group_std_mean"] == pytest.approx(float(np.mean(stds)), rel=1e-12)


def test_group_ids_length_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="group_ids has 3 entries for 4 rewards"):
        group_advantages(torch.zeros(4), [0, 0, 1], global_std=False)
    with pytest.raises(ValueError, match="group_ids"):
        group_stats(torch.zeros(4), [0, 0, 1])


# ----------------------------------------------------------------------------------------------
# Clipped surrogate

CLIP = 0.2


def _loss_case():
    """Hand-made cases: (ratio, advantage, expected per-sample loss, clipped branch active)."""
    return [
        # ratio inside the band: -A * ratio
        (1.1, 2.0, -2.2, False),
        (0.9, -1.0, 0.9, False),
        # A > 0, ratio above 1 + clip: max(-A r, -A (1 + c)) = -A (1 + c), clipped, no gradient
        (1.5, 2.0, -2.4, True),
        # A > 0, ratio below 1 - clip: -A r > -A (1 - c), the unclipped branch wins
        (0.5, 2.0, -1.0, False),
        # A < 0, ratio below 1 - clip: -A (1 - c) wins, clipped
        (0.5, -1.0, 0.8, True),
        # A < 0, ratio above 1 + clip: -A r wins (the pessimistic bound is not clipped)
        (1.5, -1.0, 1.5, False),
        # A = 0 contributes nothing
        (1.3, 0.0, 0.0, True),
    ]


def test_clipped_policy_loss_hand_values_and_gradient():
    cases = _loss_case()
    ratio = torch.tensor([c[0] for c in cases], dtype=torch.float64)
    adv = torch.tensor([c[1] for c in cases], dtype=torch.float64)
    per_sample = torch.tensor([c[2] for c in cases], dtype=torch.float64)
    clipped = torch.tensor([c[3] for c in cases])
    old = torch.tensor([-1.0, 0.5, 2.0, -3.0, 0.0, 1.0, 0.3], dtype=torch.float64)
    log_prob = (old + ratio.log()).requires_grad_(True)
    loss, stats = clipped_policy_loss(log_prob, old, adv, clip_range=CLIP)
    torch.testing.assert_close(loss, per_sample.mean(), rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(loss, log_prob)
    # d/dlogp of -A ratio = -A ratio, where the unclipped branch is active; zero where clipped
    expected = torch.where(clipped, torch.zeros_like(adv), -adv * ratio) / len(cases)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
    assert (grad[clipped] == 0).all() and (grad[~clipped & (adv != 0)] != 0).all()

    d = ratio.log()
    assert stats["clipfrac"].item() == pytest.approx(5 / 7)  # |ratio - 1| > 0.2: all but 2
    torch.testing.assert_close(stats["approx_kl"], 0.5 * (d**2).mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(stats["ratio_mean"], ratio.mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(stats["ratio_min"], ratio.min(), rtol=1e-12, atol=0)
    torch.testing.assert_close(stats["ratio_max"], ratio.max(), rtol=1e-12, atol=0)
    assert all(not s.requires_grad for s in stats.values())


def test_clipped_policy_loss_does_not_differentiate_old_log_prob_or_advantages():
    log_prob = torch.tensor([0.1, -0.05], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64, requires_grad=True)
    loss, _ = clipped_policy_loss(log_prob, old, adv, clip_range=0.5)
    loss.backward()
    assert old.grad is None and adv.grad is None and log_prob.grad is not None


def test_on_policy_ratio_is_one_and_loss_is_minus_mean_advantage():
    g = torch.Generator().manual_seed(0)
    log_prob = torch.randn(16, generator=g, dtype=torch.float64).requires_grad_(True)
    adv = torch.randn(16, generator=g, dtype=torch.float64)
    loss, stats = clipped_policy_loss(log_prob, log_prob.detach().clone(), adv, clip_range=1e-4)
    assert loss.item() == pytest.approx(-adv.mean().item(), abs=1e-15)
    assert stats["clipfrac"].item() == 0 and stats["approx_kl"].item() == 0
    assert stats["ratio_min"].item() == 1 and stats["ratio_max"].item() == 1
    (grad,) = torch.autograd.grad(loss, log_prob)
    torch.testing.assert_close(grad, -adv / 16, rtol=1e-12, atol=0)


@pytest.mark.parametrize("bad", ["log_prob", "old_log_prob", "advantages"])
def test_clipped_policy_loss_shape_mismatch_is_a_clear_error(bad):
    args = {name: torch.zeros(4) for name in ("log_prob", "old_log_prob", "advantages")}
    args[bad] = torch.zeros(4, 1)
    with pytest.raises(ValueError, match="shapes differ"):
        clipped_policy_loss(args["log_prob"], args["old_log_prob"], args["advantages"],
                            clip_range=0.2)


# ----------------------------------------------------------------------------------------------
# The composed per-timestep loss

SHAPE = (4, 2, 3, 5)


def _step_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    v = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    v_old = v + 0.01 * torch.randn(SHAPE, generator=g, dtype=torch.float64)
    v_ref = v + 0.05 * torch.randn(SHAPE, generator=g, dtype=torch.float64)
    adv = torch.randn(SHAPE[0], generator=g, dtype=torch.float64)
    grid = flow_sigmas(10, 3.0).double()
    idx = torch.tensor([0, 2, 5, 8])
    return x, v, v_old, v_ref, adv, grid[idx], grid[idx + 1], float(grid[1])


@pytest.mark.parametrize("beta", [0.0, 0.04], ids=lambda b: f"beta{b:g}")
@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_grpo_step_loss_is_the_composition(kind, beta):
    x, v, v_old, v_ref, adv, sig, sig_next, guard = _step_inputs()
    # the rollout: the old policy draws prev_sample and records its log-prob
    rollout = sde_step(x, v_old, sig, sig_next, noise_level=0.7, kind=kind, sigma_guard=guard,
                       generator=torch.Generator().manual_seed(1))
    prev, old_lp = rollout.prev_sample, rollout.log_prob

    v1 = v.clone().requires_grad_(True)
    loss, stats = grpo_step_loss(x, prev, v1, sig, sig_next, old_lp, adv, noise_level=0.7,
                                 clip_range=0.2, beta=beta, velocity_ref=v_ref, kind=kind,
                                 sigma_guard=guard)
    (grad,) = torch.autograd.grad(loss, v1)

    v2 = v.clone().requires_grad_(True)
    out = sde_step(x, v2, sig, sig_next, noise_level=0.7, kind=kind, prev_sample=prev,
                   sigma_guard=guard)
    ref = sde_step(x, v_ref, sig, sig_next, noise_level=0.7, kind=kind, prev_sample=prev,
                   sigma_guard=guard)
    expected, expected_stats = clipped_policy_loss(out.log_prob, old_lp, adv, clip_range=0.2)
    kl = kl_to_reference(out.mean, ref.mean, out.std)
    expected = expected + beta * kl.mean()
    (expected_grad,) = torch.autograd.grad(expected, v2)

    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-14)
    assert grad.abs().max() > 0
    torch.testing.assert_close(stats["kl"], kl.detach().mean() if beta > 0 else torch.zeros(()),
                               rtol=1e-12, atol=0, check_dtype=False)
    torch.testing.assert_close(stats["log_prob"], out.log_prob.detach().mean(), rtol=1e-12, atol=0)
    for key in expected_stats:
        torch.testing.assert_close(stats[key], expected_stats[key], rtol=1e-12, atol=0)
    if beta > 0:
        assert kl.mean() > 0  # the KL term is really part of the compared loss


def test_grpo_step_loss_on_policy_ratio_is_exactly_one():
    """old_log_prob recorded with the same velocity (also through a GuidedVelocity in bf16, as the
    rollout does) gives ratio exactly 1 and loss exactly -mean(A)."""
    x, v, _, _, adv, sig, sig_next, guard = _step_inputs(3)
    x32 = x.float()
    adv32 = adv.float()
    g = torch.Generator().manual_seed(2)
    gv = GuidedVelocity(torch.randn(SHAPE, generator=g).to(torch.bfloat16),
                        torch.randn(SHAPE, generator=g).to(torch.bfloat16), 4.5)
    rollout = sde_step(x32, gv, sig.float(), sig_next.float(), noise_level=0.7, kind="sde",
                       sigma_guard=guard, generator=torch.Generator().manual_seed(4))
    loss, stats = grpo_step_loss(x32, rollout.prev_sample, gv, sig.float(), sig_next.float(),
                                 rollout.log_prob, adv32, noise_level=0.7, clip_range=1e-4,
                                 sigma_guard=guard)
    assert stats["ratio_min"].item() == 1.0 and stats["ratio_max"].item() == 1.0
    assert stats["clipfrac"].item() == 0 and stats["approx_kl"].item() == 0
    assert loss.item() == (-adv32).mean().item()


def test_grpo_step_loss_rejects_the_ode_kind():
    x, v, v_old, _, adv, sig, sig_next, guard = _step_inputs()
    with pytest.raises(ValueError, match="ode"):
        grpo_step_loss(x, x, v, sig, sig_next, adv, adv, noise_level=0.7, clip_range=0.2,
                       kind="ode", sigma_guard=guard)


def test_grpo_step_loss_with_kl_needs_the_reference_velocity():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="velocity_ref"):
        grpo_step_loss(x, x, torch.randn_like(x), 0.5, 0.4, torch.zeros(2), torch.ones(2), noise_level=0.7,
                       clip_range=1e-4, beta=0.04)
