"""Training objectives beside Flow-GRPO's clipped policy gradient (fastflow.grpo), selected by
``train.algorithm`` and ``train.guard`` (docs/algorithms.md):

- ``grpo`` + ``train.guard``: GRPO-Guard's regulated ratio (:mod:`fastflow.objectives.guard`);
- ``nft``: DiffusionNFT, negative-aware flow matching on the forward process with an old
  (sampling) policy (:mod:`fastflow.objectives.nft`);
- ``awm``: Advantage Weighted Matching, a clipped advantage-weighted flow-matching likelihood
  (:mod:`fastflow.objectives.awm`).

The flow-matching objectives share the forward-process machinery in
:mod:`fastflow.objectives.forward`: clean images from any sampler, re-noised at timesteps drawn
from the rollout grid. Every loss has a float64 reference (``*_reference``) written as plainly
as possible, that the tests compare the implementation with.
"""

ALGORITHMS = ("grpo", "nft", "awm")
FLOW_MATCHING = ("nft", "awm")  # trained on the forward process: clean images only
