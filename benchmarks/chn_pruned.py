#!/usr/bin/env python
"""Channel pruning (``chn-pruned``): accuracy at several FLOPs targets, channel selection, and real speed.

Four tables, all from one process (data and baseline loaded once; each seed's learner calibrated once
and shared by every optimizer and target):

1. at each FLOPs target, for each optimizer (default uniform, ddpg, gp, tpe): the best candidate's
   validation accuracy with reconstruction and no fine-tuning (the search's reward), and its test
   accuracy after the same distilled re-training budget -- PocketFlow's table shape
   (Uniform | RL-based | RL + fine-tune); a second table gives FLOPs kept and search times;
2. channel selection at the same policy (the uniform policy at each target, and the policies the
   searches of table 1 found): LASSO + least-squares reconstruction vs L1 (+ reconstruction) vs L1
   without reconstruction vs random, validation accuracy before any fine-tuning;
3. speed of the pruned model at ``--speed-target`` vs the baseline in the same process: PyTorch eager
   (``compare_latency``: interleaved, median of repeats) and ONNX Runtime (both exported, alternated
   round by round, median) at batch 1 and 64, for each ``--speed-channel-rounds`` value;
4. ``--resource latency`` vs ``--resource flops`` at the same target: the uniform policy and a
   ``--resource-search`` optimizer's policy under each budget, predicted vs measured speedup and the
   accuracy they cost.

Regenerates the README's channel-pruning tables and plot:

    python benchmarks/chn_pruned.py --threads 2 --out benchmarks/chn_pruned.md --plot benchmarks/chn_pruned.png

Smoke test (seconds): ``python benchmarks/chn_pruned.py --dataset digits --init <model.pt> --seeds 0
--episodes 3 --retrain-epochs 0 --threads 1 --latency-repeats 3``.
"""

from __future__ import annotations

import argparse
import copy
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
from torchpocket.profile import compare_latency, profile_model

OPTIMIZERS = ("uniform", "ddpg", "gp", "tpe")
TARGETS = (0.5, 0.4, 0.3)
# learner -> the config section whose options Bench.learner(seed, **options) may vary
LEARNER_SECTIONS = {"chn-pruned": "chn", "dis-chn-pruned": "dcp"}

# name -> chn-pruned options; names are what --selections takes
SELECTIONS: dict[str, dict[str, Any]] = {
    "lasso+rec": {"select": "lasso", "reconstruct": True},
    "l1+rec": {"select": "l1", "reconstruct": True},
    "l1": {"select": "l1", "reconstruct": False},
    "random+rec": {"select": "random", "reconstruct": True},
    "random": {"select": "random", "reconstruct": False},
    "lasso": {"select": "lasso", "reconstruct": False},
}
SELECTION_LABELS = {
    "lasso+rec": "LASSO + reconstruction", "l1+rec": "L1 + reconstruction", "l1": "L1, no reconstruction",
    "random+rec": "random + reconstruction", "random": "random, no reconstruction",
    "lasso": "LASSO, no reconstruction",
}


# ----------------------------------------------------------------------------- table 1


def accuracy_tables(bench: Bench, runs: dict[tuple[float, str], list[Run]]) -> str:
    a = bench.args
    text = "### Accuracy (%) at each FLOPs target\n\n" + accuracy_table(bench, runs, first="FLOPs target")
    how = ("least-squares reconstruction" if bench.learner_name == "chn-pruned" else
           "the learner's own channel selection and stage-wise optimisation (part of building the candidate)")
    text += (f"\nval, no FT: the search's best candidate on the first {bench.reward_size} validation images, with "
             f"{how} and no fine-tuning (the reward; `uniform` evaluates its one policy once "
             "per seed). test: that candidate after the re-training budget above, test split read once per model. "
             f"Baseline: val {bench.base_val:.2f}%, test {bench.base_test:.2f}%.\n\n")
    head = ["FLOPs target", "optimizer", "FLOPs kept (measured)", "params kept", "candidates", "search s (mean)",
            "s per candidate (median)", "re-train s (mean)"]
    rows = []
    for t in a.targets:
        for name in a.optimizers:
            rs = runs[(t, name)]
            secs = [s for r in rs for s in r.candidate_seconds]
            rows.append([f"{t:g}", f"`{name}`", pm([r.flops_kept for r in rs], 3), pm([r.params_kept for r in rs], 3),
                         len(rs[0].result.trials), f"{mean_std([r.result.seconds for r in rs])[0]:.1f}",
                         f"{statistics.median(secs):.2f}", f"{mean_std([r.retrain_s for r in rs])[0]:.1f}"])
    all_runs = [r for rs in runs.values() for r in rs]
    all_secs = [s for r in all_runs for s in r.candidate_seconds]
    text += "### FLOPs kept and search time\n\n" + md_table(head, rows, right=[False, False] + [True] * 6)
    text += (f"\nAll {len(all_runs)} searches: {len(all_secs)} candidates, median {statistics.median(all_secs):.2f}s "
             f"per candidate, {sum(r.result.seconds for r in all_runs):.0f}s of search wall time in all. Calibration "
             f"(once per seed and learner, outside the search times): "
             f"{statistics.fmean(bench.prepare_s.values()):.1f}s on average.\n")
    return text


# ----------------------------------------------------------------------------- table 2


def selection_table(bench: Bench, runs: dict[tuple[float, str], list[Run]]) -> tuple[str, list[dict[str, Any]]]:
    """Val acc (reward split, no fine-tuning) of each selection method at the same policies."""
    a = bench.args
    sources = list(dict.fromkeys(a.selection_policies))
    acc: dict[tuple[float, str, str], list[float]] = {}
    kept: dict[tuple[float, str], list[float]] = {}
    for seed_i, seed in enumerate(a.seeds):
        for sel in a.selections:
            learner = bench.learner(seed, **SELECTIONS[sel])
            for t in a.targets:
                space = learner.search_space(bench.base, t)
                for src in sources:
                    policy = (space.budget.uniform() if src == "uniform"
                              else runs[(t, src)][seed_i].result.best_policy)
                    model = learner.compress(bench.base, policy).to(bench.device)
                    acc.setdefault((t, src, sel), []).append(bench.reward_acc(model))
                    if sel == a.selections[0]:
                        kept.setdefault((t, src), []).append(space.budget.fraction(policy))
        print(f"  selection methods, seed {seed}: done", flush=True)
    head = ["FLOPs target", "policy", "FLOPs kept"] + [SELECTION_LABELS[s] for s in a.selections]
    rows, plot_rows = [], []
    for t in a.targets:
        for src in sources:
            label = "uniform" if src == "uniform" else f"found by `{src}`"
            rows.append([f"{t:g}", label, pm(kept[(t, src)], 3)] + [pm(acc[(t, src, s)]) for s in a.selections])
    for t in a.targets:
        for s in a.selections:
            m, sd = mean_std(acc[(t, sources[0], s)])
            plot_rows.append({"FLOPs target": t, "selection": SELECTION_LABELS[s], "val acc (%)": m,
                              "val acc (%)_std": sd})
    text = "### Channel selection at the same policy: val acc (%) before fine-tuning\n\n"
    text += md_table(head, rows, right=[False, False] + [True] * (len(head) - 2))
    text += (f"\nSame per-layer preserve ratios in every column; first {bench.reward_size} validation images, no "
             "fine-tuning. LASSO: He et al. 2017's channel selection on sampled feature maps; L1: the consumer's "
             "weight magnitude (AMC); random: a seeded permutation. Reconstruction: least-squares re-fit of each "
             "pruned layer's consumer on the calibration points. `found by X`: the best policy of table 1's X search "
             "for the same seed (found with LASSO + reconstruction, so it favours that column).\n")
    return text, plot_rows


# ----------------------------------------------------------------------------- table 3


def _onnx_latencies(paths: dict[str, Path], shape: tuple[int, ...], *, batch_size: int, rounds: int,
                    threads: int) -> dict[str, float]:
    """Median seconds per run: ``rounds`` rounds, each timing every model (order alternating) over a few runs."""
    from torchpocket.export import onnx_latency

    names = list(paths)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        shift = r % len(names)
        for n in names[shift:] + names[:shift]:
            times[n].append(onnx_latency(paths[n], shape, batch_size=batch_size, threads=threads, warmup=2,
                                         repeats=5))
    return {n: statistics.median(t) for n, t in times.items()}


def speed_table(bench: Bench, runs: dict[tuple[float, str], list[Run]]) -> str:
    a = bench.args
    t = a.speed_target
    found = runs.get((t, a.speed_policy)) if a.speed_policy != "uniform" else None
    if a.speed_policy != "uniform" and found is None:
        print(f"  speed: no {a.speed_policy} search at target {t}: using the uniform policy", flush=True)
    source = f"found by `{a.speed_policy}` (seed {a.seeds[0]})" if found else "uniform"
    shape = bench.input_shape
    base = copy.deepcopy(bench.base).cpu().eval().to(memory_format=torch.contiguous_format)
    threads = torch.get_num_threads()
    rows = []
    with tempfile.TemporaryDirectory(prefix="torchpocket-speed-") as tmp:
        base_onnx = _export(base, Path(tmp) / "baseline.onnx", shape)
        for rnd in a.speed_channel_rounds:
            learner = bench.learner(a.seeds[0], channel_round=rnd)
            budget = learner.search_space(bench.base, t).budget
            policy = budget.project(found[0].result.best_policy) if found else budget.uniform()
            pruned: nn.Module = learner.compress(bench.base, policy).cpu().eval()
            pruned.to(memory_format=torch.contiguous_format)
            pb, pp = profile_model(base, shape), profile_model(pruned, shape)
            ratio = pp.flops / pb.flops
            models = {"baseline": base, "pruned": pruned}
            pruned_onnx = _export(pruned, Path(tmp) / f"pruned-r{rnd}.onnx", shape)
            for bs in a.batch_sizes:
                lat = compare_latency(models, shape, batch_size=bs, repeats=a.latency_repeats)
                rows.append(_speed_row(rnd, ratio, pp.params / pb.params, "PyTorch eager", bs, lat))
                print(f"  speed: channel round {rnd}, eager batch {bs}: x{lat['baseline'] / lat['pruned']:.2f}",
                      flush=True)
            for bs in a.batch_sizes:
                if base_onnx is None or pruned_onnx is None:
                    rows.append([rnd, f"{ratio:.3f}", f"{pp.params / pb.params:.3f}", "ONNX Runtime", bs,
                                 "skipped", "", "", f"{1 / ratio:.2f}"])
                    continue
                lat = _onnx_latencies({"baseline": base_onnx, "pruned": pruned_onnx}, shape, batch_size=bs,
                                      rounds=max(1, a.latency_repeats // 5), threads=threads)
                rows.append(_speed_row(rnd, ratio, pp.params / pb.params, "ONNX Runtime", bs, lat))
                print(f"  speed: channel round {rnd}, ONNX Runtime batch {bs}: x{lat['baseline'] / lat['pruned']:.2f}",
                      flush=True)
    head = ["channel round", "FLOPs kept", "params kept", "runtime", "batch", "baseline ms", "pruned ms", "speedup",
            "FLOPs limit (1 / FLOPs kept)"]
    text = f"### Speed at FLOPs target {t:g}: pruned vs baseline, same process (CPU, threads={threads})\n\n"
    text += md_table(head, rows, right=[True, True, True, False] + [True] * 5)
    text += (f"\nPolicy: {source}, projected onto each channel-round budget; weights do not affect speed, so the "
             "pruned models are not re-trained here. PyTorch eager: `torchpocket.profile.compare_latency`, both "
             f"models interleaved, median of {a.latency_repeats} repeats after warm-up. ONNX Runtime (CPU, "
             f"intra-op threads={threads}): both exported (opset 17, batch-norm folded), "
             f"{max(1, a.latency_repeats // 5)} rounds of 5 runs each with the model order alternating, median over "
             "rounds. The FLOPs ratio bounds the speedup: 1 / FLOPs kept is the most that fewer multiply-adds can "
             "give; memory traffic, per-layer overheads and channel counts that do not fill the SIMD lanes "
             "(--channel-round 8 rounds them) keep measured speedups below it.\n")
    return text


def resource_table(bench: Bench) -> str:
    """``--resource flops`` vs ``--resource latency`` at the speed target: what a latency budget buys, measured.

    For each resource (latency: a lookup table timed at each of ``--latency-lut-batches``), the uniform policy
    that meets the target and, when ``--resource-search`` names an optimizer, that optimizer's best policy
    (seed 0's search at the same episodes): predicted and measured speedup, FLOPs kept, val acc before fine-tuning.
    """
    a = bench.args
    t, rnd = a.speed_target, a.resource_channel_round
    shape = bench.input_shape
    base = copy.deepcopy(bench.base).cpu().eval().to(memory_format=torch.contiguous_format)
    threads = torch.get_num_threads()
    configs: list[tuple[str, dict[str, Any]]] = []
    for coupled in a.resource_coupled:
        configs.append((f"flops, coupled {coupled}", {"channel_round": rnd, "coupled": coupled}))
        configs += [(f"latency (LUT batch {b}), coupled {coupled}",
                     {"channel_round": rnd, "coupled": coupled, "resource": "latency", "latency_batch": b})
                    for b in a.latency_lut_batches]
    rows = []
    with tempfile.TemporaryDirectory(prefix="torchpocket-resource-") as tmp:
        base_onnx = _export(base, Path(tmp) / "baseline.onnx", shape)
        for label, chn in configs:
            seed = a.seeds[0]
            t0 = time.perf_counter()
            learner = bench.learner(seed, **chn)
            prep = time.perf_counter() - t0
            try:
                policies = [("uniform", learner.search_space(bench.base, t).budget.uniform(), float("nan"))]
            except UserError as e:  # e.g. a batch-1 latency target below what the narrowest widths reach
                rows.append([label, "-", "", "", f"unreachable: {e}".split(";")[0]] + [""] * (2 * len(a.batch_sizes))
                            + [f"{prep:.0f}", ""])
                print(f"  resource: {label}: {e}", flush=True)
                continue
            if a.resource_search:
                run = bench.search(a.resource_search, seed=seed, target=t, **chn)
                policies.append((f"`{a.resource_search}`", run.result.best_policy, run.result.seconds))
            for pname, policy, search_s in policies:
                pruned: nn.Module = learner.compress(bench.base, policy).to(bench.device).eval()
                val = bench.reward_acc(pruned)
                pruned = pruned.cpu().to(memory_format=torch.contiguous_format)
                lat_pred = learner.latency_summary(policy)
                flops = profile_model(pruned, shape).flops / profile_model(base, shape).flops
                row = [label, pname, f"{flops:.3f}", f"{val:.2f}",
                       f"{1 / lat_pred['predicted_ratio']:.2f}x (b{lat_pred['batch']})"]
                pruned_onnx = _export(pruned, Path(tmp) / f"pruned-{len(rows)}.onnx", shape)
                for bs in a.batch_sizes:
                    lat = compare_latency({"baseline": base, "pruned": pruned}, shape, batch_size=bs,
                                          repeats=a.latency_repeats)
                    row.append(f"{lat['baseline'] / lat['pruned']:.2f}x")
                for bs in a.batch_sizes:
                    if base_onnx is None or pruned_onnx is None:
                        row.append("skipped")
                        continue
                    lat = _onnx_latencies({"baseline": base_onnx, "pruned": pruned_onnx}, shape, batch_size=bs,
                                          rounds=max(1, a.latency_repeats // 5), threads=threads)
                    row.append(f"{lat['baseline'] / lat['pruned']:.2f}x")
                row += [f"{prep:.0f}", "" if search_s != search_s else f"{search_s:.0f}"]
                rows.append(row)
                print(f"  resource: {label}, {pname}: " + " ".join(map(str, row[2:])), flush=True)
                prep = 0.0
    head = (["--resource, --cp-coupled", "policy", "FLOPs kept", "val acc, no FT (%)", "predicted speedup"]
            + [f"eager b{bs}" for bs in a.batch_sizes] + [f"ORT b{bs}" for bs in a.batch_sizes]
            + ["prepare + LUT s", "search s"])
    text = (f"### `--resource latency` vs `--resource flops` at target {t:g} (channel round {rnd}, CPU, "
            f"threads={threads})\n\n")
    text += md_table(head, rows, right=[False, False] + [True] * (len(head) - 2))
    text += (f"\nTarget {t:g} of the resource named in the first column: FLOPs, or the latency the lookup table "
             "predicts (per-layer timings at each width on this machine, PyTorch eager, batch in brackets). "
             "--cp-coupled prune also removes channels tied by residual additions (ranked by group L1 norm). "
             "Measured speedups: pruned vs baseline in this process, eager interleaved medians and ONNX Runtime "
             "alternating rounds as in the table above. val acc: first "
             f"{bench.reward_size} validation images with reconstruction, no fine-tuning (seed {a.seeds[0]}). "
             "prepare + LUT s: calibration plus building the lookup table (timed once per configuration).\n")
    return text


def _export(model: nn.Module, path: Path, shape: tuple[int, ...]) -> Path | None:
    try:
        from torchpocket.export import export_onnx

        return export_onnx(model, path, shape)
    except Exception as e:  # noqa: BLE001 - no onnxruntime / unexportable op: the eager rows still stand
        print(f"  speed: ONNX export skipped: {type(e).__name__}: {' '.join(str(e).split())[:200]}", flush=True)
        return None


def _speed_row(rnd: int, ratio: float, params: float, runtime: str, bs: int, lat: dict[str, float]) -> list[Any]:
    return [rnd, f"{ratio:.3f}", f"{params:.3f}", runtime, bs, f"{1e3 * lat['baseline']:.2f}",
            f"{1e3 * lat['pruned']:.2f}", f"{lat['baseline'] / lat['pruned']:.2f}x", f"{1 / ratio:.2f}x"]


# ----------------------------------------------------------------------------- main


def plot(bench: Bench, runs: dict[tuple[float, str], list[Run]], selection_rows: list[dict[str, Any]],
         path: str) -> None:
    from torchpocket.report import plot_ablation

    rows = []
    for (t, name), rs in runs.items():
        for stage, xs in (("val, no FT", [r.val_acc for r in rs]), ("test, re-trained", [r.test_acc for r in rs])):
            m, s = mean_std(xs)
            rows.append({"FLOPs target": t, "optimizer / stage": f"{name}: {stage}", "accuracy (%)": m,
                         "accuracy (%)_std": s})
    p = Path(path)
    plot_ablation(rows, p, x="FLOPs target", y="accuracy (%)", hue="optimizer / stage")
    print(f"wrote {p}", flush=True)
    if selection_rows:
        sel = p.with_name(f"{p.stem}-selection{p.suffix}")
        plot_ablation(selection_rows, sel, x="FLOPs target", y="val acc (%)", hue="selection")
        print(f"wrote {sel}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, optimizers=OPTIMIZERS, targets=TARGETS)
    ap.add_argument("--learner", default="chn-pruned", choices=list(LEARNER_SECTIONS),
                    help="channel-pruning learner of table 1 (dis-chn-pruned: table 1 only; default: %(default)s)")
    ap.add_argument("--selections", nargs="+", default=["lasso+rec", "l1+rec", "l1", "random+rec", "random"],
                    choices=list(SELECTIONS), help="table 2's columns (default: %(default)s)")
    ap.add_argument("--selection-policies", nargs="+", default=None,
                    help="table 2's policies: uniform and/or optimizers of table 1 (default: uniform, and ddpg "
                         "if it ran)")
    ap.add_argument("--speed-target", type=float, default=0.5, help="table 3's FLOPs target (default: %(default)s)")
    ap.add_argument("--speed-policy", default=None,
                    help="table 3's policy: uniform or an optimizer of table 1 (default: ddpg if it ran, else uniform)")
    ap.add_argument("--speed-channel-rounds", type=int, nargs="+", default=[1, 8],
                    help="table 3's --channel-round rows (default: %(default)s)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64], help="table 3's batch sizes")
    ap.add_argument("--latency-repeats", type=int, default=50, help="timed repeats per latency (default: %(default)s)")
    ap.add_argument("--latency-lut-batches", type=int, nargs="+", default=[1, 64],
                    help="table 4's --latency-batch rows for --resource latency (default: %(default)s)")
    ap.add_argument("--resource-channel-round", type=int, default=8,
                    help="table 4's --channel-round (default: %(default)s)")
    ap.add_argument("--resource-coupled", nargs="+", default=["skip", "prune"], choices=["skip", "prune"],
                    help="table 4's --cp-coupled rows (default: %(default)s)")
    ap.add_argument("--resource-search", default="ddpg",
                    help="table 4: also search with this optimizer under each resource (seed 0; '' = uniform only)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["selection", "speed", "resource"],
                    help="leave out table 2 / 3 / 4")
    args = ap.parse_args()
    if args.learner != "chn-pruned":  # tables 2-4 vary chn-pruned's own selection / speed options
        args.skip = sorted(set(args.skip) | {"selection", "speed", "resource"})
    if args.selection_policies is None:
        args.selection_policies = ["uniform"] + (["ddpg"] if "ddpg" in args.optimizers else [])
    for src in args.selection_policies:
        if src != "uniform" and src not in args.optimizers:
            ap.error(f"--selection-policies takes uniform or optimizers of --optimizers, got {src!r}")
    if args.speed_policy is None:
        args.speed_policy = "ddpg" if "ddpg" in args.optimizers else "uniform"
    if args.speed_policy != "uniform" and args.speed_policy not in args.optimizers:
        ap.error(f"--speed-policy must be uniform or one of --optimizers, got {args.speed_policy!r}")
    if min(args.speed_channel_rounds) < 1 or min(args.batch_sizes) < 1 or args.latency_repeats < 1:
        ap.error("--speed-channel-rounds, --batch-sizes and --latency-repeats must be at least 1")
    if not 0 < args.speed_target <= 1:
        ap.error(f"--speed-target must be in (0, 1], got {args.speed_target}")

    start = time.perf_counter()
    bench = setup(args, learner=args.learner, section=LEARNER_SECTIONS[args.learner])
    runs: dict[tuple[float, str], list[Run]] = {(t, n): [] for t in args.targets for n in args.optimizers}
    for seed in args.seeds:
        for t in args.targets:
            for name in args.optimizers:
                run = bench.retrain_and_test(bench.search(name, seed=seed, target=t))
                runs[(t, name)].append(run)
                print(progress_line(run), flush=True)
    text = header(f"Channel pruning ({args.learner})", bench) + accuracy_tables(bench, runs)
    selection_rows: list[dict[str, Any]] = []
    if "selection" not in args.skip:
        sel_text, selection_rows = selection_table(bench, runs)
        text += "\n" + sel_text
    if "speed" not in args.skip:
        text += "\n" + speed_table(bench, runs)
    if "resource" not in args.skip:
        text += "\n" + resource_table(bench)
    text += f"\nWhole benchmark: {time.perf_counter() - start:.0f}s wall.\n"
    emit(text, args.out, first=True)
    if args.plot:
        plot(bench, runs, selection_rows, args.plot)


if __name__ == "__main__":
    main_guard(main)
