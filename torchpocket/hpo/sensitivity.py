"""``sensitivity``: probe each layer alone, allocate the budget by its accuracy curves, then refine locally.

The family of NetAdapt, AIMET's greedy compression-ratio selection, HAWQ-V3's
integer programme and Sony MCT's mixed-precision allocation, for any learner
(preserve ratios, densities, bit-widths):

1. **Uniform:** the first trial is the uniform policy (so the search never
   ends below it).
2. **Probe:** the unpruned policy (every layer at its upper bound), then each
   layer alone at ``points`` values from its lower bound up, the others at their
   upper bound. Probes break the budget: the pipeline scores and logs them, and
   never chooses one as the result. They give one reward curve per layer.
3. **Allocate:** the reward of a policy is modelled as the unpruned reward minus
   the sum of the layers' drops (each curve interpolated linearly between its
   probes and made monotone; with a single probe per layer, a quadratic through
   it). When
   the Budget's cost is separable over layers (checked numerically), the
   allocation over a grid of ``grid`` values per layer is an exact integer
   programme (``scipy.optimize.milp``); otherwise a Lagrangian relaxation with
   the costs re-linearised around the current solution. The result is projected
   onto the Budget like every optimizer's proposal.
4. **Refine:** the remaining trials are a (1+1) evolution strategy around the
   best policy so far (Gaussian steps of ``sigma`` times each layer's range,
   projected; the step grows after a success and shrinks after a failure).

Under ``--pareto LO:HI`` the same probes serve the whole front: the allocation
is solved at every ``PARETO_STEP`` of the window (each its own trial, at or just
below that resource), and the refinement cycles over those points, each step
projected back to its point's resource and counted a success when it beats the
best trial at or below that resource.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from torchpocket.hpo import register_hpo
from torchpocket.hpo.base import Optimizer
from torchpocket.options import opt
from torchpocket.space import Budget, Policy, SearchSpace, window_points


@dataclass
class SensitivityConfig:
    """The sensitivity-allocation optimizer (section ``sensitivity``)."""

    points: int = opt(-1, "values probed per layer, each layer alone (-1 = as many as fit in 40% of the trials, "
                          "1 to 6)", flag="--sens-points")
    grid: int = opt(33, "values per layer the allocation chooses from (curves interpolated between probes)",
                    flag="--sens-grid")
    sigma: float = opt(0.05, "first step of the local search, as a fraction of each layer's range",
                       flag="--sens-sigma")



_PROBE_SHARE = 0.4
_MAX_POINTS = 6
PARETO_STEP = 0.05  # the allocation's resources across a Pareto window


def probe_points(total_trials: int, n_free: int) -> int:
    """Probes per layer: as many as fit in 40% of the search (after the uniform and unpruned trials), 1 to 6."""
    if total_trials <= 0:
        return 4
    return int(max(1, min(_MAX_POINTS, (_PROBE_SHARE * total_trials - 2) // max(n_free, 1))))


@register_hpo("sensitivity")
class SensitivityOptimizer(Optimizer):
    """Per-layer sensitivity probes, then an exact (integer programme) or Lagrangian allocation, then local search"""

    parallel: ClassVar[bool] = False
    seeds_uniform: ClassVar[bool] = True
    pareto: ClassVar[bool] = True  # one set of probes, the allocation at every point of the window
    Config: ClassVar[type] = SensitivityConfig
    section: ClassVar[str] = "sensitivity"

    def __init__(self, space: SearchSpace, **kw: Any) -> None:
        super().__init__(space, **kw)
        self.budget = space.budget
        self.lows, self.highs = space.lows, space.highs
        self.free = [i for i in range(len(space)) if self.highs[i] > self.lows[i]]
        k = self.config.points if self.config.points > 0 else probe_points(self.total_trials, len(self.free))
        self.queue: list[dict[str, Any]] = [{"kind": "probe", "layer": -1, "value": None}]  # unpruned first
        for i in self.free:
            for v in self._probe_values(i, k):
                self.queue.append({"kind": "probe", "layer": i, "value": v})
        self.asked = 0  # asks handed out, the uniform one included
        self.pending: list[tuple[Policy, dict[str, Any]]] = []
        self.curves: dict[int, dict[float, float]] = {i: {} for i in self.free}
        self.full_reward: float | None = None
        self.scored: list[tuple[Policy, float]] = []  # non-probe trials: what best() chooses from
        self.rng = np.random.default_rng(self.seed)
        self.allocated = False
        self._separable: bool | None = None
        # the resources allocated at: the target, or every PARETO_STEP of a Pareto window
        b = self.budget
        self.targets = [b.target] if b.floor is None else window_points(b.floor, b.target, PARETO_STEP)
        self.n_allocated = 0  # allocation trials asked (one per target)
        self.sigmas = [float(self.config.sigma)] * len(self.targets)
        self.turn = 0  # the target the next refinement step works at
        self._at: dict[int, Budget] = {}

    # -- probes ----------------------------------------------------------------------------------
    def _probe_values(self, i: int, k: int) -> list[float]:
        lo, hi = float(self.lows[i]), float(self.highs[i])
        vals = [lo + (hi - lo) * j / k for j in range(k)]
        rounded = [float(self.budget.clip(self._alone(i, v))[i]) for v in vals]
        return sorted({v for v in rounded if v < hi})

    def _alone(self, i: int, v: float | None) -> list[float]:
        p = [float(h) for h in self.highs]
        if i >= 0 and v is not None:
            p[i] = float(v)
        return p

    # -- ask / tell --------------------------------------------------------------------------------
    def ask(self) -> Policy:
        self.asked += 1
        if self.seeding():
            policy = self.ask_uniform()
            self.pending.append((policy, {"kind": "uniform"}))
            return policy
        if self.queue:
            tag = self.queue.pop(0)
            self.last_kind = "probe"
            policy = [float(v) for v in self.budget.clip(self._alone(tag["layer"], tag["value"]))]
        elif not self.allocated:
            k = self.n_allocated
            self.n_allocated += 1
            self.allocated = self.n_allocated >= len(self.targets)
            self.last_kind, tag = "search", {"kind": "search", "phase": "allocate", "point": k}
            policy = self._at_point(k).project(self.allocate(k))
        else:
            k = self.turn % len(self.targets)
            self.turn += 1
            self.last_kind, tag = "search", {"kind": "search", "phase": "refine", "point": k}
            policy = self._perturb(k)
        self.pending.append((policy, tag))
        return policy

    def tell(self, policy: Policy, reward: float) -> None:
        super().tell(policy, reward)
        item = self.pop_pending(self.pending, policy)
        if item is None:
            return
        _, tag = item
        r = float(reward) if math.isfinite(reward) else float("nan")
        if tag["kind"] == "probe":
            if tag["layer"] < 0:
                self.full_reward = r
            else:
                self.curves[tag["layer"]][float(tag["value"])] = r
            return
        if tag.get("phase") == "refine" and math.isfinite(r):
            k = int(tag.get("point", 0))
            best = self.best(k)
            sig = self.sigmas[k]
            self.sigmas[k] = min(0.5, sig * 1.5) if best is None or r > best[1] else max(0.005, sig * 0.85)
        self.scored.append((list(policy), r))

    def _at_point(self, k: int) -> Budget:
        """The Budget at the ``k``-th target: the search's own one, or a copy at that point of the window."""
        b = self.budget
        if b.floor is None:
            return b
        if k not in self._at:
            self._at[k] = b.retarget(self.targets[k])
        return self._at[k]

    def best(self, k: int | None = None) -> tuple[Policy, float] | None:
        """The best scored trial (not a probe); with ``k``, the best at or below the ``k``-th target's resource."""
        ok = [pr for pr in self.scored if not math.isnan(pr[1])]
        if k is not None and self.budget.floor is not None:
            at = self._at_point(k)
            ok = [pr for pr in ok if at.satisfied(pr[0])]
        return max(ok, key=lambda pr: pr[1]) if ok else None

    # -- the reward model --------------------------------------------------------------------------
    def drop(self, i: int, values: np.ndarray) -> np.ndarray:
        """Modelled loss of reward when layer ``i`` alone goes to ``values`` (0 at its upper bound)."""
        full = self.full_reward if self.full_reward is not None and math.isfinite(self.full_reward) else None
        pts = sorted((v, r) for v, r in self.curves.get(i, {}).items() if math.isfinite(r))
        if full is None:
            full = max([r for _, r in pts], default=0.0)
        xs = np.asarray([v for v, _ in pts] + [float(self.highs[i])])
        ys = np.asarray([full - r for _, r in pts] + [0.0])
        ys = np.maximum.accumulate(np.maximum(ys, 0.0)[::-1])[::-1]  # a smaller value never hurts less
        v = np.asarray(values, float)
        if len(xs) == 1:  # no probe of this layer: call it free of cost only at its upper bound
            return np.where(v >= xs[0], 0.0, 1.0)
        if len(xs) == 2:  # one probe: a convex (quadratic) curve through it, losses growing as the layer shrinks
            t = np.clip((xs[1] - v) / max(xs[1] - xs[0], 1e-12), 0.0, None)
            return ys[0] * t**2
        return np.interp(v, xs, ys)

    def _grid(self, i: int) -> np.ndarray:
        lo, hi, step = float(self.lows[i]), float(self.highs[i]), float(self.budget.steps[i])
        if step > 0:
            return np.arange(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1) * step
        return np.linspace(lo, hi, max(2, self.config.grid))

    def _is_separable(self) -> bool:
        if self._separable is None:
            b, rng = self.budget, np.random.default_rng(12345)
            base = b.cost(list(self.highs))
            ok = True
            for _ in range(3):
                p = rng.uniform(self.lows, self.highs)
                alone = sum(b.cost(self._alone(i, p[i])) - base for i in self.free)
                ok &= abs(b.cost(list(p)) - base - alone) <= 1e-6 * max(abs(base), 1.0)
            self._separable = bool(ok)
        return self._separable

    def allocate(self, k: int = 0) -> Policy:
        """The policy the reward model prefers under the Budget (at the ``k``-th target of a Pareto window)."""
        if not self.free:
            return [float(v) for v in self.highs]
        grids = {i: self._grid(i) for i in self.free}
        drops = {i: self.drop(i, grids[i]) for i in self.free}
        if self._is_separable():
            p = self._milp(grids, drops, self._at_point(k))
            if p is not None:
                return p
        return self._lagrangian(grids, drops, self._at_point(k))

    def _milp(self, grids: dict[int, np.ndarray], drops: dict[int, np.ndarray], b: Budget) -> Policy | None:
        from scipy.optimize import Bounds, LinearConstraint, milp

        base = b.cost(list(self.highs))
        cols, cost, obj, rows = [], [], [], []
        for r, i in enumerate(self.free):
            for g, v in enumerate(grids[i]):
                cols.append((i, float(v)))
                cost.append(b.cost(self._alone(i, v)) - base)
                obj.append(float(drops[i][g]))
                rows.append(r)
        m, n = len(self.free), len(cols)
        one = np.zeros((m, n))
        one[rows, np.arange(n)] = 1.0
        scale = max(abs(base), 1.0)
        cons = [LinearConstraint(one, 1.0, 1.0),
                LinearConstraint(np.asarray(cost)[None] / scale, -np.inf, (b.limit - base) / scale)]
        res = milp(c=np.asarray(obj), constraints=cons, integrality=np.ones(n), bounds=Bounds(0, 1),
                   options={"time_limit": 20.0})
        if res.x is None:
            return None
        p = [float(v) for v in self.highs]
        for k in np.flatnonzero(res.x > 0.5):
            i, v = cols[k]
            p[i] = v
        return p if b.satisfied(p) else None

    def _lagrangian(self, grids: dict[int, np.ndarray], drops: dict[int, np.ndarray], b: Budget) -> Policy:
        """min sum drop_i + lam * cost_i, costs linearised around the current policy (re-done 3 times)."""
        p = np.asarray(b.uniform(), float)
        for _ in range(3):
            base = b.cost(list(p))
            marg = {}
            for i in self.free:
                q = p.copy()
                vals = []
                for v in grids[i]:
                    q[i] = v
                    vals.append(b.cost(list(q)) - base)
                marg[i] = np.asarray(vals) / max(b.full, 1e-12)

            def pick(lam: float, p0: np.ndarray = p, marg: dict[int, np.ndarray] = marg) -> np.ndarray:
                out = p0.copy()
                for i in self.free:
                    out[i] = grids[i][int(np.argmin(drops[i] + lam * marg[i]))]
                return out

            lo, hi = 0.0, 1.0
            while not b.satisfied(list(pick(hi))) and hi < 1e8:
                hi *= 4.0
            for _ in range(40):
                mid = 0.5 * (lo + hi)
                lo, hi = (lo, mid) if b.satisfied(list(pick(mid))) else (mid, hi)
            p = pick(hi)
        return [float(v) for v in p]

    # -- refine --------------------------------------------------------------------------------------
    def _perturb(self, k: int = 0) -> Policy:
        best = self.best(k)
        at = self._at_point(k)
        center = np.asarray(best[0] if best is not None else at.uniform(), float)
        span = self.highs - self.lows
        # at least one step of a stepped layer (whole bits), or it would never move
        scale = np.maximum(self.sigmas[k] * span, np.where(self.budget.steps > 0, self.budget.steps, 0.0))
        x = center + self.rng.normal(0.0, 1.0, len(center)) * scale
        return at.project(x)

    # -- resume --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"history": [[list(p), r] for p, r in self.history], "n_layers": len(self.space),
                "queue": [dict(t) for t in self.queue], "asked": self.asked, "seeded": self.seeded,
                "pending": [[list(p), dict(t)] for p, t in self.pending],
                "curves": {str(i): [[v, r] for v, r in c.items()] for i, c in self.curves.items()},
                "full_reward": self.full_reward, "scored": [[list(p), r] for p, r in self.scored],
                "sigmas": list(self.sigmas), "allocated": self.allocated, "n_allocated": self.n_allocated,
                "turn": self.turn, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torchpocket.errors import UserError

        if int(state["n_layers"]) != len(self.space):
            raise UserError(f"the sensitivity state is for {int(state['n_layers'])} layers, this model has "
                            f"{len(self.space)}: resume with the same model and learner")
        self.history = [(list(p), float(r)) for p, r in state["history"]]
        self.queue = [dict(t) for t in state["queue"]]
        self.asked, self.seeded = int(state["asked"]), bool(state["seeded"])
        self.pending = [([float(v) for v in p], dict(t)) for p, t in state["pending"]]
        self.curves = {int(i): {float(v): float(r) for v, r in c} for i, c in state["curves"].items()}
        self.full_reward = None if state["full_reward"] is None else float(state["full_reward"])
        self.scored = [(list(p), float(r)) for p, r in state["scored"]]
        self.allocated = bool(state["allocated"])
        sigmas = state.get("sigmas", [state.get("sigma", self.config.sigma)])  # a state from before --pareto
        self.sigmas = [float(v) for v in sigmas] + [float(self.config.sigma)] * (len(self.targets) - len(sigmas))
        self.n_allocated = int(state.get("n_allocated", int(self.allocated)))
        self.turn = int(state.get("turn", 0))
        self.rng.bit_generator.state = state["rng"]
