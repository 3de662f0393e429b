"""The sampler records what the training pass needs, and the training pass reproduces it."""

import pytest
import torch

from fastflow import ops
from fastflow.models.toy import ToyPolicy
from fastflow.rollout import Trajectory, recompute_step, sample, sde_window

PROMPTS = ["a red square", "a blue square", "a green square"]


def _rollout(policy, seeds, **kw):
    cond = policy.encode_prompts([PROMPTS[i % 3] for i in range(len(seeds))])
    args = dict(num_steps=6, guidance_scale=4.5, noise_level=0.7)
    args.update(kw)
    return sample(policy, cond, seeds=torch.tensor(seeds), **args)


def _training_log_probs(policy, traj, autocast=None, kind="sde"):
    out = []
    for j in range(traj.num_steps):
        v = recompute_step(policy, traj, j, guidance_scale=4.5, autocast=autocast)
        step = ops.sde_step(traj.latents[:, j], v, traj.sigmas[j], traj.sigmas_next[j], noise_level=0.7, kind=kind,
                            prev_sample=traj.next_latents[:, j], sigma_guard=traj.sigma_guard)
        out.append(step.log_prob)
    return torch.stack(out, 1)


@pytest.mark.parametrize("kind", ["sde", "cps"])
def test_ratio_is_one_on_policy_fp32(kind):
    policy = ToyPolicy()
    traj = _rollout(policy, list(range(5)), kind=kind)
    lp = _training_log_probs(policy, traj, kind=kind)
    assert torch.equal(lp, traj.log_probs)  # same inputs, same ops: bitwise


def test_ratio_is_one_on_policy_bf16_autocast():
    policy = ToyPolicy()
    ac = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    cond = policy.encode_prompts(PROMPTS)
    traj = sample(policy, cond, num_steps=6, guidance_scale=4.5, noise_level=0.7,
                  seeds=torch.tensor([1, 2, 3]), autocast=ac())
    lp = _training_log_probs(policy, traj, autocast=ac())
    ratio = torch.exp(lp - traj.log_probs)
    assert (ratio - 1).abs().max() < 1e-5, ratio
    # and autocast really changed the numbers (otherwise this test would prove nothing)
    fp32 = sample(policy, cond, num_steps=6, guidance_scale=4.5, noise_level=0.7, seeds=torch.tensor([1, 2, 3]))
    assert not torch.equal(fp32.final, traj.final)


def test_per_sample_seeds_make_samples_batch_invariant():
    policy = ToyPolicy()
    full = _rollout(policy, [11, 12, 13, 14])
    alone = _rollout(policy, [13])  # prompt index differs: re-run with matching prompt
    cond = policy.encode_prompts([PROMPTS[2]])
    alone = sample(policy, cond, num_steps=6, guidance_scale=4.5, noise_level=0.7, seeds=torch.tensor([13]))
    # The noise is batch-invariant, the network's output only to float rounding: a batch of 1 and of
    # 4 take other matmul blockings (and thread splits, and AVX2 / AVX-512 kernels on other CPUs).
    # Measured on an AVX-512 EPYC over 300 batch compositions (sizes 4-33, 1 and 2 threads, ATen's
    # AVX-512 and scalar kernels, MKL's default and COMPATIBLE paths): at most 6e-7 on the final
    # latents (|x| <= 4.1) and 1.4e-6 on the log-probs (|lp| <= 6.1; the last step divides the
    # rounding of the mean by a small std). The worst case uses 1/40 of this bound (1e-5 + 1e-5 |x|;
    # it used 1/4 of the former 1e-6, too little headroom for CPUs not measured), while a sample whose
    # noise depended on its batch or position moves by O(1) (another seed: 4.3 here).
    torch.testing.assert_close(alone.final[0], full.final[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(alone.log_probs[0], full.log_probs[2], rtol=1e-5, atol=1e-5)
    other = _rollout(policy, [99, 12, 13, 14])
    assert not torch.allclose(other.final[0], full.final[0])


def test_window_records_only_sde_steps():
    policy = ToyPolicy()
    traj = _rollout(policy, [1, 2], window=sde_window(6, 2, 3))
    assert traj.step_indices.tolist() == [3, 4]
    assert traj.latents.shape == (2, 2, 3, 4, 4) and traj.log_probs.shape == (2, 2)
    # the recorded steps chain: x_{j+1} of step 3 is x_j of step 4
    torch.testing.assert_close(traj.next_latents[:, 0], traj.latents[:, 1])
    assert torch.equal(_training_log_probs(policy, traj), traj.log_probs)


def test_window_bounds_are_checked():
    with pytest.raises(ValueError, match="window start"):
        sde_window(6, 2, 5)


def test_ode_eval_records_nothing_and_is_finite():
    policy = ToyPolicy()
    traj = _rollout(policy, [1, 2, 3], kind="ode", num_steps=12)
    assert traj.num_steps == 0 and traj.log_probs.shape == (3, 0)
    assert torch.isfinite(traj.final).all()
    again = _rollout(policy, [1, 2, 3], kind="ode", num_steps=12)
    assert torch.equal(traj.final, again.final)


def test_trajectory_select_and_cat_round_trip():
    policy = ToyPolicy()
    traj = _rollout(policy, [1, 2, 3, 4])
    idx = torch.tensor([3, 1])
    sub = traj.select(idx)
    assert torch.equal(sub.latents, traj.latents[idx]) and torch.equal(sub.cond["token"], traj.cond["token"][idx])
    both = Trajectory.cat([traj.select(torch.tensor([0, 1])), traj.select(torch.tensor([2, 3]))])
    assert torch.equal(both.log_probs, traj.log_probs) and torch.equal(both.cond["token"], traj.cond["token"])
