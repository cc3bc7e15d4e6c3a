"""Parallel search workers on one Optuna storage (``--storage``): study-wide trial numbers share the
``--episodes`` budget; the worker that drew the last trial waits for the others and runs the final stage."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from torchpocket.errors import UserError
from torchpocket.hpo import Optimizer
from torchpocket.space import Policy


def study_name(cfg: dict[str, Any]) -> str:
    run = cfg["run"]
    return cfg["search"]["study_name"] or (
        f"{run['learner']}-{run['hpo']}-{run['net']}-{run['dataset']}-t{run['target']}")


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def storage_kwargs(hpo_cls: type[Optimizer], cfg: dict[str, Any]) -> dict[str, Any]:
    """The optimizer's keyword arguments for a shared study (none without ``--storage``)."""
    sc, run = cfg["search"], cfg["run"]
    if sc["final_only"] and not sc["storage"]:
        raise UserError("--final-only runs the final stage of a search kept in --storage: give --storage")
    if not sc["storage"]:
        return {}
    if not hpo_cls.parallel:
        from torchpocket.hpo import HPOS

        names = ", ".join(n for n in HPOS.names() if HPOS.get(n).parallel)
        raise UserError(f"--storage needs an Optuna-backed optimizer ({names}), not {run['hpo']!r}")
    # one study for every worker; each worker's sampler gets its own seed so they do not propose alike
    return {"storage": sc["storage"], "study_name": study_name(cfg), "seed": run["seed"] + os.getpid(),
            "heartbeat": sc["heartbeat"]}


class TrialSource:
    """Hands out (policy, trial number) until the budget is used: this process's own, or the shared study's."""

    def __init__(self, optimizer: Optimizer, episodes: int, cfg: dict[str, Any]) -> None:
        self.optimizer, self.episodes = optimizer, episodes
        self.shared, self.final_only = bool(cfg["search"]["storage"]), bool(cfg["search"]["final_only"])

    def next(self, done: int) -> tuple[Policy, int] | None:
        if self.final_only:
            return None
        if not self.shared:
            return (self.optimizer.ask(), done) if done < self.episodes else None
        policy = self.optimizer.ask()
        if self.optimizer.last_slot >= self.episodes:  # the other workers used the budget up
            self.optimizer.abandon(policy, "over the shared budget")
            return None
        return policy, self.optimizer.last_slot  # a dead worker's trial run again fills that trial's slot


def wait_for_budget(optimizer: Optimizer, episodes: int, *, wait: float) -> bool:
    """Once this worker has drawn no trial in the budget: wait until every slot of it is finished (at most
    ``wait`` seconds), failing the trials of dead workers on the way (the storage's heartbeat). True when a
    dead worker's trial has been put back to run again (this worker should ask for it), False when the
    budget is finished or the wait is over."""
    deadline = time.monotonic() + wait
    rechecked = False
    while True:
        optimizer.reap_stale()
        rows = [r for r in optimizer.shared_trials() if r["slot"] < episodes]
        if any(r["state"] == "WAITING" for r in rows):
            return True
        if time.monotonic() >= deadline:
            return False
        if not any(r["state"] == "RUNNING" for r in rows):
            # a stale trial is failed first and put back just after (two transactions): a slot whose only
            # trials failed, none given back as over the budget, may be about to get its copy; look once more
            done = {r["slot"] for r in rows if r["state"] == "COMPLETE" or "abandoned" in r}
            if rechecked or all(r["slot"] in done for r in rows):
                return False
            rechecked = True
            time.sleep(0.5)
            continue
        time.sleep(min(1.0, max(0.05, optimizer.heartbeat / 4)) if optimizer.heartbeat else 1.0)


def runs_final_stage(trials: list[dict[str, Any]], episodes: int, cfg: dict[str, Any]) -> bool:
    """In a shared study, the worker that drew the last trial (or ``--final-only``) runs the final stage."""
    mine = [x["trial"] for x in trials]
    if cfg["search"]["final_only"] or (episodes - 1) in mine:
        return True
    print(f"this worker evaluated trials {mine}; the search's {episodes} trials are all drawn, and the "
          f"worker that drew the last one runs the final stage", flush=True)
    return False


def shared_trials(optimizer: Optimizer, episodes: int, hpo: str, *, wait: float) -> list[dict[str, Any]]:
    """Every worker's trials from the shared study, once the budget's trials are all finished (or ``wait``
    seconds have passed): the union that the final stage chooses from."""
    deadline = time.monotonic() + wait
    while True:
        rows = [r for r in optimizer.shared_trials() if r["slot"] < episodes]
        if all(r["state"] not in ("RUNNING", "WAITING") for r in rows) or time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    out = []
    for r in rows:
        if r["state"] != "COMPLETE" or "policy" not in r:
            continue
        out.append({"trial": r["slot"], "optimizer": hpo, "kind": r.get("kind", "search"),
                    "policy": [float(v) for v in r["policy"]], "resource": r.get("resource"),
                    "status": r.get("status", "ok"), "val_acc": r.get("val_acc"), "reward": float(r["value"]),
                    "seconds": r.get("seconds"), "worker": r.get("worker"),
                    **({"retry_of_number": r["number"]} if r["slot"] != r["number"] else {})})
    running = sum(r["state"] == "RUNNING" for r in rows)
    print(f"shared study: {len(out)} finished trials of {episodes}" + (f", {running} still running (not waited for)"
                                                                         if running else ""), flush=True)
    return out
