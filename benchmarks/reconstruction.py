#!/usr/bin/env python
"""Does reconstruction survive re-training? The same policy with and without least-squares reconstruction,
with LASSO and with L1 channel selection, after the same distilled re-train (and the re-train's peak
learning rate varied, to find what closes a gap).

Each row is one *cell* (selection, reconstruction, re-train learning rate, policy, seed) written to
``--cells`` as ``result.json`` when done and skipped when present, so the benchmark spans sessions.
The policy is the uniform one at ``--target``, or the best policy of a finished ``benchmarks/search.py``
cell (``--policy-from CELL_DIR``).

    python benchmarks/reconstruction.py --target 0.5 --seeds 0 --retrain-epochs 2 --threads 2 \\
        --cells benchmarks/reconstruction-cells --out benchmarks/reconstruction.md

``--report-only`` rebuilds the table from every cell present without running any.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path
from typing import Any

from _common import add_common_args, emit, header, main_guard, md_table, pm, setup

from torchpocket.errors import UserError
from torchpocket.learners.training import evaluate
from torchpocket.pipeline.final import retrain
from torchpocket.profile import profile_model
from torchpocket.utils import atomic_write_text, seed_everything

ROWS = (("lasso", True), ("lasso", False), ("l1", True), ("l1", False))


def run_cell(bench: Any, *, select: str, reconstruct: bool, lr: float, policy: list[float] | None,
             target: float, seed: int) -> dict[str, Any]:
    learner = bench.learner(seed, select=select, reconstruct=reconstruct)
    space = learner.search_space(bench.base, target)
    p = policy if policy is not None else space.budget.uniform()
    seed_everything(seed)
    val_before = bench.reward_acc(learner.compress(bench.base, p).to(bench.device))
    with contextlib.redirect_stdout(io.StringIO()):
        final, _, history, secs = retrain(learner, bench.base, p, bench.data, epochs=bench.args.retrain_epochs,
                                          lr=lr, device=bench.device)
    test = evaluate(final, bench.data.loader("test", batch_size=500), device=bench.device)
    prof = profile_model(final, bench.input_shape)
    return {"select": select, "reconstruct": reconstruct, "retrain_lr": lr, "seed": seed, "target": target,
            "policy": [float(v) for v in p], "policy_source": "uniform" if policy is None else "search",
            "val_before": val_before, "val_after": history[-1]["val_acc"] if history else val_before,
            "test_acc": test, "flops_kept": prof.flops / bench.base_flops, "retrain_s": secs,
            "retrain_epochs": bench.args.retrain_epochs, "base_test": bench.base_test, "base_val": bench.base_val,
            "reward_size": bench.reward_size}


def table(rows: list[dict[str, Any]]) -> str:
    keys = sorted({(r["policy_source"], r["target"], r["retrain_lr"], r["select"], r["reconstruct"]) for r in rows},
                  key=lambda k: (k[0], k[1], k[2], k[3] != "lasso", not k[4]))
    body = []
    for src, target, lr, select, rec in keys:
        rs = [r for r in rows if (r["policy_source"], r["target"], r["retrain_lr"], r["select"], r["reconstruct"])
              == (src, target, lr, select, rec)]
        body.append([f"{src} @ {target:g}", select, "yes" if rec else "no", f"{lr:g}", len(rs),
                     pm([r["val_before"] for r in rs]), pm([r["val_after"] for r in rs]),
                     pm([r["test_acc"] for r in rs]), pm([r["flops_kept"] for r in rs], 3)])
    r0 = rows[0]
    head = ["policy", "selection", "reconstruction", "re-train lr", "seeds", "val before re-train",
            "val after re-train", "test after re-train", "FLOPs kept"]
    return (md_table(head, body) + f"\nBaseline test {r0['base_test']:.2f}%. Val before re-train: the reward split "
            f"({r0['reward_size']} images); val after: the whole validation split. Re-train: "
            f"{r0['retrain_epochs']} distilled epoch(s), cosine from the given peak learning rate.\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, optimizers=("uniform",), targets=(0.5,))
    ap.set_defaults(retrain_epochs=2, seeds=[0])
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.01], help="re-train peak learning rates")
    ap.add_argument("--rows", nargs="+", default=[f"{s}:{int(r)}" for s, r in ROWS],
                    help="selection:reconstruct pairs (default: %(default)s)")
    ap.add_argument("--policy-from", default=None, help="a finished benchmarks/search.py cell: use its best policy")
    ap.add_argument("--cells", default="benchmarks/reconstruction-cells")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the table from the cells")
    args = ap.parse_args()
    policy = None
    if args.policy_from:
        res = Path(args.policy_from) / "result.json"
        if not res.is_file():
            raise UserError(f"--policy-from {args.policy_from}: no result.json (not a finished search cell)")
        policy = json.loads(res.read_text())["best_policy"]
    rows_spec = []
    for item in args.rows:
        sel, _, rec = item.partition(":")
        if sel not in ("lasso", "l1", "random") or rec not in ("0", "1"):
            raise UserError(f"--rows takes selection:0|1 with selection lasso, l1 or random, got {item!r}")
        rows_spec.append((sel, rec == "1"))
    bench = setup(args)
    emit(header("Reconstruction after re-training", bench), args.out, first=True)
    root = Path(args.cells)
    src = "search" if policy is not None else "uniform"
    for target in [] if args.report_only else args.targets:
        for seed in args.seeds:
            for lr in args.lrs:
                for sel, rec in rows_spec:
                    cell = root / f"{bench.net}-{src}-t{target:g}-{sel}-rec{int(rec)}-lr{lr:g}-s{seed}"
                    if (cell / "result.json").exists():
                        continue
                    r = run_cell(bench, select=sel, reconstruct=rec, lr=lr, policy=policy, target=target, seed=seed)
                    cell.mkdir(parents=True, exist_ok=True)
                    atomic_write_text(cell / "result.json", json.dumps(r, indent=1) + "\n")
                    print(f"  {cell.name}: val {r['val_before']:.2f} -> test {r['test_acc']:.2f} "
                          f"({r['retrain_s']:.0f}s)", flush=True)
    rows = [json.loads(p.read_text()) for p in sorted(root.glob("*/result.json"))]
    emit(table(rows), args.out, first=False)


if __name__ == "__main__":
    sys.setrecursionlimit(10000)
    main_guard(main)
