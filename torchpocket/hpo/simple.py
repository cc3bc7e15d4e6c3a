"""Baselines: ``random`` (uniform in the bounds, projected onto the budget) and ``uniform`` (one ratio for all).

``random`` scores the uniform policy first, like every learned optimizer.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from torchpocket.hpo import register_hpo
from torchpocket.hpo.base import Optimizer
from torchpocket.space import Policy, SearchSpace


@register_hpo("random")
class RandomSearch(Optimizer):
    """Random search: each layer uniform in its [low, high], projected onto the budget (uniform policy first)"""

    parallel: ClassVar[bool] = False
    seeds_uniform: ClassVar[bool] = True
    pareto: ClassVar[bool] = True  # its proposals do not depend on the rewards: a front needs nothing more

    def __init__(self, space: SearchSpace, **kw: Any) -> None:
        super().__init__(space, **kw)
        self.rng = np.random.default_rng(self.seed)

    def ask(self) -> Policy:
        if self.seeding():
            return self.ask_uniform()
        self.last_kind = "search"
        x = self.rng.uniform(self.space.lows, self.space.highs)
        return self.space.budget.project(x)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rng": self.rng.bit_generator.state, "seeded": self.seeded,
                "n_seeded": self.n_seeded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [(list(p), float(r)) for p, r in state["history"]]
        self.rng.bit_generator.state = state["rng"]
        self.seeded = bool(state.get("seeded", bool(self.history)))
        self.n_seeded = int(state.get("n_seeded", int(self.seeded)))


@register_hpo("uniform")
class UniformPolicy(Optimizer):
    """Uniform baseline: the same ratio for every layer, meeting the target (one trial, whatever --episodes says)"""

    parallel: ClassVar[bool] = False
    max_trials: ClassVar[int | None] = 1  # per point: under --pareto, the uniform curve across the window
    pareto: ClassVar[bool] = True

    def ask(self) -> Policy:
        self.last_kind = "uniform"
        curve = self.uniform_policies()
        return list(curve[min(len(self.history), len(curve) - 1)])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [(list(p), float(r)) for p, r in state["history"]]
