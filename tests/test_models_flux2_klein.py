"""The FLUX.2 [klein] policy on tiny random Flux2KleinPipelines (28-layer Qwen3 text encoder, the
in-memory Qwen tokenizer with Qwen3's chat template, Flux2Transformer2DModel, AutoencoderKLFlux2
with batch-norm statistics), base and step-distilled, saved to disk and loaded through
from_pretrained (fastflow.models._tiny): prompt rows and ids as the pipeline makes them, its
sigmas (FLUX.2's empirical shift, by resolution and step count), CFG only for the base model,
the ODE sampler reproducing the pipeline, the on-policy ratio, LoRA on the public recipe's
targets, the reference, export to the stock pipeline and full fine-tuning."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers import Flux2KleinPipeline, Flux2Transformer2DModel  # noqa: E402

from fastflow.models import build_policy  # noqa: E402
from fastflow.models._tiny import save_tiny_flux2_klein  # noqa: E402
from fastflow.rollout import Policy, sample  # noqa: E402
from fastflow.sde import GuidedVelocity  # noqa: E402
from tests.tiny_pipelines import rollout, step_loss, tiny_cfg, train  # noqa: E402

PROMPTS = ["a red cube", "two blue cats"]
CFG_W, NOISE = 4.0, 0.7


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread: these toy-sized matmuls run in microseconds on one thread but can wait
    milliseconds each for a second thread on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def klein_path(tmp_path_factory):
    return save_tiny_flux2_klein(tmp_path_factory.mktemp("tiny_klein") / "base")


@pytest.fixture(scope="module")
def pipe(klein_path):
    return Flux2KleinPipeline.from_pretrained(klein_path)


@pytest.fixture(scope="module")
def trained(klein_path):
    """A LoRA policy after one rollout and two optimizer steps, with the on-policy stats and which
    parameters the first backward reached."""
    torch.manual_seed(0)
    policy = build_policy(tiny_cfg("flux2_klein", klein_path), "cpu")
    traj = rollout(policy, PROMPTS, guidance_scale=CFG_W, noise_level=NOISE)
    adv = torch.tensor([1.0, -1.0])
    loss, _ = step_loss(policy, traj, 0, adv, guidance_scale=CFG_W, noise_level=NOISE)
    loss.backward()
    grads = {n: (p.grad is not None and bool(p.grad.abs().sum() > 0))
             for n, p in policy.transformer.named_parameters()}
    for p in policy.transformer.parameters():
        p.grad = None
    stats = train(policy, traj, adv, guidance_scale=CFG_W, noise_level=NOISE)
    return policy, traj, stats, grads


def _transformer_velocity(model, policy, x, s, embeds):
    return model(hidden_states=x, timestep=s, guidance=None, encoder_hidden_states=embeds,
                 txt_ids=policy._txt_ids, img_ids=policy._img_ids, return_dict=False)[0]


def test_policy_protocol_ids_and_rows_as_the_pipeline(klein_path, pipe):
    policy = build_policy(tiny_cfg("flux2_klein", klein_path), "cpu")
    assert isinstance(policy, Policy) and policy.cfg  # the base model runs CFG
    # 32 px, VAE factor 2 -> 16 x 16 latents of 4 channels -> 8 x 8 patches of 2 x 2 x 4 = 16
    assert policy.latent_shape == (64, 16)
    cond = policy.encode_prompts(PROMPTS)
    # 512 padded tokens, hidden states of layers 9, 18, 27 of a width-16 Qwen3
    assert set(cond) == {"prompt_embeds"} and cond["prompt_embeds"].shape == (2, 512, 48)
    theirs, text_ids = pipe.encode_prompt(PROMPTS, device="cpu")
    torch.testing.assert_close(cond["prompt_embeds"], theirs, rtol=0, atol=0)
    assert torch.equal(policy._txt_ids, text_ids[0]) and torch.equal(text_ids[0], text_ids[1])
    latents, latent_ids = pipe.prepare_latents(1, 4, 32, 32, torch.float32, "cpu", None)
    assert latents.shape == (1, *policy.latent_shape) and torch.equal(policy._img_ids, latent_ids[0])
    traj = rollout(policy, PROMPTS, steps=2, guidance_scale=CFG_W, noise_level=NOISE)
    assert torch.isfinite(traj.log_probs).all()
    images = policy.decode(traj.final)
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1


def test_sigmas_equal_the_pipeline_by_resolution_and_step_count(klein_path, pipe):
    grids = {}
    for res in (32, 64):
        policy = build_policy(tiny_cfg("flux2_klein", klein_path, resolution=res), "cpu")
        for n in (1, 4, 8):
            pipe(prompt=PROMPTS[0], num_inference_steps=n, height=res, width=res, guidance_scale=1.0,
                 output_type="latent", max_sequence_length=16, text_encoder_out_layers=(9, 18, 27))
            got = policy.sigmas(n)
            assert got.shape == (n + 1,) and got[0] == 1 and got[-1] == 0
            assert torch.equal(got, pipe.scheduler.sigmas.to(torch.float32)), (res, n)
            grids[res, n] = got
    assert grids[32, 8][4] != grids[64, 8][4]  # mu follows the image tokens...
    m4 = build_policy(tiny_cfg("flux2_klein", klein_path), "cpu")
    assert not torch.allclose(m4.sigmas(4)[1:3], grids[32, 8][2:6:2])  # ...and the step count
    static = build_policy(tiny_cfg("flux2_klein", klein_path, shift=3.0), "cpu")
    t = torch.linspace(1, 1 / 4, 4, dtype=torch.float64)
    torch.testing.assert_close(static.sigmas(4)[:-1].double(), 3 * t / (1 + 2 * t), atol=1e-6, rtol=0)


def test_ode_rollout_reproduces_the_pipeline_with_cfg(klein_path, pipe):
    """Same initial packed latents and prompt, CFG 4 with the empty negative: fastflow's ODE
    sampler, the VAE latents and decode == Flux2KleinPipeline's loop."""
    policy = build_policy(tiny_cfg("flux2_klein", klein_path), "cpu")  # fresh LoRA: the base model
    noise = torch.randn(1, *policy.latent_shape, generator=torch.Generator().manual_seed(3))
    ours = sample(policy, policy.encode_prompts([PROMPTS[0]]), num_steps=3, guidance_scale=CFG_W,
                  noise_level=0.0, kind="ode", latents=noise)
    # the pipeline's latents argument is the unpacked [B, 4 C, H / 16, W / 16] grid
    grid = noise.view(1, 8, 8, 16).permute(0, 3, 1, 2).contiguous()
    kw = dict(prompt=PROMPTS[0], num_inference_steps=3, height=32, width=32, guidance_scale=CFG_W)
    theirs = pipe(latents=grid.clone(), output_type="latent", **kw).images
    torch.testing.assert_close(policy.vae_latents(ours.final), theirs, rtol=1e-5, atol=1e-5)
    assert (ours.final - noise).abs().max() > 0.1  # the sampler moved
    image = pipe(latents=grid.clone(), output_type="pt", **kw).images
    torch.testing.assert_close(policy.decode(ours.final), image, rtol=1e-4, atol=1e-4)


def test_cfg_is_one_batched_forward_of_negative_and_prompt(klein_path):
    policy = build_policy(tiny_cfg("flux2_klein", klein_path), "cpu")
    cond = policy.encode_prompts(PROMPTS)
    x = torch.randn(2, *policy.latent_shape)
    s = torch.full((2,), 0.6)
    calls = []
    hook = policy.transformer.register_forward_hook(
        lambda m, a, k, o: calls.append(k["hidden_states"].shape[0]), with_kwargs=True)
    v = policy.velocity(x, s, cond, guidance_scale=CFG_W)
    hook.remove()
    assert calls == [4] and isinstance(v, GuidedVelocity) and v.scale == CFG_W
    torch.testing.assert_close(v.cond, policy.velocity(x, s, cond, guidance_scale=1.0), rtol=1e-5, atol=1e-5)
    neg = policy.encode_prompts([""])["prompt_embeds"].expand(2, -1, -1)
    torch.testing.assert_close(v.uncond, policy.velocity(x, s, {"prompt_embeds": neg}, guidance_scale=1.0),
                               rtol=1e-5, atol=1e-5)


def test_the_distilled_model_samples_without_cfg_as_its_pipeline(tmp_path):
    path = save_tiny_flux2_klein(tmp_path / "distilled", distilled=True)
    pipe = Flux2KleinPipeline.from_pretrained(path)
    policy = build_policy(tiny_cfg("flux2_klein", path), "cpu")
    assert not policy.cfg
    noise = torch.randn(1, *policy.latent_shape, generator=torch.Generator().manual_seed(4))
    cond = policy.encode_prompts([PROMPTS[1]])
    v = policy.velocity(noise, torch.full((1,), 0.5), cond, guidance_scale=CFG_W)
    assert isinstance(v, torch.Tensor)  # guidance ignored: no doubled batch
    ours = sample(policy, cond, num_steps=2, guidance_scale=CFG_W, noise_level=0.0, kind="ode", latents=noise)
    grid = noise.view(1, 8, 8, 16).permute(0, 3, 1, 2).contiguous()
    theirs = pipe(prompt=PROMPTS[1], num_inference_steps=2, height=32, width=32, guidance_scale=CFG_W,
                  latents=grid, output_type="latent").images
    torch.testing.assert_close(policy.vae_latents(ours.final), theirs, rtol=1e-5, atol=1e-5)


def test_on_policy_ratio_is_one_fp32(trained):
    _, traj, stats, _ = trained
    assert len(stats) == traj.num_steps == 3
    for s in stats:
        assert abs(s["ratio_min"] - 1) <= 1e-6 and abs(s["ratio_max"] - 1) <= 1e-6, s
        assert s["kl"] == 0.0


def test_gradients_reach_only_the_lora_on_the_recipe_targets(trained):
    policy, _, _, grads = trained
    trainable = set(policy.named_trainable_parameters())
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    for target in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_v_proj",
                   "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.ff.linear_in",
                   "transformer_blocks.0.ff.linear_out", "transformer_blocks.0.ff_context.linear_in",
                   "single_transformer_blocks.0.attn.to_qkv_mlp_proj"):
        assert f"transformer.{target}.lora_B.default.weight" in trainable, target
    assert not any("single_transformer_blocks.0.attn.to_out." in n for n in trainable)
    with_grad = {f"transformer.{n}" for n, g in grads.items() if g}
    assert with_grad and with_grad <= trainable and all(".lora_B." in n for n in with_grad)
    assert all(p.grad is None for p in policy.pipe.text_encoder.parameters())


def test_reference_is_the_base_model_and_export_loads_in_the_stock_pipeline(trained, klein_path, tmp_path):
    policy, traj, _, _ = trained
    base = Flux2Transformer2DModel.from_pretrained(klein_path, subfolder="transformer")
    x, s, embeds = traj.latents[:, 1], traj.sigmas[1].expand(2), traj.cond["prompt_embeds"]
    with torch.no_grad():
        ours = policy.velocity(x, s, traj.cond, guidance_scale=1.0)
        with policy.reference():
            ref = policy.velocity(x, s, traj.cond, guidance_scale=1.0)
        v_base = _transformer_velocity(base, policy, x, s, embeds)
    torch.testing.assert_close(ref, v_base, rtol=0, atol=1e-6)
    assert (ours - v_base).abs().max() > 1e-4

    assert policy.export(tmp_path / "lora").is_file()
    fresh = Flux2KleinPipeline.from_pretrained(klein_path)
    fresh.load_lora_weights(tmp_path / "lora")
    with torch.no_grad():
        theirs = _transformer_velocity(fresh.transformer, policy, x, s, embeds)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_bf16_on_policy_ratio(klein_path):
    policy = build_policy(tiny_cfg("flux2_klein", klein_path, dtype="bfloat16"), "cpu")
    assert all(p.dtype == torch.float32 for p in policy.named_trainable_parameters().values())
    traj = rollout(policy, PROMPTS, guidance_scale=CFG_W, noise_level=NOISE)
    for j in range(traj.num_steps):
        _, stats = step_loss(policy, traj, j, torch.tensor([1.0, -1.0]), guidance_scale=CFG_W,
                             noise_level=NOISE)
        assert float(stats["ratio_min"]) == 1.0 and float(stats["ratio_max"]) == 1.0, (j, stats)


def test_full_finetune_keeps_a_frozen_reference_and_exports_for_from_pretrained(klein_path, tmp_path):
    policy = build_policy(tiny_cfg("flux2_klein", klein_path, finetune="full"), "cpu")
    names = set(policy.named_trainable_parameters())
    assert names == {f"transformer.{n}" for n, _ in policy.transformer.named_parameters()}
    traj = rollout(policy, PROMPTS, steps=2, guidance_scale=CFG_W, noise_level=NOISE)
    x, s, cond = traj.latents[:, 0], traj.sigmas[0].expand(2), traj.cond
    with torch.no_grad(), policy.reference():
        before = policy.velocity(x, s, cond, guidance_scale=1.0)
    stats = train(policy, traj, torch.tensor([1.0, -1.0]), guidance_scale=CFG_W, noise_level=NOISE,
                  optimizer_steps=1, lr=1e-3)
    assert abs(stats[0]["ratio_mean"] - 1) <= 1e-6
    with torch.no_grad():
        with policy.reference():
            after_ref = policy.velocity(x, s, cond, guidance_scale=1.0)
        after = policy.velocity(x, s, cond, guidance_scale=1.0)
    assert torch.equal(before, after_ref) and (after - after_ref).abs().max() > 1e-4
    loaded = Flux2Transformer2DModel.from_pretrained(policy.export(tmp_path / "final"))
    with torch.no_grad():
        torch.testing.assert_close(_transformer_velocity(loaded, policy, x, s, cond["prompt_embeds"]), after,
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model, match", [
    (dict(lora_targets=["attn.no_such_proj"]), "lora_targets"),
    (dict(resolution=30), "model.resolution must be a positive multiple of 4"),
    (dict(path="/nonexistent/fastflow-klein"), "model.path"),
])
def test_bad_settings_give_a_clear_error(klein_path, model, match):
    model = dict(model)
    path = model.pop("path", klein_path)
    with pytest.raises(ValueError, match=match):
        build_policy(tiny_cfg("flux2_klein", path, **model), "cpu")


def test_parallel_hooks_expose_double_and_single_blocks(klein_path):
    from fastflow.parallel import policy_modules

    policy = build_policy(tiny_cfg("flux2_klein", klein_path), "cpu")
    root, blocks = policy_modules(policy)
    t = policy.transformer
    assert root is t and blocks == [*t.transformer_blocks, *t.single_transformer_blocks] and len(blocks) == 2


def test_the_captured_program_runs_the_same_rollout(klein_path):
    """CUDA-graph support, checked on the CPU: GraphedSampler's static mode runs the code a capture
    records and must give the eager sampler's rollout (CFG halves fused in the SDE step)."""
    from fastflow.graphs import GraphedSampler

    policy = build_policy(tiny_cfg("flux2_klein", klein_path), "cpu")
    cond = policy.encode_prompts(PROMPTS)
    kw = dict(num_steps=3, guidance_scale=CFG_W, noise_level=NOISE, seeds=torch.tensor([5, 6]), device="cpu")
    eager = sample(policy, cond, **kw)
    static = GraphedSampler(policy, mode="static", noise="host")(cond, **kw)
    torch.testing.assert_close(static.log_probs, eager.log_probs, rtol=0, atol=1e-6)
    torch.testing.assert_close(static.final, eager.final, rtol=0, atol=1e-6)
