"""``gp``: Gaussian-process Bayesian optimisation through ``skopt.Optimizer`` (ask / tell, minimising -reward).

skopt proposes a point ``x`` inside the layers' bounds; the budget projects it
onto the target. skopt is told its own ``x`` with the reward of the projected
policy, so its model only ever sees points it asked for. Layers whose bounds
are equal are left out of skopt's space. Resume replays the journal of asks
and tells into a fresh ``skopt.Optimizer`` with the same seed, which makes the
same proposals again.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from torchpocket.hpo import register_hpo
from torchpocket.hpo.base import JournalOptimizer
from torchpocket.options import opt
from torchpocket.space import Policy, SearchSpace


@dataclass
class GPConfig:
    """skopt's Gaussian-process optimizer (section ``gp``); defaults are skopt's."""

    initial_points: int = opt(-1, "random points before the GP model is used "
                                  "(-1 = skopt's 10, or a quarter of a shorter search, at least 2)",
                              flag="--gp-initial-points")
    acq_func: str = opt("gp_hedge", "acquisition function", flag="--gp-acq-func",
                        choices=("gp_hedge", "EI", "PI", "LCB"))
    acq_optimizer: str = opt("auto", "how the acquisition is maximised (auto = lbfgs for a GP; sampling is "
                                     "several times faster per ask)", flag="--gp-acq-optimizer",
                             choices=("auto", "lbfgs", "sampling"))
    candidates: int = opt(10000, "random points scored by the acquisition per ask (skopt's n_points)",
                          flag="--gp-candidates")




def initial_points(total_trials: int) -> int:
    """Random points before the GP is used: skopt's 10, fewer for short searches (a quarter, at least 2)."""
    return 10 if total_trials <= 0 else max(2, min(10, total_trials // 4))


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Small GP matrices: several BLAS threads only contend (5-10x slower on a busy machine), and one thread
    keeps the floating-point results the same from run to run."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1):
        yield


def skopt_problem() -> str | None:
    """Why scikit-optimize cannot be used here (one line), or None when it can."""
    try:
        import skopt

        with one_blas_thread():
            skopt.Optimizer([(0.0, 1.0)], base_estimator="GP", n_initial_points=1, random_state=0).ask()
    except Exception as e:  # noqa: BLE001 - missing, or broken by its dependencies: both mean "use the fallback"
        return f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"
    return None


@register_hpo("gp")
class GPOptimizer(JournalOptimizer):
    """Gaussian-process Bayesian optimisation (scikit-optimize), proposals projected onto the budget"""

    parallel: ClassVar[bool] = False
    seeds_uniform: ClassVar[bool] = True
    Config: ClassVar[type] = GPConfig  # its config section, for the pipeline
    section: ClassVar[str] = "gp"

    def __new__(cls, space: SearchSpace, **kw: Any) -> Any:
        """scikit-optimize is archived upstream: where it cannot be used (not installed, or broken by a newer
        numpy), ``gp`` is Optuna's GP sampler instead, with one warning line."""
        problem = skopt_problem()
        if cls is GPOptimizer and problem is not None:
            from torchpocket.hpo.optuna_opt import OptunaGPOptimizer

            print(f"warning: scikit-optimize cannot be used here ({problem}); --hpo gp runs Optuna's GP sampler "
                  "instead", file=sys.stderr, flush=True)
            return OptunaGPOptimizer(space, **{k: v for k, v in kw.items() if k != "config"})
        return super().__new__(cls)

    def __init__(self, space: SearchSpace, **kw: Any) -> None:
        super().__init__(space, **kw)
        import skopt

        lows, highs = space.lows, space.highs
        self.free = [i for i in range(len(space)) if highs[i] > lows[i]]
        n0 = self.config.initial_points
        self.n_initial_points = n0 if n0 > 0 else initial_points(self.total_trials)
        self._skopt = skopt
        self.opt = self._new_skopt()
        self.pending: list[tuple[Policy, list[float]]] = []  # (projected policy, skopt's point)

    def _new_skopt(self) -> Any:
        lows, highs = self.space.lows, self.space.highs
        if not self.free:
            return None
        return self._skopt.Optimizer(
            dimensions=[(float(lows[i]), float(highs[i])) for i in self.free], base_estimator="GP",
            n_initial_points=self.n_initial_points, random_state=self.seed,
            acq_func=self.config.acq_func, acq_optimizer=self.config.acq_optimizer,
            acq_optimizer_kwargs={"n_points": self.config.candidates})

    def _ask_x(self) -> list[float]:
        if self.opt is None:
            return []
        with one_blas_thread():
            return [float(v) for v in self.opt.ask()]

    def _tell_x(self, x: list[float], y: float) -> None:
        if self.opt is not None:
            with one_blas_thread():
                self.opt.tell(list(x), y)

    def ask(self) -> Policy:
        if self.seeding():  # skopt's x0: a point it did not propose, told like its own (no ask to replay)
            policy = self.ask_uniform()
            self.pending.append((policy, [float(policy[i]) for i in self.free]))
            return policy
        self.last_kind = "search"
        x = self._ask_x()
        self.record_ask()
        full = [float(v) for v in self.space.lows]
        for i, v in zip(self.free, x):
            full[i] = v
        policy = self.space.budget.project(full)
        self.pending.append((policy, x))
        return policy

    def tell(self, policy: Policy, reward: float) -> None:
        super().tell(policy, reward)
        item = self.pop_pending(self.pending, policy)
        if item is None:
            return  # a policy skopt never proposed: nothing to learn from
        _, x = item
        y = -float(reward) if math.isfinite(reward) else self._worst()
        self._tell_x(x, y)
        self.record_tell(x, y)

    def _worst(self) -> float:
        ys = [e[1] for e in self.journal if e]
        return max(ys) + 1.0 if ys else 0.0

    # -- resume: replay the journal into a fresh skopt.Optimizer ----------------------------------------
    def new_engine(self) -> None:
        self.opt = self._new_skopt()

    def replay_ask(self) -> None:
        self._ask_x()

    def replay_tell(self, entry: list[Any]) -> None:
        self._tell_x([float(v) for v in entry[0]], float(entry[1]))

    def state_dict(self) -> dict[str, Any]:
        return {**self.journal_state(), "pending": [[list(p), list(x)] for p, x in self.pending]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_layers(state)
        self.replay(state)
        self.pending = [([float(v) for v in p], [float(v) for v in x]) for p, x in state["pending"]]
