"""Ranks that must agree: a non-finite loss on one rank only, and the full fine-tuning reference
built shard by shard under FSDP2 (2 gloo ranks under torchrun, loopback)."""

from __future__ import annotations

import pytest
import torch

from tests.test_distributed import launch, sd3_args, toy_args

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_nan_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path, strategy):
    """Rank 1 alone gets a NaN loss in iteration 1. Before, it skipped that backward alone: under
    FSDP its reduce-scatters, under DDP its gradient buckets, then differed from rank 0's and the
    run hung or diverged. Now both ranks run the same collectives, agree to skip that optimizer
    step, and end with identical weights."""
    args = toy_args(tmp_path / "run", "--distributed.strategy", strategy, "--checkpoint.every", "100")
    dumps = launch("nan", tmp_path / "dump", args)  # a hang would hit launch's timeout
    a, b = dumps
    assert int(a["iteration"]) == int(b["iteration"]) == 4
    # iteration 1's step is skipped on both ranks (one step per iteration here), the others taken
    assert a["skipped"].tolist() == b["skipped"].tolist() == [0, 1, 0, 0]
    assert int(a["optimizer_steps"]) == int(b["optimizer_steps"]) == 3
    for k in a:
        if k.startswith("w."):
            assert torch.equal(a[k], b[k]), k
            assert torch.isfinite(a[k]).all(), k  # the NaN never reached the weights


def test_fsdp_full_finetune_reference_is_built_shard_by_shard(tmp_path):
    """Full fine-tuning under FSDP2 in bf16: the trained shards are float32 master weights, the
    frozen reference is bf16 and each rank holds about half of it (never a full copy first), and
    the gathered reference equals the base weights (what the KL must be measured against)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from diffusers import SD3Transformer2DModel

    from fastflow.models._tiny import save_tiny_sd3

    pipe = save_tiny_sd3(tmp_path / "pipe")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue ball\na green cat\n")
    dumps = launch("reference", tmp_path / "dump", sd3_args(tmp_path / "runs", pipe, prompts,
                                                            "--model.finetune", "full",
                                                            "--model.dtype", "bfloat16"))
    base = {n: p.detach() for n, p in SD3Transformer2DModel.from_pretrained(pipe, subfolder="transformer").named_parameters()}
    for d in dumps:
        assert int(d["trained_fp32"]) == 1 and int(d["ref_bf16"]) == 1
        total = int(d["ref_numel"])
        assert total == sum(v.numel() for v in base.values())
        assert int(d["ref_local_numel"]) < 0.6 * total  # a shard (padding aside), not the whole
        assert int(d["trained_local_numel"]) < 0.6 * total
    assert sum(int(d["ref_local_numel"]) for d in dumps) >= int(dumps[0]["ref_numel"])
    for n, v in base.items():
        torch.testing.assert_close(dumps[0][f"ref.{n}"], v.to(torch.bfloat16).float(), rtol=0, atol=0)
        # the master weights start as the weights loaded in model.dtype, exactly (bf16 -> fp32)
        torch.testing.assert_close(dumps[0][f"w.transformer.{n}"], v.to(torch.bfloat16).float(), rtol=0, atol=0)


def test_an_evaluation_with_fewer_images_than_ranks_does_not_hang(tmp_path):
    """One (prompt, seed) pair at 2 ranks: under FSDP2 rank 1 would sample nothing and leave rank 0
    waiting in its first forward's all-gather (and the ranks' metric tables would differ in
    shape). Every rank samples the same number of batches; the padding is not counted."""
    args = toy_args(tmp_path / "run", "--distributed.strategy", "fsdp", "--eval.every", "2",
                    "--eval.max_prompts", "1", "--eval.seeds", "1", "--run.iterations", "2")
    dumps = launch("train", tmp_path / "dump", args)
    assert int(dumps[0]["iteration"]) == int(dumps[1]["iteration"]) == 2
    import json

    rows = [json.loads(l) for l in (tmp_path / "run" / "toy" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/overall/reward" in r]
    assert evals and all(r["eval/overall/reward"] < 0 for r in evals)  # one image's score, not 0 (padding counted as nothing)
