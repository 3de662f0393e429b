"""What one optimizer step applies, checked against hand computations: the EMA of the weights, and
the accumulated gradient (the mean over a step's micro-batches and trained timesteps of the per-step
Flow-GRPO loss gradients, FLOW_GRPO.md section 5).

Both are invisible to end-to-end checks: a reward still rises with an inverted EMA decay (the EMA is
only evaluated), and a gradient k times too large is mostly undone by the grad-norm clip and Adam's
scale invariance. So these tests compare numbers, on the toy policy, with the clip switched off.
"""

from __future__ import annotations

import pytest
import torch

from fastflow import ops
from fastflow import train as train_mod
from fastflow.config import load_config, validate
from fastflow.distributed import DistInfo
from fastflow.ema import EMA
from fastflow.rollout import recompute_step

SOLO = DistInfo(0, 1, 0, torch.device("cpu"))


# --------------------------------------------------------------------------------------- the EMA

def hand_ema(start: dict[str, torch.Tensor], history: list[dict[str, torch.Tensor]], decay: float,
             every: int) -> dict[str, torch.Tensor]:
    """shadow <- decay * shadow + (1 - decay) * weights after every ``every``-th step, in float64."""
    shadow = {n: v.double() for n, v in start.items()}
    for step, weights in enumerate(history, start=1):
        if step % every == 0:
            shadow = {n: decay * shadow[n] + (1 - decay) * weights[n].double() for n in shadow}
    return shadow


# decay 0.5 would not tell decay from 1 - decay; 0 keeps nothing of the past
@pytest.mark.parametrize("decay, every, steps", [(0.9, 1, 4), (0.6, 3, 7), (0.0, 2, 4)])
def test_ema_follows_the_hand_computation(decay, every, steps):
    g = torch.Generator().manual_seed(0)
    params = {"a": torch.nn.Parameter(torch.randn(3, 4, generator=g)),
              "b": torch.nn.Parameter(torch.randn(5, generator=g).to(torch.bfloat16))}
    start = {n: p.detach().clone() for n, p in params.items()}
    ema = EMA(params, decay, every)
    history, updated = [], []
    for _ in range(steps):
        with torch.no_grad():  # what an optimizer step does: move the weights in place
            for p in params.values():
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype))
        history.append({n: p.detach().clone() for n, p in params.items()})
        updated.append(ema.on_optimizer_step())
    assert updated == [(s + 1) % every == 0 for s in range(steps)]
    want = hand_ema(start, history, decay, every)
    for n, shadow in ema.state_dict().items():
        assert shadow.dtype == torch.float32  # averaged in float32, also for a bf16 weight
        torch.testing.assert_close(shadow.double(), want[n], rtol=1e-6, atol=1e-6)
    # the average differs from the current weights (or the comparison above would prove little)
    assert decay == 0 or (ema.shadow["a"] - params["a"]).abs().max() > 0.1
    # applied() evaluates with the average and gives the weights back
    with ema.applied():
        torch.testing.assert_close(params["a"].detach(), ema.shadow["a"], rtol=0, atol=0)
    assert torch.equal(params["a"].detach(), history[-1]["a"])
    assert torch.equal(params["b"].detach(), history[-1]["b"])


# ----------------------------------------------------------------------------------- the trainer

def toy_trainer(tmp_path, *extra) -> train_mod.Trainer:
    """12 images per iteration (3 prompts x 4), sampled in batches of 6 and trained in micro-batches
    of 3, each from its own initial noise; 4 SDE steps of which train.timestep_fraction 0.75 trains
    the first 3. No grad-norm clip (train.max_grad_norm far above any norm here): the optimizer sees
    the accumulated gradient itself."""
    overrides = ["--model.kind", "toy", "--reward.weights", "{toy_color=1.0}", "--sample.group_size", "4",
                 "--sample.prompts_per_iter", "3", "--sample.batch_size", "6", "--train.batch_size", "3",
                 "--sample.train_steps", "4", "--sample.window_size", "0", "--train.timestep_fraction", "0.75",
                 "--sample.guidance_scale", "1.5", "--train.beta", "0.04", "--train.clip_range", "0.2",
                 "--train.lr", "3e-3", "--train.max_grad_norm", "1e6", "--run.iterations", "3",
                 "--eval.every", "0", "--eval.seeds", "1", "--eval.min_category_images", "0",
                 "--checkpoint.every", "1000", "--log.progress", "false", "--log.tensorboard", "false",
                 "--run.output_dir", str(tmp_path), "--run.name", "toy", "--run.max_minutes", "0",
                 "--sample.cuda_graph", "false", "--sample.shared_initial_noise", "false", *extra]
    cfg = load_config(None, overrides)
    return train_mod.Trainer(cfg, validate(cfg, 1), SOLO)


class StepRecorder:
    """Before each optimizer step: the weights and their gradients; after it: the weights again and
    the EMA (which the trainer updates after the step, so it shows the steps before)."""

    def __init__(self, trainer: train_mod.Trainer):
        self.trainer = trainer
        self.before: list[dict] = []
        self.after: list[dict] = []
        trainer.optimizer.register_step_pre_hook(self._pre)
        trainer.optimizer.register_step_post_hook(self._post)

    def _snapshot(self):
        return {n: p.detach().clone() for n, p in self.trainer.params.items()}

    def _pre(self, optimizer, args, kwargs):
        grads = {n: p.grad.detach().clone() for n, p in self.trainer.params.items() if p.grad is not None}
        self.before.append({"weights": self._snapshot(), "grads": grads})

    def _post(self, optimizer, args, kwargs):
        ema = self.trainer.ema
        self.after.append({"weights": self._snapshot(),
                           "ema": {n: v.clone() for n, v in ema.shadow.items()} if ema else None})


class MicroBatchSpy:
    """Which samples (by their recorded latents, matched bit for bit: the training pass evaluates
    the rollout's own latents) and which recorded steps the trainer's gradient-carrying velocity
    calls evaluated, grouped by the optimizer step that followed them."""

    def __init__(self, trainer: train_mod.Trainer, rb):
        self.latents = rb.traj.latents  # [B, K, ...]
        self.groups: list[list[tuple[tuple[int, ...], int]]] = [[]]
        policy = trainer.policy
        real = policy.velocity

        def velocity(latents, sigma, cond, **kw):
            if torch.is_grad_enabled():
                self.groups[-1].append(self._identify(latents))
            return real(latents, sigma, cond, **kw)

        policy.velocity = velocity
        trainer.optimizer.register_step_pre_hook(lambda *a: self.groups.append([]))

    def _identify(self, latents):
        rows, steps = [], set()
        for x in latents:
            hits = [(i, j) for i in range(self.latents.shape[0]) for j in range(self.latents.shape[1])
                    if torch.equal(self.latents[i, j], x)]
            assert len(hits) == 1, f"a trained latent matches {len(hits)} recorded ones"
            rows.append(hits[0][0])
            steps.add(hits[0][1])
        assert len(steps) == 1, "one velocity call evaluated several recorded steps"
        return tuple(sorted(rows)), steps.pop()


def expected_gradient(trainer, rb, adv, micro_batches, weights) -> dict[str, torch.Tensor]:
    """The mean over ``micro_batches`` and the trained steps of grad fastflow.ops.grpo_step_loss
    (clipped surrogate + beta KL), at ``weights``: the accumulated gradient of one optimizer step."""
    cfg, k_train = trainer.cfg, trainer.derived.trained_timesteps
    s, t = cfg.sample, cfg.train
    params = trainer.params
    saved = {n: p.detach().clone() for n, p in params.items()}
    total = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])
    try:
        for idx in micro_batches:
            sub = rb.traj.select(torch.as_tensor(idx))
            for j in range(k_train):
                v = recompute_step(trainer.policy, sub, j, guidance_scale=s.guidance_scale)
                with torch.no_grad():
                    v_ref = recompute_step(trainer.policy, sub, j, guidance_scale=s.guidance_scale,
                                           reference=True)
                loss, _ = ops.grpo_step_loss(
                    sub.latents[:, j], sub.next_latents[:, j], v, sub.sigmas[j], sub.sigmas_next[j],
                    sub.log_probs[:, j], adv[torch.as_tensor(idx)], noise_level=s.noise_level,
                    clip_range=t.clip_range, beta=t.beta, velocity_ref=v_ref, kind=s.kind,
                    sigma_guard=sub.sigma_guard)
                names = list(params)
                grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
                for n, gr in zip(names, grads):
                    if gr is not None:
                        total[n] += gr.double()
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
    scale = 1.0 / (len(micro_batches) * k_train)
    return {n: (g * scale).float() for n, g in total.items()}


def assert_gradients_match(got: dict, want: dict) -> None:
    """Equal up to float rounding (the trainer's and this computation's micro-batches differ in
    composition, so the network's outputs differ by ulps): 1e-4 of the largest entry. A missing
    1 / grad_accum or 1 / trained steps factor changes every entry by 2x-3x."""
    assert got.keys() == want.keys()
    scale = max(float(w.abs().max()) for w in want.values())
    assert scale > 1e-3  # a gradient to compare, not zeros
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f"{n}: {m}")


def test_one_optimizer_step_applies_the_mean_gradient_of_its_micro_batches_and_steps(tmp_path):
    """train.optimizer_steps 1: the step accumulates all 4 micro-batches (grad_accum 4) x 3 trained
    steps. Every micro-batch holds 3 samples and the loss is a per-sample mean, so the mean over
    micro-batches does not depend on how the trainer shuffled the samples into them."""
    t = toy_trainer(tmp_path, "--train.optimizer_steps", "1")
    assert (t.derived.grad_accum, t.derived.trained_timesteps) == (4, 3)
    rec = StepRecorder(t)
    rb = t.rollout(0)
    adv, _ = t.advantages(rb)
    assert adv.abs().max() > 0.5  # the policy-gradient term is not zero
    t.train_on(rb, adv, 0)
    assert len(rec.before) == 1
    tb = t.derived.train_batch_size
    micro_batches = [tuple(range(i, i + tb)) for i in range(0, rb.traj.batch_size, tb)]
    want = expected_gradient(t, rb, adv, micro_batches, rec.before[0]["weights"])
    assert_gradients_match(rec.before[0]["grads"], want)


def test_each_optimizer_step_applies_the_mean_gradient_of_its_own_micro_batches(tmp_path):
    """train.optimizer_steps 2: two steps of 2 micro-batches each (grad_accum 2) x 3 trained steps,
    the second at the weights the first moved (where the KL to the reference has a gradient too).
    Which samples each step trained on is read off the trainer's velocity calls."""
    t = toy_trainer(tmp_path, "--train.optimizer_steps", "2")
    assert (t.derived.grad_accum, t.derived.trained_timesteps) == (2, 3)
    rec = StepRecorder(t)
    rb = t.rollout(0)
    adv, _ = t.advantages(rb)
    spy = MicroBatchSpy(t, rb)
    t.train_on(rb, adv, 0)
    assert len(rec.before) == 2 and spy.groups[-1] == []  # nothing trained after the last step
    seen = []
    for step, calls in enumerate(spy.groups[:2]):
        micro_batches = sorted({rows for rows, _ in calls})
        assert len(micro_batches) == 2, micro_batches
        for mb in micro_batches:  # each micro-batch at exactly the first 3 recorded steps
            assert sorted(j for rows, j in calls if rows == mb) == [0, 1, 2], calls
        seen += [i for mb in micro_batches for i in mb]
        want = expected_gradient(t, rb, adv, micro_batches, rec.before[step]["weights"])
        assert_gradients_match(rec.before[step]["grads"], want)
    assert sorted(seen) == list(range(12))  # every sample trained once per epoch
    moved = max(float((rec.before[1]["weights"][n] - rec.before[0]["weights"][n]).abs().max())
                for n in t.params)
    assert moved > 1e-3  # the second step's gradient is taken at other weights


def test_trainer_ema_is_the_hand_computed_average_of_the_stepped_weights(tmp_path):
    """train.ema_decay 0.7, train.ema_every 3, 2 optimizer steps per iteration over 3 iterations:
    the EMA moves after steps 3 and 6 only, towards the weights of those steps."""
    decay, every = 0.7, 3
    t = toy_trainer(tmp_path, "--train.optimizer_steps", "2", "--train.ema_decay", str(decay),
                    "--train.ema_every", str(every), "--train.max_grad_norm", "1.0")
    rec = StepRecorder(t)
    start = {n: p.detach().clone() for n, p in t.params.items()}
    for it in range(3):
        rb = t.rollout(it)
        adv, _ = t.advantages(rb)
        t.train_on(rb, adv, it)
    history = [a["weights"] for a in rec.after]
    assert len(history) == 6
    for step in range(1, 7):  # as it stood right after each step: the steps before it
        want = hand_ema(start, history[:step - 1], decay, every)
        for n, v in rec.after[step - 1]["ema"].items():
            torch.testing.assert_close(v.double(), want[n], rtol=1e-6, atol=1e-7)
    want = hand_ema(start, history, decay, every)
    for n, v in t.ema.shadow.items():
        torch.testing.assert_close(v.double(), want[n], rtol=1e-6, atol=1e-7)
    # the weights moved far more than the tolerance, and the average lags behind them
    assert max(float((history[-1][n] - start[n]).abs().max()) for n in start) > 1e-2
    assert max(float((t.ema.shadow[n] - history[-1][n]).abs().max()) for n in start) > 1e-3
