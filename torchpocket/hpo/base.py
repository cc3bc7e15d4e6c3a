"""The optimizer contract: ``ask() -> policy``, ``tell(policy, reward)``, ``state_dict()`` for resume.

Rewards are always maximised. Every policy an optimizer returns has passed
through ``space.budget`` (so it meets the target), except *probes*: policies an
optimizer asks to have scored only to learn from them (one layer compressed
alone, say), which the pipeline logs but never chooses as the result.
Optimizers never import networks or learners: all they know is the
:class:`SearchSpace`.

Declared capabilities (class attributes, never duck-typed):

- ``parallel``: several worker processes may share one study (``--storage``);
- ``seeds_uniform``: the first trial is the uniform policy (``Budget.uniform``),
  so a search never returns something worse than uniform on the reward split;
- ``max_trials``: the most distinct trials the optimizer can use (``uniform``: 1);
- ``takes_policy``: the constructor takes the user's ``policy`` (``none``);
- ``pareto``: searches a whole accuracy-resource front (``--pareto LO:HI``): the
  budget then keeps every proposal's resource inside the window
  (``Budget.window``), the optimizer reads each told policy's resource off the
  budget as its second objective, and ``seeds_uniform`` seeds the uniform policy
  at every point of ``Budget.points()``;
- :attr:`Optimizer.last_kind`: what the latest :meth:`ask` returned, one of
  :data:`TRIAL_KINDS`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from torchpocket.space import Policy, SearchSpace

#: ``uniform``: the uniform policy seeding a search; ``probe``: scored to learn, outside the budget, never the
#: result; ``search``: any other proposal.
TRIAL_KINDS = ("uniform", "probe", "search")


class Optimizer(ABC):
    """Base class of every hyper-parameter optimizer (Optuna ``BaseSampler`` style).

    Subclasses implement :meth:`ask` and :meth:`tell`; the defaults of
    :meth:`state_dict` / :meth:`load_state_dict` cover optimizers whose state is
    fully determined by the seed and the history of (policy, reward) pairs.
    ``parallel`` says whether several worker processes may share one study
    (``--storage``).
    """

    parallel: ClassVar[bool] = False
    seeds_uniform: ClassVar[bool] = False
    max_trials: ClassVar[int | None] = None  # None: any number
    takes_policy: ClassVar[bool] = False  # the constructor takes ``policy=`` (``--policy policy.yaml``)
    pareto: ClassVar[bool] = False  # multi-objective under a Pareto window (``--pareto LO:HI``)
    Config: ClassVar[type | None] = None  # the optimizer's config dataclass (its section), if it has options
    section: ClassVar[str | None] = None  # the name of that section

    def __init__(self, space: SearchSpace, *, seed: int = 0, total_trials: int = 0, config: Any = None,
                 storage: str | None = None, study_name: str | None = None, heartbeat: int = 0) -> None:
        self.space, self.seed, self.total_trials = space, seed, total_trials
        self.config = self.make_config(config)
        self.storage, self.study_name, self.heartbeat = storage, study_name, int(heartbeat)
        self.history: list[tuple[Policy, float]] = []
        self.last_kind: str = "search"  # the kind (TRIAL_KINDS) of the policy the latest ask() returned
        self.seeded = False  # the uniform first trial (every uniform point of a Pareto window) has been asked
        self.n_seeded = 0  # uniform trials asked so far
        self._uniform: list[Policy] | None = None
        self.last_number = -1  # number of the latest asked trial (study-wide in a shared study)
        self.last_slot = -1  # the budget slot it fills: its number, or for a retried trial the original's

    @classmethod
    def default_config(cls) -> Any:
        return cls.Config() if cls.Config is not None else None

    @classmethod
    def make_config(cls, config: Any) -> Any:
        """The optimizer's options: its ``Config`` as given, from a dict of fields, or the defaults."""
        if config is None:
            return cls.default_config()
        if cls.Config is not None and isinstance(config, dict):
            return cls.Config(**config)
        if cls.Config is not None and not isinstance(config, cls.Config):
            raise TypeError(f"{cls.__name__} config must be a {cls.Config.__name__} or a dict, "
                            f"got {type(config).__name__}")
        return config

    @abstractmethod
    def ask(self) -> Policy:
        """Propose the next policy (already within bounds and budget)."""

    def tell(self, policy: Policy, reward: float) -> None:
        """Report the reward of a policy returned by :meth:`ask` (higher is better)."""
        self.history.append((list(policy), float(reward)))

    def trial_info(self) -> dict[str, Any]:
        """Plain-data facts about the latest told trial, logged with it in ``trials.jsonl`` (DDPG: critic loss)."""
        return {}

    def uniform_policy(self) -> Policy:
        """The uniform policy at the target: the first trial of a ``seeds_uniform`` optimizer."""
        return self.space.budget.uniform()

    def uniform_policies(self) -> list[Policy]:
        """The uniform trials that seed the search: the uniform policy at the target, or at every point of a
        Pareto window (:meth:`Budget.points`)."""
        if self._uniform is None:
            self._uniform = self.space.budget.uniform_curve()
        return self._uniform

    def seeding(self) -> bool:
        """True when the next ask is a uniform seed trial (``seeds_uniform`` and not all asked yet)."""
        return self.seeds_uniform and not self.seeded

    def ask_uniform(self) -> Policy:
        """Hand out the next uniform seed trial (a subclass calls this when :meth:`seeding` says so)."""
        seeds = self.uniform_policies()
        policy = seeds[min(self.n_seeded, len(seeds) - 1)]
        self.n_seeded += 1
        self.seeded, self.last_kind = self.n_seeded >= len(seeds), "uniform"
        return list(policy)

    def state_dict(self) -> dict[str, Any]:
        return {"history": [[list(p), r] for p, r in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Default: rebuild by replaying the history (ask, then tell the recorded reward)."""
        for policy, reward in state["history"]:
            self.ask()
            self.tell(list(policy), float(reward))

    # -- parallel workers (``parallel = True``): a shared study's side of the protocol --------------
    def annotate(self, **attrs: Any) -> None:
        """Attach plain-data attributes (val acc, resource, worker) to the latest asked trial in the study."""

    def abandon(self, policy: Policy, reason: str) -> None:
        """Give back an asked trial without scoring it (over the shared budget)."""

    def shared_trials(self) -> list[dict[str, Any]]:
        """Every trial of the shared study, all workers, oldest first: number, slot (the budget slot: the
        number, or for a trial run again after its worker died the original's), state, value, attributes."""
        raise NotImplementedError(f"{type(self).__name__} keeps no shared study (parallel = False)")

    def reap_stale(self) -> None:
        """Fail the trials of workers that died (no heartbeat), which puts each back once to run again."""

    def retries_dead(self) -> bool:
        """Whether a dead worker's trial is failed and run again (a shared study with a heartbeat)."""
        return False

    @staticmethod
    def pop_pending(pending: list[Any], policy: Policy) -> Any:
        """Remove and return the pending ask whose policy (its first element) equals ``policy``;
        else the oldest one (a caller that rounded the policy); ``None`` when nothing is pending."""
        key = [float(v) for v in policy]
        i = next((k for k, item in enumerate(pending) if list(item[0]) == key), 0 if pending else None)
        return None if i is None else pending.pop(i)

    def best(self) -> tuple[Policy, float] | None:
        """The told policy with the highest reward (NaN rewards, from failed candidates, and probes never win)."""
        scored = [pr for pr in self.history if not math.isnan(pr[1])]
        return max(scored, key=lambda pr: pr[1]) if scored else None


class JournalOptimizer(Optimizer):
    """An optimizer over an engine that cannot be saved (a skopt model, an in-memory Optuna study): it keeps a
    journal of its asks (``[]``) and tells (``[key, value]``), and resume replays the journal, in order, into a
    fresh engine with the same seed, which then makes the same proposals again.

    Subclasses implement :meth:`new_engine`, :meth:`replay_ask` and :meth:`replay_tell`, and call
    :meth:`record_ask` / :meth:`record_tell` as they go.
    """

    def __init__(self, space: SearchSpace, **kw: Any) -> None:
        super().__init__(space, **kw)
        self.journal: list[list[Any]] = []

    def new_engine(self) -> None:
        """Replace the engine by a fresh one (same seed, nothing asked)."""
        raise NotImplementedError

    def replay_ask(self) -> None:
        raise NotImplementedError

    def replay_tell(self, entry: list[Any]) -> None:
        raise NotImplementedError

    def record_ask(self) -> None:
        self.journal.append([])

    def record_tell(self, key: Any, value: Any) -> None:
        self.journal.append([key, value])

    def journal_state(self) -> dict[str, Any]:
        return {"history": [[list(p), r] for p, r in self.history], "n_layers": len(self.space),
                "journal": [list(e) for e in self.journal], "seeded": self.seeded}

    def check_layers(self, state: dict[str, Any]) -> None:
        from torchpocket.errors import UserError

        if int(state["n_layers"]) != len(self.space):
            raise UserError(f"the optimizer state is for {int(state['n_layers'])} layers, this model has "
                            f"{len(self.space)}: resume with the same model and learner")

    def replay(self, state: dict[str, Any], *, engine: bool = True) -> None:
        """Rebuild from ``journal_state()``; ``engine=False``: the engine holds the trials already (a database)."""
        if engine:
            self.new_engine()
            for entry in state["journal"]:
                if entry:
                    self.replay_tell(list(entry))
                else:
                    self.replay_ask()
        self.journal = [list(e) for e in state["journal"]]
        self.history = [(list(p), float(r)) for p, r in state["history"]]
        self.seeded = bool(state.get("seeded", bool(self.journal)))
