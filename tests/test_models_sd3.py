"""The SD3 policy on a tiny random StableDiffusion3Pipeline saved to disk and loaded through the
same from_pretrained path users take (fastflow.models._tiny): sigmas, prompt caching, CFG, on-policy
ratio, gradients reaching only the LoRA, the adapter-disabled reference, LoRA export to diffusers,
full fine-tuning, and clear errors on bad settings."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline  # noqa: E402

from fastflow.models import build_policy  # noqa: E402
from fastflow.models._tiny import save_tiny_sd3  # noqa: E402
from fastflow.rollout import Policy, sample  # noqa: E402
from fastflow.sde import GuidedVelocity  # noqa: E402
from tests.tiny_pipelines import rollout, step_loss, tiny_cfg, train  # noqa: E402

PROMPTS = ["a red cube", "two blue cats"]
CFG_W, NOISE = 4.5, 0.7


@pytest.fixture(scope="module")
def sd3_path(tmp_path_factory):
    return save_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3") / "pipe")


@pytest.fixture(scope="module")
def trained(sd3_path):
    """A LoRA policy after one rollout and two optimizer steps (non-zero LoRA), with the stats of
    the on-policy pass and the gradients of the first backward."""
    torch.manual_seed(0)
    policy = build_policy(tiny_cfg("sd3", sd3_path), "cpu")
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


def test_policy_protocol_and_shapes(sd3_path):
    policy = build_policy(tiny_cfg("sd3", sd3_path), "cpu")
    assert isinstance(policy, Policy)
    # tiny VAE: scale factor 2 -> 32 px images have 16 x 16 latents with 4 channels
    assert policy.latent_shape == (4, 16, 16)
    assert policy.shift == 3.0  # the scheduler's shift when model.shift = 0
    cond = policy.encode_prompts(PROMPTS)
    # CLIP 77 tokens + T5 128 tokens (the public code's max_sequence_length), T5 width 64
    assert cond["prompt_embeds"].shape == (2, 77 + 128, 64)
    assert cond["pooled_prompt_embeds"].shape == (2, 64)
    traj = rollout(policy, PROMPTS, steps=2)
    images = policy.decode(traj.final)
    assert images.shape == (2, 3, 32, 32)
    assert images.min() >= 0 and images.max() <= 1
    assert torch.isfinite(traj.log_probs).all()


def test_sigmas_equal_the_scheduler(sd3_path):
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_path)
    policy = build_policy(tiny_cfg("sd3", sd3_path), "cpu")
    for n in (1, 3, 10, 40):
        pipe.scheduler.set_timesteps(n)
        assert torch.equal(policy.sigmas(n), pipe.scheduler.sigmas.to(torch.float32)), n
    shifted = build_policy(tiny_cfg("sd3", sd3_path, shift=1.5), "cpu")
    assert shifted.sigmas(10)[5] != policy.sigmas(10)[5]


def test_ode_rollout_reproduces_the_pipeline(sd3_path):
    """Same initial latents, same prompt, CFG 4.5: fastflow's ODE sampler and decode ==
    StableDiffusion3Pipeline's loop (timestep = sigma * 1000, empty-prompt negative, VAE factors)."""
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_path)
    policy = build_policy(tiny_cfg("sd3", sd3_path), "cpu")  # fresh LoRA: B = 0, the base model
    noise = torch.randn(1, *policy.latent_shape, generator=torch.Generator().manual_seed(3))
    ours = sample(policy, policy.encode_prompts([PROMPTS[0]]), num_steps=3, guidance_scale=CFG_W,
                  noise_level=0.0, kind="ode", latents=noise)
    kw = dict(num_inference_steps=3, height=32, width=32, guidance_scale=CFG_W,
              max_sequence_length=128)
    theirs = pipe(PROMPTS[0], latents=noise.clone(), output_type="latent", **kw).images
    torch.testing.assert_close(ours.final, theirs, rtol=1e-5, atol=1e-5)
    image = pipe(PROMPTS[0], latents=noise.clone(), output_type="pt", **kw).images
    torch.testing.assert_close(policy.decode(ours.final), image, rtol=1e-4, atol=1e-4)


def test_prompt_embeddings_cached_and_batch_independent(sd3_path):
    policy = build_policy(tiny_cfg("sd3", sd3_path), "cpu")
    calls = []
    encode = policy._cache._encode
    policy._cache._encode = lambda ps: calls.append(list(ps)) or encode(ps)
    both = policy.encode_prompts(PROMPTS + PROMPTS[:1])
    again = policy.encode_prompts(PROMPTS[::-1])
    assert calls == [PROMPTS]  # each new prompt encoded once, the repeat served from the cache
    assert torch.equal(both["prompt_embeds"][0], both["prompt_embeds"][2])
    assert torch.equal(again["prompt_embeds"][1], both["prompt_embeds"][0])
    alone = encode([PROMPTS[1]])  # a row does not depend on the batch it was encoded in
    torch.testing.assert_close(alone["prompt_embeds"][0], both["prompt_embeds"][1])
    assert not torch.equal(both["prompt_embeds"][0], both["prompt_embeds"][1])


def test_cfg_is_one_batched_forward_of_negative_and_prompt(sd3_path):
    policy = build_policy(tiny_cfg("sd3", sd3_path), "cpu")
    cond = policy.encode_prompts(PROMPTS)
    x = torch.randn(2, *policy.latent_shape)
    s = torch.full((2,), 0.6)
    calls = []
    hook = policy.transformer.register_forward_hook(lambda m, a, k, o: calls.append(k["hidden_states"].shape[0]),
                                                    with_kwargs=True)
    v = policy.velocity(x, s, cond, guidance_scale=CFG_W)
    hook.remove()
    assert calls == [4] and isinstance(v, GuidedVelocity) and v.scale == CFG_W
    plain = policy.velocity(x, s, cond, guidance_scale=1.0)
    assert isinstance(plain, torch.Tensor)
    torch.testing.assert_close(v.cond, plain, rtol=1e-5, atol=1e-5)
    neg = policy.encode_prompts([""])
    uncond = policy.velocity(x, s, {k: t.expand(2, *t.shape[1:]) for k, t in neg.items()},
                             guidance_scale=1.0)
    torch.testing.assert_close(v.uncond, uncond, rtol=1e-5, atol=1e-5)


def test_on_policy_ratio_is_one_fp32(trained):
    _, traj, stats, _ = trained
    assert len(stats) == traj.num_steps == 3
    for s in stats:
        assert abs(s["ratio_min"] - 1) <= 1e-6 and abs(s["ratio_max"] - 1) <= 1e-6, s
        assert s["kl"] == 0.0  # fresh LoRA (B = 0): the policy is the reference


def test_gradients_reach_only_the_lora(trained):
    policy, _, _, grads = trained
    trainable = set(policy.named_trainable_parameters())
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    with_grad = {f"transformer.{n}" for n, g in grads.items() if g}
    assert with_grad and with_grad <= trainable
    # Gaussian init: B = 0, so the first gradient reaches every B and no A
    assert all(".lora_B." in n for n in with_grad)
    assert all(p.grad is None for enc in (policy.pipe.text_encoder, policy.pipe.vae)
               for p in enc.parameters())


def test_training_moves_lora_and_reference_is_the_base_model(trained, sd3_path):
    policy, traj, _, _ = trained
    lora_b = [p for n, p in policy.named_trainable_parameters().items() if ".lora_B." in n]
    assert any(p.abs().max() > 0 for p in lora_b)
    base = SD3Transformer2DModel.from_pretrained(sd3_path, subfolder="transformer")
    x, s, cond = traj.latents[:, 1], traj.sigmas[1].expand(2), traj.cond
    with torch.no_grad():
        v_policy = policy.velocity(x, s, cond, guidance_scale=1.0)
        with policy.reference():
            v_ref = policy.velocity(x, s, cond, guidance_scale=1.0)
        v_base = base(hidden_states=x, timestep=s * 1000, encoder_hidden_states=cond["prompt_embeds"],
                      pooled_projections=cond["pooled_prompt_embeds"], return_dict=False)[0]
        v_after = policy.velocity(x, s, cond, guidance_scale=1.0)
    torch.testing.assert_close(v_ref, v_base, rtol=0, atol=1e-6)
    assert (v_policy - v_base).abs().max() > 1e-4  # the trained LoRA changes the velocity
    assert torch.equal(v_after, v_policy)  # leaving reference() restores the adapter
    # the KL to the reference is now positive
    _, stats = step_loss(policy, traj, 0, torch.zeros(2), guidance_scale=CFG_W, noise_level=NOISE)
    assert stats["kl"] > 0


def test_exported_lora_loads_into_a_fresh_pipeline(trained, sd3_path, tmp_path):
    policy, traj, _, _ = trained
    weights = policy.export(tmp_path / "lora")  # what the trainer calls at the end of a run
    assert weights.is_file()
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_path)
    pipe.load_lora_weights(tmp_path / "lora")
    x, s, cond = traj.latents[:, 0], traj.sigmas[0].expand(2), traj.cond
    with torch.no_grad():
        ours = policy.velocity(x, s, cond, guidance_scale=1.0)
        theirs = pipe.transformer(hidden_states=x, timestep=s * 1000,
                                  encoder_hidden_states=cond["prompt_embeds"],
                                  pooled_projections=cond["pooled_prompt_embeds"], return_dict=False)[0]
        pipe.disable_lora()
        base = pipe.transformer(hidden_states=x, timestep=s * 1000,
                                encoder_hidden_states=cond["prompt_embeds"],
                                pooled_projections=cond["pooled_prompt_embeds"], return_dict=False)[0]
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (base - ours).abs().max() > 1e-4  # the test means something: the LoRA is not zero


def test_bf16_on_policy_ratio(sd3_path):
    policy = build_policy(tiny_cfg("sd3", sd3_path, dtype="bfloat16"), "cpu")
    assert policy.transformer.dtype == torch.bfloat16 or next(
        p for n, p in policy.transformer.named_parameters() if "lora" not in n).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in policy.named_trainable_parameters().values())
    traj = rollout(policy, PROMPTS)
    assert traj.latents.dtype == torch.float32
    for j in range(traj.num_steps):
        _, stats = step_loss(policy, traj, j, torch.tensor([1.0, -1.0]), guidance_scale=CFG_W,
                             noise_level=NOISE)
        assert abs(float(stats["ratio_min"]) - 1) <= 1e-4 and abs(float(stats["ratio_max"]) - 1) <= 1e-4


def test_full_finetune_keeps_a_frozen_reference(sd3_path):
    policy = build_policy(tiny_cfg("sd3", sd3_path, finetune="full"), "cpu")
    names = set(policy.named_trainable_parameters())
    assert names == {f"transformer.{n}" for n, _ in policy.transformer.named_parameters()}
    assert not any("lora" in n for n in names)
    traj = rollout(policy, PROMPTS, steps=2)
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
    assert torch.equal(before, after_ref)
    assert (after - after_ref).abs().max() > 1e-4
    with pytest.raises(ValueError, match="no LoRA adapter"):
        policy.export_lora("unused")


@pytest.mark.parametrize("model, match", [
    (dict(lora_targets=["attn.no_such_proj"]), "lora_targets"),
    (dict(resolution=30), "resolution"),
    (dict(path="/nonexistent/fastflow-sd3"), "model.path"),
])
def test_bad_settings_give_a_clear_error(sd3_path, model, match):
    model = dict(model)
    path = model.pop("path", sd3_path)
    with pytest.raises(ValueError, match=match):
        build_policy(tiny_cfg("sd3", path, **model), "cpu")


PAPER = {  # FLOW_GRPO.md section 6 and the FLUX row
    "pickscore": dict(kind="sd3", beta=0.01, steps=(10, 40), w=4.5, a=0.7, rank=(32, 64.0), batch=9),
    "geneval": dict(kind="sd3", beta=0.04, steps=(10, 40), w=4.5, a=0.7, rank=(32, 64.0), batch=9),
    "ocr": dict(kind="sd3", beta=0.04, steps=(10, 40), w=4.5, a=0.7, rank=(32, 64.0), batch=9),
    "flux_pickscore": dict(kind="flux", beta=0.01, steps=(6, 28), w=3.5, a=0.9, rank=(64, 128.0),
                           batch=3),
}


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_configs_load_and_split_over_any_gpu_count(name, tmp_path):
    from pathlib import Path

    from fastflow.config import load_config, validate

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(str(root / "configs" / f"{name}.toml"))
    p = PAPER[name]
    assert (cfg.model.kind, cfg.model.dtype, cfg.model.resolution) == (p["kind"], "bfloat16", 512)
    assert (cfg.model.lora_rank, cfg.model.lora_alpha) == p["rank"]
    assert (cfg.sample.train_steps, cfg.sample.eval_steps) == p["steps"]
    assert (cfg.sample.guidance_scale, cfg.sample.noise_level) == (p["w"], p["a"])
    assert (cfg.sample.group_size, cfg.sample.prompts_per_iter, cfg.sample.batch_size) == (24, 48, p["batch"])
    assert (cfg.train.beta, cfg.train.clip_range, cfg.train.lr) == (p["beta"], 1e-4, 3e-4)
    assert cfg.train.global_std and cfg.train.ema
    assert (cfg.train.timestep_fraction, cfg.train.ema_every) == (0.99, 8)
    # the paper's sampler, not the shapes defaults: every step SDE and trained, independent initial
    # noises, uniform prompts, no wall-clock budget
    assert (cfg.sample.window_size, cfg.sample.shared_initial_noise, cfg.sample.prompt_sampling) == (0, False, "uniform")
    assert cfg.run.max_minutes == 0
    assert list(cfg.reward.weights) == [name.removeprefix("flux_")]
    # the prompt files are user-supplied: stand-ins of the right suffix for validation
    for key in ("train_prompts", "eval_prompts"):
        stand_in = tmp_path / Path(getattr(cfg.data, key)).name
        stand_in.write_text('{"prompt": "a cat"}\n' if stand_in.suffix == ".jsonl" else "a cat\n")
        setattr(cfg.data, key, str(stand_in))
    # at the paper's 32 GPUs: two optimizer steps per iteration
    assert validate(cfg, 32).optimizer_steps_per_iter == 2
    for world in (1, 2, 4, 8, 16):
        assert validate(cfg, world).images_per_rank * world == 48 * 24


def test_parallel_hooks_expose_the_blocks_for_fsdp(sd3_path):
    from fastflow.parallel import policy_modules

    lora = build_policy(tiny_cfg("sd3", sd3_path), "cpu")
    root, blocks = policy_modules(lora)
    assert root is lora.transformer and blocks == list(lora.transformer.transformer_blocks) and blocks
    assert lora.reference_modules() is None  # LoRA: the reference is the adapter-disabled network
    full = build_policy(tiny_cfg("sd3", sd3_path, finetune="full"), "cpu")
    ref_root, ref_blocks = full.reference_modules()
    assert ref_root is full.tuning.ref_transformer and len(ref_blocks) == len(blocks)
