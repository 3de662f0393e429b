"""The shapes Policy (LoRA / full, reference, CFG, bf16), its export, evaluate_policy and the
evaluate CLI. A tiny random model keeps everything fast; an oracle policy checks the evaluation
end to end (it must score 100 %, a wrong oracle 0 %)."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastflow import evaluate
from fastflow.rollout import Policy, sample
from fastflow.sde import GuidedVelocity, flow_sigmas, sde_step
from fastflow.shapes import world
from fastflow.shapes.model import ModelConfig, ShapesFlowModel, load_model, save_model
from fastflow.shapes.policy import DEFAULT_WEIGHTS, ShapesPolicy, build_policy, default_prompts

TINY = dict(channels=(8, 16, 16), text_dim=16, emb_dim=16, text_layers=1)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_model(ShapesFlowModel(ModelConfig(**TINY)), path)
    return path


def make_cfg(path, finetune="lora", **kw):
    model = dict(kind="shapes", path=str(path), finetune=finetune, lora_rank=4, lora_alpha=8.0,
                 lora_targets=[], shift=0.0, dtype="float32")
    model.update(kw)
    return types.SimpleNamespace(model=types.SimpleNamespace(**model), run=types.SimpleNamespace(seed=0))


def _perturb(policy):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.named_trainable_parameters().values():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_policy_protocol_reference_and_export(tiny_weights, tmp_path, finetune):
    pol = build_policy(make_cfg(tiny_weights, finetune), "cpu")
    assert isinstance(pol, Policy) and pol.latent_shape == (3, 32, 32)
    params = pol.named_trainable_parameters()
    n_all = sum(p.numel() for p in pol.model.parameters())
    if finetune == "lora":
        assert params and all("lora_" in n for n in params)
    else:
        assert sum(p.numel() for p in params.values()) == n_all
    cond = pol.encode_prompts(["a red circle and a blue square", "two squares"])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    s = torch.tensor([0.7, 0.3])
    base = load_model(tiny_weights)
    v_base = base.velocity(x, s, cond["ids"], cond["mask"])
    v0 = pol.velocity(x, s, cond, guidance_scale=1.0)
    torch.testing.assert_close(v0, v_base)           # LoRA starts at the base model (B = 0)
    _perturb(pol)
    v1 = pol.velocity(x, s, cond, guidance_scale=1.0)
    assert (v1 - v_base).abs().max() > 1e-3
    with pol.reference():
        torch.testing.assert_close(pol.velocity(x, s, cond, guidance_scale=1.0), v_base)
    assert set(pol.named_trainable_parameters()) == set(params)   # reference() leaves them trainable
    # the gradient reaches exactly the trainable parameters
    pol.velocity(x, s, cond, guidance_scale=4.5).combine().square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    # export writes the merged weights; building from it reproduces the fine-tuned velocity
    path = pol.export(tmp_path / "final")
    again = build_policy(make_cfg(path.parent, "full"), "cpu")
    torch.testing.assert_close(again.velocity(x, s, cond, guidance_scale=1.0), v1.detach(), atol=1e-5, rtol=1e-4)


def test_guided_velocity_is_one_batched_pass_and_runs_in_bf16(tiny_weights):
    pol = build_policy(make_cfg(tiny_weights), "cpu")
    calls = []
    orig = pol.model.velocity
    pol.model.velocity = lambda *a: calls.append(a[0].shape[0]) or orig(*a)
    cond = pol.encode_prompts(["a circle", "a yellow triangle", "four circles"])
    x = torch.randn(3, 3, 32, 32)
    s = torch.full((3,), 0.5)
    g = pol.velocity(x, s, cond, guidance_scale=4.5)
    assert isinstance(g, GuidedVelocity) and calls == [6] and g.scale == 4.5
    torch.testing.assert_close(g.cond, orig(x, s, cond["ids"], cond["mask"]))
    unc = pol.encode_prompts(["", "", ""])
    torch.testing.assert_close(g.uncond, orig(x, s, unc["ids"], unc["mask"]))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gb = pol.velocity(x, s, cond, guidance_scale=4.5)
    assert gb.cond.dtype == torch.float32 and torch.isfinite(gb.combine()).all()
    assert (gb.combine() - g.combine()).abs().mean() < 0.1 * g.combine().abs().mean()


def test_velocity_is_finite_on_the_whole_grid_and_sde_logprobs_reproduce(tiny_weights):
    pol = build_policy(make_cfg(tiny_weights), "cpu")
    assert torch.equal(pol.sigmas(10), flow_sigmas(10, 1.0))
    cond = pol.encode_prompts(["a blue square", "a circle below a triangle"])
    traj = sample(pol, cond, num_steps=6, guidance_scale=4.5, noise_level=0.7, kind="sde",
                  seeds=torch.tensor([3, 4]))
    assert traj.log_probs.shape == (2, 6) and torch.isfinite(traj.log_probs).all()
    for j in range(6):   # the training pass sees the same log-probs (ratio 1 on-policy)
        v = pol.velocity(traj.latents[:, j], traj.sigmas[j].expand(2), cond, guidance_scale=4.5)
        out = sde_step(traj.latents[:, j], v, traj.sigmas[j], traj.sigmas_next[j], noise_level=0.7,
                       prev_sample=traj.next_latents[:, j], sigma_guard=traj.sigma_guard)
        torch.testing.assert_close(out.log_prob, traj.log_probs[:, j], atol=1e-4, rtol=1e-4)
    img = pol.decode(traj.final)
    assert img.shape == (2, 3, 32, 32) and img.min() >= 0 and img.max() <= 1


def test_bad_inputs_give_clear_errors(tiny_weights, tmp_path):
    pol = build_policy(make_cfg(tiny_weights), "cpu")
    with pytest.raises(ValueError, match="vocabulary"):
        pol.encode_prompts(["a purple circle"])
    with pytest.raises(ValueError, match="finetune"):
        build_policy(make_cfg(tiny_weights, "dora"), "cpu")
    with pytest.raises(ValueError, match="lora_targets"):
        build_policy(make_cfg(tiny_weights, lora_targets=["to_qq"]), "cpu")
    with pytest.raises(FileNotFoundError, match="not found"):
        build_policy(make_cfg(tmp_path / "none.safetensors"), "cpu")
    bogus = tmp_path / "bogus.safetensors"
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(1)}, str(bogus))
    with pytest.raises(ValueError, match="not a fastflow shapes model"):
        build_policy(make_cfg(bogus), "cpu")


class OraclePolicy:
    """Its ODE lands exactly on a rendered scene of the prompt (v = (x - x0) / sigma; the last
    Euler step to sigma = 0 returns x0), or of a perturbed prompt when ``lie`` is set."""

    latent_shape = (3, 32, 32)

    def __init__(self, lie: bool = False):
        self.lie = lie

    def encode_prompts(self, prompts):
        rng = np.random.default_rng(0)
        x0 = []
        for p in prompts:
            if self.lie:   # a scene with one extra object: never correct
                s = world.parse_prompt(p)
                wanted = [(o.shape, o.color or "red") for o in s.objects][:3] + [("square", "green")]
                objs = world.place_objects(wanted, rng)
            else:
                objs = world.scene_for_prompt(p, rng)
            x0.append(world.render(objs) * 2 - 1)
        return {"x0": torch.stack(x0), "texts": list(prompts)}

    def sigmas(self, n):
        return flow_sigmas(n, 1.0)

    def velocity(self, latents, sigma, cond, *, guidance_scale):
        return (latents - cond["x0"]) / sigma.view(-1, 1, 1, 1)

    def decode(self, latents):
        return ((latents + 1) / 2).clamp(0, 1)


def test_evaluate_policy_scores_an_oracle_exactly(tmp_path):
    prompts = [p.text for p in default_prompts("eval")][::3]
    good = evaluate.evaluate_policy(OraclePolicy(), prompts, seeds=2, steps=3, guidance_scale=1.0,
                                    batch_size=7, keep_images=True)
    assert len(good.records) == 2 * len(prompts)
    assert good.accuracy["overall"] == 1.0 and good.image_accuracy == 1.0
    assert set(good.categories) == set(world.CATEGORIES)
    bad = evaluate.evaluate_policy(OraclePolicy(lie=True), prompts, seeds=2, steps=3, guidance_scale=1.0,
                                   keep_images=True)
    assert bad.accuracy["overall"] == 0.0
    assert [r.seed for r in bad.records] == [r.seed for r in good.records]   # same fixed seeds
    grid = evaluate.category_grid([bad, good], tmp_path / "grid.png", per_category=3, labels=["before", "after"])
    with Image.open(grid) as im:
        assert im.size[1] > 6 * 32 and im.size[0] > 2 * 3 * 32
    evaluate.write_results(good, tmp_path / "out")
    rows = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == len(good.records) and all(r["correct"] for r in rows)
    with Image.open(tmp_path / "out" / rows[0]["file"]) as im:   # raw, lossless
        arr = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 255
    assert arr.shape == (3, 32, 32)
    torch.testing.assert_close(arr, good.records[0].image, atol=1 / 255, rtol=0)


def test_seeds_per_prompt_gives_small_categories_more_seeds():
    cats = ["one"] + ["three"] * 3 + ["many"] * 40
    assert evaluate.seeds_per_prompt(cats, 8, 96) == [96] + [32] * 3 + [8] * 40
    assert evaluate.seeds_per_prompt(cats, 8, 0) == [8] * 44
    assert evaluate.seeds_per_prompt(["a", "a"], 4, 9) == [5, 5]            # rounded up: 10 >= 9
    with pytest.raises(ValueError, match="seeds"):
        evaluate.seeds_per_prompt(cats, 0, 0)
    with pytest.raises(ValueError, match="min_category_images"):
        evaluate.seeds_per_prompt(cats, 8, -1)


def test_evaluate_policy_balances_categories_and_keeps_the_plain_seeds():
    prompts = ["a circle", "two squares", "three squares", "a red circle"]  # 1 + 2 + 1 per category
    plain = evaluate.evaluate_policy(OraclePolicy(), prompts, seeds=2, steps=2, guidance_scale=1.0)
    balanced = evaluate.evaluate_policy(OraclePolicy(), prompts, seeds=2, steps=2, guidance_scale=1.0,
                                        min_category_images=5)
    per_prompt = {p: [r.seed for r in balanced.records if r.prompt == p] for p in prompts}
    assert {p: len(s) for p, s in per_prompt.items()} == {
        "a circle": 5, "two squares": 3, "three squares": 3, "a red circle": 5}
    for r in plain.records:  # the balanced evaluation contains the plain one's images
        assert per_prompt[r.prompt][r.seed_index] == r.seed
    assert balanced.accuracy["overall"] == 1.0
    lying = evaluate.evaluate_policy(OraclePolicy(lie=True), prompts[:1], seeds=2, steps=2, guidance_scale=1.0)
    mixed = evaluate.EvalResults(balanced.records + lying.records[:1])  # "a circle": 5 right, 1 wrong
    assert mixed.image_accuracy == pytest.approx((5 / 6 + 3 * 1.0) / 4)  # a mean over prompts


def test_evaluate_cli_rejects_a_negative_min_category_images(tmp_path, capsys):
    assert evaluate.main(["--min-category-images", "-2", "--out", str(tmp_path / "ev")]) == 2
    assert capsys.readouterr().err == "evaluate: --min-category-images must be >= 0, got -2\n"


def test_evaluate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="seeds"):
        evaluate.evaluate_policy(OraclePolicy(), ["a circle"], seeds=0, steps=3, guidance_scale=1.0)
    with pytest.raises(ValueError, match="grammar"):
        evaluate.evaluate_policy(OraclePolicy(), ["a circle on a table"], seeds=1, steps=3, guidance_scale=1.0)


def test_evaluate_cli_writes_images_and_jsonl(tiny_weights, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\ntwo squares\na circle left of a square\n")
    out = tmp_path / "ev"
    rc = evaluate.main([ "--checkpoint", str(tiny_weights), "--prompts", str(prompts), "--seeds", "2",
                        "--min-category-images", "3", "--steps", "2", "--out", str(out),
                        "--baseline", str(tiny_weights)])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    # one prompt per category: 2 seeds each, raised to 3 by --min-category-images
    assert len(rows) == 9 and {r["category"] for r in rows} == {"colors", "counting", "position"}
    assert all((out / r["file"]).is_file() for r in rows) and (out / "grid.png").is_file()
    assert (out / "compare.png").is_file()
    assert set(rows[0]) >= {"prompt", "file", "seed", "category", "correct"}
    text = capsys.readouterr().out
    assert "overall" in text and "position" in text and "baseline:" in text


def test_shipped_base_model_loads_and_is_small():
    assert DEFAULT_WEIGHTS.is_file(), "ship fastflow/shapes/weights/base.safetensors (see pretrain --export)"
    assert DEFAULT_WEIGHTS.stat().st_size < 16 * 2**20
    pol = build_policy(make_cfg(""), "cpu")
    assert isinstance(pol, ShapesPolicy)
    cond = pol.encode_prompts(["a red circle"])
    v = pol.velocity(torch.randn(1, 3, 32, 32), torch.tensor([0.5]), cond, guidance_scale=4.5)
    assert torch.isfinite(v.combine()).all()


def test_trainer_checkpoint_folder_loads_into_a_policy(tiny_weights, tmp_path):
    from safetensors.torch import save_file
    pol = build_policy(make_cfg(tiny_weights, "lora"), "cpu")
    _perturb(pol)
    ck = tmp_path / "iter-000001"
    ck.mkdir()
    save_file({n: p.detach().contiguous() for n, p in pol.named_trainable_parameters().items()},
              str(ck / "trainable.safetensors"))
    fresh = build_policy(make_cfg(tiny_weights, "lora"), "cpu")
    evaluate.load_checkpoint_into(fresh, ck)
    cond = pol.encode_prompts(["a green square"])
    x, s = torch.randn(1, 3, 32, 32), torch.tensor([0.4])
    torch.testing.assert_close(fresh.velocity(x, s, cond, guidance_scale=1.0),
                               pol.velocity(x, s, cond, guidance_scale=1.0))
    full = build_policy(make_cfg(tiny_weights, "full"), "cpu")   # names differ: a clear error
    with pytest.raises(ValueError, match="finetune"):
        evaluate.load_checkpoint_into(full, ck)


def test_sharded_checkpoint_of_a_multi_rank_run_loads_its_ema_into_a_policy(tiny_weights, tmp_path):
    """The default CPU run has 2 ranks, so its checkpoints are sharded (torch.distributed.checkpoint);
    the evaluate CLI reads their EMA weights without a process group."""
    from fastflow.checkpoint import save_sharded_checkpoint
    from fastflow.distributed import DistInfo

    pol = build_policy(make_cfg(tiny_weights, "lora"), "cpu")
    _perturb(pol)
    params = pol.named_trainable_parameters()
    ema = {n: p.detach().clone() for n, p in params.items()}
    trainable = {n: p.detach() * 0 for n, p in params.items()}  # differs: the EMA must be the one read
    ck = save_sharded_checkpoint(tmp_path / "run", 3, DistInfo(0, 1, 0, torch.device("cpu")),
                                 trainable=trainable, optimizer_state={}, state={}, ema=ema)
    fresh = build_policy(make_cfg(tiny_weights, "lora"), "cpu")
    evaluate.load_checkpoint_into(fresh, tmp_path / "run")       # a run directory: its latest checkpoint
    for n, p in fresh.named_trainable_parameters().items():
        torch.testing.assert_close(p.detach(), ema[n], rtol=0, atol=0)
    full = build_policy(make_cfg(tiny_weights, "full"), "cpu")   # names differ: a clear error
    with pytest.raises(ValueError, match="finetune"):
        evaluate.load_checkpoint_into(full, ck)


def test_sampling_context_merges_lora_and_rollouts_reproduce_in_training(tiny_weights):
    """Rollouts run inside sampling() (LoRA merged, no grad); the training pass, with the adapters,
    reproduces their log-probs to float rounding (ratio 1 within 1e-5), and the context restores
    the trainable adapter path on exit."""
    pol = build_policy(make_cfg(tiny_weights), "cpu")
    _perturb(pol)
    cond = pol.encode_prompts(["a red circle left of a blue square", "three green triangles", "a yellow square"])
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    s = torch.tensor([0.9, 0.5, 0.2])
    v_adapter = pol.velocity(x, s, cond, guidance_scale=4.5).combine().detach()
    with pol.sampling():
        assert pol._active is not pol.model
        v_merged = pol.velocity(x, s, cond, guidance_scale=4.5).combine()
        assert not v_merged.requires_grad
        traj = sample(pol, cond, num_steps=6, guidance_scale=4.5, noise_level=0.7, kind="sde",
                      seeds=torch.tensor([5, 6, 7]))
    assert pol._active is pol.model
    torch.testing.assert_close(v_merged, v_adapter, atol=1e-4, rtol=1e-4)
    sig = pol.sigmas(6)
    for j in range(traj.num_steps):
        v = pol.velocity(traj.latents[:, j], traj.sigmas[j].expand(3), cond, guidance_scale=4.5)
        assert v.uncond.requires_grad
        out = sde_step(traj.latents[:, j], v, traj.sigmas[j].expand(3), traj.sigmas_next[j].expand(3),
                       noise_level=0.7, prev_sample=traj.next_latents[:, j], sigma_guard=float(sig[1]))
        ratio = torch.exp(out.log_prob - traj.log_probs[:, j])
        assert (ratio - 1).abs().max() < 1e-5
    # the merged copy follows later updates of the adapters
    _perturb(pol)
    v2 = pol.velocity(x, s, cond, guidance_scale=4.5).combine().detach()
    with pol.sampling():
        torch.testing.assert_close(pol.velocity(x, s, cond, guidance_scale=4.5).combine(), v2, atol=1e-4, rtol=1e-4)


def test_model_compile_compiles_every_network_the_policy_runs(tiny_weights):
    """model.compile = true reaches the shapes model: the trained network, the frozen reference and
    the merged sampling copy run compiled, and give what the eager policy gives."""
    eager = build_policy(make_cfg(tiny_weights), "cpu")
    pol = build_policy(make_cfg(tiny_weights, compile=True), "cpu")
    assert not eager.model.unet._compiled_call_impl
    cond = pol.encode_prompts(["a red circle left of a blue square", "two green triangles"])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    s = torch.tensor([0.9, 0.4])
    with torch.no_grad(), pol.sampling(), eager.sampling():
        v = pol.velocity(x, s, cond, guidance_scale=1.0)
        torch.testing.assert_close(v, eager.velocity(x, s, cond, guidance_scale=1.0), atol=1e-4, rtol=1e-4)
        nets = [pol.model, pol._ref_model, pol._active]
    assert all(n.text._compiled_call_impl is not None and n.unet._compiled_call_impl is not None for n in nets)
