"""Pretrain the shapes base model from scratch on rendered scenes (a one-off job; the default
training run never pretrains, it loads the shipped weights).

    python -m fastflow.shapes.pretrain --out runs/pretrain [--minutes 120] [--seed 0]
    python -m fastflow.shapes.pretrain --out runs/pretrain --export fastflow/shapes/weights/base.safetensors

Rectified flow ``x_t = (1 - t) x0 + t eps`` with an x0-prediction loss; captions are dropped to ""
with probability ``--cfg-drop`` for classifier-free guidance. Data and noise of step k are a pure
function of (seed, k), so a resumed run continues the same stream. Every ``--ckpt-minutes`` the run
writes ``ckpt.pt`` (resumable: model, EMA, optimizer, step); every ``--eval-minutes`` it samples the
held-out prompts with the EMA weights (ODE, CFG) and logs the strict accuracy per category, and
keeps the best EMA weights as ``best.safetensors``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fastflow.sde import flow_sigmas
from fastflow.shapes import verifier
from fastflow.shapes.model import ModelConfig, ShapesFlowModel, load_model, save_model
from fastflow.shapes.world import CATEGORIES, category_of, sample_batch

HERE = Path(__file__).resolve().parent


def read_prompt_list(path: str | Path) -> list[str]:
    """Prompts of a .txt list (one per line, # comments)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [s.strip() for s in lines if s.strip() and not s.strip().startswith("#")]


@torch.no_grad()
def ode_sample(model: ShapesFlowModel, prompts: list[str], seeds: list[int], steps: int,
               guidance: float) -> torch.Tensor:
    """Euler ODE samples in [0, 1], one per (prompt, seed) pair, with classifier-free guidance."""
    device = next(model.parameters()).device
    x = torch.stack([torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device)
    c = model.encode(prompts, device)
    u = model.encode([""] * len(prompts), device)
    ids, mask = torch.cat([u["ids"], c["ids"]]), torch.cat([u["mask"], c["mask"]])
    sig = flow_sigmas(steps, 1.0)
    for i in range(steps):
        t = sig[i].expand(len(prompts)).to(device)
        vu, vc = model.velocity(torch.cat([x, x]), torch.cat([t, t]), ids, mask).chunk(2)
        v = vu + guidance * (vc - vu)
        x = x + float(sig[i + 1] - sig[i]) * v
    return ((x + 1) / 2).clamp(0, 1)


def quick_eval(model: ShapesFlowModel, prompts: list[str], seeds: int, steps: int, guidance: float,
               batch: int = 128) -> dict[str, float]:
    """Strict accuracy per category (and ``overall`` = mean over categories, ``images`` = per image)."""
    pairs = [(p, 1000 + s) for p in prompts for s in range(seeds)]
    correct: list[bool] = []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        imgs = ode_sample(model, [p for p, _ in chunk], [s for _, s in chunk], steps, guidance)
        correct += verifier.is_correct(imgs, [p for p, _ in chunk]).tolist()
    by: dict[str, list[bool]] = {}
    for (p, _), ok in zip(pairs, correct):
        by.setdefault(category_of(p), []).append(ok)
    out = {c: float(np.mean(by[c])) for c in CATEGORIES if c in by}
    out["overall"] = float(np.mean([out[c] for c in CATEGORIES if c in by]))
    out["images"] = float(np.mean(correct))
    return out


def lr_at(step: int, base: float, warmup: int) -> float:
    """Linear warmup, then constant (the run length is set by wall-clock, not a schedule)."""
    return base * min(1.0, (step + 1) / warmup)


def train_step(model, opt, step: int, args) -> float:
    """One optimisation step on batch (seed, step); returns the loss."""
    rng = np.random.default_rng([args.seed, step])
    x0, caps = sample_batch(args.batch, rng)
    gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    x0 = x0 * 2 - 1
    eps = torch.randn(x0.shape, generator=gen)
    t = torch.rand(args.batch, generator=gen)
    drop = torch.rand(args.batch, generator=gen) < args.cfg_drop
    caps = ["" if d else c for c, d in zip(caps, drop.tolist())]
    xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    c = model.encode(caps)
    pred = model.predict_x0(xt, t, c["ids"], c["mask"])
    loss = F.mse_loss(pred, x0)
    for g in opt.param_groups:
        g["lr"] = lr_at(step, args.lr, args.warmup)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss.detach())


@torch.no_grad()
def ema_update(ema, model, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - decay)


def save_ckpt(path: Path, model, ema, opt, step: int, elapsed: float, best: float) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                "step": step, "elapsed": elapsed, "best": best, "config": model.cfg.to_json()}, tmp)
    os.replace(tmp, path)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fastflow.shapes.pretrain", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/pretrain", help="run directory (checkpoints, log.jsonl)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=110.0, help="wall-clock budget of this run")
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0 = no limit)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--cfg-drop", type=float, default=0.1)
    ap.add_argument("--channels", default="24,48,96", help="UNet widths at 32, 16 and 8 px")
    ap.add_argument("--ckpt-minutes", type=float, default=4.0)
    ap.add_argument("--eval-minutes", type=float, default=8.0)
    ap.add_argument("--eval-seeds", type=int, default=2)
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.5)
    ap.add_argument("--eval-prompts", default=str(HERE / "prompts_eval.txt"))
    ap.add_argument("--export", default="", help="only export: write the best (else latest EMA) weights "
                    "of --out to this safetensors path and exit")
    return ap.parse_args(argv)


def export(out: Path, dest: str) -> None:
    """Copy the run's best EMA weights (or the latest checkpoint's EMA) to ``dest``."""
    src = out / "best.safetensors"
    if src.is_file():
        model = load_model(src)
    else:
        ck = out / "ckpt.pt"
        if not ck.is_file():
            raise SystemExit(f"nothing to export: neither {src} nor {ck} exists")
        state = torch.load(ck, map_location="cpu", weights_only=True)
        model = ShapesFlowModel(ModelConfig.from_json(state["config"]))
        model.load_state_dict(state["ema"])
    save_model(model, dest)
    print(f"exported {src if src.is_file() else ck} -> {dest}")


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    if args.export:
        export(out, args.export)
        return
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    channels = tuple(int(c) for c in args.channels.split(","))
    if len(channels) != 3:
        raise SystemExit(f"--channels needs three widths, got {args.channels!r}")
    model = ShapesFlowModel(ModelConfig(channels=channels))
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    step, elapsed0, best = 0, 0.0, -1.0
    ck = out / "ckpt.pt"
    if ck.is_file():
        state = torch.load(ck, map_location="cpu", weights_only=True)
        if state["config"] != model.cfg.to_json():
            raise SystemExit(f"{ck} was written for another architecture; use a fresh --out")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        step, elapsed0, best = state["step"], state["elapsed"], state["best"]
        print(f"resumed from {ck} at step {step}", flush=True)
    eval_prompts = read_prompt_list(args.eval_prompts)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"shapes pretrain: {n_params / 1e6:.2f}M params, batch {args.batch}, threads "
          f"{torch.get_num_threads()}", flush=True)
    log = (out / "log.jsonl").open("a")
    start = time.time()
    last_ck = last_ev = start
    losses: list[float] = []
    while True:
        now = time.time()
        done = (now - start) / 60 >= args.minutes or (args.max_steps and step >= args.max_steps)
        if done or now - last_ev >= args.eval_minutes * 60:
            t0 = time.time()
            acc = quick_eval(ema, eval_prompts, args.eval_seeds, args.eval_steps, args.guidance)
            rec = {"step": step, "minutes": round((elapsed0 + now - start) / 60, 2),
                   "eval_seconds": round(time.time() - t0, 1), **{k: round(v, 4) for k, v in acc.items()}}
            print("eval", json.dumps(rec), flush=True)
            log.write(json.dumps({"eval": rec}) + "\n")
            log.flush()
            save_model(ema, out / "latest_ema.safetensors", {"step": str(step)})
            if acc["overall"] > best:
                best = acc["overall"]
                save_model(ema, out / "best.safetensors", {"step": str(step), "overall": f"{best:.4f}"})
            last_ev = time.time()
        if done or time.time() - last_ck >= args.ckpt_minutes * 60:
            save_ckpt(ck, model, ema, opt, step, elapsed0 + time.time() - start, best)
            last_ck = time.time()
        if done:
            break
        losses.append(train_step(model, opt, step, args))
        ema_update(ema, model, min(args.ema, (1 + step) / (10 + step)))
        step += 1
        if step % 50 == 0:
            rec = {"step": step, "loss": round(float(np.mean(losses)), 5),
                   "minutes": round((elapsed0 + time.time() - start) / 60, 2)}
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            losses.clear()
    print(f"done at step {step}; best held-out overall strict accuracy {best:.3f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
