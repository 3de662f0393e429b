"""``python -m fastflow.plan CONFIG [overrides] [--plan-gpus N] [--plan-gpu-memory SIZE]``: the same
as ``python -m fastflow.train CONFIG --plan``."""

import sys

from fastflow.train import main

sys.exit(main([*sys.argv[1:], "--plan"]))
