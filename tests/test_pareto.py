"""Multi-objective search (``--pareto LO:HI``): the window budget, the front and its hypervolume, the run's
front files, ``--pick`` with no new search, the API's ``Front`` / ``pick``, and the refusals."""

from __future__ import annotations

import csv
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import torchpocket
from tests.conftest import run_ok
from tests.test_pipeline import TINY, trials
from torchpocket import pareto
from torchpocket.cli import main
from torchpocket.hpo import create_optimizer
from torchpocket.space import Budget, LayerSpec, SearchSpace, window_points

pytestmark = pytest.mark.usefixtures("shared_cache")

PARETO = [a if a != "--target" else "--pareto" for a in TINY]
PARETO[PARETO.index("--pareto") + 1] = "0.3:0.7"


def _space(low: float | None = 0.25, target: float = 0.8) -> SearchSpace:
    w = np.array([1.0, 2.0, 3.0, 4.0])
    layers = [LayerSpec(f"l{i}", "conv", 8, 8, 1, 3, 10, int(c), low=0.1, high=1.0) for i, c in enumerate(w)]
    budget = Budget(cost_fn=lambda p: float(np.dot(w, p)), full=float(w.sum()), target=target, lows=[0.1] * 4,
                    highs=[1.0] * 4)
    if low is not None:
        budget.window(low)
    return SearchSpace(layers, budget)


def test_window_budget_keeps_every_projection_inside_the_window() -> None:
    space = _space()
    b = space.budget
    rng = np.random.default_rng(0)
    for _ in range(200):
        q = b.project(rng.uniform(0.0, 1.2, 4))
        assert 0.25 - 1e-6 <= b.fraction(q) <= 0.8 + 1e-9
    inside = [0.3, 0.5, 0.2, 0.4]  # fraction 0.35: kept as it is
    assert b.project(inside) == pytest.approx(inside)
    assert b.points() == window_points(0.25, 0.8) == [0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]
    fractions = [b.fraction(u) for u in b.uniform_curve()]
    assert all(f <= r + 1e-9 and f > r - 0.01 for f, r in zip(fractions, b.points()))
    assert all(len(set(np.round(u, 9))) == 1 for u in b.uniform_curve())  # one value per policy: uniform
    with pytest.raises(Exception, match="low end"):
        _space(low=0.9)


def test_the_uniform_seed_at_the_low_end_is_inside_the_window() -> None:
    """Coarse steps put the uniform policy at LO under LO: the seed is then the narrowest uniform policy over it."""
    w = np.array([1.0, 2.0, 3.0, 4.0])
    b = Budget(cost_fn=lambda p: float(np.dot(w, p)), full=float(w.sum()), target=0.8, lows=[0.25] * 4,
               highs=[1.0] * 4, steps=[0.25] * 4)
    b.window(0.3)
    assert b.fraction(b.uniform(fraction=0.3)) == pytest.approx(0.25)  # under the window
    curve = b.uniform_curve()
    assert b.fraction(curve[0]) == pytest.approx(0.5) and len(set(curve[0])) == 1
    assert all(0.3 <= b.fraction(u) <= 0.8 + 1e-9 for u in curve)


def _brute_area(points: list[tuple[float, float]], lo: float, hi: float, n: int = 20000) -> float:
    xs = lo + (np.arange(n) + 0.5) * (hi - lo) / n
    return float(sum(max([a for r, a in points if r <= x] or [0.0]) for x in xs) * (hi - lo) / n)


def test_front_hypervolume_and_best_at_match_brute_force() -> None:
    rng = np.random.default_rng(1)
    trials = [{"trial": i, "status": "ok", "kind": "search", "resource": float(r), "val_acc": float(a)}
              for i, (r, a) in enumerate(zip(rng.uniform(0.2, 0.8, 40), rng.uniform(50, 95, 40)))]
    trials.append({"trial": 99, "status": "ok", "kind": "probe", "resource": 0.21, "val_acc": 99.0})  # never counts
    trials.append({"trial": 98, "status": "failed", "kind": "search", "resource": 0.22, "val_acc": 99.0})
    f = pareto.front(trials)
    ok = pareto.scored(trials)
    assert len(ok) == 40
    for t in ok:  # on the front iff no other trial dominates it
        dominated = any(u["resource"] <= t["resource"] and u["val_acc"] >= t["val_acc"] and u is not t
                        and (u["resource"] < t["resource"] or u["val_acc"] > t["val_acc"]) for u in ok)
        assert (t in f) == (not dominated)
    assert [t["resource"] for t in f] == sorted(t["resource"] for t in f)
    pts = [(t["resource"], t["val_acc"]) for t in ok]
    assert pareto.hypervolume(trials, 0.2, 0.8) == pytest.approx(_brute_area(pts, 0.2, 0.8), rel=2e-3)
    for r in (0.25, 0.4, 0.61):
        best = pareto.best_at(trials, r)
        assert best["val_acc"] == max(t["val_acc"] for t in ok if t["resource"] <= r)
    assert pareto.best_at(trials, 0.1) is None
    block = pareto.front_block(trials, 0.2, 0.8)
    assert block["front_mean_val_acc"] == pytest.approx(block["hypervolume"] / 0.6)


def test_sensitivity_allocates_the_whole_front_from_one_set_of_probes() -> None:
    """``sensitivity --pareto``: the uniform curve, one set of probes, the allocation at every 0.05 of the window
    (each beating uniform at its resource on a reward whose layers differ in sensitivity), then local search."""
    from torchpocket.hpo.sensitivity import PARETO_STEP

    sens = np.array([4.0, 0.2, 1.0, 0.05])

    def reward(p: list[float]) -> float:
        return -float(np.dot(sens, (1.0 - np.asarray(p)) ** 2))

    space = _space()
    b = space.budget
    opt = create_optimizer("sensitivity", space, seed=0, total_trials=60, config={"points": 3})
    points = window_points(0.25, 0.8, PARETO_STEP)
    asked = []
    for i in range(60):
        p = opt.ask()
        asked.append((p, opt.last_kind))
        opt.tell(p, reward(p))
        if i == 40:
            state = opt.state_dict()
    kinds = [k for _, k in asked]
    n_uni, n_probe = len(b.points()), 1 + 4 * 3
    assert kinds[:n_uni] == ["uniform"] * n_uni and kinds[n_uni:n_uni + n_probe] == ["probe"] * n_probe
    assert set(kinds[n_uni + n_probe:]) == {"search"}
    alloc = [p for p, _ in asked[n_uni + n_probe:n_uni + n_probe + len(points)]]
    for p, r in zip(alloc, points):
        assert r - 0.03 <= b.fraction(p) <= r + 1e-9  # at (or just under) its point of the window
        assert reward(p) > reward(b.uniform(fraction=r)) + 1e-3  # better than uniform at that resource
    for p, _ in asked[n_uni + n_probe:]:
        assert 0.25 - 1e-6 <= b.fraction(p) <= 0.8 + 1e-9
    again = create_optimizer("sensitivity", _space(), seed=0, total_trials=60, config={"points": 3})
    again.load_state_dict(state)
    assert again.ask() == pytest.approx(asked[41][0])


@pytest.mark.parametrize("hpo", ["sensitivity", "ddpg"])
def test_a_window_reaching_under_the_narrowest_policy_is_searched(hpo: str) -> None:
    """A window whose low end is under what every layer at its lower bound keeps (0.05 < 0.1 here): the points
    under it are searched at that floor instead of failing."""
    space = _space(low=0.05)
    opt = create_optimizer(hpo, space, seed=0, total_trials=40, config={"warmup": 5} if hpo == "ddpg" else None)
    for _ in range(40):
        p = opt.ask()
        if opt.last_kind != "probe":  # probes break the budget by design
            assert 0.1 - 1e-9 <= space.budget.fraction(p) <= 0.8 + 1e-9
        opt.tell(p, -float(np.sum((np.asarray(p) - 0.5) ** 2)))


def test_ddpg_draws_each_episodes_target_in_the_window_and_sees_it() -> None:
    """``ddpg --pareto``: the uniform curve first (each at its point), then episodes whose targets are drawn in the
    window; the target is the 11th state feature, the action wall and projection keep each episode at it."""
    import copy

    from torchpocket.hpo.ddpg import N_FEATURES

    space = _space()
    b = space.budget
    opt = create_optimizer("ddpg", space, seed=1, total_trials=30, config={"warmup": 10, "batch_size": 8})
    assert opt.n_states == N_FEATURES + 1
    n = len(b.points())
    goals, asked, state = [], [], None
    for i in range(24):
        p = opt.ask()
        rec = opt.pending[-1]
        goals.append(rec["goal"])
        asked.append(p)
        assert 0.25 - 1e-6 <= b.fraction(p) <= rec["goal"] + 1e-9  # at or under the episode's own target
        feature = (rec["goal"] - 0.25) / (0.8 - 0.25)
        assert all(s[-1] == pytest.approx(feature) and len(s) == N_FEATURES + 1 for s in rec["states"])
        if i < n:
            assert opt.last_kind == "uniform" and p == pytest.approx(b.uniform_curve()[i])
            assert rec["goal"] == b.points()[i]
        opt.tell(p, -float(np.sum((np.asarray(p) - 0.5) ** 2)))
        if i == 15:
            state = copy.deepcopy(opt.state_dict())  # as saved to disk: the live networks keep learning
    drawn = goals[n:]
    assert len(set(drawn)) == len(drawn) and min(drawn) >= 0.25 and max(drawn) <= 0.8
    assert opt.trial_info()["ddpg"]["target"] == goals[-1] and opt.trial_info()["ddpg"]["critic_loss"] is not None
    again = create_optimizer("ddpg", _space(), seed=1, total_trials=30, config={"warmup": 10, "batch_size": 8})
    again.load_state_dict(state)
    assert again.ask() == pytest.approx(asked[16])  # resumed bit for bit: the same next episode
    single = create_optimizer("ddpg", _space(low=None), seed=1, total_trials=30)
    with pytest.raises(Exception, match="different --pareto"):
        single.load_state_dict(state)


@pytest.mark.parametrize("hpo", ["tpe", "evolution", "random"])
def test_multi_objective_optimizers_seed_the_uniform_curve_and_resume_the_same(hpo: str) -> None:
    def reward(p: list[float]) -> float:
        return -float(np.sum((np.asarray(p) - 0.5) ** 2))

    space = _space()
    opt = create_optimizer(hpo, space, seed=3, total_trials=20)
    asked = []
    for i in range(12):
        p = opt.ask()
        assert 0.25 - 1e-6 <= space.budget.fraction(p) <= 0.8 + 1e-9
        asked.append((p, opt.last_kind))
        opt.tell(p, reward(p))
        if i == 8:
            state = opt.state_dict()
    n = len(space.budget.points())
    assert [k for _, k in asked[:n]] == ["uniform"] * n and asked[n][1] == "search"
    assert [p for p, _ in asked[:n]] == [pytest.approx(u) for u in space.budget.uniform_curve()]
    if hpo != "random":
        assert len(opt.study.directions) == 2
        done = opt.study.get_trials(deepcopy=False)
        assert done[-1].values[1] == pytest.approx(space.budget.fraction(asked[-1][0]))
    again = create_optimizer(hpo, _space(), seed=3, total_trials=20)
    again.load_state_dict(state)
    assert [again.ask() for _ in range(1)][0] == pytest.approx(asked[9][0])


def test_pareto_run_writes_the_front_and_pick_finalises_without_searching(capsys: pytest.CaptureFixture[str],
                                                                          tmp_path: Path) -> None:
    run_dir = run_ok(capsys, *PARETO, "--hpo", "tpe", "--episodes", "9", "--out-dir", str(tmp_path))
    rows = trials(run_dir)
    n = len(window_points(0.3, 0.7))
    assert [r["kind"] for r in rows[:n]] == ["uniform"] * n and len(rows) == 9
    seeds = [r["resource"] for r in rows[:n]]  # uniform at each point: inside the window, in order
    assert all(0.3 - 1e-9 <= f <= 0.7 + 1e-9 for f in seeds) and seeds == sorted(seeds)
    assert all(f <= p + 1e-9 or f == seeds[0] for f, p in zip(seeds, window_points(0.3, 0.7)))
    assert all(0.3 - 0.02 <= r["resource"] <= 0.7 + 1e-9 for r in rows[n:])  # the search: inside the window
    summary = json.loads((run_dir / "summary.json").read_text())["pareto"]
    with open(run_dir / "pareto.csv") as fh:
        front_rows = list(csv.DictReader(fh))
    assert [int(r["trial"]) for r in front_rows] == [t["trial"] for t in pareto.front(rows)]
    assert len(front_rows) == summary["front_size"] >= 1
    assert summary["hypervolume"] == pytest.approx(pareto.hypervolume(rows, 0.3, 0.7))
    assert summary["hypervolume"] >= summary["uniform_hypervolume"]  # the front holds the uniform curve
    assert (run_dir / "pareto.png").stat().st_size > 1000 and not (run_dir / "model.pt").exists()
    assert "## Pareto front" in (run_dir / "report.md").read_text() and (run_dir / "report.html").is_file()
    import optuna

    study = optuna.load_study(study_name="torchpocket", storage=f"sqlite:///{run_dir / 'study.db'}")
    assert len(study.directions) == 2 and len(study.best_trials) >= 1

    assert main(["--resume", str(run_dir), "--pick", "0.45,0.7", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert trials(run_dir) == rows  # no new search
    for r in (0.45, 0.7):
        best = pareto.best_at(rows, r)
        assert f"pick {r:g}: trial {best['trial']} " in out
        model = torchpocket.load(run_dir / f"pick-{r:g}" / "model.pt")
        sub = json.loads((run_dir / f"pick-{r:g}" / "summary.json").read_text())
        assert sub["compressed"]["flops"] / sub["baseline"]["flops"] == pytest.approx(best["resource"], abs=0.01)
        assert isinstance(model, torch.nn.Module)
    picks = json.loads((run_dir / "summary.json").read_text())["picks"]
    assert [p["pick"] for p in picks] == [0.45, 0.7]

    assert main(["--resume", str(run_dir), "--pick", "0.1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--pick 0.1: no scored trial keeps flops <= 0.1" in err[0]


@pytest.mark.parametrize(("argv", "message"), [
    (["--hpo", "gp", "--pareto", "0.3:0.7"], "--pareto searches a front"),
    (["--hpo", "tpe", "--pareto", "0.7:0.3"], "--pareto must be LO:HI"),
    (["--hpo", "tpe", "--pareto", "half"], "--pareto must be LO:HI"),
    (["--hpo", "tpe", "--pick", "0.4"], "--pick chooses points of a Pareto front"),
    (["--hpo", "tpe", "--pareto", "0.3:0.7", "--pick", "0,4"], "--pick must be R[,R...]"),
    (["--hpo", "tpe", "--pareto", "0.3:0.7", "--reward", "acc-flops"], "use it with --reward acc"),
])
def test_bad_pareto_options_are_one_line(capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    assert main([*TINY, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_pick_on_a_single_target_run_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    run_dir = run_ok(capsys, *TINY, "--hpo", "uniform", "--out-dir", str(tmp_path))
    assert main(["--resume", str(run_dir), "--pick", "0.4"]) == 2
    assert "searched one target" in capsys.readouterr().err


def test_api_returns_the_front_and_pick_gives_the_model() -> None:
    torch.manual_seed(0)
    x = torch.randn(64, 1, 8, 8)
    data = DataLoader(TensorDataset(x, torch.randint(0, 3, (64,))), batch_size=32)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 3))
    front = torchpocket.compress(net, data, data, learner="chn-pruned", hpo="random", pareto=(0.4, 0.8),
                                 episodes=8, retrain_epochs=0, calib_batches=1)
    assert isinstance(front, torchpocket.Front) and len(front.trials) == 8
    assert front.points and front.hypervolume > 0
    small = torchpocket.pick(front, 0.6)
    n_params = [sum(p.numel() for p in m.parameters()) for m in (net, small)]
    assert n_params[1] < n_params[0]
    with pytest.raises(torchpocket.api.UserError, match="no scored trial"):
        torchpocket.pick(front, 0.05)
    assert list(itertools.islice(iter(data), 1))  # the loaders are left usable
