"""Throughput of the reward server: sequential requests vs concurrent clients, with and without
batching. Starts its own servers on loopback (``python -m fastflow.rewards.serve``, OS-chosen
ports) and sends them the same requests three ways:

    sequential   one client, every request after the previous one's reply
    concurrent   N clients at once, the server batching off (--max-batch-images 0)
    batched      N clients at once, the server batching (the default)

    python -m fastflow.rewards.serve_bench --reward toy_color [--clients 8] [--requests 4]
        [--images 8] [--size 64] [--option key=value ...] [--device cpu]
    python -m fastflow.rewards.serve_bench --random-clip [--size 224] ...

``--random-clip`` scores with the pickscore reward on a CLIP of ViT-B/32 shape (12 + 12 layers,
width 768 / 512) with random weights, written to a temporary folder: a real CLIP scorer's cost
without a download (the speed does not depend on the weights). Requests are encoded before the
clock starts, so the numbers are the server's. Prints one table (images/s, mean model batch,
median request latency).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

from fastflow.rewards.serve import parse_option
from fastflow.rewards.wire import encode_images


def write_random_clip(path: Path, image_size: int = 224, seed: int = 0) -> Path:
    """A CLIPModel of ViT-B/32 shape with random weights and a CLIPProcessor (a character-level
    vocabulary, no merges) saved to ``path``, loadable by the pickscore reward offline."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    path.mkdir(parents=True, exist_ok=True)
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, extra = bs[:], 0
    for b in range(256):  # CLIP's byte -> unicode table
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    chars = [chr(c) for c in cs]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    processor = CLIPImageProcessor(size={"shortest_edge": image_size},
                                   crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(path)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokens), hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=77, bos_token_id=len(tokens) - 2,
                         eos_token_id=len(tokens) - 1, pad_token_id=len(tokens) - 1),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=image_size, patch_size=32),
        projection_dim=512)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        CLIPModel(config).save_pretrained(path)
    return path


class _Server:
    def __init__(self, reward: str, args: list[str], startup_s: float = 300):
        cmd = [sys.executable, "-m", "fastflow.rewards.serve", "--reward", reward, "--port", "0", *args]
        env = {k: v for k, v in os.environ.items() if k != "FASTFLOW_REWARD_TOKEN"}  # loopback, no token
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        line: list[str] = []
        t = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        t.start()
        t.join(startup_s)
        if not line or not line[0].startswith("serving"):
            self.stop()
            raise RuntimeError(f"the reward server did not start: {line}")
        self.url = line[0].split(" on ")[1].strip()

    def metrics(self) -> dict:
        with urllib.request.urlopen(self.url + "/metrics", timeout=30) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _post(url: str, body: bytes) -> float:
    t0 = time.perf_counter()
    req = urllib.request.Request(url + "/score", data=body, method="POST")
    with urllib.request.urlopen(req, timeout=600) as r:
        reply = json.loads(r.read())
    if "scores" not in reply:
        raise RuntimeError(f"no scores in the reply: {str(reply)[:200]}")
    return time.perf_counter() - t0


def _run(url: str, bodies: list[list[bytes]], concurrent: bool) -> tuple[float, list[float]]:
    """Wall time and per-request latencies; bodies[c] are client c's requests."""
    latencies: list[float] = []
    lock = threading.Lock()

    def client(mine: list[bytes]) -> None:
        for b in mine:
            dt = _post(url, b)
            with lock:
                latencies.append(dt)
    t0 = time.perf_counter()
    if concurrent:
        threads = [threading.Thread(target=client, args=(mine,)) for mine in bodies]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        client([b for mine in bodies for b in mine])
    return time.perf_counter() - t0, latencies


def bench(reward: str, server_args: list[str], *, clients: int, requests: int, images: int, size: int,
          warmup: int = 1) -> list[dict]:
    prompts = [f"a photo of a red apple number {i}" for i in range(images)]
    if reward == "toy_color":
        prompts = ["a red"] * images
    g = torch.Generator().manual_seed(0)
    bodies = [[json.dumps({"images": encode_images(torch.rand(images, 3, size, size, generator=g)),
                           "prompts": prompts}).encode() for _ in range(requests)] for _ in range(clients)]
    rows = []
    # The sequential baseline does not wait for other requests to join (--batch-wait-ms 0): one
    # client alone has nothing to batch with.
    for mode, extra, concurrent in [("sequential", ["--batch-wait-ms", "0"], False),
                                    ("concurrent", ["--max-batch-images", "0"], True), ("batched", [], True)]:
        server = _Server(reward, server_args + extra)
        try:
            for _ in range(warmup):
                _run(server.url, [bodies[0][:1]], False)
            before = server.metrics()
            wall, lat = _run(server.url, bodies, concurrent)
            after = server.metrics()
        finally:
            server.stop()
        n_images = clients * requests * images
        batches = after["batches"] - before["batches"]
        rows.append({"mode": mode, "clients": clients if concurrent else 1, "images": n_images,
                     "wall_s": wall, "images_per_s": n_images / wall,
                     "mean_batch_images": (after["images"] - before["images"]) / max(batches, 1),
                     "median_latency_s": statistics.median(lat)})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastflow.rewards.serve_bench", description=__doc__.split("\n")[0])
    p.add_argument("--reward", default="toy_color")
    p.add_argument("--random-clip", action="store_true", help="pickscore on a random CLIP of ViT-B/32 shape")
    p.add_argument("--option", action="append", type=parse_option, default=[], metavar="KEY=VALUE")
    p.add_argument("--device", default="cpu")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--images", type=int, default=8, help="images per request")
    p.add_argument("--size", type=int, default=64, help="image side (px)")
    p.add_argument("--batch-wait-ms", type=float, default=20.0)
    p.add_argument("--json", action="store_true", help="print the rows as JSON lines too")
    args = p.parse_args(argv)
    if min(args.clients, args.requests, args.images, args.size) < 1:
        print("serve_bench: --clients, --requests, --images and --size must be >= 1", file=sys.stderr)
        return 2
    options = list(args.option)
    with tempfile.TemporaryDirectory(prefix="fastflow-serve-bench-") as tmp:
        reward = args.reward
        if args.random_clip:
            clip = write_random_clip(Path(tmp) / "clip", image_size=224)
            reward = "pickscore"
            options += [("model", str(clip)), ("processor", str(clip)), ("dtype", "float32")]
        server_args = ["--device", args.device, "--batch-wait-ms", str(args.batch_wait_ms)]
        for k, v in options:
            server_args += ["--option", f"{k}={json.dumps(v) if not isinstance(v, str) else v}"]
        rows = bench(reward, server_args, clients=args.clients, requests=args.requests, images=args.images,
                     size=args.size)
    base = rows[0]["images_per_s"]
    print(f"reward {reward}: {args.clients} clients x {args.requests} requests x {args.images} images of "
          f"{args.size} px, device {args.device}, torch threads {torch.get_num_threads()}")
    print(f"{'mode':<11} {'clients':>7} {'images/s':>9} {'vs seq':>7} {'batch':>6} {'p50 latency':>12}")
    for r in rows:
        print(f"{r['mode']:<11} {r['clients']:>7} {r['images_per_s']:>9.1f} {r['images_per_s'] / base:>6.2f}x "
              f"{r['mean_batch_images']:>6.1f} {r['median_latency_s']:>10.3f} s")
        if args.json:
            print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
