#!/usr/bin/env python
"""Does the search pay? Learning curves of every optimizer up to AMC's 400 candidates, and the final models.

For one net, each (target, resource, optimizer, seed) is a *cell*: a search of ``--episodes``
candidates with ``chn-pruned`` (LASSO + reconstruction, no fine-tuning: AMC's protocol) scored on
the validation reward split, then the best candidate within the budget re-trained with the same
distilled re-train (``--retrain-epochs`` whole epochs) and tested once. Every cell keeps its own
trial log under ``--cells`` (a killed search resumes from its last finished trial, as ``run.py
--resume`` does) and writes ``result.json`` when it is done; a cell with a ``result.json`` is skipped,
so the benchmark spans sessions. The tables and plots are made from the ``result.json`` files alone:

- the best validation accuracy (the reward) after 50 / 100 / 200 / 400 candidates, mean ± std over
  seeds, with the uniform policy's as the reference;
- test accuracy of each search's final model after the re-train;
- seconds per candidate;
- one learning-curve plot per (net, target, resource): best-so-far val acc against candidates.

    python benchmarks/search.py --net resnet20 --targets 0.3 0.5 --seeds 0 --episodes 400 --threads 2 \\
        --retrain-epochs 2 --cells benchmarks/search-cells --out benchmarks/search.md --plot-dir benchmarks

``--report-only`` rebuilds the tables and plots from the cells without running anything.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from _common import Run, add_common_args, emit, header, main_guard, md_table, pm, setup

from torchpocket.errors import UserError
from torchpocket.pipeline import RunDir, search
from torchpocket.utils import atomic_write_text, seed_everything

OPTIMIZERS = ("uniform", "sensitivity", "ddpg", "tpe", "gp", "evolution", "random")
BUDGETS = (50, 100, 200, 400)


def cell_name(net: str, target: float, resource: str, optimizer: str, seed: int) -> str:
    return f"{net}-{resource}-t{target:g}-{optimizer}-s{seed}"


def best_so_far(trials: list[dict[str, Any]]) -> list[float]:
    """Best val acc among the scored candidates within the budget (probes excluded), after each trial."""
    out, cur = [], -math.inf
    for t in trials:
        if t.get("status") == "ok" and t.get("kind") != "probe":
            cur = max(cur, float(t["val_acc"]))
        out.append(cur)
    return out


def run_cell(bench: Any, cell: Path, *, optimizer: str, target: float, resource: str, seed: int) -> dict[str, Any]:
    """One search (resumed when its trial log exists), then its best candidate re-trained and tested once."""
    a = bench.args
    episodes = 1 if optimizer == "uniform" else a.episodes
    cfg = bench.config(hpo=optimizer, seed=seed, target=target, episodes=episodes, resource=resource)
    cell.mkdir(parents=True, exist_ok=True)
    if (cell / "search_state.pt").exists():
        cfg["search"]["resume"] = str(cell)
    learner = bench.learner(seed, resource=resource)
    seed_everything(seed)
    quiet = contextlib.nullcontext() if a.verbose else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        result = search(learner, bench.base, bench.data, cfg, run_dir=RunDir(cell), device=bench.device,
                        prepare=False)
    run = bench.retrain_and_test(Run(optimizer, target, seed, result, val_acc=result.best_val_acc),
                                 resource=resource)
    trials = result.trials
    secs = [float(t["seconds"]) for t in trials if t.get("status") == "ok" and not t.get("cached_probe")]
    uni = next((t for t in trials if t.get("kind") == "uniform"), None)
    return {
        "net": bench.net, "target": target, "resource": resource, "optimizer": optimizer, "seed": seed,
        "episodes": episodes, "trials": len(trials), "probes": sum(t.get("kind") == "probe" for t in trials),
        "curve": best_so_far(trials), "best_val_acc": result.best_val_acc, "best_policy": result.best_policy,
        "uniform_val_acc": uni["val_acc"] if uni else None, "test_acc": run.test_acc,
        "flops_kept": run.flops_kept, "params_kept": run.params_kept, "retrain_s": run.retrain_s,
        "retrain_epochs": a.retrain_epochs, "search_s": result.seconds,
        "s_per_candidate": statistics.median(secs) if secs else None,
        "base_val": bench.base_val, "base_test": bench.base_test, "reward_size": bench.reward_size,
    }


def load_cells(root: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(root.glob("*/result.json"))]


def at_budget(r: dict[str, Any], n: int) -> float | None:
    curve = r["curve"]
    if r["optimizer"] == "uniform":
        return curve[-1]
    return curve[n - 1] if len(curve) >= n else None


def tables(rows: list[dict[str, Any]]) -> str:
    out = []
    groups = sorted({(r["net"], r["resource"], r["target"]) for r in rows})
    for net, res, target in groups:
        g = [r for r in rows if (r["net"], r["resource"], r["target"]) == (net, res, target)]
        names = [n for n in OPTIMIZERS if any(r["optimizer"] == n for r in g)]
        names += sorted({r["optimizer"] for r in g} - set(names))
        budgets = [b for b in BUDGETS if any(len(r["curve"]) >= b for r in g)] or [max(len(r["curve"]) for r in g)]
        head = ["optimizer", "seeds"] + [f"val @ {b}" for b in budgets] + [
            "test after re-train", "FLOPs kept", "s / candidate"]
        body = []
        for name in names:
            rs = [r for r in g if r["optimizer"] == name]
            cells = []
            for b in budgets:
                vals = [v for v in (at_budget(r, b) for r in rs) if v is not None]
                cells.append(pm(vals) if len(vals) == len(rs) else "–")
            spc = [r["s_per_candidate"] for r in rs if r["s_per_candidate"]]
            body.append([f"`{name}`", len(rs), *cells, pm([r["test_acc"] for r in rs]),
                         pm([r["flops_kept"] for r in rs], 3), f"{statistics.median(spc):.2f}" if spc else "–"])
        base = g[0]
        out.append(f"### {net}, {res} target {target:g}\n\n"
                   f"Baseline: val {base['base_val']:.2f}% on the reward split ({base['reward_size']} images), "
                   f"test {base['base_test']:.2f}%. `val @ N`: best val acc (reward split, reconstruction, no "
                   f"fine-tuning) among the first N candidates, probes excluded; the uniform policy is one "
                   f"candidate. Test: the search's best candidate after {base['retrain_epochs']} distilled "
                   "epoch(s) of re-training, read once.\n\n" + md_table(head, body))
    return "\n".join(out)


def plot(rows: list[dict[str, Any]], plot_dir: Path) -> list[Path]:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    paths = []
    plot_dir.mkdir(parents=True, exist_ok=True)
    for net, res, target in sorted({(r["net"], r["resource"], r["target"]) for r in rows}):
        g = [r for r in rows if (r["net"], r["resource"], r["target"]) == (net, res, target)]
        fig = Figure(figsize=(7, 4.5), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        n_max = max(len(r["curve"]) for r in g)
        for name in [n for n in OPTIMIZERS if any(r["optimizer"] == n for r in g)]:
            rs = [r for r in g if r["optimizer"] == name]
            if name == "uniform":
                m = statistics.fmean(r["curve"][-1] for r in rs)
                ax.axhline(m, color="black", ls="--", lw=1, label="uniform")
                continue
            n = min(len(r["curve"]) for r in rs)
            c = np.asarray([r["curve"][:n] for r in rs], float)
            xs = np.arange(1, n + 1)
            mean = c.mean(axis=0)
            line = ax.plot(xs, mean, lw=1.5, label=f"{name} ({len(rs)} seed{'s' if len(rs) > 1 else ''})")[0]
            if len(rs) > 1:
                sd = c.std(axis=0, ddof=1)
                ax.fill_between(xs, mean - sd, mean + sd, color=line.get_color(), alpha=0.15)
        lo = min(min(v for v in r["curve"] if math.isfinite(v)) for r in g if any(map(math.isfinite, r["curve"])))
        ax.set_ylim(bottom=max(lo - 1.0, 0.0))
        ax.set_xlim(1, n_max)
        ax.set_xlabel("candidates scored (probes included)")
        ax.set_ylabel("best val acc so far, % (reward split)")
        ax.set_title(f"{net}: {res} target {target:g}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        path = plot_dir / f"search-{net}-{res}-t{target:g}.png"
        fig.savefig(path)
        paths.append(path)
    return paths


def plot_ddpg(cell: Path, path: Path) -> Path | None:
    """DDPG's diagnosis: the agent's action per layer against the episodes, and the critic's loss."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    log = cell / "trials.jsonl"
    if not log.is_file():
        return None
    rows = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]
    rows = [r for r in rows if isinstance(r.get("ddpg"), dict)]
    if not rows:
        return None
    fig = Figure(figsize=(8, 6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2)
    eps = [r["ddpg"]["episode"] for r in rows]
    n = len(rows[0]["ddpg"]["actions"])
    for k in range(n):
        top.plot(eps, [r["ddpg"]["actions"][k] for r in rows], lw=0.8, label=f"layer {k}")
    top.set_ylabel("action in [0, 1] (0.5 = uniform)")
    top.set_title(f"{cell.name}: actions per layer")
    top.legend(fontsize=6, ncol=5)
    loss = [(e, r["ddpg"]["critic_loss"]) for e, r in zip(eps, rows) if r["ddpg"]["critic_loss"] is not None]
    if loss:
        bottom.semilogy([e for e, _ in loss], [v for _, v in loss], lw=1)
    bottom.set_xlabel("episode")
    bottom.set_ylabel("critic loss (mean per episode)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.savefig(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, optimizers=OPTIMIZERS, targets=(0.3, 0.5))
    ap.set_defaults(episodes=400, retrain_epochs=2, seeds=[0])
    ap.add_argument("--resources", nargs="+", default=["flops"], choices=("flops", "params", "latency"),
                    help="what each target constrains (default: %(default)s)")
    ap.add_argument("--cells", default="benchmarks/search-cells", help="one folder per cell (default: %(default)s)")
    ap.add_argument("--plot-dir", default=None, help="folder for the learning-curve PNGs")
    ap.add_argument("--report-only", action="store_true", help="only rebuild tables and plots from the cells")
    args = ap.parse_args()
    root = Path(args.cells)
    if args.report_only:
        rows = load_cells(root)
        if not rows:
            raise UserError(f"no finished cells (result.json) under {root}")
        emit(tables(rows), args.out, first=True)
        if args.plot_dir:
            print("\n".join(map(str, plot(rows, Path(args.plot_dir)))))
            for cell in sorted(root.glob("*-ddpg-s*")):
                made = plot_ddpg(cell, Path(args.plot_dir) / f"search-ddpg-{cell.name}.png")
                if made:
                    print(made)
        return
    bench = setup(args)
    emit(header("Search quality: learning curves and final models", bench), None, first=True)
    for target in args.targets:
        for res in args.resources:
            for seed in args.seeds:
                for name in args.optimizers:
                    cell = root / cell_name(bench.net, target, res, name, seed)
                    if (cell / "result.json").exists():
                        continue
                    t0 = time.perf_counter()
                    r = run_cell(bench, cell, optimizer=name, target=target, resource=res, seed=seed)
                    atomic_write_text(cell / "result.json", json.dumps(r, indent=1) + "\n")
                    print(f"  {cell.name}: best val {r['best_val_acc']:.2f}% (uniform {r['uniform_val_acc']}), "
                          f"test {r['test_acc']:.2f}%, {r['trials']} trials, {time.perf_counter() - t0:.0f}s",
                          flush=True)
    rows = [r for r in load_cells(root) if r["net"] == bench.net]
    emit(tables(rows), args.out, first=True)
    if args.plot_dir:
        plot(rows, Path(args.plot_dir))


if __name__ == "__main__":
    sys.setrecursionlimit(10000)
    main_guard(main)
