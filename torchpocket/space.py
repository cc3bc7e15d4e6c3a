"""The neutral ground of learners and optimizers: the search space every optimizer sees, and the Budget
every proposal passes through (neither family imports the other; both import this module).

A learner describes its compressible layers (:class:`LayerSpec`, AMC's static
layer features plus action bounds) and supplies a cost function over whole
policies (FLOPs, parameters, weight bits, predicted latency...). The
:class:`Budget` clips any policy to the bounds and projects it onto the target,
so every optimizer's candidates meet the same constraint and ablations compare
like with like.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from torchpocket.errors import UserError

Policy = list[float]

KINDS = ("conv", "dwconv", "linear")


@dataclass(frozen=True)
class LayerSpec:
    """One compressible layer: AMC's static features and the bounds of its action."""

    name: str
    kind: str  # conv | dwconv | linear
    in_channels: int
    out_channels: int
    stride: int
    kernel: int
    params: int
    flops: int
    low: float = 0.2
    high: float = 1.0
    step: float = 0.0  # 0: continuous action; >0: actions are multiples of step (bit-widths: 1)

    @classmethod
    def from_module(cls, name: str, module: Any, *, flops: int = 0, low: float, high: float,
                    step: float = 0.0) -> LayerSpec:
        """The spec of one ``nn.Conv2d`` / ``nn.Linear`` (read by attribute: this module imports no torch)."""
        conv = hasattr(module, "kernel_size")
        if conv:
            cin, cout, stride, kernel = module.in_channels, module.out_channels, module.stride[0], module.kernel_size[0]
            kind = "dwconv" if module.groups > 1 and module.groups == module.in_channels else "conv"
        else:
            cin, cout, stride, kernel, kind = module.in_features, module.out_features, 1, 1, "linear"
        return cls(name=name, kind=kind, in_channels=int(cin), out_channels=int(cout), stride=int(stride),
                   kernel=int(kernel), params=int(module.weight.numel()), flops=int(flops), low=float(low),
                   high=float(high), step=float(step))


class Budget:
    """Knows the resource of any policy and keeps proposals at (or under) ``target`` of ``full``.

    ``cost_fn(policy)`` must be non-decreasing in every coordinate. With
    ``fill=True`` (the resource-constrained protocol) :meth:`project` also raises a
    policy that is under the target until it is as close below it as the
    layers' granularity allows; with ``fill=False`` (accuracy-guaranteed rewards)
    it only lowers policies that are over.
    """

    def __init__(
        self,
        *,
        cost_fn: Callable[[Sequence[float]], float],
        full: float,
        target: float,
        lows: Sequence[float],
        highs: Sequence[float],
        steps: Sequence[float] | None = None,
        layer_cost_fn: Callable[[Sequence[float]], Sequence[float]] | None = None,
        fill: bool = True,
        unit: str = "flops",
        uniform_path: Callable[[float], Sequence[float]] | None = None,
        inert: Sequence[bool] | None = None,
    ) -> None:
        self.cost_fn, self.full, self.target = cost_fn, float(full), float(target)
        # what "uniform" means when the values are of different kinds (a composite's ratios and bits): t in
        # [0, 1] -> a policy, non-decreasing in t; default: one value for every layer
        self.uniform_path = uniform_path
        # values the cost does not depend on (a composite's weight bits under an int8 latency table): projection
        # leaves them where the optimizer put them instead of lowering them for nothing
        self.inert = np.zeros(len(lows), bool) if inert is None else np.asarray(inert, bool)
        self.lows, self.highs = np.asarray(lows, float), np.asarray(highs, float)
        self.steps = np.zeros(len(self.lows)) if steps is None else np.asarray(steps, float)
        self.layer_cost_fn, self.fill, self.unit = layer_cost_fn, fill, unit
        self.limit = self.target * self.full
        self.floor: float | None = None  # a Pareto window's lower end (a fraction of full), see :meth:`window`
        floor = self.cost(list(self.lows))
        if floor > self.limit * (1 + 1e-9):
            raise UserError(
                f"target {self.target:g} is unreachable: with every layer at its lower bound the model keeps "
                f"{floor / self.full:.3f} of its {unit}; raise --target or lower the layer bounds"
            )

    @classmethod
    def from_layers(cls, layers: Sequence[LayerSpec], layer_cost_fn: Callable[[Sequence[float]], Sequence[float]], *,
                    full: float, target: float, fixed: float = 0.0, fill: bool = True, unit: str = "flops") -> Budget:
        """A Budget whose cost is ``fixed`` plus the sum of per-layer costs, bounds and steps from ``layers``."""
        return cls(cost_fn=lambda p: fixed + float(sum(layer_cost_fn(p))), full=full, target=target,
                   lows=[lay.low for lay in layers], highs=[lay.high for lay in layers],
                   steps=[lay.step for lay in layers], layer_cost_fn=layer_cost_fn, fill=fill, unit=unit)

    # -- evaluation -------------------------------------------------------------------------
    def cost(self, policy: Sequence[float]) -> float:
        return float(self.cost_fn(list(policy)))

    def fraction(self, policy: Sequence[float]) -> float:
        return self.cost(policy) / self.full

    def satisfied(self, policy: Sequence[float], limit: float | None = None) -> bool:
        return self.cost(policy) <= (self.limit if limit is None else limit) * (1 + 1e-9)

    # -- Pareto window ------------------------------------------------------------------------
    def window(self, low: float) -> None:
        """Multi-objective search over ``[low, target]``: :meth:`project` keeps a policy whose resource is inside
        the window as it is, lowers one above it to just under ``target`` and raises one below it to ``low``."""
        if not 0 < low < self.target:
            raise UserError(f"the Pareto window's low end must be in (0, {self.target:g}), got {low:g}")
        self.floor = float(low)

    def retarget(self, target: float) -> Budget:
        """A copy of this Budget at another ``target`` (no window, filling up to it), raised to the narrowest
        policy's resource where ``target`` is under it: one point of a Pareto window, searched on its own."""
        floor = self.fraction(list(self.lows))
        return Budget(cost_fn=self.cost_fn, full=self.full, target=max(float(target), floor), lows=self.lows,
                      highs=self.highs, steps=self.steps, layer_cost_fn=self.layer_cost_fn, fill=True, unit=self.unit,
                      uniform_path=self.uniform_path, inert=self.inert)

    def points(self, step: float = 0.1) -> list[float]:
        """The resources the uniform policy is measured at: the target alone, or across a Pareto window (its
        ends and every multiple of ``step`` between them)."""
        return [self.target] if self.floor is None else window_points(self.floor, self.target, step)

    def layer_costs(self, policy: Sequence[float]) -> list[float]:
        if self.layer_cost_fn is None:
            raise NotImplementedError("this budget has no per-layer cost breakdown")
        return [float(c) for c in self.layer_cost_fn(list(policy))]

    # -- projection ---------------------------------------------------------------------------
    def clip(self, policy: Sequence[float]) -> np.ndarray:
        p = np.clip(np.asarray(policy, float), self.lows, self.highs)
        return self._round(p)

    def _round(self, p: np.ndarray) -> np.ndarray:
        s = self.steps
        if np.any(s > 0):
            q = np.where(s > 0, np.floor(p / np.where(s > 0, s, 1) + 0.5 + 1e-9) * np.where(s > 0, s, 1), p)
            p = np.clip(q, self.lows, self.highs)
        return p

    def _shape(self, p: np.ndarray, s: float) -> np.ndarray:
        """Monotone family through p: s=0 -> lows, s=1 -> p, s=2 -> highs (inert values stay at p)."""
        if s <= 1:
            q = self.lows + s * (p - self.lows)
        else:
            q = p + (s - 1) * (self.highs - p)
        return self._round(np.where(self.inert, p, q))

    def project(self, policy: Sequence[float], *, iters: int = 50) -> Policy:
        """Clip to bounds, then move the policy along a monotone path until it meets the target.

        The relative shape of the policy is kept: over-target policies shrink toward
        the lower bounds, under-target ones (with ``fill``) grow toward the upper bounds.
        """
        p = self.clip(policy)
        over = not self.satisfied(p)
        if not over and self.floor is not None:
            return self._raise_to(p, self.floor * self.full, iters)
        if not over and not self.fill:
            return [float(v) for v in p]
        lo, hi = (0.0, 1.0) if over else (1.0, 2.0)
        if not over and self.satisfied(self._shape(p, 2.0)):
            return [float(v) for v in self._shape(p, 2.0)]
        for _ in range(iters):  # invariant: shape(lo) satisfies, shape(hi) does not
            mid = 0.5 * (lo + hi)
            if self.satisfied(self._shape(p, mid)):
                lo = mid
            else:
                hi = mid
        return [float(v) for v in self._shape(p, lo)]

    def _raise_to(self, p: np.ndarray, floor: float, iters: int) -> Policy:
        """``p`` (within the target) raised along the monotone path until its cost reaches ``floor``."""
        if self.cost(p) >= floor:
            return [float(v) for v in p]
        top = self._shape(p, 2.0)
        if self.cost(top) < floor:  # the window's low end is out of reach (the upper bounds keep less): as high
            return [float(v) for v in top]  # as it goes
        lo, hi = 1.0, 2.0  # invariant: shape(lo) under the floor, shape(hi) at or over it
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if self.cost(self._shape(p, mid)) >= floor else (mid, hi)
        q = self._shape(p, hi)
        return [float(v) for v in (q if self.satisfied(q) else self._shape(p, lo))]

    def max_action(self, prefix: Sequence[float], index: int, *, iters: int = 40) -> float:
        """AMC's action wall: the largest action for layer ``index`` such that, with the
        layers before it at ``prefix`` and every later layer at its lower bound, the
        target can still be met."""
        n = len(self.lows)
        base = list(prefix[:index]) + [0.0] + list(self.lows[index + 1 :])

        def ok(a: float) -> bool:
            base[index] = a
            return self.satisfied(self._round(np.asarray(base, float)))

        lo, hi = float(self.lows[index]), float(self.highs[index])
        if ok(hi):
            return hi
        if not ok(lo):
            return lo
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if ok(mid) else (lo, mid)
        assert len(base) == n
        return lo

    def _uniform_at(self, v: float) -> np.ndarray:
        """The uniform policy at value ``v`` (a point of ``uniform_path``, or ``v`` for every layer), clipped."""
        if self.uniform_path is not None:
            return self.clip(np.asarray(self.uniform_path(v), float))
        return self.clip(np.full(len(self.lows), v))

    def _uniform_range(self) -> tuple[float, float]:
        """The values :meth:`_uniform_at` takes: [0, 1] along a path, else the layers' bounds."""
        return (0.0, 1.0) if self.uniform_path is not None else (float(self.lows.min()), float(self.highs.max()))

    def uniform(self, *, fraction: float | None = None, iters: int = 60) -> Policy:
        """One value for every layer (each clipped to its own bounds) that meets the target (or keeps at most
        ``fraction`` of the resource): the classic baseline. With a ``uniform_path``, the policy furthest along it.

        The largest such value (with ``fill``; without, the upper bounds when they already meet the target).
        A layer whose bounds exclude the value sits at its nearest bound.
        """
        limit = self.limit if fraction is None else min(fraction * self.full, self.limit)
        at = self._uniform_at
        lo, hi = self._uniform_range()
        if self.satisfied(at(hi), limit):
            return [float(x) for x in at(hi)]
        for _ in range(iters):  # invariant: at(lo) satisfies (the lower bounds do), at(hi) does not
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if self.satisfied(at(mid), limit) else (lo, mid)
        return [float(x) for x in at(lo)]

    def uniform_curve(self) -> list[Policy]:
        """The uniform policy at each of :meth:`points` (one policy without a Pareto window). Where the layers'
        granularity puts one under the window's low end, the narrowest uniform policy at or over it instead, so
        every seed is inside the window."""
        out = [self.uniform(fraction=r) for r in self.points()]
        if self.floor is not None:
            up = None
            for k, u in enumerate(out):
                if self.fraction(u) < self.floor * (1 - 1e-9):
                    up = up or self._uniform_over(self.floor * self.full)
                    out[k] = list(up) if up is not None else u
        return out

    def _uniform_over(self, cost: float, iters: int = 60) -> Policy | None:
        """The uniform policy with the least resource at or over ``cost`` that still meets the target."""
        at = self._uniform_at
        lo, hi = self._uniform_range()
        if self.cost(at(hi)) < cost:
            return None
        for _ in range(iters):  # invariant: at(hi) costs at least ``cost``
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if self.cost(at(mid)) >= cost else (mid, hi)
        p = at(hi)
        return [float(x) for x in p] if self.satisfied(p) else None


def window_points(lo: float, hi: float, step: float = 0.1) -> list[float]:
    """The ends of ``[lo, hi]`` and every multiple of ``step`` between them: where a Pareto search measures the
    uniform policy."""
    grid = np.arange(math.ceil(lo / step - 1e-9) * step, hi + 1e-9, step)
    return sorted({round(float(v), 6) for v in [lo, *grid, hi] if lo - 1e-9 <= v <= hi + 1e-9})


@dataclass
class SearchSpace:
    """The compressible layers in order, and the Budget shared by every optimizer."""

    layers: list[LayerSpec]
    budget: Budget
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def names(self) -> list[str]:
        return [lay.name for lay in self.layers]

    @property
    def lows(self) -> np.ndarray:
        return np.array([lay.low for lay in self.layers], float)

    @property
    def highs(self) -> np.ndarray:
        return np.array([lay.high for lay in self.layers], float)

    def static_features(self) -> np.ndarray:
        """AMC's static layer embedding: index, type, in/out channels, stride, kernel, log params."""
        rows = [
            [i, KINDS.index(lay.kind) if lay.kind in KINDS else len(KINDS), lay.in_channels, lay.out_channels,
             lay.stride, lay.kernel, math.log1p(lay.params)]
            for i, lay in enumerate(self.layers)
        ]
        return np.asarray(rows, float)

    def to_dict(self, policy: Sequence[float]) -> dict[str, float]:
        return {lay.name: float(v) for lay, v in zip(self.layers, policy, strict=True)}

    def from_dict(self, values: dict[str, float]) -> Policy:
        missing = [n for n in self.names if n not in values]
        extra = [n for n in values if n not in self.names]
        if missing or extra:
            raise UserError(
                f"policy does not match this model's compressible layers: missing {missing[:5]}, unknown {extra[:5]}"
            )
        return [float(values[n]) for n in self.names]
