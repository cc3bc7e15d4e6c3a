"""The run's report: ``report.md`` (and the same as one self-contained ``report.html``) with a summary
table, the best policy and three plots (four when the search probed each layer alone: the layer
sensitivity chart).

Plots use matplotlib's object API (``Figure`` + the Agg canvas), imported inside the functions: no
``pyplot`` global state, no display needed, and importing torchpocket does not import matplotlib.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torchpocket.report_html import write_html
from torchpocket.utils import atomic_write_text

REWARD_PNG = "reward.png"
POLICY_PNG = "policy.png"
TRADEOFF_PNG = "tradeoff.png"
SENSITIVITY_PNG = "sensitivity.png"


def _new_figure(width: float = 6.4, height: float = 4.0) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _ok(t: dict[str, Any]) -> bool:
    return t.get("status", "ok") == "ok" and _finite(t.get("reward"))


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _best_trial(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    ok = [t for t in trials if _ok(t) and t.get("kind") != "probe"]  # probes break the budget: never the best
    return max(ok, key=lambda t: t["reward"]) if ok else None


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-3):
            return f"{v:.4g}"
        return f"{v:.4f}".rstrip("0").rstrip(".") if abs(v) < 1000 else f"{v:,.1f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _plot_rewards(trials: list[dict[str, Any]], path: Path) -> None:
    fig = _new_figure()
    ax = fig.add_subplot()
    probes = [t for t in trials if _ok(t) and t.get("kind") == "probe"]
    ok = [t for t in trials if _ok(t) and t.get("kind") != "probe"]
    failed = [t for t in trials if not _ok(t)]
    if probes:
        ax.plot([t["trial"] for t in probes], [t["reward"] for t in probes], "s", ms=3, color="tab:gray",
                alpha=0.6, label=f"probes ({len(probes)}, outside the budget)")
    for opt in dict.fromkeys(str(t.get("optimizer", "")) for t in ok):
        pts = [t for t in ok if str(t.get("optimizer", "")) == opt]
        ax.plot([t["trial"] for t in pts], [t["reward"] for t in pts], "o", ms=4, alpha=0.7, label=opt or "trial")
    if ok:
        xs, best, cur = [], [], -math.inf
        for t in sorted(ok, key=lambda t: t["trial"]):
            cur = max(cur, t["reward"])
            xs.append(t["trial"])
            best.append(cur)
        ax.step(xs, best, where="post", color="black", lw=1.5, label="best so far")
    if failed:
        # a failed trial has no meaningful reward: mark it at the bottom of the plotted range
        y0 = min((t["reward"] for t in ok), default=0.0)
        ax.plot([t.get("trial", i) for i, t in enumerate(failed)], [y0] * len(failed), "x", color="tab:red", ms=7,
                label=f"failed ({len(failed)})")
    if not trials:
        ax.text(0.5, 0.5, "no trials", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("trial")
    ax.set_ylabel("reward")
    ax.set_title("Reward per trial")
    ax.grid(alpha=0.3)
    if trials:
        ax.legend(fontsize="small")
    fig.savefig(path)


def _plot_policy(layer_names: list[str], best: list[float], uniform: list[float] | None, path: Path) -> None:
    n = len(layer_names)
    fig = _new_figure(width=min(max(6.4, 0.28 * n + 2.0), 30.0), height=4.5)
    ax = fig.add_subplot()
    xs = list(range(n))
    if uniform is not None:
        w = 0.4
        ax.bar([x - w / 2 for x in xs], best, width=w, label="best policy")
        ax.bar([x + w / 2 for x in xs], uniform, width=w, label="uniform policy", color="tab:gray", alpha=0.7)
        ax.legend(fontsize="small")
    else:
        ax.bar(xs, best, width=0.7, label="best policy")
    ax.set_xticks(xs)
    ax.set_xticklabels(layer_names, rotation=90, fontsize=7)
    ax.set_ylabel("value per layer")
    ax.set_title("Chosen per-layer policy")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path)


def _plot_tradeoff(trials: list[dict[str, Any]], path: Path) -> None:
    fig = _new_figure()
    ax = fig.add_subplot()
    pts = [t for t in trials if _ok(t) and _finite(t.get("resource")) and _finite(t.get("val_acc"))]
    if pts:
        ax.scatter([t["resource"] for t in pts], [t["val_acc"] for t in pts], s=14, alpha=0.6, label="trials")
        best = _best_trial(pts)
        assert best is not None
        ax.scatter([best["resource"]], [best["val_acc"]], s=160, marker="*", color="tab:red", zorder=3,
                   label=f"best (trial {best.get('trial')})")
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no successful trials", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("resource fraction kept")
    ax.set_ylabel("validation accuracy")
    ax.set_title("Resource vs validation accuracy")
    ax.grid(alpha=0.3)
    fig.savefig(path)


def sensitivity_curves(trials: list[dict[str, Any]], layer_names: list[str]) -> dict[str, list[list[float]]]:
    """Per layer, ``[value, val_acc]`` of the probes that compressed that layer alone, sorted by value.

    The unpruned probe (the elementwise maximum of the probes' policies) is each curve's last point."""
    probes = [t for t in trials if t.get("kind") == "probe" and _ok(t) and _finite(t.get("val_acc"))]
    if not probes:
        return {}
    top = [max(float(t["policy"][i]) for t in probes) for i in range(len(layer_names))]
    full = next((t for t in probes if [float(v) for v in t["policy"]] == top), None)
    curves: dict[str, list[list[float]]] = {}
    for t in probes:
        diff = [i for i, v in enumerate(t["policy"]) if float(v) != top[i]]
        if len(diff) == 1:
            curves.setdefault(layer_names[diff[0]], []).append([float(t["policy"][diff[0]]), float(t["val_acc"])])
    for i, name in enumerate(layer_names):
        if name in curves and full is not None:
            curves[name].append([top[i], float(full["val_acc"])])
        if name in curves:
            curves[name].sort()
    return curves


def _plot_sensitivity(curves: dict[str, list[list[float]]], path: Path) -> None:
    fig = _new_figure(width=7.5, height=4.5)
    ax = fig.add_subplot()
    cmap = __import__("matplotlib").colormaps["viridis"]
    for k, (name, pts) in enumerate(curves.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, lw=1.2,
                color=cmap(k / max(len(curves) - 1, 1)), label=name)
    ax.set_xlabel("value of the layer alone (the others uncompressed)")
    ax.set_ylabel("validation accuracy (reward split)")
    ax.set_title("Layer sensitivity")
    ax.grid(alpha=0.3)
    if len(curves) <= 24:
        ax.legend(fontsize=6, ncol=2)
    fig.savefig(path)


def _summary_tables(summary: dict[str, Any]) -> list[str]:
    base = summary.get("baseline") or {}
    comp = summary.get("compressed") or {}
    lines: list[str] = []
    if base or comp:
        lines += ["| metric | baseline | compressed | compressed / baseline |", "|---|---:|---:|---:|"]
        for key in dict.fromkeys([*base, *comp]):
            b, c = base.get(key), comp.get(key)
            ratio = f"{c / b:.3f}" if _finite(b) and _finite(c) and b != 0 else ""
            lines.append(f"| {key} | {_fmt(b) if key in base else ''} | {_fmt(c) if key in comp else ''} "
                         f"| {ratio} |")
        lines.append("")
    scalars = {k: v for k, v in summary.items()
               if k not in ("baseline", "compressed") and (v is None or isinstance(v, (str, int, float, bool)))}
    if scalars:
        lines += ["| | value |", "|---|---:|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in scalars.items()]
        lines.append("")
    return lines


def write_report(run_dir: Path, *, trials: list[dict[str, Any]], summary: dict[str, Any], layer_names: list[str],
                 best_policy: list[float], uniform_policy: list[float] | None, title: str) -> Path:
    """Write ``run_dir/report.md``, its PNGs (reward per trial, per-layer policy, resource vs accuracy) and
    ``report.html`` (the same page, self-contained).

    ``trials`` are the pipeline's trial records (``trial``, ``optimizer``, ``policy``, ``resource``,
    ``val_acc``, ``reward``, ``seconds``, ``status``, ``reason``); a trial whose ``status`` is not ``ok``
    is drawn as a red x and left out of the best-so-far line. ``summary["baseline"]`` and
    ``summary["compressed"]`` become one comparison table (whatever keys they hold), other top-level
    scalars a second one. Returns the path of ``report.md``.
    """
    if len(best_policy) != len(layer_names):
        raise ValueError(f"best_policy has {len(best_policy)} values for {len(layer_names)} layers")
    if uniform_policy is not None and len(uniform_policy) != len(layer_names):
        raise ValueError(f"uniform_policy has {len(uniform_policy)} values for {len(layer_names)} layers")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _plot_rewards(trials, run_dir / REWARD_PNG)
    _plot_policy(layer_names, best_policy, uniform_policy, run_dir / POLICY_PNG)
    _plot_tradeoff(trials, run_dir / TRADEOFF_PNG)

    failed = [t for t in trials if t.get("status", "ok") != "ok"]
    best = _best_trial(trials)
    lines = [f"# {title}", ""]
    lines += _summary_tables(summary)
    n_probe = sum(t.get("kind") == "probe" for t in trials)
    lines.append(f"- **Trials:** {len(trials)} ({len(failed)} failed" + (f", {n_probe} probes" if n_probe else "")
                 + ")")
    uni = next((t for t in trials if t.get("kind") == "uniform" and _ok(t)), None)
    if uni is not None and best is not None:
        lines.append(f"- **Uniform policy (trial {uni.get('trial')}):** val acc {_fmt(uni.get('val_acc'))}; the best "
                     f"is {best['val_acc'] - uni['val_acc']:+.2f} points above it")
    if best is not None:
        lines.append(f"- **Best reward:** {best['reward']:.4f} (trial {best.get('trial')}, "
                     f"optimizer {best.get('optimizer', '?')}, resource {_fmt(best.get('resource'))}, "
                     f"val acc {_fmt(best.get('val_acc'))})")
    lines.append("")
    lines += [f"![reward per trial]({REWARD_PNG})", "", f"![resource vs accuracy]({TRADEOFF_PNG})", ""]
    curves = sensitivity_curves(trials, layer_names)
    if curves:
        _plot_sensitivity(curves, run_dir / SENSITIVITY_PNG)
        n_probe = sum(t.get("kind") == "probe" for t in trials)
        lines += ["## Layer sensitivity", "", f"Each layer compressed alone, the others untouched ({n_probe} probes, "
                  "scored on the reward split; outside the budget, never chosen).", "",
                  f"![layer sensitivity]({SENSITIVITY_PNG})", "",
                  "| layer | value: val acc |", "|---|---|"]
        lines += [f"| {name} | " + ", ".join(f"{v:g}: {a:.2f}" for v, a in pts) + " |" for name, pts in curves.items()]
        lines.append("")
    lines += ["## Best policy per layer", "", f"![per-layer policy]({POLICY_PNG})", ""]
    header = "| # | layer | best |" + (" uniform |" if uniform_policy is not None else "")
    lines += [header, "|---:|---|---:|" + ("---:|" if uniform_policy is not None else "")]
    for i, (name, v) in enumerate(zip(layer_names, best_policy)):
        row = f"| {i} | {name} | {_fmt(float(v))} |"
        if uniform_policy is not None:
            row += f" {_fmt(float(uniform_policy[i]))} |"
        lines.append(row)
    if failed:
        lines += ["", "## Failed trials", "", "| trial | reason |", "|---:|---|"]
        lines += [f"| {t.get('trial', '?')} | {_fmt(str(t.get('reason', ''))[:200])} |" for t in failed]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    write_html(path)
    return path


def plot_ablation(rows: list[dict[str, Any]], path: Path, *, x: str, y: str, hue: str) -> Path:
    """Grouped error-bar plot: one line per ``hue`` value, ``y`` against ``x`` with ``y + "_std"`` error bars.

    ``x`` may be numeric or categorical (categories keep their first-seen order). Rows without ``y`` are
    skipped; a missing ``_std`` column means no error bar. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [r for r in rows if _finite(r.get(y))]
    xs_all = list(dict.fromkeys(r.get(x) for r in rows))
    numeric = all(_finite(v) for v in xs_all)
    pos = {v: (float(v) if numeric else i) for i, v in enumerate(xs_all)}
    hues = list(dict.fromkeys(str(r.get(hue)) for r in rows))
    # categorical x: shift the groups apart so their error bars do not overlap
    width = 0.6 / max(len(hues), 1)
    fig = _new_figure()
    ax = fig.add_subplot()
    for j, h in enumerate(hues):
        group = sorted((r for r in rows if str(r.get(hue)) == h), key=lambda r: pos[r.get(x)])
        offset = 0.0 if numeric else (j - (len(hues) - 1) / 2) * width
        std: Sequence[float] = [float(r.get(f"{y}_std") or 0.0) for r in group]
        ax.errorbar([pos[r.get(x)] + offset for r in group], [float(r[y]) for r in group], yerr=std, fmt="o-",
                    capsize=3, label=h)
    if not numeric:
        ax.set_xticks(list(range(len(xs_all))))
        ax.set_xticklabels([str(v) for v in xs_all])
    if not rows:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
    if hues:
        ax.legend(title=hue, fontsize="small")
    fig.savefig(path)
    return path
