#!/usr/bin/env python
"""Weight sparsification (``weight-sparse``): uniform Zhu & Gupta vs searched per-layer sparsity.

PocketFlow's table shape, on the shipped benchmark baseline, all from one process (data and baseline
loaded once; each seed's learner prepared once and shared by every optimizer and density):

1. at each density (fraction of the prunable weights kept: 0.5, 0.25, 0.1, 0.05 = sparsity 50/75/90/95%),
   for ``uniform`` (every layer at the same density: Zhu & Gupta's setting) and each searched optimizer
   (default ``ddpg``): the best candidate's validation accuracy after one-shot magnitude pruning and no
   fine-tuning (the search's reward), and its test accuracy after the same re-training budget (Zhu &
   Gupta's gradual schedule from the dense baseline, distilled from it), mean ± std over seeds;
2. measured density and on-disk size: ``model.sparse.pt`` (kept values + packed bitmask, what the
   learner exports) against the dense fp32 checkpoint, plus search and re-train seconds.

Regenerates the README's weight-sparsification table:

    python benchmarks/weight_sparse.py --threads 2 --out benchmarks/weight_sparse.md
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import (
    Bench,
    Run,
    accuracy_table,
    add_common_args,
    emit,
    header,
    main_guard,
    md_table,
    mean_std,
    pm,
    progress_line,
    setup,
)
from torch import nn

from torchpocket.errors import UserError
from torchpocket.profile import example_input

LEARNER = "weight-sparse"
TARGETS = (0.5, 0.25, 0.1, 0.05)
OPTIMIZERS = ("uniform", "ddpg")


def record_size(bench: Bench, tmp: Path) -> Any:
    """``after`` hook: export the re-trained model the way the pipeline does, keep sizes and density."""

    def after(model: nn.Module, run: Run) -> None:
        learner = bench.learner(run.seed)
        out = tmp / f"{run.optimizer}-{run.target:g}-{run.seed}"
        out.mkdir(parents=True, exist_ok=True)
        x = example_input(model, bench.input_shape, batch_size=2)
        info = learner.export(model.eval(), out, x)
        if info["max_abs_diff"] > 1e-5:
            raise RuntimeError(f"sparse export does not round-trip: max abs diff {info['max_abs_diff']}")
        run.extra.update(info)

    return after


def tables(bench: Bench, runs: dict[tuple[float, str], list[Run]]) -> str:
    a = bench.args
    text = "### Accuracy (%) at each density\n\n" + accuracy_table(
        bench, runs, first="density (sparsity)", label=lambda t: f"{t:g} ({100 * (1 - t):.0f}%)")
    text += (f"\nval, no FT: the search's best candidate on the first {bench.reward_size} validation images after "
             "one-shot magnitude pruning, no fine-tuning (the reward; `uniform` evaluates its one policy once per "
             "seed). test: that policy after the re-training budget above, where each layer goes from dense to its "
             "density on Zhu & Gupta's cubic schedule (distilled from the baseline), test split read once per model. "
             f"Baseline: val {bench.base_val:.2f}%, test {bench.base_test:.2f}%.\n\n")
    head = ["density", "optimizer", "density (measured)", "model.sparse.pt bytes", "dense fp32 bytes", "size ratio",
            "candidates", "search s (mean)", "s per candidate (median)", "re-train s (mean)"]
    rows = []
    for t in a.targets:
        for name in a.optimizers:
            rs = runs[(t, name)]
            secs = [s for r in rs for s in r.candidate_seconds]
            sparse = mean_std([r.extra["sparse_bytes"] for r in rs])[0]
            dense = mean_std([r.extra["dense_bytes"] for r in rs])[0]
            rows.append([f"{t:g}", f"`{name}`", pm([r.extra["density"] for r in rs], 3), f"{sparse:,.0f}",
                         f"{dense:,.0f}", f"{sparse / dense:.3f}", len(rs[0].result.trials),
                         f"{mean_std([r.result.seconds for r in rs])[0]:.1f}", f"{statistics.median(secs):.2f}",
                         f"{mean_std([r.retrain_s for r in rs])[0]:.1f}"])
    text += "### Density, size on disk and time\n\n" + md_table(head, rows, right=[False, False] + [True] * 8)
    text += ("\ndensity (measured): non-zero weights of the prunable conv / linear layers over all of them, on the "
             "re-trained model (the first and last layer stay dense: --ws-skip-first / --ws-skip-last). "
             "model.sparse.pt: the learner's export (kept values + packed bitmask per sparse layer, dense tensors for "
             "the rest; loading it back reproduces the outputs, checked); dense fp32 bytes: the same state_dict "
             "saved dense.\n")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, optimizers=OPTIMIZERS, targets=TARGETS)
    ap.add_argument("--min-density", type=float, default=0.02,
                    help="--ws-conv-min-density for every search, so 0.05 stays reachable (default: %(default)s)")
    args = ap.parse_args()
    if not 0 < args.min_density <= 1:
        raise UserError(f"--min-density must be in (0, 1], got {args.min_density}")
    start = time.perf_counter()
    bench = setup(args, learner=LEARNER, section="ws")
    bench.cfg["ws"]["conv_min_density"] = args.min_density
    runs: dict[tuple[float, str], list[Run]] = {(t, n): [] for t in args.targets for n in args.optimizers}
    with tempfile.TemporaryDirectory(prefix="torchpocket-ws-") as tmp:
        after = record_size(bench, Path(tmp))
        for seed in args.seeds:
            for t in args.targets:
                for name in args.optimizers:
                    run = bench.retrain_and_test(bench.search(name, seed=seed, target=t), after=after)
                    runs[(t, name)].append(run)
                    print(progress_line(run) + f", density {run.extra['density']:.3f}", flush=True)
    text = header("Weight sparsification (weight-sparse)", bench) + tables(bench, runs)
    text += f"\nWhole benchmark: {time.perf_counter() - start:.0f}s wall.\n"
    emit(text, args.out, first=True)


if __name__ == "__main__":
    torch.backends.cudnn.benchmark = False
    main_guard(main)
