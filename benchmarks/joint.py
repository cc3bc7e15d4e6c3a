#!/usr/bin/env python
"""Joint prune + quantize search (``chn-pruned+uniform-quant``) against its alternatives at equal BitOps.

Every row ends at the same BitOps (``--resource bitops``: ``sum over Conv2d / Linear of MACs x weight bits x
activation bits``, a fraction of the fp32 network's; or ``--resource bytes``: the weights' stored size) and gets
the same distilled QAT re-training, then the test split once:

- ``joint``: one search of ``--episodes`` candidates over both decisions per layer (``--optimizer``);
- ``sequential``: a search of half the candidates over preserve ratios alone at ``--seq-flops`` of the FLOPs,
  then a search of the other half over bit-widths alone, the pruning frozen at the first search's best,
  under the same joint Budget: each stage blind to the other, the same candidate count in all;
- ``prune-0.5+int8``: the uniform preserve ratio keeping ``--prune-flops`` of the FLOPs, every layer at 8 bits;
- ``uniform-both``: every value at the same fraction of its range (``Budget.uniform_path``).

The target is that of ``prune-0.5+int8`` unless ``--target`` gives one. Candidates are scored on the
reward split after reconstruction and activation calibration, with no fine-tuning (as ``run.py`` does).
Each row's final model is exported as ``model.int8.onnx`` and timed against the fp32 baseline's ONNX file in
the same ONNX Runtime rounds (median of ``--latency-repeats``), at batch 1 and 64.

Each (net, resource, target, row, seed) is a cell under ``--cells`` (``result.json`` when done, the search's
trial log while it runs): a killed run resumes where it stopped, and a finished cell is skipped.

First figures (2-core machine, seed 0)::

    python benchmarks/joint.py --net resnet20 --seeds 0 --episodes 200 --retrain-epochs 2 --threads 2

``--resource latency`` (no ``sequential`` row: weight bits cost no time in ONNX Runtime int8) compares the
joint search with uniform pruning + int8 at the same predicted latency::

    python benchmarks/joint.py --net resnet20 --resource latency --target 0.6 --rows joint uniform-both \\
        --seeds 0 --episodes 200 --retrain-epochs 2 --threads 2 --out benchmarks/joint-latency.md \\
        --cells benchmarks/joint-cells
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import Bench, header, main_guard, md_table, pm, setup
from torch import nn

from torchpocket.errors import UserError
from torchpocket.export import compare_onnx_latency, export_int8_onnx, export_onnx, file_size
from torchpocket.learners.training import evaluate
from torchpocket.pipeline import RunDir, make_learner, search
from torchpocket.pipeline.final import retrain
from torchpocket.space import Budget, SearchSpace
from torchpocket.utils import atomic_write_text, seed_everything

LEARNER = "chn-pruned+uniform-quant"
ROWS = ("joint", "sequential", "prune-0.5+int8", "uniform-both")


def composite(bench: Bench, seed: int) -> Any:
    """The prepared joint learner for ``seed`` (a ``--resource`` Budget), built once per seed."""
    key = ("composite", seed)
    if key not in bench.learners:
        cfg = config(bench, hpo="none", seed=seed, target=1.0, episodes=1)
        learner = make_learner(cfg, bench.device)
        learner.prepare(bench.base, bench.data)
        bench.learners[key] = learner
    return bench.learners[key]


def config(bench: Bench, *, hpo: str, seed: int, target: float, episodes: int, learner: str = LEARNER,
           resource: str | None = None) -> dict[str, Any]:
    resource = resource or bench.args.resource
    cfg = copy.deepcopy(bench.cfg)
    cfg["run"].update(learner=learner, hpo=hpo, seed=seed, target=target, resource=resource)
    cfg["search"]["episodes"] = episodes
    return cfg


def fixed_policy(bench: Bench, seed: int, flops: float) -> list[float]:
    """The uniform preserve ratio at ``flops`` of the FLOPs, every layer at 8 bits (``prune-0.5+int8``)."""
    joint = composite(bench, seed)
    chn = joint.first.search_space(bench.base, flops).budget.uniform()
    space = joint.search_space(bench.base, 1.0)
    return chn + [8.0] * (len(space) - len(chn))


def frozen(space: SearchSpace, prefix: list[float]) -> SearchSpace:
    """``space`` with its first ``len(prefix)`` decisions fixed at ``prefix`` (bounds low = high = value)."""
    k = len(prefix)
    layers = [dataclasses.replace(lay, low=v, high=v) for lay, v in zip(space.layers[:k], prefix)] + space.layers[k:]
    b = space.budget
    lows, highs = np.array([lay.low for lay in layers]), np.array([lay.high for lay in layers])
    budget = Budget(cost_fn=b.cost_fn, full=b.full, target=b.target, lows=lows, highs=highs, steps=b.steps,
                    fill=b.fill, unit=b.unit, uniform_path=lambda t: list(lows + t * (highs - lows)))
    return SearchSpace(layers, budget, meta={**space.meta, "frozen_prefix": k})


def run_search(bench: Bench, learner: Any, cfg: dict[str, Any], where: Path) -> Any:
    where.mkdir(parents=True, exist_ok=True)
    if (where / "search_state.pt").exists():
        cfg["search"]["resume"] = str(where)
    seed_everything(cfg["run"]["seed"])
    with contextlib.nullcontext() if bench.args.verbose else contextlib.redirect_stdout(io.StringIO()):
        return search(learner, bench.base, bench.data, cfg, run_dir=RunDir(where), device=bench.device, prepare=False)


def best_policy(bench: Bench, row: str, seed: int, target: float, cell: Path) -> tuple[list[float], dict[str, Any]]:
    """The row's policy (searched, or fixed) and what its search recorded."""
    a, joint = bench.args, composite(bench, seed)
    if row == "prune-0.5+int8":
        return fixed_policy(bench, seed, a.prune_flops), {"candidates": 0}
    if row == "uniform-both":
        return joint.search_space(bench.base, target).budget.uniform(), {"candidates": 1}
    if row == "joint":
        res = run_search(bench, joint, config(bench, hpo=a.optimizer, seed=seed, target=target,
                                              episodes=a.episodes), cell / "search")
        return res.best_policy, {"candidates": len(res.trials), "val_acc": res.best_val_acc,
                                 "seconds": res.seconds, "s_per_candidate": _median_seconds(res.trials)}
    # sequential: preserve ratios alone at --seq-flops, then bits alone on the frozen pruning, same BitOps
    half = a.episodes // 2
    first = joint.first
    res1 = run_search(bench, first, config(bench, hpo=a.optimizer, seed=seed, target=a.seq_flops, episodes=half,
                                           learner="chn-pruned", resource="flops"), cell / "prune")
    prune = list(res1.best_policy)
    full = joint.search_space

    def space_fn(model: nn.Module, t: float, *, fill: bool = True) -> SearchSpace:
        return frozen(full(model, t, fill=fill), prune)

    stage2 = copy.copy(joint)
    stage2.search_space = space_fn  # type: ignore[method-assign]
    res2 = run_search(bench, stage2, config(bench, hpo=a.optimizer, seed=seed, target=target,
                                            episodes=a.episodes - half), cell / "bits")
    return res2.best_policy, {"candidates": len(res1.trials) + len(res2.trials), "val_acc": res2.best_val_acc,
                              "prune_val_acc": res1.best_val_acc, "seconds": res1.seconds + res2.seconds,
                              "s_per_candidate": _median_seconds(res1.trials + res2.trials)}


def _median_seconds(trials: list[dict[str, Any]]) -> float | None:
    secs = [float(t["seconds"]) for t in trials if t.get("status") == "ok"]
    return statistics.median(secs) if secs else None


def run_cell(bench: Bench, row: str, seed: int, target: float, cell: Path, base_onnx: Path) -> dict[str, Any]:
    a, joint = bench.args, composite(bench, seed)
    policy, info = best_policy(bench, row, seed, target, cell)
    space = joint.search_space(bench.base, target)
    assert space.budget.satisfied(policy), f"{row}: the policy is over the {a.resource} target"
    seed_everything(seed)
    with contextlib.nullcontext() if a.verbose else contextlib.redirect_stdout(io.StringIO()):
        final, val_before, _, secs = retrain(joint, bench.base, policy, bench.data, epochs=a.retrain_epochs,
                                             lr=bench.cfg["search"]["retrain_lr"], device=bench.device)
    final.eval()
    test = evaluate(final, bench.data.loader("test", batch_size=500), device=bench.device)
    k = space.meta["split"]
    fr = joint.joint_fractions(policy)
    flops = joint.first.search_space(bench.base, 1.0).budget.fraction(policy[:k])
    out = {"net": bench.net, "row": row, "seed": seed, "optimizer": a.optimizer if info["candidates"] > 1 else None,
           "resource": a.resource, "target": target, **fr, "flops_kept": flops, "test_acc": test,
           "val_before_retrain": val_before,
           "retrain_s": secs, "retrain_epochs": a.retrain_epochs, "policy": policy, "split": k,
           "avg_bits": _avg_bits(joint, policy[k:]), "base_test": bench.base_test, **info}
    out.update(speed(bench, final, base_onnx))
    return out


def _avg_bits(joint: Any, bits: list[float]) -> float:
    sizes = [int(m.weight.numel()) for _, m in _quant_layers(joint)]
    return float(sum(round(b) * n for b, n in zip(bits, sizes)) / sum(sizes))


def _quant_layers(joint: Any) -> list[tuple[str, nn.Module]]:
    from torchpocket.learners._quant import quant_layers

    return quant_layers(joint._model)


def speed(bench: Bench, final: nn.Module, base_onnx: Path) -> dict[str, Any]:
    """``model.int8.onnx`` of ``final`` against the fp32 baseline's ONNX file, in the same rounds."""
    shape = bench.input_shape
    with tempfile.TemporaryDirectory(prefix="torchpocket-joint-") as tmp:
        p8 = export_int8_onnx(copy.deepcopy(final).cpu().eval(), Path(tmp) / "model.int8.onnx", shape)
        threads = torch.get_num_threads()
        times = {b: compare_onnx_latency({"fp32 baseline": base_onnx, "int8": p8}, shape, batch_size=b,
                                         threads=threads, repeats=bench.args.latency_repeats) for b in (1, 64)}
        size = file_size(p8)
    return {"int8_bytes": size, "fp32_baseline_bytes": file_size(base_onnx),
            "speedup_b1": times[1]["fp32 baseline"] / times[1]["int8"],
            "speedup_b64": times[64]["fp32 baseline"] / times[64]["int8"]}


SIZE_LEARNER = "weight-sparse+non-uniform-quant"


def size_cell(bench: Bench, optimizer: str, seed: int, target: float, cell: Path) -> dict[str, Any]:
    """Deep Compression as one search: densities and codebook bits under a bytes Budget, then the files."""
    a = bench.args
    episodes = 1 if optimizer == "uniform" else a.episodes
    cfg = config(bench, hpo=optimizer, seed=seed, target=target, episodes=episodes, learner=SIZE_LEARNER,
                 resource="bytes")
    cfg["ws"]["conv_min_density"] = a.size_conv_min_density
    learner = make_learner(cfg, bench.device)
    learner.prepare(bench.base, bench.data)
    res = run_search(bench, learner, cfg, cell / "search")
    seed_everything(seed)
    with contextlib.nullcontext() if a.verbose else contextlib.redirect_stdout(io.StringIO()):
        final, val_before, _, secs = retrain(learner, bench.base, res.best_policy, bench.data,
                                             epochs=a.retrain_epochs, lr=bench.cfg["search"]["retrain_lr"],
                                             device=bench.device)
    final.eval()
    test = evaluate(final, bench.data.loader("test", batch_size=500), device=bench.device)
    with tempfile.TemporaryDirectory(prefix="torchpocket-size-") as tmp:
        files = learner.export(final, Path(tmp), bench.data.example())
    k = learner.search_space(bench.base, target).meta["split"]
    return {"net": bench.net, "row": "size", "optimizer": optimizer, "seed": seed, "target": target,
            **learner.joint_fractions(res.best_policy), "test_acc": test, "val_acc": res.best_val_acc,
            "val_before_retrain": val_before, "retrain_s": secs, "policy": res.best_policy, "split": k,
            "mean_density": float(np.mean(res.best_policy[:k])), "candidates": len(res.trials),
            "base_test": bench.base_test, **{key: files[key] for key in ("fp32_bytes", "codebook_bytes", "xz_bytes",
                                                                        "reload_identical")}}


def size_table(rows: list[dict[str, Any]], base_test: float) -> str:
    body = []
    for (opt, target) in sorted({(r["optimizer"], r["target"]) for r in rows}, key=lambda t: (t[1], t[0] != "uniform")):
        g = [r for r in rows if (r["optimizer"], r["target"]) == (opt, target)]
        body.append([f"{target:g}", f"`{opt}`", len(g), pm([r["bytes_fraction"] for r in g], 4),
                     pm([r["mean_density"] for r in g], 3), pm([r["val_acc"] for r in g]),
                     pm([r["test_acc"] for r in g]), pm([r["test_acc"] - base_test for r in g]),
                     pm([r["fp32_bytes"] / r["codebook_bytes"] for r in g], 1) + "x",
                     pm([r["fp32_bytes"] / r["xz_bytes"] for r in g], 1) + "x",
                     "yes" if all(r["reload_identical"] for r in g) else "NO"])
    head = ["bytes target", "optimizer", "seeds", "bytes kept (Budget)", "mean density", "best val (reward split)",
            "test after re-train", "vs fp32 baseline", "model.codebook.pt smaller", "model.codebook.pt.xz smaller",
            "reloads identical"]
    return md_table(head, body, right=[False, False] + [True] * (len(head) - 2))


def table(rows: list[dict[str, Any]], base_test: float) -> str:
    order = [r for r in ROWS if any(x["row"] == r for x in rows)]
    lat = all("latency_fraction" in x for x in rows)
    body = []
    for name in order:
        g = [x for x in rows if x["row"] == name]
        body.append([f"`{name}`" + (f" ({g[0]['optimizer']})" if g[0].get("optimizer") else ""), len(g),
                     pm([x["bitops_fraction"] for x in g], 4), pm([x["bytes_fraction"] for x in g], 3),
                     *([pm([x["latency_fraction"] for x in g], 3)] if lat else []),
                     pm([x["flops_kept"] for x in g], 3), pm([x["avg_bits"] for x in g], 2),
                     pm([x["val_acc"] for x in g if "val_acc" in x]) if any("val_acc" in x for x in g) else "–",
                     pm([x["test_acc"] for x in g]), pm([x["test_acc"] - base_test for x in g]),
                     pm([x["speedup_b1"] for x in g]) + "x", pm([x["speedup_b64"] for x in g]) + "x",
                     pm([x["fp32_baseline_bytes"] / x["int8_bytes"] for x in g], 1) + "x",
                     max(x["candidates"] for x in g)])
    head = ["row", "seeds", "BitOps kept", "bytes kept", *(["latency (predicted, of fp32)"] if lat else []),
            "FLOPs kept", "avg weight bits", "best val (reward split)",
            "test after re-train", "vs fp32 baseline", "int8 ONNX speed-up b1", "b64", "ONNX file smaller",
            "candidates"]
    return md_table(head, body, right=[False] + [True] * (len(head) - 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--net", default="resnet20")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--init", default=None, help="baseline checkpoint (default: the shipped one)")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    ap.add_argument("--part", default="equal", choices=("equal", "size"),
                    help="equal: the rows at one joint target; size: weight-sparse+non-uniform-quant under "
                         "--size-targets (bytes), its files against the fp32 one")
    ap.add_argument("--size-targets", type=float, nargs="+", default=[0.04])
    ap.add_argument("--size-optimizers", nargs="+", default=["uniform", "tpe"])
    ap.add_argument("--size-conv-min-density", type=float, default=0.05,
                    help="--ws-conv-min-density of the size part (default: %(default)s)")
    ap.add_argument("--optimizer", default="tpe", help="the joint and sequential searches' --hpo (default: tpe)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--episodes", type=int, default=200, help="candidates per search (sequential: half each)")
    ap.add_argument("--resource", default="bitops", choices=("bitops", "bytes", "latency"),
                    help="the joint Budget every row meets (default: %(default)s)")
    ap.add_argument("--target", type=float, default=None,
                    help="resource to keep, a fraction of the fp32 network's (default: prune-0.5+int8's)")
    ap.add_argument("--prune-flops", type=float, default=0.5, help="FLOPs kept by prune-0.5+int8 (default 0.5)")
    ap.add_argument("--seq-flops", type=float, default=0.7, help="FLOPs the sequential prune keeps (default 0.7)")
    ap.add_argument("--retrain-epochs", type=int, default=2)
    ap.add_argument("--retrain-steps", type=int, default=0)
    ap.add_argument("--retrain-lr", type=float, default=None)
    ap.add_argument("--reward-val-size", type=int, default=2000)
    ap.add_argument("--latency-repeats", type=int, default=30)
    ap.add_argument("--channel-round", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cells", default="joint-cells")
    ap.add_argument("--out", default="joint.md")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()
    if args.episodes < 2:
        raise UserError(f"--episodes must be at least 2 (the sequential row splits them), got {args.episodes}")
    args.optimizers, args.targets = [args.optimizer], [args.prune_flops]
    if args.resource == "latency" and "sequential" in args.rows:
        if args.rows != list(ROWS):
            raise UserError("--rows sequential: under --resource latency the weight bits cost no time (one int8 "
                            "kernel runs them all), so a bits-only second stage has nothing to search")
        args.rows = [r for r in ROWS if r != "sequential"]
    bench = setup(args)
    shape = bench.input_shape
    cells = Path(args.cells)
    if args.part == "size":
        rows = []
        for target in args.size_targets:
            for opt in args.size_optimizers:
                for seed in args.seeds:
                    cell = cells / f"{bench.net}-size-t{target:g}-{opt}-s{seed}"
                    done = cell / "result.json"
                    if not done.is_file():
                        cell.mkdir(parents=True, exist_ok=True)
                        atomic_write_text(done, json.dumps(size_cell(bench, opt, seed, target, cell), indent=1))
                    r = json.loads(done.read_text())
                    print(f"  {cell.name}: test {r['test_acc']:.2f}%, bytes {r['bytes_fraction']:.4f}, xz file "
                          f"{r['fp32_bytes'] / r['xz_bytes']:.1f}x smaller", flush=True)
                    rows.append(r)
        text = header(f"Deep Compression as one search ({SIZE_LEARNER}), file sizes", bench)
        text += "\n\n" + size_table(rows, bench.base_test) + (
            "\n\nBytes (the Budget): each kept weight at its codebook bits, one bitmask bit per weight of a sparse "
            "layer, the other parameters in fp32, as a fraction of the fp32 parameters. Files: `model.codebook.pt` "
            "(codebooks, packed indices of the kept weights, packed bitmasks) and the same file xz-compressed, "
            "against the fp32 state_dict file.\n")
        atomic_write_text(Path(args.out), text)
        print(text)
        return
    with tempfile.TemporaryDirectory(prefix="torchpocket-joint-base-") as tmp:
        base_onnx = export_onnx(copy.deepcopy(bench.base).cpu().eval(), Path(tmp) / "baseline.onnx", shape)
        rows = []
        for seed in args.seeds:
            target = args.target or composite(bench, seed).search_space(bench.base, 1.0).budget.fraction(
                fixed_policy(bench, seed, args.prune_flops))
            for row in args.rows:
                cell = cells / f"{bench.net}-{args.resource}-t{target:.4f}-{row}-s{seed}"
                done = cell / "result.json"
                if not done.is_file():
                    cell.mkdir(parents=True, exist_ok=True)
                    result = run_cell(bench, row, seed, target, cell, base_onnx)
                    atomic_write_text(done, json.dumps(result, indent=1))
                r = json.loads(done.read_text())
                kept = r[f"{args.resource}_fraction"]
                print(f"  {cell.name}: test {r['test_acc']:.2f}%, {args.resource} {kept:.4f}, "
                      f"int8 speed-up b1 {r['speedup_b1']:.2f}x b64 {r['speedup_b64']:.2f}x", flush=True)
                rows.append(r)
    text = header(f"Joint prune + quantize search at equal {args.resource}", bench)
    text += "\n\n" + table(rows, bench.base_test)
    text += ("\n\nBitOps: sum over Conv2d / Linear of MACs x weight bits x activation bits (8), as a fraction of "
             "the fp32 network's (x 32 x 32); bytes: stored weights at their bit-widths plus the other parameters "
             "in fp32. Speed-ups: each row's `model.int8.onnx` against the fp32 baseline's ONNX file in the same "
             "ONNX Runtime rounds." + (" Latency: the int8 lookup table's prediction, as a fraction of the unpruned "
             "fp32 model's ONNX Runtime time at batch 1 (`--resource latency`)." if args.resource == "latency"
             else "") + "\n")
    atomic_write_text(Path(args.out), text)
    print(text)


if __name__ == "__main__":
    main_guard(main)
