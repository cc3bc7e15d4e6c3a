"""Optuna-backed optimizers: ``tpe`` (TPE), ``evolution`` (NSGA-II) and ``optuna-gp`` (Optuna's GP sampler).

One class, :class:`OptunaOptimizer`, drives an Optuna study through
``study.ask()`` / ``study.tell()``: one ``suggest_float`` per layer (named
after the layer), the point projected onto the budget, and the reward of the
projected policy told to the trial that proposed it. Subclasses only choose the
sampler. With ``storage`` (an Optuna RDB URL such as ``sqlite:///search.db``)
the study lives in that database and several worker processes can share it;
resuming then just reattaches to it. In memory, resume replays the journal of
asks and tells into a fresh study with the same seed, which makes the same
proposals again. Every new study starts with the uniform policy
(``study.enqueue_trial``), which the sampler then learns from like any trial.

Under a Pareto window (``--pareto LO:HI``) the study is multi-objective: maximise the reward, minimise the
resource the budget gives the projected policy; it is seeded with the uniform policy at every point of the
window. TPE is multi-objective as it is (MOTPE), ``evolution`` is NSGA-II, and Optuna's GP sampler takes
several objectives too.
"""

from __future__ import annotations

import math
import sys
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from torchpocket.errors import UserError
from torchpocket.hpo import register_hpo
from torchpocket.hpo.base import JournalOptimizer
from torchpocket.hpo.gp import one_blas_thread
from torchpocket.options import opt
from torchpocket.space import Policy, SearchSpace
from torchpocket.utils import redact_url

if TYPE_CHECKING:
    import optuna

DEFAULT_STUDY_NAME = "torchpocket"


class OptunaOptimizer(JournalOptimizer):
    """Base of the Optuna optimizers: an Optuna study driven by ask / tell; subclasses pick the sampler."""

    parallel: ClassVar[bool] = True
    seeds_uniform: ClassVar[bool] = True
    pareto: ClassVar[bool] = True

    def __init__(self, space: SearchSpace, **kw: Any) -> None:
        super().__init__(space, **kw)
        import optuna  # imported on use: ``--help`` and the other optimizers need not load it

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.study = self._open_study()
        self.pending: list[tuple[Policy, int]] = []  # (projected policy, trial number), oldest first
        self._live: dict[int, optuna.trial.Trial] = {}  # asked, not yet told: for user attributes
        self.last_number = -1  # study-wide number of the latest ask (unique across workers sharing a storage)

    def make_sampler(self) -> optuna.samplers.BaseSampler:
        raise NotImplementedError

    def _open_study(self) -> optuna.Study:
        import optuna

        sampler = self.make_sampler()
        if self.storage is None:
            study = optuna.create_study(sampler=sampler, directions=self.directions, study_name=self.study_name)
        else:
            study, created = open_shared_study(self.storage, self.study_name or DEFAULT_STUDY_NAME, sampler,
                                               seed=self.seed, directions=self.directions, heartbeat=self.heartbeat)
        # a new study starts uniform; a shared one is seeded by the worker whose create_study made it, so that
        # workers started together enqueue the uniform policies once
        if (created if self.storage is not None else not study.get_trials(deepcopy=False)):
            self.seed_trials(study)
        return study

    def seed_trials(self, study: optuna.Study) -> None:
        """Enqueue what a new study starts with: the uniform policy (at every point of a Pareto window)."""
        for i, uniform in enumerate(self.uniform_policies()):
            study.enqueue_trial(dict(zip(self.space.names, uniform)),
                                user_attrs={"kind": "uniform", "uniform_index": i})

    @property
    def multi_objective(self) -> bool:
        return self.space.budget.floor is not None

    @property
    def directions(self) -> list[str]:
        return ["maximize", "minimize"] if self.multi_objective else ["maximize"]

    def _values(self, policy: Policy, reward: float) -> float | list[float]:
        return [float(reward), self.space.budget.fraction(policy)] if self.multi_objective else float(reward)

    def _ask_trial(self) -> tuple[Policy, int]:
        lows, highs = self.space.lows, self.space.highs
        self.reap_stale()
        with one_blas_thread():
            trial = self.study.ask()
            self._live[trial.number] = trial
            self._beat(trial)  # before sampling (which can take seconds): a trial with no beat is never failed
            x = [trial.suggest_float(name, float(lo), float(hi)) for name, lo, hi in zip(self.space.names, lows, highs)]
        self.last_number = trial.number
        self.last_slot = (_slot(trial.number, self.study._storage.get_trial_system_attrs(trial._trial_id))
                          if self.storage is not None else trial.number)
        self.last_kind = "uniform" if trial.user_attrs.get("kind") == "uniform" else "search"
        if self.last_kind == "uniform":
            self.seeded = True
            index = int(trial.user_attrs.get("uniform_index", 0))  # exactly the uniform policy (a projection
            return list(self.uniform_policies()[index]), trial.number  # would nudge it)
        return self.space.budget.project(x), trial.number

    def _tell_trial(self, number: int, value: float | list[float] | None, policy: Policy | None = None) -> None:
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        trial = self._live.pop(number, None)
        try:
            if trial is not None and policy is not None and self.storage is not None:
                trial.set_user_attr("policy", [float(v) for v in policy])  # the projected policy that was scored
            if value is None:
                self.study.tell(number, state=TrialState.FAIL)
            else:
                self.study.tell(number, value)
        except (UpdateFinishedTrialError, ValueError) as e:
            if self.storage is None or "finished" not in str(e).lower() and "fail" not in str(e).lower():
                raise
            # another worker took this trial for dead (no heartbeat within the grace period: a stalled storage
            # or process) and has put it back; the copy it runs keeps the slot, this result is dropped
            print(f"warning: trial {number} was failed by another worker (missed heartbeats) and is run again "
                  "there; this worker's result for it is dropped", file=sys.stderr, flush=True)

    def ask(self) -> Policy:
        policy, number = self._ask_trial()
        self.record_ask()
        self.pending.append((policy, number))
        return policy

    def tell(self, policy: Policy, reward: float) -> None:
        super().tell(policy, reward)
        item = self.pop_pending(self.pending, policy)
        if item is None:
            return  # not a policy this study proposed: nothing to tell it
        projected, number = item
        value = self._values(projected, reward) if math.isfinite(reward) else None
        self._tell_trial(number, value, projected)
        self.record_tell(number, value)

    # -- parallel workers sharing one storage ------------------------------------------------------
    def annotate(self, **attrs: Any) -> None:
        """Attach plain-data attributes (val acc, resource, worker) to the latest asked trial in the storage."""
        from optuna.exceptions import UpdateFinishedTrialError

        trial = self._live.get(self.last_number)
        if trial is not None and self.storage is not None:
            try:
                for k, v in attrs.items():
                    trial.set_user_attr(k, v)
            except UpdateFinishedTrialError:
                pass  # failed by another worker (missed heartbeats): _tell_trial says so

    def abandon(self, policy: Policy, reason: str) -> None:
        """Give back an asked trial without scoring it (over the shared budget): recorded as failed."""
        item = self.pop_pending(self.pending, policy)
        if item is None:
            return
        trial = self._live.get(item[1])
        if trial is not None and self.storage is not None:
            trial.set_user_attr("abandoned", reason)
        self._tell_trial(item[1], None)
        self.record_tell(item[1], None)

    def shared_trials(self) -> list[dict[str, Any]]:
        """Every trial of the study (all workers), oldest first: number, slot, state, value and user attributes."""
        return [{"number": t.number, "slot": _slot(t.number, t.system_attrs), "state": t.state.name,
                 "value": t.values[0] if t.values else None, **t.user_attrs}
                for t in self.study.get_trials(deepcopy=False)]

    def reap_stale(self) -> None:
        if self.retries_dead():
            from optuna.storages import fail_stale_trials

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks the heartbeat experimental
                fail_stale_trials(self.study)

    def retries_dead(self) -> bool:
        """True when this study's storage beats a heartbeat, so a dead worker's trial is failed and run again."""
        from optuna.storages._heartbeat import is_heartbeat_enabled

        return self.storage is not None and self.heartbeat > 0 and is_heartbeat_enabled(self.study._storage)

    # -- heartbeat: a daemon thread beats for every trial this worker has asked and not yet told -----------
    def _beat(self, trial: optuna.trial.Trial) -> None:
        if self.storage is None or self.heartbeat <= 0 or not hasattr(self.study._storage, "record_heartbeat"):
            return
        self.study._storage.record_heartbeat(trial._trial_id)  # at once, as Optuna's own heartbeat thread does
        if getattr(self, "_beater", None) is None:
            import threading

            self._beater = threading.Thread(target=self._beat_loop, name="torchpocket-heartbeat", daemon=True)
            self._beater.start()

    def _beat_loop(self) -> None:
        import time

        while True:
            time.sleep(self.heartbeat / 2)  # twice per interval: the storage keeps whole seconds
            for trial in list(self._live.values()):
                try:
                    self.study._storage.record_heartbeat(trial._trial_id)
                except Exception:  # noqa: BLE001 - a missed beat is retried at the next interval
                    pass

    # -- resume: reattach to the storage, or replay the journal into a fresh in-memory study -----------
    def new_engine(self) -> None:
        self.study = self._open_study()

    def replay_ask(self) -> None:
        self._ask_trial()

    def replay_tell(self, entry: list[Any]) -> None:
        value = entry[1]
        self._tell_trial(int(entry[0]), None if value is None else
                         [float(v) for v in value] if isinstance(value, (list, tuple)) else float(value))

    def state_dict(self) -> dict[str, Any]:
        return {**self.journal_state(), "storage": redact_url(self.storage), "study_name": self.study.study_name,
                "pending": [[list(p), n] for p, n in self.pending]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_layers(state)
        if self.storage is None and state.get("storage") is not None:
            raise UserError(f"this search kept its study in {state['storage']!r}: resume with --storage")
        # with storage the trials are already in the database: the study opened in __init__ holds them
        self.replay(state, engine=self.storage is None)
        self.pending = [([float(v) for v in p], int(n)) for p, n in state["pending"]]


#: errors of two workers creating the same schema or study at the same instant: the loser retries
_RACES = ("already exists", "unique constraint", "duplicate key", "integrityerror", "database is locked")


def _slot(number: int, system_attrs: dict[str, Any]) -> int:
    """The budget slot of a trial: its number, or for one put back after its worker died the original's."""
    history = system_attrs.get("retry_history") or []
    return int(history[0]) if history else int(number)


def make_storage(url: str, *, heartbeat: int = 0) -> Any:
    """``journal:///path/file.log``: Optuna's JournalStorage on a file (what Optuna recommends for several processes
    on one machine); anything else: an RDB URL (``sqlite:///...``, ``postgresql://...``).

    ``heartbeat`` > 0 (RDB only): Optuna's heartbeat, every ``heartbeat`` seconds, grace period two intervals; a
    trial whose worker stopped beating is failed by the next worker to look, and put back once, WAITING, with
    the same parameters (``RetryFailedTrialCallback``)."""
    from optuna.storages import RDBStorage, RetryFailedTrialCallback
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if url.startswith("journal://"):
        return JournalStorage(JournalFileBackend(url[len("journal://"):]))
    kw: dict[str, Any] = {}
    if url.startswith("sqlite"):  # every transaction takes the write lock (below): wait for it, not 5 s
        kw["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks the heartbeat and the retry callback experimental
        if heartbeat > 0:
            kw.update(heartbeat_interval=int(heartbeat), grace_period=2 * int(heartbeat),
                      failed_trial_callback=RetryFailedTrialCallback(max_retry=1))
        storage = RDBStorage(url, **kw)
    if storage.engine.dialect.name == "sqlite":
        _serialise_sqlite(storage.engine)
    return storage


def _serialise_sqlite(engine: Any) -> None:
    """Make every SQLite transaction take the write lock at its start (``BEGIN IMMEDIATE``).

    Optuna hands an enqueued (WAITING) trial to one worker with ``SELECT ... FOR UPDATE``, which SQLite ignores:
    two workers asking at once could both read it as waiting and both run it (the second ``tell`` then fails with
    UpdateFinishedTrialError). With the lock taken first, the second worker reads it as running and moves on.
    SQLAlchemy's documented recipe: pysqlite's own BEGIN handling off, then BEGIN IMMEDIATE on each begin."""
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_pysqlite_begin(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections made before the listeners are closed; new ones get them


def open_shared_study(url: str, name: str, sampler: Any, *, seed: int, tries: int = 12,
                      directions: list[str] | None = None, heartbeat: int = 0) -> tuple[optuna.Study, bool]:
    """Create or load study ``name`` in ``url``, race-free: workers started together retry with jittered backoff
    when another one is creating the schema at that instant. Returns the study and whether this call created it
    (exactly one of the workers racing to create a study gets True: the storage's unique study name decides).
    Anything else is one clear line."""
    import random
    import time

    import optuna

    rng = random.Random(seed)
    for attempt in range(tries):
        try:
            storage = make_storage(url, heartbeat=heartbeat)
            try:
                study = optuna.create_study(storage=storage, study_name=name, directions=directions or ["maximize"],
                                            sampler=sampler)
                created = True
            except optuna.exceptions.DuplicatedStudyError:
                study, created = optuna.load_study(study_name=name, storage=storage, sampler=sampler), False
        except Exception as e:  # noqa: BLE001  (bad URL, missing driver, unreachable server, a race...)
            text = f"{type(e).__name__}: {e}".lower()
            if attempt + 1 < tries and any(r in text for r in _RACES):
                time.sleep(min(2.0, 0.05 * 2 ** attempt) * (0.5 + rng.random()))
                continue
            detail = (str(e).strip().splitlines() or [""])[0][:200]
            shown = redact_url(url)
            raise UserError(f"cannot open Optuna storage {shown!r} (study {name!r}): {type(e).__name__}: "
                            f"{detail.replace(url, str(shown))}") from None
        if len(study.directions) != len(directions or ["maximize"]):
            kind = "a Pareto (two-objective)" if len(study.directions) > 1 else "a single-target"
            raise UserError(f"study {name!r} in {redact_url(url)!r} is {kind} search: give another --study-name, "
                            "or the same --pareto as its other workers")
        return study, created
    raise AssertionError("unreachable")


@register_hpo("tpe")
class TPEOptimizer(OptunaOptimizer):
    """Tree-structured Parzen estimator (Optuna TPESampler); --storage lets workers share one study"""

    def make_sampler(self) -> optuna.samplers.BaseSampler:
        from optuna.samplers import TPESampler

        return TPESampler(seed=self.seed)


def population_size(total_trials: int) -> int:
    """NSGA-II population: Optuna's 50, or a fifth of a shorter search (at least 4)."""
    return 50 if total_trials <= 0 else min(50, max(4, total_trials // 5))


@dataclass
class EvolutionConfig:
    """NSGA-II's first generation (section ``evolution``)."""

    init: str = opt("perturbed", "the first generation beyond the uniform seeds: perturbed (the uniform policy at "
                    "the target, or at a random point of the --pareto window, each layer scaled by exp(N(0, "
                    "--evolution-sigma^2)), then projected onto the budget) or random (Optuna's uniform sampling "
                    "over the layer bounds)", flag="--evolution-init", choices=("perturbed", "random"))
    sigma: float = opt(0.25, "spread of the perturbed first generation (log-scale, per layer)",
                       flag="--evolution-sigma", positive=True)


@register_hpo("evolution")
class EvolutionOptimizer(OptunaOptimizer):
    """Evolutionary search (Optuna NSGAIISampler), population scaled to the number of trials"""

    Config: ClassVar[type] = EvolutionConfig
    section: ClassVar[str] = "evolution"

    def make_sampler(self) -> optuna.samplers.BaseSampler:
        from optuna.samplers import NSGAIISampler

        return NSGAIISampler(seed=self.seed, population_size=population_size(self.total_trials))

    def seed_trials(self, study: optuna.Study) -> None:
        """The uniform seeds, then (``--evolution-init perturbed``) the rest of the first generation as perturbed
        uniform policies: a random first generation in a many-layer space sits far below the uniform policy,
        and NSGA-II then spends generations climbing back to it."""
        super().seed_trials(study)
        cfg = self.config or EvolutionConfig()
        if cfg.init != "perturbed":
            return
        import numpy as np

        budget = self.space.budget
        rng = np.random.default_rng(self.seed)
        lows, highs = np.asarray(self.space.lows, float), np.asarray(self.space.highs, float)
        n = population_size(self.total_trials) - len(self.uniform_policies())
        for _ in range(max(0, n)):
            frac = budget.target if budget.floor is None else float(rng.uniform(budget.floor, budget.target))
            base = np.asarray(budget.uniform(fraction=frac), float)
            x = np.clip(base * np.exp(cfg.sigma * rng.standard_normal(len(base))), lows, highs)
            study.enqueue_trial(dict(zip(self.space.names, map(float, x))), user_attrs={"kind": "perturbed"})


@register_hpo("optuna-gp")
class OptunaGPOptimizer(OptunaOptimizer):
    """Gaussian-process Bayesian optimisation (Optuna GPSampler); --storage lets workers share one study"""

    def make_sampler(self) -> optuna.samplers.BaseSampler:
        import optuna

        try:
            from optuna.samplers import GPSampler
        except ImportError:
            raise UserError(f"--hpo optuna-gp needs Optuna's GPSampler (optuna >= 3.6), this is optuna "
                            f"{optuna.__version__}: pip install -U optuna") from None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return GPSampler(seed=self.seed)
