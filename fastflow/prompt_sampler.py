"""Which training prompts an iteration rolls out (``sample.prompt_sampling``).

``uniform`` draws ``prompts_per_iter`` distinct prompts, each equally likely (the authors' scripts).

``category`` draws every category equally often: each prompt is weighted by one over the number of
prompts in its category (the dataset's "category"/"tag" metadata, else the policy's own labels, as
the evaluation groups them). A benchmark that reports the mean over categories (GenEval) weighs a
category of 3 prompts as much as one of 36; uniform sampling would spend most rollouts on the big one.

``signal`` spends the rollouts where GRPO can learn: a group whose rewards are all equal (a prompt
the model always or never gets right) has zero advantage everywhere and no gradient, so its images
are wasted compute. Each prompt keeps a running mean of the within-group reward std its past groups
showed; prompts are drawn (without replacement) with probability proportional to that signal plus
a floor, ``sample.prompt_floor`` times the mean signal, so every prompt keeps being tried and a
prompt the model stops (or starts) getting right is noticed. Prompts not yet seen count as the
strongest seen so far. The weights are scale-free (any reward), and the state is a pure function of
the rewards every rank gathers, so all ranks draw the same prompts and a resumed run continues the
same sequence.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor

MODES = ("uniform", "category", "signal")
DECAY = 0.5
"""Weight of a new observation in a prompt's running std. Each prompt is seen every few
iterations and the policy drifts meanwhile: recent groups matter more than old ones."""


class PromptSampler:
    def __init__(self, num_prompts: int, mode: str = "uniform", floor: float = 0.2,
                 categories: list[str] | None = None):
        if mode not in MODES:
            raise ValueError(f"sample.prompt_sampling: unknown mode {mode!r}; known: {', '.join(MODES)}")
        if num_prompts < 1:
            raise ValueError("no training prompts to sample from")
        if floor < 0:
            raise ValueError(f"sample.prompt_floor must be >= 0, got {floor}")
        self.mode, self.floor = mode, float(floor)
        if mode == "category":
            if categories is None or len(categories) != num_prompts:
                raise ValueError("sample.prompt_sampling = category needs one category per training prompt")
            count = Counter(categories)
            self.category_weight = torch.tensor([1.0 / count[c] for c in categories], dtype=torch.float64)
        self.signal = torch.full((num_prompts,), float("nan"), dtype=torch.float64)  # nan = not seen

    def weights(self) -> Tensor:
        """Unnormalised draw weight of every prompt (all ones for ``uniform``)."""
        if self.mode == "uniform":
            return torch.ones_like(self.signal)
        if self.mode == "category":
            return self.category_weight.clone()
        seen = ~torch.isnan(self.signal)
        if not seen.any():
            return torch.ones_like(self.signal)
        s = self.signal.clone()
        s[~seen] = s[seen].max()
        mean = float(s.mean())
        if mean <= 0:  # every group so far was all-equal: nothing to prefer
            return torch.ones_like(s)
        return s + self.floor * mean

    def draw(self, count: int, generator: torch.Generator) -> Tensor:
        """``count`` prompt indices: distinct when there are enough prompts."""
        n = self.signal.shape[0]
        if self.mode == "uniform":  # the exact stream of earlier versions (same seeds, same prompts)
            if count <= n:
                return torch.randperm(n, generator=generator)[:count]
            return torch.randint(n, (count,), generator=generator)
        return torch.multinomial(self.weights(), count, replacement=count > n, generator=generator)

    def update(self, prompt_index: Tensor, rewards: Tensor, group_ids: Tensor) -> None:
        """Record the within-group reward std (population) of each group of one iteration."""
        r = torch.as_tensor(rewards, dtype=torch.float64).reshape(-1)
        pi = torch.as_tensor(prompt_index).reshape(-1).cpu()
        gid = torch.as_tensor(group_ids).reshape(-1).cpu()
        for g in torch.unique(gid).tolist():
            sel = gid == g
            std = float(r[sel].std(unbiased=False)) if int(sel.sum()) > 1 else 0.0
            p = int(pi[sel][0])
            old = float(self.signal[p])
            self.signal[p] = std if old != old else (1 - DECAY) * old + DECAY * std  # old != old: nan

    def state_dict(self) -> dict:
        return {"mode": self.mode, "signal": [None if v != v else v for v in self.signal.tolist()]}

    def load_state_dict(self, state: dict) -> None:
        vals = state.get("signal", [])
        if len(vals) != self.signal.shape[0]:
            raise ValueError(f"prompt sampler state has {len(vals)} prompts, this run has {self.signal.shape[0]}")
        self.signal = torch.tensor([float("nan") if v is None else float(v) for v in vals], dtype=torch.float64)
