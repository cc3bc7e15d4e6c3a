"""Parallel search workers: independent ``run.py`` processes sharing one Optuna study (SQLite, PostgreSQL).

The PostgreSQL case needs a server: ``eval "$(.ci/postgres.sh)"`` starts one on loopback and sets
``TORCHPOCKET_TEST_POSTGRES`` (``.ci/run`` does this); without it the case is skipped with that hint.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import optuna
import pytest

from tests._forked import start
from torchpocket.cli import main

TINY = ["--dataset", "synthetic", "--net", "resnet20", "--learner", "chn-pruned", "--target", "0.5", "--device", "cpu",
        "--quiet", "--epochs", "1", "--retrain-epochs", "0", "--no-export-onnx", "--reward-val-size", "64",
        "--latency-repeats", "2", "--calib-batches", "2", "--threads", "1"]
BUDGET = 8
ROOT = Path(__file__).resolve().parents[1]


def storages() -> list[object]:
    pg = os.environ.get("TORCHPOCKET_TEST_POSTGRES")
    skip = pytest.mark.skip(reason="no PostgreSQL server: run `eval \"$(.ci/postgres.sh)\"` (sets "
                                   "TORCHPOCKET_TEST_POSTGRES) to enable this case")
    return ["sqlite", pytest.param("postgresql", marks=() if pg else skip)]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A cache holding the tiny baseline, trained once, so every worker starts from the same model."""
    root = tmp_path_factory.mktemp("workers")
    os.environ["TORCHPOCKET_CACHE"] = str(root / "cache")
    try:
        assert main([*TINY, "--hpo", "uniform", "--out-dir", str(root / "base")]) == 0
    finally:
        del os.environ["TORCHPOCKET_CACHE"]
    return str(root / "cache")


def shared_base(cache: str) -> list[str]:
    """``--init`` of the one baseline every worker starts from: without it a worker with another --seed trains a
    baseline of its own first, starts late, and may find every trial already drawn."""
    (path,) = Path(cache).glob("baselines/resnet20-synthetic-s0-*.pt")
    return ["--init", str(path)]


@pytest.mark.timeout(420)
@pytest.mark.parametrize("kind", storages())
def test_two_workers_share_one_study(kind: str, cache: str, tmp_path: Path) -> None:
    env = {**os.environ, "TORCHPOCKET_CACHE": cache, "PYTHONPATH": str(ROOT)}
    secret = "s3cret-pw"  # the loopback server trusts every local user: a password is accepted, never needed
    url = (f"sqlite:///{tmp_path / 'search.db'}" if kind == "sqlite"
           else os.environ["TORCHPOCKET_TEST_POSTGRES"].replace("postgres@", f"postgres:{secret}@", 1))
    study = f"workers-{uuid.uuid4().hex[:8]}"
    argv = [*TINY, *shared_base(cache), "--hpo", "tpe", "--episodes", str(BUDGET), "--storage", url,
            "--study-name", study]
    procs = [start([*argv, "--seed", str(i), "--out-dir", str(tmp_path / f"worker{i}")], env) for i in range(2)]
    outs = ["".join(p.communicate(timeout=400)) for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out

    stored = optuna.load_study(study_name=study, storage=url).get_trials(deepcopy=False)
    done = [t for t in stored if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.number for t in done) == list(range(BUDGET))  # the budget exactly: none lost, none extra
    assert all(t.state != optuna.trial.TrialState.RUNNING for t in stored)
    logged = []
    for i in range(2):
        (run_dir,) = (tmp_path / f"worker{i}").iterdir()
        logged += [json.loads(ln) for ln in (run_dir / "trials.jsonl").read_text().splitlines()]
    assert sorted(r["trial"] for r in logged) == list(range(BUDGET))  # each trial evaluated by exactly one worker
    assert len({r["worker"] for r in logged}) == 2, "both workers should have evaluated trials"

    files = [f for f in tmp_path.glob("worker*/**/*") if f.is_file()]
    assert files and not [f for f in files if secret.encode() in f.read_bytes()]  # no password in any run file
    summaries = list(tmp_path.glob("worker*/*/summary.json"))
    assert len(summaries) == 1, "the final stage runs once, in one worker"
    best = max(done, key=lambda t: t.value)
    summary = json.loads(summaries[0].read_text())
    assert summary["trials"] == BUDGET
    assert summary["search"]["best_trial"] == best.number
    assert summary["search"]["best_reward"] == pytest.approx(best.value)


@pytest.mark.timeout(420)
def test_two_workers_share_one_pareto_study(cache: str, tmp_path: Path) -> None:
    """--pareto with --storage: one two-objective study, the budget exactly, one front written from all trials."""
    env = {**os.environ, "TORCHPOCKET_CACHE": cache, "PYTHONPATH": str(ROOT)}
    url, study = f"sqlite:///{tmp_path / 'front.db'}", f"front-{uuid.uuid4().hex[:8]}"
    argv = [*TINY, *shared_base(cache), "--hpo", "tpe", "--episodes", str(BUDGET), "--pareto", "0.3:0.7",
            "--storage", url,
            "--study-name", study]
    procs = [start([*argv, "--seed", str(i), "--out-dir", str(tmp_path / f"worker{i}")], env) for i in range(2)]
    outs = ["".join(p.communicate(timeout=400)) for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    loaded = optuna.load_study(study_name=study, storage=url)
    assert len(loaded.directions) == 2
    done = [t for t in loaded.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.number for t in done) == list(range(BUDGET))
    assert sum(t.user_attrs.get("kind") == "uniform" for t in done) == 5  # 0.3, 0.4, 0.5, 0.6, 0.7: seeded once
    summaries = list(tmp_path.glob("worker*/*/summary.json"))
    assert len(summaries) == 1, "the front is written once, by the worker that drew the last trial"
    block = json.loads(summaries[0].read_text())["pareto"]
    assert block["trials"] == BUDGET and block["front_size"] >= 1


@pytest.mark.timeout(420)
def test_a_worker_killed_mid_trial_has_its_trial_run_again_by_another(cache: str, tmp_path: Path) -> None:
    """Three workers, heartbeat 2 s; one is SIGKILLed with a trial scored but not told (RUNNING in the study).
    A live worker fails it after the 4 s grace period, runs it again in the same slot, and the study ends
    with the budget exactly and one final stage."""
    from torchpocket import faults

    env = {**os.environ, "TORCHPOCKET_CACHE": cache, "PYTHONPATH": str(ROOT)}
    url, study = f"sqlite:///{tmp_path / 'search.db'}", f"dead-{uuid.uuid4().hex[:8]}"
    budget = 9
    argv = [*TINY, *shared_base(cache), "--hpo", "tpe", "--episodes", str(budget), "--storage", url,
            "--study-name", study,
            "--heartbeat", "2"]
    procs = [start([*argv, "--seed", str(i), "--out-dir", str(tmp_path / f"worker{i}")],
                   {**env, faults.ENV: "trial-scored:2"} if i == 0 else env) for i in range(3)]
    outs = ["".join(p.communicate(timeout=400)) for p in procs]
    assert [p.returncode for p in procs] == [-9, 0, 0], outs
    stored = optuna.load_study(study_name=study, storage=url).get_trials(deepcopy=False)
    failed = [t for t in stored if t.state == optuna.trial.TrialState.FAIL and "abandoned" not in t.user_attrs]
    retried = [t for t in stored if t.system_attrs.get("retry_history")]
    assert len(failed) == 1 and len(retried) == 1  # the dead worker's trial, failed once and run once more
    assert retried[0].system_attrs["retry_history"] == [failed[0].number] and failed[0].number < budget
    assert retried[0].state == optuna.trial.TrialState.COMPLETE and retried[0].params == failed[0].params
    done = [t for t in stored if t.state == optuna.trial.TrialState.COMPLETE]
    slots = sorted(t.system_attrs["retry_history"][0] if t.system_attrs.get("retry_history") else t.number
                   for t in done)
    assert slots == list(range(budget))  # every slot of the budget finished, none twice
    logged = [json.loads(ln)["trial"] for f in tmp_path.glob("worker*/*/trials.jsonl")
              for ln in f.read_text().splitlines()]
    assert sorted(logged) == list(range(budget))  # the workers' logs hold every slot once, the retried one too
    summaries = list(tmp_path.glob("worker*/*/summary.json"))
    assert len(summaries) == 1 and json.loads(summaries[0].read_text())["trials"] == budget
