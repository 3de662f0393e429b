"""The FLUX policy on a tiny random FluxPipeline (FLUX.1-dev's structure and scheduler) saved to
disk and loaded through from_pretrained (fastflow.models._tiny): the pipeline's sigmas and
sampling conventions, guidance embedding, on-policy ratio, gradients reaching only the LoRA (with
the MLP targets), the adapter-disabled reference, and LoRA export to diffusers."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers import FluxPipeline, FluxTransformer2DModel  # noqa: E402

from fastflow.models import build_policy  # noqa: E402
from fastflow.models._tiny import save_tiny_flux  # noqa: E402
from fastflow.rollout import Policy, sample  # noqa: E402
from tests.tiny_pipelines import rollout, step_loss, tiny_cfg, train  # noqa: E402

PROMPTS = ["a red cube", "two blue cats"]
GUIDANCE, NOISE = 3.5, 0.9


@pytest.fixture(scope="module")
def flux_path(tmp_path_factory):
    return save_tiny_flux(tmp_path_factory.mktemp("tiny_flux") / "pipe")


@pytest.fixture(scope="module")
def trained(flux_path):
    """A LoRA policy after one rollout and two optimizer steps, with the on-policy stats and which
    parameters the first backward reached."""
    torch.manual_seed(0)
    policy = build_policy(tiny_cfg("flux", flux_path), "cpu")
    traj = rollout(policy, PROMPTS, guidance_scale=GUIDANCE, noise_level=NOISE)
    adv = torch.tensor([1.0, -1.0])
    loss, _ = step_loss(policy, traj, 0, adv, guidance_scale=GUIDANCE, noise_level=NOISE)
    loss.backward()
    grads = {n: (p.grad is not None and bool(p.grad.abs().sum() > 0))
             for n, p in policy.transformer.named_parameters()}
    for p in policy.transformer.parameters():
        p.grad = None
    stats = train(policy, traj, adv, guidance_scale=GUIDANCE, noise_level=NOISE)
    return policy, traj, stats, grads


def _base_velocity(model, policy, x, s, cond, guidance):
    return model(hidden_states=x, timestep=s, guidance=torch.full((x.shape[0],), guidance),
                 pooled_projections=cond["pooled_prompt_embeds"],
                 encoder_hidden_states=cond["prompt_embeds"],
                 txt_ids=torch.zeros(cond["prompt_embeds"].shape[1], 3), img_ids=policy._img_ids,
                 return_dict=False)[0]


def test_policy_protocol_and_packed_latents(flux_path):
    policy = build_policy(tiny_cfg("flux", flux_path), "cpu")
    assert isinstance(policy, Policy)
    # 32 px, VAE factor 2 -> 16 x 16 latents of 4 channels -> 8 x 8 tokens of 2 x 2 x 4 = 16
    assert policy.latent_shape == (64, 16)
    cond = policy.encode_prompts(PROMPTS)
    assert cond["prompt_embeds"].shape == (2, 128, 32)
    assert cond["pooled_prompt_embeds"].shape == (2, 32)
    traj = rollout(policy, PROMPTS, steps=2, guidance_scale=GUIDANCE, noise_level=NOISE)
    assert torch.isfinite(traj.log_probs).all()
    images = policy.decode(traj.final)
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    v = policy.velocity(traj.final, torch.full((2,), 0.5), cond, guidance_scale=GUIDANCE)
    assert isinstance(v, torch.Tensor) and v.shape == (2, 64, 16)
    v2 = policy.velocity(traj.final, torch.full((2,), 0.5), cond, guidance_scale=1.0)
    assert (v - v2).abs().max() > 0  # guidance reaches the guidance embedding


def test_sigmas_equal_the_pipeline(flux_path):
    pipe = FluxPipeline.from_pretrained(flux_path)
    policy = build_policy(tiny_cfg("flux", flux_path), "cpu")
    for n in (1, 6, 28):
        pipe("x", num_inference_steps=n, height=32, width=32, output_type="latent",
             max_sequence_length=16)
        got = policy.sigmas(n)
        assert got.shape == (n + 1,) and got[0] == 1 and got[-1] == 0
        assert torch.equal(got, pipe.scheduler.sigmas.to(torch.float32)), n
    # dynamic shifting depends on the resolution (image token count): 64 px differs from 32 px
    big = build_policy(tiny_cfg("flux", flux_path, resolution=64), "cpu")
    assert big.sigmas(6)[3] > policy.sigmas(6)[3]
    static = build_policy(tiny_cfg("flux", flux_path, shift=3.0), "cpu")
    t = torch.linspace(1, 1 / 6, 6, dtype=torch.float64)
    torch.testing.assert_close(static.sigmas(6)[:-1].double(), 3 * t / (1 + 2 * t), atol=1e-6, rtol=0)


def test_ode_rollout_reproduces_the_pipeline(flux_path):
    """Same initial packed latents, same prompt: fastflow's ODE sampler == FluxPipeline's loop."""
    pipe = FluxPipeline.from_pretrained(flux_path)
    policy = build_policy(tiny_cfg("flux", flux_path), "cpu")  # fresh LoRA: B = 0, the base model
    noise = torch.randn(1, *policy.latent_shape, generator=torch.Generator().manual_seed(3))
    ours = sample(policy, policy.encode_prompts([PROMPTS[0]]), num_steps=3, guidance_scale=GUIDANCE,
                  noise_level=0.0, kind="ode", latents=noise)
    theirs = pipe(PROMPTS[0], num_inference_steps=3, height=32, width=32, guidance_scale=GUIDANCE,
                  latents=noise.clone(), output_type="latent", max_sequence_length=128).images
    torch.testing.assert_close(ours.final, theirs, rtol=1e-5, atol=1e-5)
    image = pipe(PROMPTS[0], num_inference_steps=3, height=32, width=32, guidance_scale=GUIDANCE,
                 latents=noise.clone(), output_type="pt", max_sequence_length=128).images
    torch.testing.assert_close(policy.decode(ours.final), image, rtol=1e-4, atol=1e-4)


def test_on_policy_ratio_is_one_fp32(trained):
    _, traj, stats, _ = trained
    assert len(stats) == traj.num_steps == 3
    for s in stats:
        assert abs(s["ratio_min"] - 1) <= 1e-6 and abs(s["ratio_max"] - 1) <= 1e-6, s


def test_gradients_reach_only_the_lora_including_the_mlps(trained):
    policy, _, _, grads = trained
    trainable = set(policy.named_trainable_parameters())
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    for target in ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
                   "attn.to_add_out", "single_transformer_blocks.0.attn.to_q"):
        assert any(f"{target}.lora_B." in n for n in trainable), target
    with_grad = {f"transformer.{n}" for n, g in grads.items() if g}
    assert with_grad and with_grad <= trainable
    assert all(p.grad is None for p in policy.pipe.text_encoder_2.parameters())


def test_reference_is_the_base_model_and_export_loads_in_diffusers(trained, flux_path, tmp_path):
    policy, traj, _, _ = trained
    base = FluxTransformer2DModel.from_pretrained(flux_path, subfolder="transformer")
    x, s, cond = traj.latents[:, 1], traj.sigmas[1].expand(2), traj.cond
    with torch.no_grad():
        ours = policy.velocity(x, s, cond, guidance_scale=GUIDANCE)
        with policy.reference():
            ref = policy.velocity(x, s, cond, guidance_scale=GUIDANCE)
        v_base = _base_velocity(base, policy, x, s, cond, GUIDANCE)
    torch.testing.assert_close(ref, v_base, rtol=0, atol=1e-6)
    assert (ours - v_base).abs().max() > 1e-4  # the trained LoRA is not zero

    policy.export_lora(tmp_path / "lora")
    pipe = FluxPipeline.from_pretrained(flux_path)
    pipe.load_lora_weights(tmp_path / "lora")
    with torch.no_grad():
        theirs = _base_velocity(pipe.transformer, policy, x, s, cond, GUIDANCE)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_bf16_on_policy_ratio(flux_path):
    policy = build_policy(tiny_cfg("flux", flux_path, dtype="bfloat16"), "cpu")
    assert all(p.dtype == torch.float32 for p in policy.named_trainable_parameters().values())
    traj = rollout(policy, PROMPTS, guidance_scale=GUIDANCE, noise_level=NOISE)
    for j in range(traj.num_steps):
        _, stats = step_loss(policy, traj, j, torch.tensor([1.0, -1.0]), guidance_scale=GUIDANCE,
                             noise_level=NOISE)
        assert abs(float(stats["ratio_min"]) - 1) <= 1e-4 and abs(float(stats["ratio_max"]) - 1) <= 1e-4


def test_bad_resolution_is_a_clear_error(flux_path):
    with pytest.raises(ValueError, match="model.resolution"):
        build_policy(tiny_cfg("flux", flux_path, resolution=30), "cpu")
