"""``none``: no search — one policy, from ``--policy policy.yaml`` or the learner's default."""

from __future__ import annotations

from typing import Any

from torchpocket.hpo import register_hpo
from torchpocket.hpo.base import Optimizer
from torchpocket.hpo.space import Policy


@register_hpo("none")
class FixedPolicy(Optimizer):
    """No search: the policy from --policy, else the learner's default (e.g. --bits, or uniform at the target)"""

    def __init__(self, space: Any, *, policy: Policy | None = None, **kw: Any) -> None:
        super().__init__(space, **kw)
        self.policy = policy

    def ask(self) -> Policy:
        if self.policy is not None:
            return self.space.budget.project(self.policy) if self.space.budget.fill else list(self.policy)
        return self.space.budget.uniform()
