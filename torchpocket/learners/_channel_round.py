"""``--channel-round auto``: which channel counts are fast on this CPU, learned per layer by timing.

Convolution kernels process channels in blocks of the SIMD width (oneDNN's ``nChw16c`` with
AVX-512, MLAS's NCHWc blocks in ONNX Runtime), so a layer's latency is often a staircase in
its width: 17 channels cost what 32 cost. For every prunable group the probe times the layers
whose widths the group sets (fresh layers of the same geometry, with the norm / activation
right after them, on inputs of their real size) at every width the search can reach, or at
most :data:`MAX_WIDTHS` of them. A granule ``g`` is *justified* when, in every step between two of
its multiples, the wider end runs at most :data:`TOLERANCE` slower than the step's fast
widths: the widths in between buy no speed. Each group gets its largest
justified granule (1 where none is); the Budget then offers only its multiples (and the full
width), and the exact-cost promise is unchanged, since the cost model counts the rounded widths.

The plan is measured once per network, input, machine and options and kept under
``$TORCHPOCKET_CACHE/widths``: a resumed run, a second search worker on the same machine and a
later run read the same granules, so one policy always means one architecture there.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from torchpocket.learners._channel_cost import CostModel, keep_counts
from torchpocket.learners._channel_latency import _fresh_layer, _trace_layers, isotonic, time_cases
from torchpocket.utils import machine_description

GRANULES = (2, 4, 8, 16, 32)  # candidate granules, finest first
TOLERANCE = 0.05  # rounding up to a step's wider end may cost this much more time and still be free
MAX_WIDTHS = 48  # widths timed per group at most (a coarser step for wider layers)
VERSION = 1


@dataclass
class RoundingPlan:
    """Per group: the granule chosen and the measurement behind it."""

    granules: list[int]
    names: list[str]
    evidence: list[dict[str, Any]] = field(default_factory=list)  # per group: widths, ms, cost of each granule
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"version": VERSION, "granules": list(self.granules), "names": list(self.names),
                "evidence": self.evidence, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict[str, Any], names: Sequence[str]) -> RoundingPlan:
        if d.get("version") != VERSION or list(d.get("names", [])) != list(names):
            raise ValueError("the channel-rounding plan is for another model or version")
        granules = [int(g) for g in d["granules"]]
        if len(granules) != len(names) or any(g < 1 for g in granules):
            raise ValueError("the channel-rounding plan has bad granules")
        return cls(granules, list(names), list(d.get("evidence", [])), dict(d.get("meta", {})))

    def summary(self) -> dict[str, Any]:
        """For summary.json: the granule of every layer, and how the plan was made."""
        used = self.meta.get("used") or self.granules  # capped where the measured granules made the target unreachable
        return {"setting": "auto", "per_layer": dict(zip(self.names, used)),
                "measured": dict(zip(self.names, self.granules)), "capped_at": self.meta.get("capped_at"),
                "rounding_cost": {n: e.get("cost", {}) for n, e in zip(self.names, self.evidence)},
                **{k: self.meta[k] for k in ("batch", "threads", "runtime", "seconds", "timings", "loaded_from",
                                             "tolerance") if k in self.meta}}


def choose_granule(widths: Sequence[int], seconds: Sequence[float], full: int, low: int, *, step: int = 1,
                   granules: Sequence[int] = GRANULES, tolerance: float = TOLERANCE) -> tuple[int, dict[str, float]]:
    """The largest granule whose rounding up is free, and what rounding up costs at each granule.

    For a granule ``g``, every step of widths ``(m - g, m)`` (``m`` a multiple of ``g``, or
    ``full``) compares the time at ``m`` with the step's fast widths (its lower quartile, robust
    to one lucky timing); the granule's cost is its worst step's ratio, and it is free when that
    is at most ``1 + tolerance``. ``widths`` (sorted, the multiples of ``step`` from ``low`` to
    ``full``) were timed at ``seconds``; a granule must be a multiple of ``step`` larger than it,
    and must leave at least one width below ``full`` at or above ``low``.
    """
    t = dict(zip((int(w) for w in widths), (float(s) for s in seconds)))
    best, costs = 1, {}
    for g in granules:
        if g <= step or g % step:
            continue
        steps: dict[int, list[float]] = {}
        for w, sec in t.items():
            if w % g and w != full:
                steps.setdefault(min(-(-w // g) * g, full), []).append(sec)
        ratios = [t[up] / float(np.quantile(v, 0.25)) for up, v in steps.items() if up in t and min(v) > 0]
        if not ratios or not any(low <= m < full for m in range(g, full, g)):
            continue
        costs[str(g)] = max(ratios)
        if costs[str(g)] <= 1 + tolerance:
            best = g
    return best, costs


def _test_widths(low: int, full: int) -> tuple[list[int], int]:
    """Every width from ``low`` to ``full``, or the multiples of a power-of-two step when that is too many."""
    step = 1
    while (full - low) // step + 1 > MAX_WIDTHS:
        step *= 2
    ws = [w for w in range(low, full + 1) if w % step == 0]
    return sorted(set(ws) | {full}), step


def probe_rounding(model: nn.Module, example: Tensor, cost: CostModel, *, low: float, batch: int = 16,
                   repeats: int = 7, warmup: int = 2, device: torch.device | str = "cpu",
                   timer: Callable[[list[tuple[nn.Module, Tensor]]], list[float]] | None = None,
                   progress: Callable[[int, int], None] | None = None) -> RoundingPlan:
    """Time every prunable group's layers at its reachable widths and choose its granule (:func:`choose_granule`).

    ``timer`` replaces the wall-clock timing (tests): it gets ``(layer, input)`` cases and
    returns seconds per case. Groups of several classes (grouped convolutions) keep granule 1.
    """
    start = time.perf_counter()
    net = copy.deepcopy(model).to(device).eval()
    p = next(net.parameters(), None)
    dtype = p.dtype if p is not None else torch.float32
    trace = _trace_layers(net, example[:1].to(device=device, dtype=dtype))
    mods = dict(net.named_modules())
    full_counts = cost.class_size.copy()
    base_in, base_out = cost.widths(full_counts)
    low_counts = keep_counts(np.full(len(full_counts), low), cost.class_size, 1)
    gen = torch.Generator().manual_seed(0)
    memo: dict[tuple[Any, ...], float] = {}
    time_fn = timer or (lambda cases: time_cases(cases, warmup=warmup, repeats=repeats))
    names = [g.name for g in cost.info.groups]
    granules, evidence, timings = [], [], 0
    for gi in range(len(names)):
        if progress is not None and gi:
            progress(gi, len(names))
        classes = np.flatnonzero(cost.class_group == gi)
        full = int(cost.class_size[classes[0]]) if len(classes) else 0
        if len(classes) != 1 or full < 4:
            granules.append(1)
            evidence.append({"why": "several classes (grouped)" if len(classes) != 1 else "narrower than 4"})
            continue
        q = int(classes[0])
        widths, step = _test_widths(int(low_counts[q]), full)
        items = cost.cnt[:, q] > 0
        touched = [k for k in np.flatnonzero(cost.m_in[:, items].any(1) | cost.m_out[:, items].any(1))
                   if cost.types[k] in ("conv", "dwconv", "linear") and cost.names[k] in trace]
        plan: dict[int, list[tuple[tuple[Any, ...], int]]] = {}
        cases: dict[tuple[Any, ...], tuple[nn.Module, Tensor]] = {}
        for w in widths:
            counts = full_counts.copy()
            counts[q] = w
            cin, cout = cost.widths(counts)
            parts = []
            for k in touched:
                name, kind = cost.names[k], cost.types[k]
                in_shape, calls, extras = trace[name]
                src = mods[name]
                ci, co = int(cin[k]), int(cout[k])
                geom = (kind, tuple(in_shape[1:]), getattr(src, "kernel_size", None), getattr(src, "stride", None),
                        getattr(src, "padding", None), getattr(src, "groups", 1), src.bias is not None,
                        tuple(type(e).__name__ for e in extras), ci, co)
                if geom not in memo and geom not in cases:
                    layer = _fresh_layer(src, kind, ci, co, extras)
                    if kind == "linear":
                        shape = (batch, *in_shape[:-1], ci)
                    else:
                        shape = (batch, co if kind == "dwconv" else ci, *in_shape[1:])
                    cases[geom] = (layer, torch.randn(shape, generator=gen).to(device=device, dtype=dtype))
                parts.append((geom, calls))
            plan[w] = parts
        if cases:
            keys = list(cases)
            for key, sec in zip(keys, time_fn([cases[k] for k in keys])):
                memo[key] = float(sec)
            timings += len(keys)
        secs = [sum(calls * memo[geom] for geom, calls in plan[w]) for w in widths]
        if not any(plan[w] for w in widths):
            granules.append(1)
            evidence.append({"why": "no timed layer"})
            continue
        secs = list(isotonic(np.asarray(secs)))  # latency does not fall as a layer widens: a slow outlier is pooled
        gran, costs = choose_granule(widths, secs, full, int(low_counts[q]), step=step)
        granules.append(gran)
        evidence.append({"widths": widths, "ms": [round(1e3 * s, 4) for s in secs], "cost": costs})
    if progress is not None and names:
        progress(len(names), len(names))
    meta = {"batch": batch, "threads": torch.get_num_threads(), "runtime": "eager", "repeats": repeats,
            "tolerance": TOLERANCE, "timings": timings, "seconds": round(time.perf_counter() - start, 2)}
    return RoundingPlan(granules, names, evidence, meta)


def plan_key(model: nn.Module, input_shape: Sequence[int], cost: CostModel, **options: Any) -> str:
    """What a plan depends on: network, input, machine (threads included) and the probe's options."""
    key = {"model": str(model), "input": list(input_shape)[1:], "machine": machine_description(),
           "groups": [[g.name, g.units, [len(k) for k in g.classes]] for g in cost.info.groups],
           "version": VERSION, **options}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cache_root() -> Path:
    return Path(os.environ.get("TORCHPOCKET_CACHE", Path.home() / ".cache" / "torchpocket")) / "widths"


def load_or_probe(path: Path | None, names: Sequence[str], probe: Callable[[], RoundingPlan]) -> RoundingPlan:
    """The plan kept at ``path``; else a new one, kept there unless another process kept one first (that one wins,
    so processes sharing the cache agree)."""
    if path is not None and path.is_file():
        try:
            plan = RoundingPlan.from_dict(json.loads(path.read_text()), names)
            plan.meta["loaded_from"] = str(path)
            return plan
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            pass  # a damaged or foreign file: measure again and replace it
    plan = probe()
    if path is None:
        return plan
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(plan.to_dict(), f)
    try:
        os.link(tmp, path)  # fails when another process kept its plan first
    except FileExistsError:
        try:
            other = RoundingPlan.from_dict(json.loads(path.read_text()), names)
            other.meta["loaded_from"] = str(path)
            return other
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            os.replace(tmp, path)
            return plan
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return plan
