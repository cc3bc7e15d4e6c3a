"""``full-prec``: no compression; trains (or evaluates) the full-precision baseline."""

from __future__ import annotations

import copy

from torch import nn

from torchpocket.learners import register_learner
from torchpocket.learners.base import Learner
from torchpocket.space import Budget, Policy, SearchSpace


@register_learner("full-prec")
class FullPrecLearner(Learner):
    """Full precision, no compression: trains the baseline every other learner starts from"""

    searchable = False

    def search_space(self, model: nn.Module, target: float, *, fill: bool = True) -> SearchSpace:
        budget = Budget(cost_fn=lambda p: 1.0, full=1.0, target=1.0, lows=[], highs=[])
        return SearchSpace([], budget)

    def compress(self, model: nn.Module, policy: Policy) -> nn.Module:
        return copy.deepcopy(model)
