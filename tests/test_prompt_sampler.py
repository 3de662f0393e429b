"""Prompt sampling (fastflow.prompt_sampler): uniform keeps the historical stream; signal weights
prompts by their groups' reward spread, keeps a floor, and round-trips through a checkpoint."""

import math

import pytest
import torch

from fastflow.prompt_sampler import PromptSampler


def test_uniform_is_the_plain_random_permutation():
    s = PromptSampler(10, "uniform")
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(s.draw(4, g1), torch.randperm(10, generator=g2)[:4])
    s.update(torch.tensor([0, 0, 1, 1]), torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0, 0, 1, 1]))
    assert torch.equal(s.weights(), torch.ones(10))  # rewards never change a uniform draw
    more = s.draw(25, torch.Generator().manual_seed(0))  # more than there are: with replacement
    assert more.shape == (25,) and int(more.max()) < 10


def test_category_draws_every_category_equally_often():
    cats = ["big"] * 9 + ["small"]                 # 9 prompts of one category, 1 of another
    s = PromptSampler(10, "category", categories=cats)
    torch.testing.assert_close(s.weights(), torch.tensor([1 / 9] * 9 + [1.0], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(10)
    for _ in range(4000):
        counts[s.draw(1, g)] += 1
    assert abs(counts[9] / 4000 - 0.5) < 0.03      # the lone prompt: half of all draws (uniform: 1/10)
    assert counts[:9].min() > 0.5 * counts[:9].mean()  # within a category: uniform
    s.update(torch.tensor([9, 9]), torch.tensor([0.0, 1.0]), torch.tensor([0, 0]))
    torch.testing.assert_close(s.weights()[9], torch.tensor(1.0, dtype=torch.float64))  # rewards don't matter
    assert sorted(s.draw(10, g).tolist()) == list(range(10))  # distinct when there are enough
    with pytest.raises(ValueError, match="one category per training prompt"):
        PromptSampler(10, "category")


def test_signal_prefers_prompts_whose_groups_disagree():
    s = PromptSampler(4, "signal", floor=0.2)
    assert torch.equal(s.weights(), torch.ones(4))  # nothing seen yet: uniform
    # prompt 0: all wrong (no gradient); prompt 1: half right (std 0.5); prompts 2, 3 unseen
    s.update(torch.tensor([0] * 4 + [1] * 4), torch.tensor([0.0] * 4 + [1, 0, 1, 0.0]),
             torch.tensor([0] * 4 + [1] * 4))
    w = s.weights()
    mean = (0 + 0.5 + 0.5 + 0.5) / 4           # unseen prompts count as the strongest seen
    torch.testing.assert_close(w, torch.tensor([0, 0.5, 0.5, 0.5], dtype=torch.float64) + 0.2 * mean)
    counts = torch.zeros(4)
    g = torch.Generator().manual_seed(0)
    for _ in range(2000):
        counts[s.draw(1, g)] += 1
    assert counts[0] > 0                        # the floor keeps the hopeless prompt in play
    assert counts[1] > 4 * counts[0]
    picks = s.draw(4, g)                        # distinct when there are enough prompts
    assert sorted(picks.tolist()) == [0, 1, 2, 3]


def test_signal_running_mean_and_scale_free():
    s = PromptSampler(2, "signal")
    ids, groups = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 1])
    s.update(ids, torch.tensor([10.0, 30.0, 5.0, 5.0]), groups)      # std 10 and 0
    s.update(ids, torch.tensor([20.0, 20.0, 4.0, 6.0]), groups)      # std 0 and 1
    assert s.signal.tolist() == [5.0, 0.5]                          # half old, half new
    scaled = PromptSampler(2, "signal")
    scaled.update(ids, torch.tensor([1.0, 3.0, 0.5, 0.5]), groups)
    scaled.update(ids, torch.tensor([2.0, 2.0, 0.4, 0.6]), groups)
    torch.testing.assert_close(scaled.weights() / scaled.weights().sum(), s.weights() / s.weights().sum())


def test_state_round_trip_and_errors():
    s = PromptSampler(3, "signal")
    s.update(torch.tensor([1, 1]), torch.tensor([0.0, 1.0]), torch.tensor([0, 0]))
    t = PromptSampler(3, "signal")
    t.load_state_dict(s.state_dict())
    assert math.isnan(t.signal[0]) and t.signal[1] == 0.5
    assert torch.equal(t.weights(), s.weights())
    with pytest.raises(ValueError, match="3 prompts"):
        PromptSampler(4, "signal").load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="prompt_sampling"):
        PromptSampler(3, "sometimes")
    with pytest.raises(ValueError, match="prompt_floor"):
        PromptSampler(3, "signal", floor=-1)


def test_trainer_weights_the_shapes_categories_by_their_size(tmp_path):
    from fastflow import train as train_mod
    from fastflow.config import load_config, validate
    from fastflow.distributed import DistInfo
    from fastflow.shapes.world import category_of

    cfg = load_config(None, ["--sample.prompt_sampling", "category", "--run.output_dir", str(tmp_path),
                             "--log.tensorboard", "false", "--distributed.cpu_ranks", "1"])
    t = train_mod.Trainer(cfg, validate(cfg, 1), DistInfo(0, 1, 0, torch.device("cpu")))
    cats = [category_of(p.text) for p in t.train_prompts]
    w = t.prompt_sampler.weights()
    per_cat = {c: float(sum(w[i] for i in range(len(cats)) if cats[i] == c)) for c in set(cats)}
    assert len(per_cat) == 6 and all(abs(v - 1.0) < 1e-9 for v in per_cat.values()), per_cat
