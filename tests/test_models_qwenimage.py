"""The Qwen-Image policy on a tiny random QwenImagePipeline (Qwen2.5-VL text encoder, in-memory Qwen
tokenizer, QwenImageTransformer2DModel, AutoencoderKLQwenImage, Qwen-Image's scheduler) saved to
disk and loaded through from_pretrained (fastflow.models._tiny): the prompt template and its
dropped tokens, the run's fixed text length, the scheduler's sigmas at several resolutions, the
pipeline's true CFG reproduced by the ODE sampler, the on-policy ratio, LoRA (MLP targets
included), the reference, export to the stock pipeline and full fine-tuning."""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers import QwenImagePipeline, QwenImageTransformer2DModel  # noqa: E402

from fastflow.models import build_policy  # noqa: E402
from fastflow.models._tiny import save_tiny_qwenimage  # noqa: E402
from fastflow.rollout import Policy, sample  # noqa: E402
from tests.tiny_pipelines import rollout, step_loss, tiny_cfg, train  # noqa: E402

PROMPTS = ["a red cube", "two blue cats"]
CFG_W, NOISE = 4.0, 1.0
SYSTEM_PREFIX = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, "
                 "quantity, text, spatial relationships of the objects and background:<|im_end|>\n"
                 "<|im_start|>user\n")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One CPU thread: these toy-sized matmuls run in microseconds on one thread but can wait
    milliseconds each for a second thread on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def qwen_path(tmp_path_factory):
    return save_tiny_qwenimage(tmp_path_factory.mktemp("tiny_qwenimage") / "pipe")


@pytest.fixture(scope="module")
def pipe(qwen_path):
    return QwenImagePipeline.from_pretrained(qwen_path)


@pytest.fixture(scope="module")
def trained(qwen_path):
    """A LoRA policy after one rollout and two optimizer steps, with the on-policy stats and which
    parameters the first backward reached."""
    torch.manual_seed(0)
    policy = build_policy(tiny_cfg("qwenimage", qwen_path), "cpu")
    policy.cache_prompts(PROMPTS)  # the run's text length, as the trainer sets it
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


def _transformer_velocity(model, policy, x, s, cond):
    return model(hidden_states=x, timestep=s, encoder_hidden_states=cond["prompt_embeds"],
                 encoder_hidden_states_mask=cond["prompt_embeds_mask"],
                 img_shapes=policy._img_shapes * x.shape[0], return_dict=False)[0]


def test_policy_protocol_and_packed_latents(qwen_path):
    policy = build_policy(tiny_cfg("qwenimage", qwen_path), "cpu")
    assert isinstance(policy, Policy)
    # 32 px, VAE factor 4 -> 8 x 8 latents of 4 channels -> 4 x 4 tokens of 2 x 2 x 4 = 16
    assert policy.latent_shape == (16, 16)
    assert policy.text_len == 512  # the pipeline's max_sequence_length until the lists are known
    cond = policy.encode_prompts(PROMPTS)
    assert cond["prompt_embeds"].shape == (2, 512, 32) and cond["prompt_embeds_mask"].dtype == torch.bool
    traj = rollout(policy, PROMPTS, steps=2, guidance_scale=CFG_W, noise_level=NOISE)
    assert torch.isfinite(traj.log_probs).all()
    images = policy.decode(traj.final)
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1


def test_template_drops_the_system_prompt_and_rows_equal_the_pipeline(qwen_path, pipe):
    """The 34 dropped tokens are exactly the system prompt (the real Qwen tokenizer's count); what
    is kept equals QwenImagePipeline.encode_prompt row for row, zero-padded to text_len with a
    false mask."""
    tok = pipe.tokenizer
    ids = tok(pipe.prompt_template_encode.format("a red cube")).input_ids
    drop = pipe.prompt_template_encode_start_idx
    assert drop == 34 and tok.decode(ids[:drop]) == SYSTEM_PREFIX
    assert tok.decode(ids[drop:]) == "a red cube<|im_end|>\n<|im_start|>assistant\n"
    policy = build_policy(tiny_cfg("qwenimage", qwen_path), "cpu")
    lengths = policy.prompt_lengths(PROMPTS)
    assert lengths == [len(ids) - drop, len(tok(pipe.prompt_template_encode.format(PROMPTS[1])).input_ids) - drop]
    policy.set_text_len(32)
    ours = policy._encode(list(PROMPTS))
    theirs, mask = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=512)
    assert mask.sum(1).tolist() == lengths  # the pipeline pads the batch to its longest
    assert ours["prompt_embeds"].shape == (2, 32, 32)
    assert ours["prompt_embeds_mask"].sum(1).tolist() == lengths
    for i, n in enumerate(lengths):
        torch.testing.assert_close(ours["prompt_embeds"][i, :n], theirs[i, :n], rtol=0, atol=0)
        assert not ours["prompt_embeds"][i, n:].any() and not ours["prompt_embeds_mask"][i, n:].any()


def test_cache_prompts_fixes_the_text_length_from_the_lists(qwen_path, tmp_path, caplog):
    policy = build_policy(tiny_cfg("qwenimage", qwen_path), "cpu")
    long = "a long prompt about many small things"
    n_long = policy.prompt_lengths([long])[0]
    assert n_long % 16 and n_long > max(policy.prompt_lengths(PROMPTS))
    policy.cache_prompts([*PROMPTS, long], cache_dir=tmp_path / "c")
    n = -(-n_long // 16) * 16
    assert policy.text_len == n  # the longest listed prompt, rounded up to a multiple of 16
    got = policy.encode_prompts([long, PROMPTS[0]])
    assert got["prompt_embeds"].shape[1] == n and got["prompt_embeds_mask"][0].sum() == n_long
    assert policy._neg_embeds.shape[1] == n and policy._neg_mask.sum() == policy.prompt_lengths([" "])[0]
    store = policy._cache.store
    assert store is not None and store.rows([long])["prompt_embeds"].shape == (1, n, 32)
    # a prompt outside the lists that does not fit is cut there, with one warning
    policy.set_text_len(16)
    with caplog.at_level(logging.WARNING, logger="fastflow.models.qwenimage"):
        cut = policy.encode_prompts([long + "more"])
        policy.encode_prompts([long + "other"])
    assert cut["prompt_embeds_mask"].all() and cut["prompt_embeds"].shape[1] == 16
    assert sum("is cut there" in r.getMessage() for r in caplog.records) == 1


def test_sigmas_equal_the_pipeline_at_several_resolutions(qwen_path, pipe):
    """Dynamic, resolution-dependent exponential shift and the terminal stretch to 0.02: the
    pipeline's own sigmas after a run, bit for bit, at 32, 64 and 128 px."""
    grids = {}
    for res in (32, 64, 128):
        policy = build_policy(tiny_cfg("qwenimage", qwen_path, resolution=res), "cpu")
        for n in (2, 4, 10):
            pipe(PROMPTS[0], num_inference_steps=n, height=res, width=res, output_type="latent",
                 max_sequence_length=32, true_cfg_scale=1.0)
            got = policy.sigmas(n)
            assert got.shape == (n + 1,) and got[0] == 1 and got[-1] == 0
            assert torch.equal(got, pipe.scheduler.sigmas.to(torch.float32)), (res, n)
        grids[res] = policy.sigmas(10)
    assert abs(float(grids[32][-2]) - 0.02) < 1e-6  # shift_terminal
    assert grids[32][5] < grids[64][5] < grids[128][5]  # more image tokens, more shift
    # one step: the terminal stretch divides 0 by 0 (the pipeline's sigmas are NaN there)
    with pytest.raises(ValueError, match="non-finite sigmas for 1 step"):
        policy.sigmas(1)
    static = build_policy(tiny_cfg("qwenimage", qwen_path, shift=3.0), "cpu")
    assert not torch.equal(static.sigmas(10), grids[32]) and static.sigmas(10)[-2] == grids[32][-2]


def test_ode_rollout_reproduces_the_pipeline_with_true_cfg(qwen_path, pipe):
    """Same initial packed latents, prompt, negative " " and true_cfg_scale: fastflow's ODE
    sampler and decode == QwenImagePipeline's loop (norm-rescaled CFG, packing, VAE statistics)."""
    policy = build_policy(tiny_cfg("qwenimage", qwen_path), "cpu")  # fresh LoRA: the base model
    policy.cache_prompts(PROMPTS)
    noise = torch.randn(1, *policy.latent_shape, generator=torch.Generator().manual_seed(3))
    ours = sample(policy, policy.encode_prompts([PROMPTS[0]]), num_steps=3, guidance_scale=CFG_W,
                  noise_level=0.0, kind="ode", latents=noise)
    kw = dict(negative_prompt=" ", true_cfg_scale=CFG_W, num_inference_steps=3, height=32, width=32)
    theirs = pipe(PROMPTS[0], latents=noise.clone(), output_type="latent", **kw).images
    torch.testing.assert_close(ours.final, theirs, rtol=1e-5, atol=1e-5)
    assert (ours.final - noise).abs().max() > 0.1  # the sampler moved
    image = pipe(PROMPTS[0], latents=noise.clone(), output_type="pt", **kw).images
    torch.testing.assert_close(policy.decode(ours.final), image, rtol=1e-4, atol=1e-4)


def test_true_cfg_is_one_batched_forward_rescaled_to_the_conditional_norm(qwen_path):
    policy = build_policy(tiny_cfg("qwenimage", qwen_path), "cpu")
    policy.cache_prompts(PROMPTS)
    cond = policy.encode_prompts(PROMPTS)
    x = torch.randn(2, *policy.latent_shape)
    s = torch.full((2,), 0.6)
    calls = []
    hook = policy.transformer.register_forward_hook(
        lambda m, a, k, o: calls.append(k["hidden_states"].shape[0]), with_kwargs=True)
    v = policy.velocity(x, s, cond, guidance_scale=CFG_W)
    hook.remove()
    assert calls == [4] and isinstance(v, torch.Tensor) and v.dtype == torch.float32
    c = policy.velocity(x, s, cond, guidance_scale=1.0)
    neg = {"prompt_embeds": policy._neg_embeds.expand(2, -1, -1),
           "prompt_embeds_mask": policy._neg_mask.expand(2, -1)}
    u = policy.velocity(x, s, neg, guidance_scale=1.0)
    comb = u + CFG_W * (c - u)
    torch.testing.assert_close(v, comb * c.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v.norm(dim=-1), c.norm(dim=-1), rtol=1e-5, atol=1e-5)
    assert (v - comb).abs().max() > 1e-3  # the rescale is not a no-op


def test_on_policy_ratio_is_one_fp32(trained):
    _, traj, stats, _ = trained
    assert len(stats) == traj.num_steps == 3
    for s in stats:
        assert abs(s["ratio_min"] - 1) <= 1e-6 and abs(s["ratio_max"] - 1) <= 1e-6, s
        assert s["kl"] == 0.0  # fresh LoRA (B = 0): the policy is the reference


def test_gradients_reach_only_the_lora_including_both_mlps(trained):
    policy, _, _, grads = trained
    trainable = set(policy.named_trainable_parameters())
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    for target in ("attn.to_q", "attn.add_q_proj", "attn.to_add_out", "img_mlp.net.0.proj",
                   "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"):
        assert any(f"{target}.lora_B." in n for n in trainable), target
    with_grad = {f"transformer.{n}" for n, g in grads.items() if g}
    assert with_grad and with_grad <= trainable
    assert all(".lora_B." in n for n in with_grad)  # Gaussian init: B = 0 gets the first gradient
    assert all(p.grad is None for p in policy.pipe.text_encoder.parameters())


def test_reference_is_the_base_model_and_export_loads_in_the_stock_pipeline(trained, qwen_path, tmp_path):
    policy, traj, _, _ = trained
    base = QwenImageTransformer2DModel.from_pretrained(qwen_path, subfolder="transformer")
    x, s, cond = traj.latents[:, 1], traj.sigmas[1].expand(2), traj.cond
    with torch.no_grad():
        ours = policy.velocity(x, s, cond, guidance_scale=1.0)
        with policy.reference():
            ref = policy.velocity(x, s, cond, guidance_scale=1.0)
        v_base = _transformer_velocity(base, policy, x, s, cond)
    torch.testing.assert_close(ref, v_base, rtol=0, atol=1e-6)
    assert (ours - v_base).abs().max() > 1e-4  # the trained LoRA is not zero

    weights = policy.export(tmp_path / "lora")  # what the trainer calls at the end of a run
    assert weights.is_file()
    fresh = QwenImagePipeline.from_pretrained(qwen_path)
    fresh.load_lora_weights(tmp_path / "lora")
    with torch.no_grad():
        theirs = _transformer_velocity(fresh.transformer, policy, x, s, cond)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_bf16_on_policy_ratio(qwen_path):
    policy = build_policy(tiny_cfg("qwenimage", qwen_path, dtype="bfloat16"), "cpu")
    policy.cache_prompts(PROMPTS)
    assert all(p.dtype == torch.float32 for p in policy.named_trainable_parameters().values())
    frozen = [p for n, p in policy.transformer.named_parameters() if "lora" not in n]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    traj = rollout(policy, PROMPTS, guidance_scale=CFG_W, noise_level=NOISE)
    for j in range(traj.num_steps):
        _, stats = step_loss(policy, traj, j, torch.tensor([1.0, -1.0]), guidance_scale=CFG_W,
                             noise_level=NOISE)
        assert float(stats["ratio_min"]) == 1.0 and float(stats["ratio_max"]) == 1.0, (j, stats)


def test_full_finetune_keeps_a_frozen_reference_and_exports_for_from_pretrained(qwen_path, tmp_path):
    policy = build_policy(tiny_cfg("qwenimage", qwen_path, finetune="full"), "cpu")
    policy.cache_prompts(PROMPTS)
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
    assert torch.equal(before, after_ref)
    assert (after - after_ref).abs().max() > 1e-4
    out = policy.export(tmp_path / "final")
    loaded = QwenImageTransformer2DModel.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(_transformer_velocity(loaded, policy, x, s, cond), after, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model, match", [
    (dict(lora_targets=["attn.no_such_proj"]), "lora_targets"),
    (dict(resolution=36), "model.resolution must be a positive multiple of 8"),
    (dict(shift=-1.0), "model.shift"),
    (dict(path="/nonexistent/fastflow-qwenimage"), "model.path"),
])
def test_bad_settings_give_a_clear_error(qwen_path, model, match):
    model = dict(model)
    path = model.pop("path", qwen_path)
    with pytest.raises(ValueError, match=match):
        build_policy(tiny_cfg("qwenimage", path, **model), "cpu")


def test_a_step_count_the_scheduler_cannot_grid_stops_before_loading(qwen_path, monkeypatch):
    import fastflow.models.qwenimage as qwenimage

    monkeypatch.setattr(qwenimage, "load_pipeline", lambda *a: (_ for _ in ()).throw(AssertionError("loaded")))
    cfg = tiny_cfg("qwenimage", qwen_path)
    cfg.sample.train_steps = 1
    with pytest.raises(ValueError, match=r"^sample.train_steps = 1: .*non-finite sigmas"):
        build_policy(cfg, "cpu")


def test_parallel_hooks_expose_the_blocks_for_fsdp(qwen_path):
    from fastflow.parallel import policy_modules

    lora = build_policy(tiny_cfg("qwenimage", qwen_path), "cpu")
    root, blocks = policy_modules(lora)
    assert root is lora.transformer and blocks == list(lora.transformer.transformer_blocks) and len(blocks) == 2
    assert lora.reference_modules() is None


def test_cuda_graphs_are_refused_before_capture(qwen_path, monkeypatch):
    """The policy opts out (its transformer copies a host int to the device in every forward):
    on a CUDA device the sampler decides so before capturing, and "required" stops at start-up."""
    from fastflow.graphs import GraphedSampler

    policy = build_policy(tiny_cfg("qwenimage", qwen_path), "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    reason = GraphedSampler(policy)._fallback_reason(torch.device("cuda", 0))
    assert reason == "QwenImagePolicy declares supports_cuda_graphs = False"
    with pytest.raises(ValueError, match="supports_cuda_graphs = False"):
        GraphedSampler(policy, required=True).check("cuda")


def test_the_graph_program_code_runs_the_same_rollout(qwen_path):
    """GraphedSampler's static mode (the code a capture would record, with the conditioning and
    its bool mask copied into static buffers) gives the eager sampler's rollout."""
    from fastflow.graphs import GraphedSampler

    policy = build_policy(tiny_cfg("qwenimage", qwen_path), "cpu")
    policy.cache_prompts(PROMPTS)
    cond = policy.encode_prompts(PROMPTS)
    kw = dict(num_steps=3, guidance_scale=CFG_W, noise_level=NOISE, seeds=torch.tensor([5, 6]), device="cpu")
    eager = sample(policy, cond, **kw)
    static = GraphedSampler(policy, mode="static", noise="host")(cond, **kw)
    torch.testing.assert_close(static.log_probs, eager.log_probs, rtol=0, atol=1e-6)
    torch.testing.assert_close(static.final, eager.final, rtol=0, atol=1e-6)


def test_a_micro_batch_of_other_samples_reproduces_the_rollout_in_bf16(qwen_path):
    """Training micro-batches mix samples of several rollouts: with one text length per run a
    sample's recompute runs the shapes of its rollout whatever its neighbours' prompt lengths
    (padding each batch to its own longest prompt, as the pipeline does, would not)."""
    policy = build_policy(tiny_cfg("qwenimage", qwen_path, dtype="bfloat16"), "cpu")
    prompts = ["a cat", "a long prompt about many small things in a row"]
    policy.cache_prompts(prompts)
    n_short, n_long = policy.prompt_lengths(prompts)
    assert n_long - n_short >= 16
    traj = rollout(policy, prompts, guidance_scale=CFG_W, noise_level=NOISE)
    short = traj.select(torch.tensor([0]))
    for j in range(traj.num_steps):
        _, stats = step_loss(policy, short, j, torch.tensor([1.0]), guidance_scale=CFG_W, noise_level=NOISE)
        assert float(stats["ratio_min"]) == 1.0 and float(stats["ratio_max"]) == 1.0, (j, stats)
