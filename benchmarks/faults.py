#!/usr/bin/env python
"""Kill -9 at random points: does every resumed run end as the uninterrupted one?

One uninterrupted reference run (tiny: synthetic data, resnet20, ``chn-pruned`` + ``random``, ONNX export
on), then ``--points`` runs, each SIGKILLed (``TORCHPOCKET_FAULT``, :mod:`torchpocket.faults`) at a point
drawn at random from :data:`torchpocket.faults.POINTS` and a visit drawn in ``1..--max-visit`` and resumed
once with ``--resume``. A row is *identical* when the resumed run's trial log has exactly the reference's
decisions (policy, resource, val acc, reward of every trial, none lost or repeated), its final model matches
the reference's to float rounding (the largest weight difference is printed), its test accuracy is the
same, and no partial file is left. A draw whose visit never comes (say ``trial-start:9`` in a 6-trial run)
finishes without a kill and is counted apart. Resumable: every row is one JSON file under ``--cells``.

    python benchmarks/faults.py --points 50 --seed 0 --cells benchmarks/fault-cells --out benchmarks/faults.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from torchpocket import faults  # noqa: E402
from torchpocket.utils import atomic_write_text, machine_description  # noqa: E402

ARGV = ["--dataset", "synthetic", "--net", "resnet20", "--learner", "chn-pruned", "--hpo", "random", "--target",
        "0.5", "--device", "cpu", "--quiet", "--epochs", "1", "--reward-val-size", "64", "--latency-repeats", "2",
        "--calib-batches", "2", "--threads", "1", "--episodes", "6", "--retrain-epochs", "1",
        "--max-steps-per-epoch", "3"]
SAME = ("trial", "kind", "policy", "resource", "val_acc", "reward", "status")


def run(argv: list[str], env: dict[str, str]) -> int:
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *argv], env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, timeout=900).returncode


def rows(run_dir: Path) -> list[dict[str, Any]]:
    out = []
    for ln in (run_dir / "trials.jsonl").read_text().splitlines():
        try:
            out.append({k: json.loads(ln)[k] for k in SAME})
        except json.JSONDecodeError:
            break
    return out


def compare(run_dir: Path, ref: Path) -> dict[str, Any]:
    got = torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]
    exp = torch.load(ref / "model.pt", weights_only=True)["state_dict"]
    diff = max((got[k].float() - exp[k].float()).abs().max().item() for k in exp) if got.keys() == exp.keys() \
        else float("inf")
    s, r = (json.loads((d / "summary.json").read_text()) for d in (run_dir, ref))
    same = rows(run_dir) == rows(ref)
    return {"decisions_same": same, "max_weight_diff": diff,
            "test_acc_same": s["compressed"]["test_acc"] == r["compressed"]["test_acc"],
            "partial_files": len(list(run_dir.glob("*.tmp*"))),
            "identical": same and diff <= 1e-4 and s["compressed"]["test_acc"] == r["compressed"]["test_acc"]
            and not list(run_dir.glob("*.tmp*"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=50, help="random kill points (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the draws (default: %(default)s)")
    ap.add_argument("--max-visit", type=int, default=3, help="with --draw any: visits to draw from "
                    "(default: %(default)s)")
    ap.add_argument("--draw", choices=("any", "reached"), default="any",
                    help="any: a point of POINTS and a visit in 1..--max-visit (some never come); reached: a "
                         "point and a visit the reference run made (counted with TORCHPOCKET_FAULT_LOG), so "
                         "every draw kills (default: %(default)s)")
    ap.add_argument("--cells", default="benchmarks/fault-cells", help="one JSON file per row")
    ap.add_argument("--out", default=None, help="markdown file for the table (it is printed too)")
    args = ap.parse_args()
    cells = Path(args.cells)
    cells.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    prefix = f"s{args.seed}" if args.draw == "any" else f"r{args.seed}"
    with tempfile.TemporaryDirectory(prefix="torchpocket-faults") as tmp:
        env = {**os.environ, "TORCHPOCKET_CACHE": str(Path(tmp) / "cache"), "PYTHONPATH": str(ROOT)}
        env.pop(faults.ENV, None)
        visits = Path(tmp) / "visits.txt"
        assert run([*ARGV, "--out-dir", str(Path(tmp) / "ref")], {**env, faults.LOG_ENV: str(visits)}) == 0, \
            "the reference run failed"
        (ref,) = (Path(tmp) / "ref").iterdir()
        if args.draw == "any":
            draws = [(rng.choice(faults.POINTS), rng.randint(1, args.max_visit)) for _ in range(args.points)]
        else:  # visits counted in a second run of the same command: the first one also trained the baseline
            visits.unlink()
            assert run([*ARGV, "--out-dir", str(Path(tmp) / "count")], {**env, faults.LOG_ENV: str(visits)}) == 0
            counts: dict[str, int] = {}
            for name in visits.read_text().split():
                counts[name] = counts.get(name, 0) + 1
            made = sorted(counts)
            draws = []
            for _ in range(args.points):
                point = rng.choice(made)
                draws.append((point, rng.randint(1, counts[point])))
        for i, (point, visit) in enumerate(draws):
            cell = cells / f"{prefix}-{i:03d}.json"
            if cell.exists():
                continue
            out = Path(tmp) / f"r{i}"
            t0 = time.perf_counter()
            code = run([*ARGV, "--out-dir", str(out)], {**env, faults.ENV: f"{point}:{visit}"})
            (run_dir,) = out.iterdir()
            row: dict[str, Any] = {"i": i, "point": point, "visit": visit, "killed": code == -9}
            if code == -9:
                row["resume_rc"] = run(["--resume", str(run_dir), "--quiet"], env)
                # killed while writing the run's first file: nothing ran, and --resume says so (exit 2)
                row["nothing_ran"] = not (run_dir / "config.yaml").exists()
            if (run_dir / "summary.json").exists():
                row.update(compare(run_dir, ref))
            row["seconds"] = round(time.perf_counter() - t0, 1)
            atomic_write_text(cell, json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    table(sorted(cells.glob(f"{prefix}-*.json")), args)


def table(paths: list[Path], args: argparse.Namespace) -> None:
    rs = [json.loads(p.read_text()) for p in paths]
    for r in rs:  # rows written before nothing_ran was recorded: the config.yaml write is the first file
        r.setdefault("nothing_ran", r["point"] == "write:config.yaml" and r["visit"] == 1 and r.get("resume_rc") == 2)
    before = [r for r in rs if r["killed"] and r["nothing_ran"]]
    killed = [r for r in rs if r["killed"] and not r["nothing_ran"]]
    lines = ["## Kill -9 at random points, then --resume", "",
             f"- machine: {machine_description()}; command: `python benchmarks/faults.py {' '.join(sys.argv[1:])}`",
             f"- {len(rs)} draws, {len(killed) + len(before)} killed ({len(rs) - len(killed) - len(before)} never "
             f"reached their visit and finished), {sum(r.get('identical', False) for r in killed)}/{len(killed)} "
             "resumed runs identical (same decisions, same test accuracy, weights within 1e-4, no partial file)"
             + (f"; {len(before)} killed while writing config.yaml, the run's first file, so nothing had run: "
                f"--resume refused them with exit 2 ({sum(r.get('resume_rc') == 2 for r in before)}/{len(before)})"
                if before else ""), "",
             "| point | draws | killed | resumed identical | killed before anything ran (resume refused) | "
             "largest weight difference |", "|---|---:|---:|---:|---:|---:|"]
    # the named points in order, then the other atomic writes a run made (write:report.html, ...)
    for point in [*faults.POINTS, *sorted({r["point"] for r in rs} - set(faults.POINTS))]:
        g = [r for r in rs if r["point"] == point]
        if not g:
            continue
        k = [r for r in g if r["killed"] and not r["nothing_ran"]]
        diff = max((r.get("max_weight_diff", 0.0) for r in k), default=0.0)
        b = [r for r in g if r["killed"] and r["nothing_ran"]]
        lines.append(f"| `{point}` | {len(g)} | {len(k)} | {sum(r.get('identical', False) for r in k)}/{len(k)} | "
                     f"{sum(r.get('resume_rc') == 2 for r in b)}/{len(b)} | {diff:.2g} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
