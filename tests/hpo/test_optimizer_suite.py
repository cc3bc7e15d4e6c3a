"""One suite that every registered optimizer (except ``none``) must pass, so a new optimizer is tested for free.

(Optuna's ``pytest_samplers.py`` style.) Synthetic search spaces stand in for a
learner: a chain of conv layers whose FLOPs are bilinear in neighbouring
keep-ratios (pruning a layer's outputs also shrinks the next layer's inputs),
and a bit-width space with integer steps and a linear cost. The checks are plain
functions (``check_*``) that the parametrised tests call for every registered
optimizer, and ``tests/plugins/test_plugins.py`` for its toy optimizer.
"""

from __future__ import annotations

import dataclasses
import io
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from torchpocket.config import SECTIONS
from torchpocket.errors import UserError
from torchpocket.hpo import HPOS, Budget, LayerSpec, Optimizer, SearchSpace, create_optimizer
from torchpocket.hpo.base import TRIAL_KINDS
from torchpocket.hpo.ddpg import DDPGConfig
from torchpocket.hpo.gp import GPConfig

NAMES = [n for n in HPOS.names() if n != "none"]
LEARNING = [n for n in ("ddpg", "gp", "tpe", "evolution", "optuna-gp", "sensitivity") if n in HPOS]
CHANNELS = (16, 16, 32, 32, 32, 64, 64, 64, 128, 10)


def flops_space(n: int = 10, *, target: float = 0.5, fill: bool = True, layer_costs: bool = True) -> SearchSpace:
    """``n`` layers whose FLOPs are ``F_i * a_{i-1} * a_i`` (keep-ratios in [0.2, 1])."""
    layers, flops, cin = [], [], 3
    for i, c in enumerate((CHANNELS * (n // len(CHANNELS) + 1))[:n]):
        k, size = (3, 32 // (1 + i // 3)) if i < n - 1 else (1, 1)
        f = cin * c * k * k * size * size
        layers.append(LayerSpec(name=f"layer{i}", kind="conv" if i < n - 1 else "linear", in_channels=cin,
                                out_channels=c, stride=2 if i % 3 == 2 else 1, kernel=k, params=cin * c * k * k,
                                flops=f, low=0.2, high=1.0))
        flops.append(f)
        cin = c
    full = np.asarray(flops, float)

    def per_layer(p: Any) -> np.ndarray:
        p = np.asarray(p, float)
        return full * np.concatenate([[1.0], p[:-1]]) * p

    budget = Budget(cost_fn=lambda p: float(per_layer(p).sum()), full=float(full.sum()), target=target,
                    lows=[lay.low for lay in layers], highs=[lay.high for lay in layers],
                    layer_cost_fn=per_layer if layer_costs else None, fill=fill)
    return SearchSpace(layers, budget)


def bits_space(n: int = 8, *, target: float = 0.5) -> SearchSpace:
    """Integer bit-widths in [2, 8] (step 1); cost = weight bits, no per-layer breakdown, no filling."""
    params = [100 * (i + 1) ** 2 for i in range(n)]
    layers = [LayerSpec(name=f"q{i}", kind="conv", in_channels=8 * (i + 1), out_channels=8 * (i + 2), stride=1,
                        kernel=3, params=p, flops=p * 64, low=2, high=8, step=1) for i, p in enumerate(params)]
    w = np.asarray(params, float)
    budget = Budget(cost_fn=lambda b: float(np.dot(w, b)), full=float(w.sum() * 8), target=target,
                    lows=[2] * n, highs=[8] * n, steps=[1] * n, fill=False, unit="bits")
    return SearchSpace(layers, budget)


SPACES: dict[str, Callable[[], SearchSpace]] = {
    "flops": flops_space,
    "flops-nobreakdown": lambda: flops_space(layer_costs=False),
    "bits": bits_space,
}

# asks per run in the contract tests: enough to leave every optimizer's start-up phase (DDPG's warm-up is 25%
# of total_trials, skopt's random points a quarter, Optuna GP's 10 start-up trials) and cheap enough for CI
ASKS = {"gp": 4, "optuna-gp": 11, "sensitivity": 14}  # sensitivity: 1 uniform + 10 probes, then its search


def n_asks(name: str) -> int:
    return ASKS.get(name, 8)


def build(name: str, space: SearchSpace, *, seed: int = 0, total: int | None = None, **kw: Any) -> Optimizer:
    return create_optimizer(name, space, seed=seed, total_trials=total if total is not None else n_asks(name), **kw)


def target_policy(space: SearchSpace, seed: int) -> np.ndarray:
    """A feasible optimum p* on the budget's surface."""
    rng = np.random.default_rng(1000 + seed)
    return np.asarray(space.budget.project(rng.uniform(space.lows, space.highs)))


def reward_fn(star: np.ndarray) -> Callable[[list[float]], float]:
    return lambda p: -float(np.sum((np.asarray(p) - star) ** 2))


def drive(opt: Optimizer, reward: Callable[[list[float]], float], n: int) -> list[list[float]]:
    asked = []
    for _ in range(n):
        p = opt.ask()
        asked.append(list(p))
        opt.tell(p, reward(p))
    return asked


def roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# -- checks: plain functions, run for every registered optimizer below and for the toy plug-in in tests/plugins ---


def check_declarations(name: str) -> None:
    """An Optimizer with a one-line doc; its config section, when it has one, is registered."""
    cls = HPOS.get(name)
    assert issubclass(cls, Optimizer)
    assert HPOS.doc(name), f"{name} has no one-line docstring for --list"
    section = getattr(cls, "section", None)
    if section is not None:  # how the pipeline finds an optimizer's own slice of the config
        assert SECTIONS[section] is cls.Config and isinstance(cls.default_config(), cls.Config)


def check_every_ask_meets_the_budget(name: str, kind: str) -> None:
    space = SPACES[kind]()
    b = space.budget
    opt = build(name, space, seed=3)
    rng = np.random.default_rng(0)
    kinds = []
    for _ in range(n_asks(name)):
        p = opt.ask()
        kinds.append(opt.last_kind)
        opt.tell(p, float(rng.normal()))
        assert opt.last_kind in TRIAL_KINDS
        assert len(p) == len(space)
        assert all(isinstance(v, float) for v in p)
        assert np.all(np.asarray(p) >= space.lows - 1e-12) and np.all(np.asarray(p) <= space.highs + 1e-12)
        if kinds[-1] == "probe":  # scored to learn from, outside the budget: never the result
            assert opt.best() is None or opt.best()[0] != p or b.satisfied(p)
            continue
        if kinds[-1] == "uniform":
            assert p == b.uniform()
        assert b.cost(p) <= b.limit * (1 + 1e-9)
        if b.fill:  # continuous layers: the target is reachable, so the policy sits just below it
            assert b.cost(p) >= 0.99 * b.limit
        if kind == "bits":
            assert np.array_equal(np.asarray(p), np.round(p))
    assert len(opt.history) == n_asks(name)
    if HPOS.get(name).seeds_uniform:  # a learned search starts from the uniform policy
        assert kinds[0] == "uniform" and "uniform" not in kinds[1:]


def check_same_seed_same_asks(name: str) -> None:
    space = flops_space()
    reward = reward_fn(target_policy(space, 0))
    runs = [drive(build(name, space, seed=7), reward, n_asks(name)) for _ in range(2)]
    assert runs[0] == runs[1]
    if name == "sensitivity":  # its probes are the same for every seed; its local search is not
        assert drive(build(name, space, seed=8), reward, n_asks(name)) != runs[0]
    elif name != "uniform":  # another seed proposes something else
        assert drive(build(name, space, seed=8), reward, 2) != runs[0][:2]


def check_resume_continues_like_an_uninterrupted_run(name: str) -> None:
    space = flops_space()
    reward = reward_fn(target_policy(space, 1))
    k, m = n_asks(name) // 2, n_asks(name) - n_asks(name) // 2 - 1
    total = n_asks(name)

    straight = build(name, space, seed=5, total=total)
    expected = drive(straight, reward, k)
    pending = straight.ask()
    straight.tell(pending, reward(pending))
    expected += [pending] + drive(straight, reward, m)

    first = build(name, space, seed=5, total=total)
    got = drive(first, reward, k)
    held = first.ask()  # asked, not yet told, when the search is killed
    state = roundtrip(first.state_dict())
    del first
    resumed = build(name, space, seed=5, total=total)
    resumed.load_state_dict(state)
    resumed.tell(held, reward(held))
    got += [held] + drive(resumed, reward, m)

    assert got == expected
    assert resumed.history == straight.history
    assert resumed.best() == straight.best()


def check_a_failed_candidate_does_not_break_the_search(name: str) -> None:
    space = flops_space()
    opt = build(name, space, seed=0, total=6)
    rewards = [float("nan"), 1.0, -float("inf"), 0.5, float("nan"), 2.0]
    eligible = []  # what best() may return: finite rewards of policies within the budget (probes never win)
    for r in rewards:
        p = opt.ask()
        if opt.last_kind != "probe":
            assert space.budget.satisfied(p)
            if np.isfinite(r):
                eligible.append(r)
        opt.tell(p, r)
    if eligible:
        assert opt.best() is not None and opt.best()[1] == max(eligible)
    else:
        assert opt.best() is None
    assert len(drive(opt, lambda p: 0.0, 1)) == 1


def check_layers_with_fixed_bounds_are_left_out_of_the_search(name: str) -> None:
    base = flops_space()
    layers = [dataclasses.replace(lay, low=1.0, high=1.0) if i in (0, 9) else lay for i, lay in enumerate(base.layers)]
    b = base.budget
    budget = Budget(cost_fn=b.cost_fn, full=b.full, target=0.5, lows=[lay.low for lay in layers],
                    highs=[lay.high for lay in layers], layer_cost_fn=b.layer_cost_fn)
    space = SearchSpace(layers, budget)
    opt = build(name, space, seed=0, total=4)
    for _ in range(3):
        p = opt.ask()
        assert p[0] == 1.0 and p[9] == 1.0, name
        assert opt.last_kind == "probe" or budget.satisfied(p), name
        opt.tell(p, -sum(p))


# -- the suite, over every registered optimizer ------------------------------------------------------------------


def test_suite_covers_the_registry() -> None:
    assert {"random", "uniform", "ddpg", "gp", "tpe", "evolution", "sensitivity"} <= set(NAMES)
    for name in ("random", "ddpg", "gp", "tpe", "evolution", "optuna-gp", "sensitivity"):
        assert name not in HPOS or HPOS.get(name).seeds_uniform, name
    assert HPOS.get("uniform").max_trials == 1 and HPOS.get("none").max_trials == 1
    for name in NAMES:
        check_declarations(name)
        assert HPOS.get(name).parallel == (name in ("tpe", "evolution", "optuna-gp"))


@pytest.mark.parametrize("kind", sorted(SPACES))
@pytest.mark.parametrize("name", NAMES)
def test_every_ask_meets_the_budget(name: str, kind: str) -> None:
    check_every_ask_meets_the_budget(name, kind)


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_asks(name: str) -> None:
    check_same_seed_same_asks(name)


@pytest.mark.parametrize("name", NAMES)
def test_resume_continues_like_an_uninterrupted_run(name: str) -> None:
    check_resume_continues_like_an_uninterrupted_run(name)


@pytest.mark.parametrize("name", NAMES)
def test_a_failed_candidate_does_not_break_the_search(name: str) -> None:
    check_a_failed_candidate_does_not_break_the_search(name)


def test_layers_with_fixed_bounds_are_left_out_of_the_search() -> None:
    for name in NAMES:
        check_layers_with_fixed_bounds_are_left_out_of_the_search(name)


# -- learning ---------------------------------------------------------------------------------------------------
# each learning optimizer must end closer to a known optimum than random search with the same asks (3 seeds)
LEARN: dict[str, tuple[int, Any]] = {
    # AMC's defaults (warm-up = 25% of the 40 episodes) but narrower nets: 300 units learn alike, 5x slower on CPU
    "ddpg": (40, DDPGConfig(hidden=64)),
    # skopt refits the GP's kernel after every tell (~0.3 s); sampling the acquisition is ~3x cheaper than lbfgs
    "gp": (16, GPConfig(acq_optimizer="sampling", candidates=1000)),
    "tpe": (40, None),
    "evolution": (100, None),
    "optuna-gp": (18, None),  # 10 random start-up trials, then 8 GP-guided ones
    "sensitivity": (40, None),  # 1 uniform + 1 unpruned + 9 layers x 1 probe, allocation, then local search
}
SEEDS = (0, 1, 2)


def learning_curve(name: str, seed: int, n: int, config: Any) -> np.ndarray:
    space = flops_space()
    reward = reward_fn(target_policy(space, seed))
    kw = {} if config is None else {"config": config}
    opt = build(name, space, seed=seed, total=n, **kw)
    return np.asarray([reward(p) for p in drive(opt, reward, n)])


def check_learns_better_than_random(name: str, n: int, config: Any = None) -> None:
    ours = np.stack([learning_curve(name, s, n, config) for s in SEEDS])
    rand = np.stack([learning_curve("random", s, n, None) for s in SEEDS])
    # where it ends: the best policy found, and the policies it proposes last
    assert ours.max(axis=1).mean() > rand.max(axis=1).mean()
    assert ours[:, -10:].mean() > rand[:, -10:].mean()


@pytest.mark.parametrize("name", LEARNING)
def test_learns_better_than_random(name: str) -> None:
    check_learns_better_than_random(name, *LEARN[name])


# -- shared studies (optimizers that declare parallel = True) ----------------------------------------------------
PARALLEL = [n for n in NAMES if HPOS.get(n).parallel]


def check_storage_is_shared_by_workers_and_reattached_on_resume(name: str, tmp_path: Any) -> None:
    space = flops_space()
    reward = reward_fn(target_policy(space, 2))
    url = f"sqlite:///{tmp_path / 'search.db'}"
    a = build(name, space, seed=1, storage=url, study_name="s")
    b = build(name, space, seed=2, storage=url, study_name="s")
    pa, pb = a.ask(), b.ask()  # two workers with trials in flight at once
    b.tell(pb, reward(pb))
    a.tell(pa, reward(pa))
    drive(a, reward, 2)
    held = b.ask()
    state = roundtrip(b.state_dict())
    assert state["storage"] == url and state["study_name"] == "s"

    resumed = build(name, space, seed=2, storage=url, study_name="s")
    resumed.load_state_dict(state)
    resumed.tell(held, reward(held))
    for p in drive(resumed, reward, 2):
        assert space.budget.satisfied(p)
    values = sorted(t.value for t in resumed.study.trials if t.value is not None)
    assert len(resumed.study.trials) == 7 and len(values) == 7  # every trial told, none lost or duplicated
    assert values == sorted(reward(p) for p, _ in a.history + resumed.history)


@pytest.mark.parametrize("name", PARALLEL)
def test_storage_is_shared_by_workers_and_reattached_on_resume(name: str, tmp_path: Any) -> None:
    check_storage_is_shared_by_workers_and_reattached_on_resume(name, tmp_path)


@pytest.mark.parametrize("url", ["sqlite:////no/such/folder/search.db", "nosuchdb://x", "not a url"])
def test_bad_storage_is_one_clear_line(url: str) -> None:
    name = PARALLEL[0]
    with pytest.raises(UserError, match="cannot open Optuna storage") as err:
        build(name, flops_space(), storage=url, study_name="s")
    assert "\n" not in str(err.value) and url in str(err.value)


def test_in_memory_study_does_not_resume_from_a_stored_one(tmp_path: Any) -> None:
    name = PARALLEL[0]
    stored = build(name, flops_space(), storage=f"sqlite:///{tmp_path / 's.db'}", study_name="s")
    stored.tell(stored.ask(), 1.0)
    with pytest.raises(UserError, match="--storage"):
        build(name, flops_space()).load_state_dict(stored.state_dict())


def test_gp_without_scikit_optimize_falls_back_to_optunas_gp(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from torchpocket.hpo.optuna_opt import OptunaGPOptimizer

    monkeypatch.setitem(sys.modules, "skopt", None)  # import skopt -> ImportError (not installed, or broken)
    opt = build("gp", flops_space())
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert isinstance(opt, OptunaGPOptimizer) and len(err) == 1 and "runs Optuna's GP sampler instead" in err[0]
    p = opt.ask()
    assert opt.last_kind == "uniform" and flops_space().budget.satisfied(p)

