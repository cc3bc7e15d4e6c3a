"""toy-hill-climb: a coordinate-perturbation hill climber, the smallest complete optimizer (one file, one decorator).

The first trial is the uniform policy (``seeds_uniform``); every later one moves a
few coordinates of the best policy so far by a Gaussian step and projects the result
onto the Budget, like every optimizer's proposal. The step shrinks after a trial that
did not improve on the best and grows after one that did (the 1/5th rule of a (1+1)
evolution strategy, kept simple). The state for ``--resume`` is the history, the step
and the random generator's state.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from torchpocket.hpo import register_hpo
from torchpocket.hpo.base import Optimizer
from torchpocket.space import Policy, SearchSpace


@register_hpo("toy-hill-climb")
class ToyHillClimb(Optimizer):
    """Toy hill climber: Gaussian steps on a few coordinates of the best policy so far (uniform policy first)"""

    seeds_uniform: ClassVar[bool] = True
    coordinates: ClassVar[int] = 2  # layers moved per step
    first_step: ClassVar[float] = 0.2  # as a fraction of each layer's range

    def __init__(self, space: SearchSpace, **kw: Any) -> None:
        super().__init__(space, **kw)
        self.rng = np.random.default_rng(self.seed)
        self.step = self.first_step

    def ask(self) -> Policy:
        if self.seeding():
            return self.ask_uniform()
        self.last_kind = "search"
        best = self.best()
        center = np.asarray(best[0] if best else self.uniform_policy(), float)
        free = np.flatnonzero(self.space.highs > self.space.lows)  # layers with fixed bounds stay put
        moved = self.rng.choice(free, size=min(self.coordinates, len(free)), replace=False) if len(free) else []
        x = center.copy()
        x[moved] += self.step * (self.space.highs - self.space.lows)[moved] * self.rng.standard_normal(len(moved))
        return self.space.budget.project(x)

    def tell(self, policy: Policy, reward: float) -> None:
        best = self.best()
        improved = math.isfinite(reward) and (best is None or reward > best[1])
        self.step = float(np.clip(self.step * (1.5 if improved else 0.9), 0.01, 0.5))
        super().tell(policy, reward)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "step": self.step, "seeded": self.seeded, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore directly (no replay): the rng state already includes an ask that was never told."""
        self.history = [(list(p), float(r)) for p, r in state["history"]]
        self.step, self.seeded = float(state["step"]), bool(state["seeded"])
        self.rng.bit_generator.state = state["rng"]
