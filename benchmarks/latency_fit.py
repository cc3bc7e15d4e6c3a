#!/usr/bin/env python
"""How well the ONNX Runtime latency lookup table predicts whole pruned models, with and without its two-point fit.

For each ``--channel-round``, one ``chn-pruned`` learner is prepared on the shipped baseline and its lookup
table is built twice in ONNX Runtime (fp32, batch 1): with the two-point fit (the whole model timed at full and
at the narrowest widths, the table scaled through both: ``meta["fit"]``) and with the older single-measurement
rule (layers scaled down to the whole model only where they sum to more). Then, at each ``--targets`` FLOPs,
the uniform policy's model (its widths, cut without selection) and the unpruned one are exported and timed in
the same ONNX Runtime rounds: the measured ratio beside both tables' predicted ratios.

    python benchmarks/latency_fit.py --channel-rounds 1 8 --targets 0.4 0.5 0.7 0.9 --threads 1 \\
        --out benchmarks/latency_fit.md

Run it on a quiet machine: the timings share the CPU with anything else running.
"""

from __future__ import annotations

import argparse
import sys

from _common import add_common_args, emit, header, main_guard, md_table, setup

from torchpocket.learners._channel_latency import build_latency_model, time_cases_onnxruntime


def rows_for(bench: object, channel_round: int, targets: list[float], repeats: int) -> list[list[str]]:
    lrn = bench.learner(0, channel_round=channel_round)
    low = [lrn.config.low] * lrn.cost.n_groups
    ex = bench.data.example()
    fit = build_latency_model(bench.base, ex, lrn.cost, low_policy=low, runtime="onnxruntime", repeats=repeats,
                              narrow=lrn.cut_to_widths(bench.base, low))
    old = build_latency_model(bench.base, ex, lrn.cost, low_policy=low, runtime="onnxruntime", repeats=repeats)
    out = []
    for t in targets:
        space = lrn.search_space(bench.base, 1.0)
        floor = space.budget.fraction(list(space.lows))
        if t < floor:
            out.append([str(channel_round), f"{t:g}", "–", "–", "–", "–", f"unreachable (floor {floor:.3f})"])
            continue
        p = lrn.search_space(bench.base, t).budget.uniform()
        cut = lrn.cut_to_widths(bench.base, p)
        m_cut, m_full = time_cases_onnxruntime([(cut, ex[:1]), (bench.base, ex[:1])], warmup=3, repeats=3 * repeats)
        measured = m_cut / m_full
        pf, po = fit.predict(p) / fit.full, old.predict(p) / old.full
        out.append([str(channel_round), f"{t:g}", f"{space.budget.fraction(p):.3f}", f"{measured:.3f}",
                    f"{pf:.3f} ({pf / measured - 1:+.0%})", f"{po:.3f} ({po / measured - 1:+.0%})",
                    "used" if fit.meta["fit"]["used"] else "dropped (a <= 0 or b < 0)"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, optimizers=("uniform",), targets=(0.4, 0.5, 0.7, 0.9))
    ap.set_defaults(seeds=[0], retrain_epochs=0, threads=1)
    ap.add_argument("--channel-rounds", type=int, nargs="+", default=[1, 8], help="--channel-round values")
    ap.add_argument("--repeats", type=int, default=10, help="timed rounds per table entry (whole models: 3x)")
    args = ap.parse_args()
    bench = setup(args)
    text = header("ONNX Runtime latency table: predicted against measured", bench)
    body = []
    for r in args.channel_rounds:
        body += rows_for(bench, r, args.targets, args.repeats)
    text += md_table(["channel round", "FLOPs target", "FLOPs kept", "measured latency (of unpruned)",
                      "predicted, two-point fit (error)", "predicted, single measurement (error)", "fit"], body)
    text += ("\nLatency: ONNX Runtime fp32 (CPU), batch 1, the uniform policy's widths against the unpruned model "
             "in the same rounds (median). Errors: predicted / measured - 1.\n")
    emit(text, args.out, first=True)


if __name__ == "__main__":
    sys.setrecursionlimit(10000)
    main_guard(main)
