#!/usr/bin/env python
"""Speed a user can measure: pruned resnet20 against its baseline, in eager PyTorch and ONNX Runtime.

Each cell is one ``run.py`` run of ``chn-pruned`` with the uniform policy at ``--target`` (no
re-training: the accuracy is the validation accuracy on the reward split before any fine-tuning),
from the shipped baseline, with one setting changed:

- ``flops-r1`` / ``flops-auto``: ``--resource flops`` with ``--channel-round 1`` (any width) and ``auto``
  (each layer's granule timed on this machine);
- ``latency-eager`` / ``latency-ort``: ``--resource latency`` with the lookup table timed in eager
  PyTorch and in ONNX Runtime (``--latency-runtime``).

Speed-ups come from the run's own ``summary.json`` speed block: the candidate against the baseline
in the same process, medians over ``--latency-repeats`` rounds alternated between the two. For the
latency cells, the table's prediction beside the shipped model's measurement (``prediction_error``:
predicted / measured - 1, at the table's batch of 1).

Cells are JSON files under ``--cells`` (skipped when present), so the table can be built across sessions:

    python benchmarks/speed.py --cells benchmarks/speed-cells --out benchmarks/speed.md

Run it on a quiet machine: the timings share the CPU with anything else running.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

CONFIGS: dict[str, list[str]] = {
    "flops-r1": ["--resource", "flops", "--channel-round", "1"],
    "flops-auto": ["--resource", "flops", "--channel-round", "auto"],
    "latency-eager": ["--resource", "latency", "--latency-runtime", "eager"],
    "latency-ort": ["--resource", "latency", "--latency-runtime", "onnxruntime"],
}


def run_cell(name: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="torchpocket-speed") as tmp:
        cmd = [sys.executable, str(ROOT / "run.py"), "--learner", "chn-pruned", "--hpo", "uniform",
               "--target", str(args.target), "--init", args.init, "--episodes", "1", "--retrain-epochs", "0",
               "--threads", str(args.threads), "--seed", str(seed), "--latency-repeats", str(args.latency_repeats),
               "--out-dir", str(Path(tmp) / "runs"), "--quiet", *CONFIGS[name]]
        env = {**os.environ, "TORCHPOCKET_CACHE": str(Path(tmp) / "cache")}  # widths probed in this run
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:  # a refused target is a result too (one line, exit 2): the row says why
            lines = proc.stderr.strip().splitlines() or ["(no message)"]
            return {"config": name, "seed": seed, "refused": f"exit {proc.returncode}: {lines[-1][:240]}",
                    "seconds": round(time.perf_counter() - t0, 1)}
        (run,) = (Path(tmp) / "runs").iterdir()
        s = json.loads((run / "summary.json").read_text())
    sp, pred = s["speedup"], s.get("latency_prediction") or {}
    return {"config": name, "seed": seed, "flops_kept": s["flops_ratio"], "val_acc": s["search"]["best_val_acc"],
            "eager_b1": sp["eager"]["b1"], "eager_b64": sp["eager"]["b64"],
            "ort_b1": sp.get("onnxruntime", {}).get("b1"), "ort_b64": sp.get("onnxruntime", {}).get("b64"),
            "predicted_ratio": pred.get("predicted_ratio"), "prediction_error": pred.get("prediction_error"),
            "runtime": pred.get("runtime"), "granules": list(s.get("channel_round", {}).get("per_layer", {}).values()),
            "cpu_flags": sp.get("cpu_flags"), "threads": sp.get("threads"),
            "seconds": round(time.perf_counter() - t0, 1)}


def f(v: Any, spec: str) -> str:
    return "" if v is None else format(v, spec)


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| setting | seed | FLOPs kept | val acc (no fine-tuning) | eager b1 | eager b64 | ORT b1 | ORT b64 | "
             "table predicts | prediction error (ORT/eager b1) | granules | s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        if "refused" in r:
            lines.append(f"| `{r['config']}` | {r['seed']} | {r['refused']} |  |  |  |  |  |  |  |  | {r['seconds']} |")
            continue
        gran = ",".join(str(g) for g in r["granules"]) if len(set(r["granules"])) > 1 else str(r["granules"][0])
        lines.append(f"| `{r['config']}` | {r['seed']} | {f(r['flops_kept'], '.3f')} | {f(r['val_acc'], '.2f')} | "
                     f"{f(r['eager_b1'], '.2f')}x | {f(r['eager_b64'], '.2f')}x | {f(r['ort_b1'], '.2f')}x | "
                     f"{f(r['ort_b64'], '.2f')}x | {f(r['predicted_ratio'], '.3f')} | "
                     f"{f(r['prediction_error'], '+.0%')} | {gran} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--init", default="benchmarks/resnet20-fashion-mnist.pt", help="baseline model.pt")
    ap.add_argument("--target", type=float, default=0.5, help="resource target (default: %(default)s)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--latency-repeats", type=int, default=50, help="timed rounds per speed-up (median)")
    ap.add_argument("--cells", default="benchmarks/speed-cells", help="one JSON file per (setting, seed)")
    ap.add_argument("--out", default=None, help="markdown file for the table (it is printed too)")
    args = ap.parse_args()
    from _common import command_line, flag_line

    from torchpocket.utils import atomic_write_text, machine_description

    cells = Path(args.cells)
    cells.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        for name in args.configs:
            cell = cells / f"{name}-t{args.target}-s{seed}.json"
            if not cell.exists():
                row = run_cell(name, seed, args)
                atomic_write_text(cell, json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
            rows.append(json.loads(cell.read_text()))
    text = (f"## Speed at target {args.target} (resnet20, uniform policy, no re-training)\n\n"
            f"- machine: {machine_description()}; CPU flags: {flag_line()}; "
            f"command: `{command_line()}`\n\n" + table(rows))
    print(text)
    if args.out:
        atomic_write_text(args.out, text)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
