"""Re-measure the activation models shipped in ``published/measured/``: plan every shipped config
(its own fine-tuning mode and the other one, at 1 and 2 GPUs, against a GPU too small for it, so
that every advised variant is planned too), then ship what was measured. Run from a checkout
after a change to what a measurement records (bump cache.MEASURE_VERSION; a full refresh
replaces every shipped file) or to the shipped configs (name the new ones: theirs are added):

    python -m fastflow.plan.refresh [--cache DIR] [CONFIG.toml ...]

Measurements go to ``--cache DIR`` (default: a fresh temporary folder, kept) before they are
shipped, so an interrupted refresh resumes where it stopped when given the same folder. A config
that cannot be planned is reported and skipped.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

SUPPORTED = ("sd3", "flux", "qwenimage", "flux2_klein", "shapes", "toy")


def main(argv: list[str]) -> int:
    args = list(argv)
    cache = None
    if "--cache" in args:
        i = args.index("--cache")
        if i + 1 >= len(args):
            print("fastflow.plan.refresh: --cache needs a folder", file=sys.stderr)
            return 2
        cache = args[i + 1]
        del args[i:i + 2]
    cache = cache or tempfile.mkdtemp(prefix="fastflow-plan-refresh-")
    os.environ["FASTFLOW_CACHE"] = cache  # before any measurement: nothing from the user's cache
    from fastflow.config import ConfigError, load_config, validate
    from fastflow.plan import GiB, PlanError, make_plan
    from fastflow.plan import cache as plan_cache
    from fastflow.plan.arch import DIFFUSERS_KINDS
    from fastflow.plan.cli import offline_copy

    paths = [Path(a) for a in args] or sorted(Path("configs").glob("*.toml"))
    print(f"measuring into {cache}", flush=True)
    for path in paths:
        try:
            base = load_config(str(path))
            if base.model.kind not in SUPPORTED:
                print(f"{path}: model.kind {base.model.kind} is not planned; skipped", flush=True)
                continue
            modes = [base.model.finetune] + (["full" if base.model.finetune == "lora" else "lora"]
                                             if base.model.kind in DIFFUSERS_KINDS else [])
            for mode in modes:
                cfg, _ = offline_copy(load_config(str(path), ["--model.finetune", mode]))
                for world in (1, 2):
                    try:
                        validate(cfg, world)
                    except ConfigError:
                        continue
                    t0 = time.time()
                    make_plan(cfg, world, gpu_memory=1 * GiB, device="cuda")
                    print(f"{path} finetune {mode} at {world} GPU(s): {time.time() - t0:.0f} s", flush=True)
        except (ConfigError, PlanError, ValueError, OSError) as e:
            print(f"{path}: skipped ({' '.join(str(e).split())})", flush=True)
    if not args:  # a full refresh replaces every shipped measurement
        for name in os.listdir(plan_cache.SHIPPED) if plan_cache.SHIPPED.is_dir() else []:
            (plan_cache.SHIPPED / name).unlink()
    shipped = plan_cache.ship_from(Path(cache) / "plan")
    print(f"shipped {len(shipped)} measurements in {plan_cache.SHIPPED}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
