#!/usr/bin/env python
"""Optimizer ablation: every search method with the same learner, target, episodes, re-train budget and seeds.

``chn-pruned`` (LASSO selection + least-squares reconstruction) on the benchmark baseline, one FLOPs
target; for each optimizer and seed: a search of ``--episodes`` candidates scored on the validation
reward split (AMC's protocol: reconstruction, no fine-tuning), then the best candidate gets the same
distilled re-training budget and its test accuracy is read once. ``uniform`` asks one policy every
time, so it is evaluated once per seed. Everything runs in one process: data and baseline are loaded
once, and each seed's learner is calibrated once and shared by all optimizers.

Regenerates the README's optimizer-ablation table and plot:

    python benchmarks/ablation.py --threads 2 --out benchmarks/ablation.md --plot benchmarks/ablation.png

Smoke test (seconds): ``python benchmarks/ablation.py --dataset digits --init <model.pt> --seeds 0 --episodes 3
--retrain-epochs 0 --threads 1``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from _common import Bench, Run, add_common_args, emit, header, main_guard, md_table, mean_std, pm, progress_line, setup

OPTIMIZERS = ("uniform", "random", "gp", "tpe", "evolution", "ddpg")


def table(bench: Bench, runs: dict[str, list[Run]]) -> str:
    a = bench.args
    rows = []
    for name, rs in runs.items():
        secs = [s for r in rs for s in r.candidate_seconds]
        rows.append([
            f"`{name}`" + (" ¹" if name == "uniform" else ""),
            pm([r.val_acc for r in rs]),
            pm([r.test_acc for r in rs]),
            pm([r.flops_kept for r in rs], 3),
            f"{mean_std([r.result.seconds for r in rs])[0]:.1f}",
            f"{statistics.median(secs):.2f}",
        ])
    head = ["optimizer", "val acc of best candidate, % (reward split, before re-train)",
            "test acc after re-train, %", "FLOPs kept", "search s (mean)", "s per candidate (median)"]
    foot = [
        "",
        f"FLOPs target {a.targets[0]}; {len(a.seeds)} seed(s). Val acc: the best candidate of the search on the "
        f"first {bench.reward_size} validation images, with reconstruction and no fine-tuning (the reward). Test "
        "acc: that candidate after the re-training budget, test split read once per model. FLOPs kept: measured on "
        "the final model (torch FlopCounterMode). Search seconds include scoring every candidate; the learner's "
        "calibration is done once per seed outside them "
        f"({statistics.fmean(bench.prepare_s.values()):.1f}s per seed).",
        "",
        "¹ `uniform` asks the same policy (one ratio for every layer, meeting the target) every time, so it is "
        "evaluated once per seed (1 candidate, not "
        f"{a.episodes}); its spread over seeds comes from the calibration sample and the re-training.",
    ]
    return md_table(head, rows) + "\n".join(foot) + "\n"


def plot(runs: dict[str, list[Run]], path: str) -> None:
    from torchpocket.report import plot_ablation

    rows = []
    for name, rs in runs.items():
        for label, xs in (("val, best candidate (before re-train)", [r.val_acc for r in rs]),
                          ("test, after re-train", [r.test_acc for r in rs])):
            m, s = mean_std(xs)
            rows.append({"optimizer": name, "stage": label, "accuracy (%)": m, "accuracy (%)_std": s})
    plot_ablation(rows, Path(path), x="optimizer", y="accuracy (%)", hue="stage")
    print(f"wrote {path}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, optimizers=OPTIMIZERS, targets=(0.5,))
    args = ap.parse_args()
    if len(args.targets) != 1:
        ap.error("the ablation runs at one FLOPs target (--targets 0.5)")
    start = time.perf_counter()
    bench = setup(args)
    target = args.targets[0]
    runs: dict[str, list[Run]] = {name: [] for name in args.optimizers}
    for seed in args.seeds:
        for name in args.optimizers:
            run = bench.retrain_and_test(bench.search(name, seed=seed, target=target))
            runs[name].append(run)
            print(progress_line(run), flush=True)
    text = header("Optimizer ablation: chn-pruned at FLOPs target " f"{target}", bench) + table(bench, runs)
    text += f"\nWhole benchmark: {time.perf_counter() - start:.0f}s wall.\n"
    emit(text, args.out, first=True)
    if args.plot:
        plot(runs, args.plot)


if __name__ == "__main__":
    main_guard(main)
