"""The Budget every optimizer's proposals pass through: projection, the action wall, rounding, errors."""

from __future__ import annotations

import numpy as np
import pytest

from tests.hpo.test_optimizer_suite import bits_space, flops_space
from torchpocket.errors import UserError
from torchpocket.hpo import Budget


def linear_budget(*, target: float = 0.5, fill: bool = True, steps: list[float] | None = None,
                  lows: float = 0.2, highs: float = 1.0, n: int = 4) -> Budget:
    w = np.arange(1.0, n + 1.0)
    return Budget(cost_fn=lambda p: float(np.dot(w, p)), full=float(w.sum() * highs), target=target, lows=[lows] * n,
                  highs=[highs] * n, steps=steps, fill=fill)


POLICIES = [[1.0] * 10, [0.2] * 10, list(np.linspace(1.0, 0.2, 10)), [0.3, 1, 0.3, 1, 0.3, 1, 0.3, 1, 0.3, 1],
            [5.0, -3.0] * 5, [0.25] * 10]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("fill", [True, False])
def test_project_meets_the_target_within_bounds(policy: list[float], fill: bool) -> None:
    b = flops_space(fill=fill).budget
    p = b.project(policy)
    assert len(p) == len(policy) and all(isinstance(v, float) for v in p)
    assert np.all(np.asarray(p) >= 0.2) and np.all(np.asarray(p) <= 1.0)
    assert b.satisfied(p) and b.cost(p) <= b.limit * (1 + 1e-9)
    clipped = b.clip(policy)
    if not b.satisfied(clipped):  # over: shrunk toward the lower bounds, onto the target
        assert np.all(np.asarray(p) <= clipped + 1e-12)
        assert b.cost(p) >= 0.99 * b.limit
    elif fill:  # under, filling: grown toward the upper bounds, just below the target
        assert np.all(np.asarray(p) >= clipped - 1e-12)
        assert b.cost(p) >= 0.99 * b.limit
    else:  # under, not filling: left alone
        assert p == [float(v) for v in clipped]


def test_project_keeps_the_shape_of_the_policy() -> None:
    b = linear_budget()
    p = np.asarray(b.project([1.0, 0.6, 1.0, 0.6]))
    assert p[0] == pytest.approx(p[2]) and p[1] == pytest.approx(p[3]) and p[0] > p[1]
    assert (p - 0.2)[0] / (p - 0.2)[1] == pytest.approx(0.8 / 0.4)  # moved along lows + s * (p - lows)
    assert b.fraction(p) == pytest.approx(0.5, abs=1e-6)
    q = b.project([0.2, 0.2, 0.2, 0.3])  # under: filled toward the upper bounds, still ordered
    assert q[3] >= q[0] and b.fraction(q) == pytest.approx(0.5, abs=1e-6)


def test_project_fills_only_as_far_as_the_bounds_allow() -> None:
    b = linear_budget(target=1.0)
    assert b.project([0.2, 0.5, 0.7, 0.9]) == [1.0] * 4  # the whole model meets a target of 1
    assert linear_budget(target=1.0, fill=False).project([0.2, 0.5, 0.7, 0.9]) == [0.2, 0.5, 0.7, 0.9]


def test_max_action_is_the_largest_that_keeps_the_target_reachable() -> None:
    b = flops_space().budget
    n = len(b.lows)
    prefix = [1.0, 1.0, 0.9]
    a = b.max_action(prefix, 3)
    rest = list(b.lows[4:])
    assert 0.2 <= a <= 1.0
    assert b.satisfied(prefix + [a] + rest)
    assert not b.satisfied(prefix + [min(1.0, a + 1e-6)] + rest) or a == 1.0
    assert b.max_action([], 0) == 1.0  # at the start the rest can always make room
    assert b.max_action([0.2] * (n - 1), n - 1) == 1.0  # everything before at the minimum: slack to spare
    full_prefix = [1.0] * (n - 1)
    assert b.max_action(full_prefix, n - 1) == pytest.approx(0.2)  # no slack left: the lower bound (never below)


def test_max_action_on_a_linear_cost_is_exact() -> None:
    b = linear_budget()  # weights 1..4, full 10, limit 5; lows 0.2
    # prefix 1.0 (cost 1), later layers at 0.2: 3*0.2 + 4*0.2 = 1.4 -> layer 1 may use (5 - 2.4) / 2 = 1.3 -> 1.0
    assert b.max_action([1.0], 1) == 1.0
    # prefix 1.0, 1.0 (cost 3), layer 3 at 0.2 (0.8): layer 2 may use (5 - 3.8) / 3 = 0.4
    assert b.max_action([1.0, 1.0], 2) == pytest.approx(0.4, abs=1e-8)  # satisfied() allows 1e-9 relative


def test_unreachable_target_raises_a_user_error() -> None:
    with pytest.raises(UserError, match="unreachable.*--target"):
        linear_budget(target=0.1)  # all layers at 0.2 keep 20%
    with pytest.raises(UserError, match="unreachable"):
        flops_space(target=0.01)
    linear_budget(target=0.2)  # exactly at the floor is fine


def test_steps_round_to_whole_bits() -> None:
    b = linear_budget(steps=[1] * 4, lows=2, highs=8, target=0.5, fill=False)
    assert list(b.clip([3.4, 3.6, 0.0, 9.7])) == [3.0, 4.0, 2.0, 8.0]
    for policy in ([8, 8, 8, 8], [7.6, 2.2, 5.5, 8], [2, 2, 2, 2]):
        p = b.project(policy)
        assert p == [float(round(v)) for v in p] and b.satisfied(p)
        assert all(2 <= v <= 8 for v in p)
    assert b.project([8, 8, 8, 8]) == [4.0] * 4  # 4 bits everywhere is exactly half of 8
    a = b.max_action([8.0], 1)
    assert b.satisfied(list(b.clip([8.0, a, 2, 2])))
    space = bits_space()
    assert all(float(v).is_integer() for v in space.budget.project(list(np.linspace(2, 8, len(space)))))


def test_mixed_steps_round_only_the_stepped_layers() -> None:
    b = linear_budget(steps=[0, 0.25, 0, 0.25])
    assert list(b.clip([0.33, 0.33, 0.33, 0.62])) == pytest.approx([0.33, 0.25, 0.33, 0.5])


def test_uniform_is_one_value_meeting_the_target() -> None:
    b = flops_space().budget
    u = b.uniform()
    assert len(set(u)) == 1 and b.satisfied(u) and b.cost(u) >= 0.99 * b.limit
    assert b.fraction(u) <= 0.5 + 1e-9


def test_layer_costs_need_a_breakdown() -> None:
    with_breakdown, without = flops_space().budget, flops_space(layer_costs=False).budget
    p = [0.5] * 10
    assert sum(with_breakdown.layer_costs(p)) == pytest.approx(with_breakdown.cost(p))
    with pytest.raises(NotImplementedError):
        without.layer_costs(p)


def test_uniform_is_one_value_when_lower_bounds_differ() -> None:
    """Review bug: linear costs 100 / 100 / 50, lows [0.2, 0.2, 0.02], target 0.5 gave [0.522, 0.522, 0.414]."""
    w = np.array([100.0, 100.0, 50.0])
    b = Budget(cost_fn=lambda p: float(np.dot(w, p)), full=float(w.sum()), target=0.5, lows=[0.2, 0.2, 0.02],
               highs=[1.0, 1.0, 1.0])
    u = b.uniform()
    assert u == pytest.approx([0.5, 0.5, 0.5], abs=1e-9) and b.satisfied(u)
    tight = Budget(cost_fn=lambda p: float(np.dot(w, p)), full=float(w.sum()), target=0.17, lows=[0.2, 0.2, 0.02],
                   highs=[1.0, 1.0, 1.0])
    v = tight.uniform()  # below the first two lower bounds: they sit there, the third takes the rest
    assert v[:2] == pytest.approx([0.2, 0.2]) and tight.fraction(v) == pytest.approx(0.17, abs=1e-6)
