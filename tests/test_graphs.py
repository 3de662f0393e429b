"""The graph-captured rollout (fastflow.graphs) equals fastflow.rollout.sample.

On a CPU: the fallback to sample() is taken and logged; the captured program's code (mode
"static": the same buffers and straight-line body a CUDA graph captures, run without capturing)
reproduces sample() bit for bit; Philox noise (through Triton's interpreter) is fresh at every call
and its recorded log-probs are those of the transitions. With CUDA the same checks run on real
captured graphs (tests marked gpu).
"""

import logging
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402

import pytest  # noqa: E402

HAVE_TRITON = importlib.util.find_spec("triton") is not None
if HAVE_TRITON:
    if "fastflow.kernels" in sys.modules and not sys.modules["fastflow.kernels"].INTERPRETED \
            and os.environ.get("TRITON_INTERPRET") == "1":
        for name in [m for m in sys.modules if m == "fastflow.kernels" or m.startswith("fastflow.kernels.")]:
            del sys.modules[name]
    kernels = importlib.import_module("fastflow.kernels")

from fastflow import ops, sde  # noqa: E402
from fastflow.runtime import ForwardContext  # noqa: E402
from fastflow.graphs import GraphedSampler, graphed_sample, sampler_for  # noqa: E402
from fastflow.models.toy import ToyPolicy  # noqa: E402
from fastflow.rollout import sample, sde_window  # noqa: E402

PROMPTS = ["a red square", "a blue square", "a green square", "a yellow square"]
CUDA = torch.cuda.is_available()


def gpu(f):
    """A GPU test: marked gpu, skipped without CUDA."""
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason="needs CUDA")(f))
KW = dict(num_steps=5, guidance_scale=4.5, noise_level=0.7)


def _cond(policy, n):
    return policy.encode_prompts([PROMPTS[i % len(PROMPTS)] for i in range(n)])


def _assert_same_traj(a, b, exact=True, tol=1e-5):
    check = (lambda x, y: torch.testing.assert_close(x, y, rtol=0, atol=0)) if exact else \
        (lambda x, y: torch.testing.assert_close(x, y, rtol=tol, atol=tol))
    for name in ("latents", "next_latents", "log_probs", "final"):
        check(getattr(a, name).cpu(), getattr(b, name).cpu())
    assert torch.equal(a.step_indices, b.step_indices)
    assert torch.equal(a.sigmas, b.sigmas) and torch.equal(a.sigmas_next, b.sigmas_next)
    assert a.sigma_guard == b.sigma_guard
    assert torch.equal(a.prompt_ids, b.prompt_ids)


# ------------------------------------------------------------------------------------ CPU


@pytest.mark.skipif(CUDA, reason="checks the CPU fallback")
def test_cpu_falls_back_to_sample_logs_why_and_matches(caplog, monkeypatch):
    monkeypatch.setenv("FASTFLOW_KERNELS", "torch")
    policy = ToyPolicy()
    cond = _cond(policy, 4)
    seeds = torch.tensor([3, 1, 4, 1])
    with caplog.at_level(logging.INFO, logger="fastflow.graphs"):
        got = graphed_sample(policy, cond, seeds=seeds, **KW)
    want = sample(policy, cond, seeds=seeds, **KW)
    _assert_same_traj(got, want)
    s = sampler_for(policy)
    assert s.last_path == "eager" and "not CUDA" in s.last_reason
    assert any("not CUDA" in r.getMessage() and r.levelno == logging.INFO for r in caplog.records)
    assert s.captures == 0 and not s.programs
    # logged once per reason, not at every rollout
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastflow.graphs"):
        graphed_sample(policy, cond, seeds=seeds, **KW)
    assert not caplog.records


@pytest.mark.parametrize("kind,window,cfg", [("sde", None, 4.5), ("cps", None, 1.0),
                                             ("sde", (1, 2), 4.5), ("ode", None, 4.5)])
def test_static_program_equals_sample_bitwise(kind, window, cfg, monkeypatch):
    monkeypatch.setenv("FASTFLOW_KERNELS", "torch")
    policy = ToyPolicy()
    sampler = GraphedSampler(policy, mode="static")
    win = sde_window(5, *window) if window else None
    kw = dict(KW, kind=kind, guidance_scale=cfg, window=win)
    for seeds in ([5, 6, 7], [8, 9, 10]):  # second call replays the same program, fresh inputs
        cond = _cond(policy, 3)
        got = sampler(cond, seeds=torch.tensor(seeds), **kw)
        want = sample(policy, cond, seeds=torch.tensor(seeds), **kw)
        _assert_same_traj(got, want)
        assert sampler.last_path == "static"
    assert len(sampler.programs) == 1
    if kind != "ode":
        assert got.log_probs.shape == (3, len(win) if win else 5) and torch.isfinite(got.log_probs).all()


def test_static_program_generator_latents_and_shape_keys(monkeypatch):
    monkeypatch.setenv("FASTFLOW_KERNELS", "torch")
    policy = ToyPolicy()
    sampler = GraphedSampler(policy, mode="static", noise="host")
    cond = _cond(policy, 2)
    got = sampler(cond, generator=torch.Generator().manual_seed(7), **KW)
    want = sample(policy, cond, generator=torch.Generator().manual_seed(7), **KW)
    _assert_same_traj(got, want)
    x0 = torch.randn(2, *policy.latent_shape)
    got = sampler(cond, latents=x0, generator=torch.Generator().manual_seed(1), **KW)
    want = sample(policy, cond, latents=x0, generator=torch.Generator().manual_seed(1), **KW)
    _assert_same_traj(got, want)
    assert len(sampler.programs) == 1
    sampler(_cond(policy, 3), seeds=torch.tensor([1, 2, 3]), **KW)          # new batch size
    sampler(cond, seeds=torch.tensor([1, 2]), **dict(KW, num_steps=4))      # new step count
    assert len(sampler.programs) == 3
    # returned trajectories are copies: a later call does not overwrite them
    a = sampler(cond, seeds=torch.tensor([1, 2]), **KW)
    keep = a.final.clone()
    sampler(cond, seeds=torch.tensor([3, 4]), **KW)
    assert torch.equal(a.final, keep)


def test_static_program_sees_weight_updates_and_replaced_parameters(monkeypatch):
    monkeypatch.setenv("FASTFLOW_KERNELS", "torch")
    policy = ToyPolicy()
    sampler = GraphedSampler(policy, mode="static")
    cond, seeds = _cond(policy, 2), torch.tensor([1, 2])
    before = sampler(cond, seeds=seeds, **KW)
    with torch.no_grad():
        for p in policy.net.parameters():
            p.add_(0.05)                       # in place, as an optimizer step
    after = sampler(cond, seeds=seeds, **KW)
    assert not torch.equal(before.final, after.final)
    _assert_same_traj(after, sample(policy, cond, seeds=seeds, **KW))
    first = sampler.programs[next(iter(sampler.programs))]
    w = policy.net.net[0].weight
    w.data = w.data.clone() * 1.5             # new storage: the program must be rebuilt
    got = sampler(cond, seeds=seeds, **KW)
    assert sampler.programs[next(iter(sampler.programs))] is not first
    _assert_same_traj(got, sample(policy, cond, seeds=seeds, **KW))


def test_one_static_program_serves_every_window(monkeypatch):
    """The window picks each step's SDE or ODE body; it is not part of the program's key, so a
    random window per iteration never builds (or, on CUDA, captures) a new program."""
    monkeypatch.setenv("FASTFLOW_KERNELS", "torch")
    policy = ToyPolicy()
    sampler = GraphedSampler(policy, mode="static")
    cond = _cond(policy, 3)
    for start in (0, 3, 1, 2, 0):
        win = sde_window(5, 2, start)
        got = sampler(cond, seeds=torch.tensor([4, 5, 6]), window=win, **KW)
        _assert_same_traj(got, sample(policy, cond, seeds=torch.tensor([4, 5, 6]), window=win, **KW))
        assert got.step_indices.tolist() == [start, start + 1]
    assert len(sampler.programs) == 1


def test_drop_forgets_the_programs_of_one_kind(monkeypatch):
    monkeypatch.setenv("FASTFLOW_KERNELS", "torch")
    policy = ToyPolicy()
    sampler = GraphedSampler(policy, mode="static")
    cond = _cond(policy, 2)
    sampler(cond, seeds=torch.tensor([1, 2]), **KW)
    sampler(cond, seeds=torch.tensor([1, 2]), **dict(KW, kind="ode", num_steps=8))
    assert sampler.drop(kind="ode") == 1
    assert [p.kind for p in sampler.programs.values()] == ["sde"]


def test_sharded_policies_and_required_graphs_are_decided_before_capture(monkeypatch, caplog):
    monkeypatch.setenv("FASTFLOW_KERNELS", "torch")
    policy = ToyPolicy()
    with pytest.raises(ValueError, match="cuda_graph = required.*not CUDA"):
        GraphedSampler(policy, required=True).check("cpu")
    with pytest.raises(RuntimeError, match="cuda_graph = required.*not CUDA"):
        GraphedSampler(policy, required=True)(_cond(policy, 2), seeds=torch.tensor([1, 2]), **KW)
    GraphedSampler(policy, mode="static", required=True).check("cpu")  # static never falls back
    sharded = GraphedSampler(policy, sharded=True)
    reason = sharded._fallback_reason(torch.device("cuda"))
    if CUDA:
        assert "sharded (FSDP2)" in reason
    else:  # without CUDA the device is the first reason; the sharded one is next in line
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert "sharded (FSDP2)" in sharded._fallback_reason(torch.device("cuda"))


def test_bad_options_and_philox_without_kernels(monkeypatch):
    policy = ToyPolicy()
    with pytest.raises(ValueError, match="mode must be one of"):
        GraphedSampler(policy, mode="fast")
    with pytest.raises(ValueError, match="noise must be one of"):
        GraphedSampler(policy, noise="gauss")
    with pytest.raises(ValueError, match="attention must be one of"):
        ForwardContext("cpu", attention="xformers")  # the attention kernels are the forward context's
    monkeypatch.setenv("FASTFLOW_KERNELS", "torch")
    with pytest.raises(RuntimeError, match="philox.*needs the fused kernels"):
        GraphedSampler(policy, mode="static", noise="philox")(_cond(policy, 2), **KW)


def _philox_checks(policy, sampler, device):
    """Fresh noise per call, reproducible per generator seed, log-probs of the real transitions."""
    cond = _cond(policy, 4)
    runs = [sampler(cond, generator=torch.Generator(device).manual_seed(s), device=device, **KW)
            for s in (0, 0, 1)]
    assert sampler.last_path == sampler.mode
    assert len(sampler.programs) == 1
    torch.testing.assert_close(runs[0].final, runs[1].final, rtol=0, atol=0)
    assert not torch.allclose(runs[0].final, runs[2].final)
    # every step's noise differs from the others (the offset advances inside the program)
    t = runs[2]
    eps = []
    for j in range(t.num_steps):
        x, y = t.latents[:, j], t.next_latents[:, j]
        s, sn = t.sigmas[j].item(), t.sigmas_next[j].item()
        v = policy.velocity(x, torch.full((4,), s, device=device), cond, guidance_scale=4.5)
        ref = sde.sde_step(x, v, s, sn, noise_level=0.7, prev_sample=y, sigma_guard=t.sigma_guard)
        torch.testing.assert_close(ref.log_prob, t.log_probs[:, j], rtol=1e-4, atol=1e-4)
        dt = sn - s
        eps.append(((y - ref.mean) / (ref.std[:, None, None, None] * (-dt) ** 0.5)).flatten())
    eps = torch.stack(eps)
    assert eps.mean().abs() < 0.1 and (eps.std() - 1).abs() < 0.1
    corr = torch.corrcoef(eps)
    assert (corr - torch.eye(len(eps), device=corr.device)).abs().max() < 0.25


@pytest.mark.skipif(not HAVE_TRITON or CUDA or not kernels.INTERPRETED,
                    reason="needs triton's CPU interpreter")
def test_static_program_philox_noise_is_fresh_and_log_probs_match(monkeypatch):
    monkeypatch.setenv("FASTFLOW_KERNELS", "triton")
    policy = ToyPolicy()
    _philox_checks(policy, GraphedSampler(policy, mode="static", noise="philox"), "cpu")


# ------------------------------------------------------------------------------------ GPU


@pytest.mark.parametrize("kind", ["sde", "cps"])
@pytest.mark.parametrize("window", [None, (2, 2)])
@gpu
def test_graph_equals_eager_on_cuda(kind, window):
    policy = ToyPolicy(device="cuda")
    sampler = GraphedSampler(policy, mode="graph")
    win = sde_window(5, *window) if window else None
    kw = dict(KW, kind=kind, window=win, device="cuda")
    for seeds in ([1, 2, 3, 4], [5, 6, 7, 8]):
        cond = _cond(policy, 4)
        got = sampler(cond, seeds=torch.tensor(seeds), **kw)
        assert sampler.last_path == "graph", sampler.last_reason
        want = sample(policy, cond, seeds=torch.tensor(seeds), **kw)
        _assert_same_traj(got, want, exact=False)
    assert sampler.captures == KW["num_steps"]  # one graph per step, captured once


@gpu
def test_random_windows_replay_one_program_on_cuda():
    policy = ToyPolicy(device="cuda")
    sampler = GraphedSampler(policy, mode="graph")
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        start = int(torch.randint(0, 4, (1,), generator=g))
        win = sde_window(5, 2, start)
        cond = _cond(policy, 4)
        kw = dict(KW, window=win, device="cuda")
        got = sampler(cond, seeds=torch.tensor([1, 2, 3, 4]), **kw)
        assert sampler.last_path == "graph", sampler.last_reason
        _assert_same_traj(got, sample(policy, cond, seeds=torch.tensor([1, 2, 3, 4]), **kw), exact=False)
    assert len(sampler.programs) == 1 and sampler.captures <= 2 * KW["num_steps"]


@gpu
def test_graph_philox_fresh_noise_on_cuda():
    policy = ToyPolicy(device="cuda")
    sampler = GraphedSampler(policy, mode="graph", noise="philox")
    _philox_checks(policy, sampler, "cuda")
    assert sampler.captures == KW["num_steps"]


@gpu
def test_graph_sees_optimizer_updates_on_cuda():
    policy = ToyPolicy(device="cuda")
    sampler = GraphedSampler(policy)
    cond, seeds = _cond(policy, 4), torch.tensor([1, 2, 3, 4])
    sampler(cond, seeds=seeds, device="cuda", **KW)
    with torch.no_grad():
        for p in policy.net.parameters():
            p.mul_(1.1)
    got = sampler(cond, seeds=seeds, device="cuda", **KW)
    _assert_same_traj(got, sample(policy, cond, seeds=seeds, device="cuda", **KW), exact=False)
    assert sampler.captures == KW["num_steps"]


@gpu
def test_capture_error_falls_back_and_is_logged(caplog):
    class Syncing(ToyPolicy):
        def velocity(self, latents, sigma, cond, *, guidance_scale):
            if float(sigma[0]) > 2:  # a host sync: forbidden while capturing
                raise AssertionError
            return super().velocity(latents, sigma, cond, guidance_scale=guidance_scale)

    policy = Syncing(device="cuda")
    sampler = GraphedSampler(policy)
    cond, seeds = _cond(policy, 2), torch.tensor([1, 2])
    with caplog.at_level(logging.WARNING, logger="fastflow.graphs"):
        got = sampler(cond, seeds=seeds, device="cuda", **KW)
    assert sampler.last_path == "eager" and "capture failed" in sampler.last_reason
    assert any("capture failed" in r.getMessage() for r in caplog.records)
    _assert_same_traj(got, sample(policy, cond, seeds=seeds, device="cuda", **KW))


@gpu
def test_graph_sd3_tiny_bf16_equals_eager(tmp_path):
    from fastflow.models._tiny import tiny_sd3_pipeline
    from fastflow.models.sd3 import SD3Policy

    pipe = tiny_sd3_pipeline()
    policy = SD3Policy(pipe, device="cuda", dtype=torch.bfloat16, resolution=32, lora_rank=4,
                       lora_alpha=8.0)
    cond = policy.encode_prompts(["a red cube", "two blue balls", "a cat", "a dog"])
    seeds = torch.tensor([1, 2, 3, 4])
    ac = torch.autocast("cuda", dtype=torch.bfloat16)
    sampler = GraphedSampler(policy)
    got = sampler(cond, seeds=seeds, autocast=ac, device="cuda", **KW)
    assert sampler.last_path == "graph", sampler.last_reason
    want = sample(policy, cond, seeds=seeds, autocast=ac, device="cuda", **KW)
    _assert_same_traj(got, want, exact=False, tol=2e-3)
    assert torch.isfinite(got.log_probs).all()
