"""``none``: no search — one policy, from ``--policy policy.yaml`` or the learner's default."""

from __future__ import annotations

from typing import Any, ClassVar

from torchpocket.hpo import register_hpo
from torchpocket.hpo.base import Optimizer
from torchpocket.space import Policy


@register_hpo("none")
class FixedPolicy(Optimizer):
    """No search: the policy from --policy, else the learner's default (e.g. --bits, or uniform at the target)"""

    max_trials: ClassVar[int | None] = 1
    takes_policy: ClassVar[bool] = True

    def __init__(self, space: Any, *, policy: Policy | None = None, **kw: Any) -> None:
        super().__init__(space, **kw)
        self.policy = policy

    def ask(self) -> Policy:
        if self.policy is not None:  # the user's policy as written (clipped to the bounds), not re-projected
            b = self.space.budget
            p = [float(v) for v in b.clip(self.policy)]
            if not b.satisfied(p):
                from torchpocket.errors import UserError

                raise UserError(f"the policy keeps {b.fraction(p):.3f} of the {b.unit}, above --target {b.target:g}")
            return p
        return self.space.budget.uniform()
