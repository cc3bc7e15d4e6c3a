#!/usr/bin/env python
"""One search, the whole front: ``--pareto LO:HI`` against the uniform curve and against single-target searches.

For one net, each (optimizer, seed) is a *cell*: one multi-objective search of ``--episodes`` candidates over
the FLOPs window ``--window LO HI`` with ``chn-pruned`` (AMC's protocol: reconstruction, no fine-tuning),
scored on the validation reward split. The search is seeded with the uniform policy at each end of the
window and every 0.1 between, so the uniform curve is measured inside the same run. Cells resume from their
trial log and are skipped once ``result.json`` exists, so the benchmark spans sessions. Reported:

- the hypervolume (exact, 2-D: area under the front's best-so-far step over the window, reference point
  (HI, 0)) of the front after the first 100 and after all candidates, beside the uniform curve's, and the
  front's best val acc at FLOPs <= 0.3 / 0.4 / 0.5 / 0.6 against uniform's (mean +- std over seeds). The
  100-candidate figure is the first 100 trials of the same search (NSGA-II's population is sized for the
  whole search);
- with ``--single-cells`` (``benchmarks/search.py``'s cells): the front's best point at each target against a
  dedicated single-target search's best after the same number of candidates;
- with ``--picks``: each picked point of the ``--pick-optimizer`` cells re-trained (``--retrain-epochs``
  whole epochs, distilled, as ``benchmarks/search.py`` does) and tested once, beside the uniform policy at the
  same point, re-trained the same way.

    python benchmarks/pareto.py --net resnet20 --optimizers evolution tpe random --seeds 0 1 2 --episodes 200 \\
        --window 0.2 0.8 --threads 2 --cells benchmarks/pareto-cells --single-cells benchmarks/search-cells \\
        --picks 0.3 0.4 0.5 --out benchmarks/pareto.md --plot benchmarks/pareto.png

``--optimizers`` takes ``--hpo`` names and ``evolution-random`` (NSGA-II with ``--evolution-init random``, the
first generation drawn at random as before the perturbed-uniform first generation became the default).
``--report-only`` rebuilds the tables and the plot from the cells without running anything.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from _common import Run, add_common_args, emit, header, main_guard, md_table, pm, setup

from torchpocket import pareto
from torchpocket.errors import UserError
from torchpocket.pipeline import RunDir, search
from torchpocket.pipeline.search import SearchResult
from torchpocket.utils import atomic_write_text, seed_everything

OPTIMIZERS = ("sensitivity", "evolution", "tpe", "random")
#: benchmark names for an optimizer with other options: name -> (--hpo, {section: {option: value}})
VARIANTS: dict[str, tuple[str, dict[str, dict[str, Any]]]] = {
    "evolution-random": ("evolution", {"evolution": {"init": "random"}}),  # NSGA-II's random first generation
}
AT = (0.3, 0.4, 0.5, 0.6)


def cell_name(net: str, lo: float, hi: float, optimizer: str, episodes: int, seed: int) -> str:
    return f"{net}-pareto-{lo:g}-{hi:g}-{optimizer}-e{episodes}-s{seed}"


def run_cell(bench: Any, cell: Path, *, optimizer: str, seed: int, lo: float, hi: float) -> dict[str, Any]:
    a = bench.args
    hpo, options = VARIANTS.get(optimizer, (optimizer, {}))
    cfg = bench.config(hpo=hpo, seed=seed, target=hi, episodes=a.episodes)
    for section, values in options.items():
        cfg[section].update(values)
    cfg["search"]["pareto"] = f"{lo}:{hi}"
    cell.mkdir(parents=True, exist_ok=True)
    if (cell / "search_state.pt").exists():
        cfg["search"]["resume"] = str(cell)
    learner = bench.learner(seed)
    seed_everything(seed)
    with contextlib.nullcontext() if a.verbose else contextlib.redirect_stdout(io.StringIO()):
        result = search(learner, bench.base, bench.data, cfg, run_dir=RunDir(cell), device=bench.device,
                        prepare=False)
    trials = result.trials
    budgets = sorted({b for b in (100, len(trials)) if b <= len(trials)})
    secs = [float(t["seconds"]) for t in trials if t.get("status") == "ok"]
    return {"net": bench.net, "optimizer": optimizer, "seed": seed, "window": [lo, hi], "episodes": a.episodes,
            "trials": len(trials), "search_s": result.seconds,
            "s_per_candidate": statistics.median(secs) if secs else None,
            "blocks": {str(b): pareto.front_block(trials[:b], lo, hi, at=AT) for b in budgets},
            "base_val": bench.base_val, "base_test": bench.base_test, "reward_size": bench.reward_size}


def pick_cell(bench: Any, cell: Path, r: float, *, seed: int, optimizer: str) -> dict[str, Any]:
    """The front's best point at FLOPs <= r and the uniform seed trial at r, each re-trained and tested once."""
    path = cell / f"pick-{r:g}.json"
    if path.exists():
        return json.loads(path.read_text())
    trials = [json.loads(ln) for ln in (cell / "trials.jsonl").read_text().splitlines() if ln.strip()]
    out: dict[str, Any] = {"pick": r, "seed": seed, "optimizer": optimizer}
    uniform = [t for t in trials if t.get("kind") == "uniform"]
    for name, best in (("front", pareto.best_at(trials, r)), ("uniform", pareto.best_at(uniform, r))):
        if best is None:
            raise UserError(f"{cell.name}: no trial at FLOPs <= {r:g}")
        if name == "uniform" and out["front"]["trial"] == best["trial"]:  # the front's point is uniform's
            out[name] = dict(out["front"])
            continue
        result = SearchResult(best["policy"], best["reward"], best["val_acc"], [], [], None, 0.0, "flops")
        run = bench.retrain_and_test(Run(name, r, seed, result, val_acc=best["val_acc"]))
        out[name] = {"trial": best["trial"], "resource": best["resource"], "val_acc": best["val_acc"],
                     "test_acc": run.test_acc, "flops_kept": run.flops_kept, "retrain_s": run.retrain_s}
    atomic_write_text(path, json.dumps(out, indent=1) + "\n")
    return out


def load(root: Path, pattern: str = "*/result.json") -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(root.glob(pattern))]


def tables(rows: list[dict[str, Any]], picks: list[dict[str, Any]], singles: list[dict[str, Any]]) -> str:
    out = []
    names = list(dict.fromkeys(r["optimizer"] for r in rows))
    budgets = sorted({int(b) for r in rows for b in r["blocks"]})
    head = ["optimizer", "candidates", "seeds", "hypervolume", "uniform HV", "mean front acc", "mean uniform acc",
            *[f"front - uniform @ <= {r:g}" for r in AT], "s / candidate"]
    body = []
    for name in names:
        for b in budgets:
            bs = [r["blocks"][str(b)] for r in rows if r["optimizer"] == name and str(b) in r["blocks"]]
            if not bs:
                continue
            deltas = [[x["front_minus_uniform"] for blk in bs for x in blk["at"] if x["resource"] == r
                       and x["front_minus_uniform"] is not None] for r in AT]
            spc = [r["s_per_candidate"] for r in rows if r["optimizer"] == name and r["s_per_candidate"]]
            body.append([f"`{name}`", b, len(bs), pm([x["hypervolume"] for x in bs], 3),
                         pm([x.get("uniform_hypervolume", float("nan")) for x in bs], 3),
                         pm([x["front_mean_val_acc"] for x in bs]), pm([x.get("uniform_mean_val_acc", float("nan"))
                                                                         for x in bs]),
                         *[pm(d) if d else "–" for d in deltas], f"{statistics.median(spc):.2f}" if spc else "–"])
    out.append("### Front against the uniform curve (validation accuracy on the reward split, before re-training)\n")
    out.append(md_table(head, body))
    if singles:
        out.append("\n### Front point against a dedicated single-target search of the same number of candidates\n")
        body = []
        for s in singles:
            body.append([f"`{s['pareto_optimizer']}` front @ {s['target']:g}", s["candidates"],
                         pm(s["front"]), f"`{s['single_optimizer']}`", pm(s["single"]),
                         pm([f - g for f, g in zip(s["front"], s["single"])])])
        out.append(md_table(["front point", "candidates", "front val acc", "single-target search", "its val acc",
                             "front - single"], body))
    if picks:
        out.append("\n### Picked points, re-trained and tested once, against uniform at the same point\n")
        body = []
        for r in sorted({p["pick"] for p in picks}):
            ps = [p for p in picks if p["pick"] == r]
            body.append([f"{r:g}", f"`{ps[0]['optimizer']}`", len(ps), pm([p["front"]["resource"] for p in ps], 3),
                         pm([p["front"]["val_acc"] for p in ps]), pm([p["front"]["test_acc"] for p in ps]),
                         pm([p["uniform"]["resource"] for p in ps], 3), pm([p["uniform"]["test_acc"] for p in ps]),
                         pm([p["front"]["test_acc"] - p["uniform"]["test_acc"] for p in ps])])
        out.append(md_table(["FLOPs <=", "front of", "seeds", "front FLOPs", "front val acc", "front test acc",
                             "uniform FLOPs", "uniform test acc", "front - uniform (test)"], body))
    return "\n".join(out) + "\n"


def compare_singles(rows: list[dict[str, Any]], single_root: Path | None, episodes: int) -> list[dict[str, Any]]:
    """Front point at FLOPs <= t (first ``episodes`` trials) vs single-target cells' best after ``episodes``."""
    if single_root is None or not single_root.is_dir():
        return []
    singles = [r for r in load(single_root) if r["resource"] == "flops" and r["optimizer"] != "uniform"]
    out = []
    for name in dict.fromkeys(r["optimizer"] for r in rows):
        for target in sorted({s["target"] for s in singles}):
            for sname in dict.fromkeys(s["optimizer"] for s in singles if s["target"] == target):
                pairs = []
                for r in (r for r in rows if r["optimizer"] == name):
                    s = next((s for s in singles if s["target"] == target and s["optimizer"] == sname
                              and s["seed"] == r["seed"] and s["net"] == r["net"]
                              and s["reward_size"] == r["reward_size"] and len(s["curve"]) >= episodes), None)
                    blk = r["blocks"].get(str(episodes))
                    at = next((x for x in blk["at"] if abs(x["resource"] - target) < 1e-9), None) if blk else None
                    if s is not None and at is not None and at["front_val_acc"] is not None:
                        pairs.append((at["front_val_acc"], s["curve"][episodes - 1]))
                if pairs:
                    out.append({"pareto_optimizer": name, "target": target, "candidates": episodes,
                                "single_optimizer": sname, "front": [p[0] for p in pairs],
                                "single": [p[1] for p in pairs]})
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.8, 4.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    shown = [r for r in rows if r["seed"] == min(x["seed"] for x in rows)]
    for r in shown:
        blk = r["blocks"][str(max(int(b) for b in r["blocks"]))]
        f = blk["front"]
        ax.step([p["resource"] for p in f] + [r["window"][1]], [p["val_acc"] for p in f] + [f[-1]["val_acc"]],
                where="post", lw=1.2, label=f"{r['optimizer']} front ({blk['trials']} candidates)")
    uni = shown[0]["blocks"][str(max(int(b) for b in shown[0]["blocks"]))]["uniform_curve"] if shown else []
    if uni:
        ax.plot([p["resource"] for p in uni], [p["val_acc"] for p in uni], "s--", color="gray", ms=4, label="uniform")
    ax.set_xlabel("FLOPs kept (fraction of the baseline)")
    ax.set_ylabel("validation accuracy, reward split (%)")
    ax.set_title(f"{shown[0]['net']}: fronts from one search each (seed {shown[0]['seed']})" if shown else "")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, optimizers=OPTIMIZERS, targets=(0.5,))
    ap.set_defaults(episodes=200, retrain_epochs=2, seeds=[0])
    ap.add_argument("--window", nargs=2, type=float, default=[0.2, 0.8], metavar=("LO", "HI"),
                    help="FLOPs window of the front (default: %(default)s)")
    ap.add_argument("--cells", default="benchmarks/pareto-cells", help="one folder per cell (default: %(default)s)")
    ap.add_argument("--single-cells", default=None, help="benchmarks/search.py's cells, for the single-target rows")
    ap.add_argument("--picks", nargs="*", type=float, default=[], help="FLOPs points to re-train and test")
    ap.add_argument("--pick-optimizer", default=None, help="whose fronts the picks come from (default: the first)")
    ap.add_argument("--report-only", action="store_true", help="only rebuild the tables and the plot")
    args = ap.parse_args()
    lo, hi = args.window
    root = Path(args.cells)
    single_root = Path(args.single_cells) if args.single_cells else None
    if not args.report_only:
        bench = setup(args)
        emit(header("Pareto search: the whole front from one search", bench), None, first=True)
        for seed in args.seeds:
            for name in args.optimizers:
                cell = root / cell_name(bench.net, lo, hi, name, args.episodes, seed)
                if (cell / "result.json").exists():
                    continue
                t0 = time.perf_counter()
                r = run_cell(bench, cell, optimizer=name, seed=seed, lo=lo, hi=hi)
                atomic_write_text(cell / "result.json", json.dumps(r, indent=1) + "\n")
                blk = r["blocks"][str(r["trials"])]
                print(f"  {cell.name}: hypervolume {blk['hypervolume']:.3f} (uniform "
                      f"{blk.get('uniform_hypervolume', float('nan')):.3f}), {blk['front_size']} front points, "
                      f"{time.perf_counter() - t0:.0f}s", flush=True)
        who = args.pick_optimizer or args.optimizers[0]
        for seed in args.seeds:
            cell = root / cell_name(bench.net, lo, hi, who, args.episodes, seed)
            for r in args.picks:
                p = pick_cell(bench, cell, r, seed=seed, optimizer=who)
                print(f"  {cell.name} pick {r:g}: front test {p['front']['test_acc']:.2f}% (FLOPs "
                      f"{p['front']['resource']:.3f}), uniform {p['uniform']['test_acc']:.2f}%", flush=True)
    rows = load(root)
    if not rows:
        raise UserError(f"no finished cells (result.json) under {root}")
    picks = load(root, "*/pick-*.json")
    emit(tables(rows, picks, compare_singles(rows, single_root, args.episodes)), args.out, first=True)
    if args.plot:
        print(plot(rows, Path(args.plot)))


if __name__ == "__main__":
    sys.setrecursionlimit(10000)
    main_guard(main)
