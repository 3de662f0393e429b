"""The one-page markdown summary of a bench/gpu_suite.sh run.

    python bench/gpu_summary.py OUTDIR        # reads OUTDIR's parts.tsv, suite.tsv, env.json,
                                              # pytest_gpu.xml and *.jsonl; writes OUTDIR/summary.md

The suite calls it after every part, so a run stopped half-way still leaves a summary of what
finished. Standard library only: it must work when nothing else does.
"""

from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

MAX_FAILED_TESTS = 12


def read_tsv(path: Path) -> list[list[str]]:
    if not path.is_file():
        return []
    return [line.split("\t") for line in path.read_text().splitlines() if line.strip()]


def read_rows(out: Path, bench: str) -> list[dict]:
    rows = []
    for f in sorted(out.glob(f"{bench}-*.jsonl")):
        for line in f.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut off by a kill: the others still count
    return rows


def fmt(v, spec: str = ".2f", scale: float = 1.0) -> str:
    if v is None or v == "":
        return "-"
    try:
        return format(float(v) * scale, spec)
    except (TypeError, ValueError):
        return str(v)


def rows_in_log(log: Path) -> str:
    """The row count a bench prints last ('# N rows -> file'), '' when it printed none."""
    if not log.is_file():
        return ""
    found = re.findall(r"^# (\d+) rows -> ", log.read_text(errors="replace"), flags=re.M)
    return found[-1] if found else ""


def budget_skips(log: Path) -> str:
    """How many cases a bench skipped on its --time-budget ('# time budget: ...: skipped N case(s)'),
    '' when none: a part that stopped on its budget is "ok" with fewer rows."""
    if not log.is_file():
        return ""
    found = re.findall(r"^# time budget: .*skipped (\d+) case\(s\)", log.read_text(errors="replace"), flags=re.M)
    return f"{found[-1]} skipped (budget)" if found else ""


def pytest_section(xml: Path) -> list[str]:
    if not xml.is_file():
        return ["No JUnit report (the part did not run or was stopped before pytest wrote it)."]
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError as e:
        return [f"JUnit report unreadable: {e}."]
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    bad = []
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}".lstrip(":")
        kinds = {child.tag for child in case}
        if "failure" in kinds:
            counts["failed"] += 1
            bad.append(("failed", name, case.find("failure")))
        elif "error" in kinds:
            counts["error"] += 1
            bad.append(("error", name, case.find("error")))
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    total = sum(counts.values())
    lines = [f"{total} tests: {counts['passed']} passed, {counts['failed']} failed, "
             f"{counts['error']} errors, {counts['skipped']} skipped."]
    for kind, name, el in bad[:MAX_FAILED_TESTS]:
        msg = (el.get("message") or "").strip().splitlines()
        lines.append(f"- {kind}: `{name}`" + (f": {msg[0][:160]}" if msg else ""))
    if len(bad) > MAX_FAILED_TESTS:
        lines.append(f"- ... and {len(bad) - MAX_FAILED_TESTS} more (pytest_gpu.log)")
    return lines


def kernels_section(rows: list[dict]) -> list[str]:
    if not rows:
        return ["No rows."]
    by = {}
    for r in rows:
        by.setdefault((r.get("case"), r.get("op")), {})[r.get("impl")] = r
    lines = ["| case | op | eager ms | compile ms | triton ms | triton GB/s | % copy bw | x eager | x compile |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (case, op), impls in by.items():
        t = impls.get("triton", {})
        lines.append(f"| {case} | {op} | {fmt(impls.get('eager', {}).get('ms'), '.3f')} "
                     f"| {fmt(impls.get('compile', {}).get('ms'), '.3f')} | {fmt(t.get('ms'), '.3f')} "
                     f"| {fmt(t.get('gbps'), '.0f')} | {fmt(t.get('frac_copy_bw'), '.0f', 100)} "
                     f"| {fmt(t.get('speedup_vs_eager'))} | {fmt(t.get('speedup_vs_compile'))} |")
    return lines


def sampler_section(rows: list[dict]) -> list[str]:
    if not rows:
        return ["No rows."]
    by = {}
    for r in rows:
        by.setdefault((r.get("model"), r.get("batch")), {})[r.get("method")] = r
    lines = ["| model | batch | reference img/s | fastflow img/s | speedup | fastflow ms/step | MFU | peak GiB | path |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (model, batch), m in by.items():
        ref, ff = m.get("reference", {}), m.get("fastflow", {})
        path = ff.get("path") or "-"
        if ff.get("fallback_reason"):
            path += f" ({str(ff['fallback_reason'])[:60]})"
        err = ff.get("error") or ref.get("error")
        lines.append(f"| {model} | {batch} | {fmt(ref.get('images_per_s'))} | {fmt(ff.get('images_per_s'))} "
                     f"| {fmt(ff.get('speedup'))} | {fmt(ff.get('ms_per_step'), '.1f')} "
                     f"| {fmt(ff.get('mfu'), '.1f', 100)}% | {fmt(ff.get('peak_mem_gib'), '.1f')} "
                     f"| {path}{' — ' + err if err else ''} |")
    return lines


def train_section(rows: list[dict]) -> list[str]:
    if not rows:
        return ["No rows."]
    by = {}
    for r in rows:
        by.setdefault((r.get("model"), r.get("finetune")), {})[r.get("kernels")] = r
    lines = ["MFU and peak memory are the triton path's (the torch path's where triton has no row).", "",
             "| model | finetune | torch s/step | triton s/step | x torch | MFU | peak GiB | note |",
             "|---|---|---|---|---|---|---|---|"]
    for (model, ft), k in by.items():
        ref, tri = k.get("torch", {}), k.get("triton", {})
        speed = (ref["seconds_per_step"] / tri["seconds_per_step"]
                 if ref.get("seconds_per_step") and tri.get("seconds_per_step") else None)
        main = tri or ref
        notes = sorted({f"{name}: {r['error']}" for name, r in k.items() if r.get("error")})
        if any(r.get("loss_finite") is False for r in k.values()):
            notes.append("non-finite loss")
        lines.append(f"| {model} | {ft} | {fmt(ref.get('seconds_per_step'), '.3f')} "
                     f"| {fmt(tri.get('seconds_per_step'), '.3f')} | {fmt(speed)} "
                     f"| {fmt(main.get('mfu'), '.1f', 100)}% | {fmt(main.get('peak_mem_gib'), '.1f')} "
                     f"| {'; '.join(notes) or ''} |")
    return lines


def summarize(out: Path) -> str:
    suite = {k: v for k, v, *_ in (row + [""] for row in read_tsv(out / "suite.tsv"))}
    env = {}
    if (out / "env.json").is_file():
        try:
            env = json.loads((out / "env.json").read_text())
        except json.JSONDecodeError:
            env = {}
    pk = env.get("packages", {})

    def ver(name):
        return (pk.get(name) or {}).get("version") or "-"

    smi = (env.get("nvidia_smi") or {}).get("gpus") or [{}]
    device = env.get("device") or suite.get("device") or "unknown device"
    mode = suite.get("mode", "gpu")
    title = f"# GPU suite: {device}, {suite.get('started', env.get('date', ''))}"
    if mode == "dry-run":
        title += " (CPU dry run: toy sizes, the numbers mean nothing)"
    lines = [title, "",
             f"commit {suite.get('commit') or env.get('commit') or 'unknown'} · python {env.get('python', '-')} · "
             f"torch {ver('torch')} (CUDA {env.get('torch_cuda') or '-'}) · triton {ver('triton')} · "
             f"driver {smi[0].get('driver_version', '-')} · diffusers {ver('diffusers')} · peft {ver('peft')} · "
             f"transformers {ver('transformers')}",
             "", f"Time budget {suite.get('budget_s', '?')} s; elapsed {suite.get('elapsed_s', '?')} s.", "",
             "## Parts", "", "| part | status | wall s | limit s | rows | log |", "|---|---|---|---|---|---|"]
    for name, status, rc, wall, limit, log, *_ in (r + [""] * 6 for r in read_tsv(out / "parts.tsv")):
        shown = status if status != "failed" else f"failed (exit {rc})"
        skips = budget_skips(out / log) if log else ""
        shown = f"{shown}, {skips}" if skips else shown
        lines.append(f"| {name} | {shown} | {wall} | {limit} | {rows_in_log(out / log) if log else ''} | {log} |")
    lines += ["", "## pytest -m gpu", "", *pytest_section(out / "pytest_gpu.xml"),
              "", "## Fused kernels (bench/kernels.py)", "", *kernels_section(read_rows(out, "kernels")),
              "", "## Rollout throughput (bench/sampler_throughput.py)", "",
              *sampler_section(read_rows(out, "sampler_throughput")),
              "", "## Training step (bench/train_step.py)", "", *train_section(read_rows(out, "train_step")),
              "", "Every row is in the *.jsonl files beside this summary; each part's output in its log; "
                  "versions and the device in env.json / env.txt.", ""]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: gpu_summary.py OUTDIR (an existing suite output folder)", file=sys.stderr)
        return 2
    out = Path(argv[0])
    text = summarize(out)
    tmp = out / "summary.md.tmp"
    tmp.write_text(text)
    tmp.replace(out / "summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
