"""NSGA-II's first generation: the uniform seeds, then perturbed uniform policies (``--evolution-init``)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.hpo.test_optimizer_suite import flops_space
from torchpocket.hpo import create_optimizer
from torchpocket.hpo.optuna_opt import EvolutionConfig, population_size


def first_generation(init: str, *, pareto: bool, total: int = 60) -> tuple[list[list[float]], list[str], object]:
    space = flops_space(target=0.35)
    if pareto:
        space.budget.window(0.15)
    opt = create_optimizer("evolution", space, seed=3, total_trials=total, config=EvolutionConfig(init=init, sigma=0.1))
    policies, kinds = [], []
    for _ in range(population_size(total)):
        p = opt.ask()
        policies.append(p)
        kinds.append(opt.study.trials[opt.last_number].user_attrs.get("kind", "sampled"))
        opt.tell(p, -float(np.var(p)))
    return policies, kinds, space


@pytest.mark.parametrize("pareto", [False, True])
def test_the_first_generation_is_the_uniform_seeds_then_perturbed_uniform_policies(pareto: bool) -> None:
    policies, kinds, space = first_generation("perturbed", pareto=pareto)
    n_uniform = len(space.budget.uniform_curve())
    assert kinds == ["uniform"] * n_uniform + ["perturbed"] * (len(policies) - n_uniform)
    budget = space.budget
    lo = budget.floor if pareto else 0.0
    for p in policies:  # every one meets the budget (inside the window)
        assert lo - 1e-6 <= budget.fraction(p) <= budget.target + 1e-6
    perturbed = np.asarray(policies[n_uniform:])
    assert len({tuple(np.round(p, 6)) for p in perturbed}) == len(perturbed)  # all different
    # close to uniform: a perturbed policy sits about sigma (0.1 here) from the uniform policy of its own resource,
    # in log keep-ratio; Optuna's random sampling over the [0.2, 1] box (projected the same way) sits far off
    def off_uniform(ps: np.ndarray) -> float:
        return float(np.median([np.mean(np.abs(np.log(q) - np.log(budget.uniform(fraction=budget.fraction(q)))))
                                for q in ps]))

    rnd_policies, rnd_kinds, _ = first_generation("random", pareto=pareto)
    rnd = np.asarray(rnd_policies[n_uniform:])
    assert rnd_kinds[n_uniform:] == ["sampled"] * len(rnd)
    assert 0.02 < off_uniform(perturbed) < 0.5 * off_uniform(rnd)
