"""The accuracy-resource front of a multi-objective search (``--pareto LO:HI``): the non-dominated trials,
their hypervolume, the uniform curve measured at the same resources, and the best point under a resource.

Both objectives come from the trial records the search writes: ``val_acc`` (maximised, on the reward split)
and ``resource`` (the budget's fraction of the baseline, minimised). Probes and failed trials never count.

The hypervolume is exact in two dimensions: the area, over resources in ``[LO, HI]``, under the front's
best-so-far step (``acc(r)`` = the best validation accuracy at resource <= r), with the reference point
(resource ``HI``, accuracy 0). Divided by ``HI - LO`` it is the front's mean accuracy over the window, in
percent, which is what :func:`front_block` reports beside the same figure for the uniform curve.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torchpocket.utils import atomic_write_text

PARETO_CSV = "pareto.csv"
PARETO_PNG = "pareto.png"
EPS = 1e-9


def scored(trials: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Trials that can be on a front: scored, not probes, with a resource."""
    return [t for t in trials if t.get("status") == "ok" and t.get("kind") != "probe"
            and t.get("resource") is not None and t.get("val_acc") is not None]


def front(trials: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The non-dominated trials (no other trial has resource <= and val acc >=, one of them strictly), by
    resource ascending; of equal points the earliest trial."""
    out: list[dict[str, Any]] = []
    best = float("-inf")
    for t in sorted(scored(trials), key=lambda t: (t["resource"], -t["val_acc"], t.get("trial", 0))):
        if t["val_acc"] > best + EPS:
            out.append(t)
            best = t["val_acc"]
    return out


def best_at(trials: Sequence[dict[str, Any]], resource: float) -> dict[str, Any] | None:
    """The trial with the highest val acc at resource <= ``resource`` (earliest of ties); None if none."""
    ok = [t for t in scored(trials) if t["resource"] <= resource + EPS]
    return max(ok, key=lambda t: (t["val_acc"], -t.get("trial", 0))) if ok else None


def step_area(points: Sequence[tuple[float, float]], lo: float, hi: float) -> float:
    """Area over ``[lo, hi]`` under ``acc(r) = max{a : (r', a) in points, r' <= r}`` (0 where none): the 2-D
    hypervolume with reference point (``hi``, 0), points below ``lo`` counted from ``lo``."""
    area, best, prev = 0.0, 0.0, lo
    for r, a in sorted((max(float(r), lo), float(a)) for r, a in points if r <= hi + EPS):
        area += best * (max(r, prev) - prev)
        prev = max(r, prev)
        best = max(best, a)
    return area + best * max(hi - prev, 0.0)


def hypervolume(trials: Sequence[dict[str, Any]], lo: float, hi: float) -> float:
    """The front's hypervolume (accuracy in percent times resource fraction) over ``[lo, hi]``."""
    return step_area([(t["resource"], t["val_acc"]) for t in scored(trials)], lo, hi)


def uniform_curve(trials: Sequence[dict[str, Any]]) -> list[tuple[float, float]]:
    """(resource, val acc) of the uniform seed trials, by resource."""
    return sorted((t["resource"], t["val_acc"]) for t in scored(trials) if t.get("kind") == "uniform")


def front_block(trials: Sequence[dict[str, Any]], lo: float, hi: float,
                at: Sequence[float] = (0.3, 0.4, 0.5, 0.6)) -> dict[str, Any]:
    """The ``pareto`` block of summary.json."""
    f, curve = front(trials), uniform_curve(trials)
    hv = hypervolume(trials, lo, hi)
    out: dict[str, Any] = {
        "window": [lo, hi], "trials": len(scored(trials)), "front_size": len(f),
        "hypervolume": hv, "hypervolume_reference": {"resource": hi, "val_acc": 0.0},
        "front_mean_val_acc": hv / (hi - lo),
        "front": [{"trial": t.get("trial"), "resource": t["resource"], "val_acc": t["val_acc"]} for t in f],
        "uniform_curve": [{"resource": r, "val_acc": a} for r, a in curve]}
    if curve:
        uni_hv = step_area(curve, lo, hi)
        out.update(uniform_hypervolume=uni_hv, uniform_mean_val_acc=uni_hv / (hi - lo))
    rows = []
    for r in at:
        if not lo - EPS <= r <= hi + EPS:
            continue
        best = best_at(trials, r)
        uni = best_at([t for t in trials if t.get("kind") == "uniform"], r)
        rows.append({"resource": r, "front_val_acc": best["val_acc"] if best else None,
                     "front_trial": best.get("trial") if best else None,
                     "uniform_val_acc": uni["val_acc"] if uni else None,
                     "front_minus_uniform": best["val_acc"] - uni["val_acc"] if best and uni else None})
    out["at"] = rows
    return out


def write_csv(path: Path, trials: Sequence[dict[str, Any]], layer_names: Sequence[str]) -> Path:
    """``pareto.csv``: one row per front point, by resource: trial, kind, resource, val acc, the policy."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial", "kind", "resource", "val_acc", *layer_names])
    for t in front(trials):
        w.writerow([t.get("trial"), t.get("kind", "search"), f"{t['resource']:.6f}", f"{t['val_acc']:.4f}",
                    *(f"{float(v):.6g}" for v in t["policy"])])
    atomic_write_text(path, buf.getvalue())
    return path


def plot(path: Path, trials: Sequence[dict[str, Any]], lo: float, hi: float, *, resource: str,
         picks: Sequence[float] = ()) -> Path:
    """``pareto.png``: every trial, the front's step, the uniform curve, and the picked resources."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ok = scored(trials)
    search = [t for t in ok if t.get("kind") != "uniform"]
    ax.scatter([t["resource"] for t in search], [t["val_acc"] for t in search], s=8, alpha=0.35, label="trials")
    f = front(trials)
    if f:
        xs = [t["resource"] for t in f] + [hi]
        ys = [t["val_acc"] for t in f] + [f[-1]["val_acc"]]
        ax.step(xs, ys, where="post", color="black", lw=1.2, label=f"front ({len(f)} points)")
    curve = uniform_curve(trials)
    if curve:
        ax.plot([r for r, _ in curve], [a for _, a in curve], "s--", color="tab:orange", ms=4, label="uniform")
    for r in picks:
        ax.axvline(r, color="tab:red", lw=0.8, ls=":")
    ax.set_xlim(lo - 0.02, hi + 0.02)
    if ok:
        top = max(t["val_acc"] for t in ok)
        ax.set_ylim(max(0.0, min(a for _, a in curve) - 5 if curve else top - 30), top + 1)
    ax.set_xlabel(f"{resource} kept (fraction of the baseline)")
    ax.set_ylabel("validation accuracy, reward split (%)")
    ax.set_title(f"Accuracy-{resource} front over [{lo:g}, {hi:g}]")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.savefig(path, dpi=110)
    return path


def _fmt(v: Any, fmt: str = ".2f") -> str:
    return "" if v is None else format(v, fmt)


def markdown(block: dict[str, Any], *, picks: Sequence[dict[str, Any]] = ()) -> list[str]:
    """The front's section of report.md."""
    lines = ["## Pareto front", "",
             f"- **Window:** resource in [{block['window'][0]:g}, {block['window'][1]:g}], {block['trials']} scored "
             f"trials, {block['front_size']} on the front",
             f"- **Hypervolume:** {block['hypervolume']:.3f} (reference: resource {block['window'][1]:g}, "
             f"accuracy 0), mean front accuracy over the window {block['front_mean_val_acc']:.2f}%"
             + (f" against {block['uniform_mean_val_acc']:.2f}% for the uniform curve"
                if "uniform_mean_val_acc" in block else ""), "",
             f"![Pareto front]({PARETO_PNG})", ""]
    if block["at"]:
        lines += ["| resource <= | front val acc | trial | uniform val acc | front - uniform |",
                  "|---:|---:|---:|---:|---:|"]
        for r in block["at"]:
            lines.append(f"| {r['resource']:g} | {_fmt(r['front_val_acc'])} | {_fmt(r['front_trial'], 'd')} | "
                         f"{_fmt(r['uniform_val_acc'])} | {_fmt(r['front_minus_uniform'], '+.2f')} |")
        lines.append("")
    if picks:
        lines += ["## Picked points", "", "| resource <= | trial | resource | val acc (search) | test acc | "
                  "folder |", "|---:|---:|---:|---:|---:|---|"]
        for p in picks:
            lines.append(f"| {p['pick']:g} | {p['trial']} | {p['resource']:.3f} | {p['val_acc']:.2f} | "
                         f"{p['test_acc']:.2f} | `{p['folder']}` |")
        lines.append("")
    return lines
