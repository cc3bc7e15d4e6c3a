"""The search: ask, compress, (fast fine-tune), evaluate on the validation reward split, reward, tell, log.

Everything a candidate needs from the original model is extracted once (``learner.prepare``); each
trial is appended and flushed to ``trials.jsonl`` / ``trials.csv`` and the optimizer state is saved
atomically after every trial, so ``--resume RUN_DIR`` loses at most the trial in flight and makes the
same decisions as an uninterrupted run. One candidate is scored by :func:`score_candidate`, which the
benchmarks reuse.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from torchpocket import distributed, faults
from torchpocket.datasets import DataBundle, Split, TensorLoader
from torchpocket.errors import CandidateError, OutOfMemory, UserError
from torchpocket.hpo import HPOS, Optimizer, create_optimizer
from torchpocket.learners import Learner
from torchpocket.learners.training import NonFiniteLoss, evaluate
from torchpocket.pipeline import workers
from torchpocket.pipeline.rundir import RunDir, TrialLog, atomic_torch_save
from torchpocket.pipeline.studylog import StudyLog
from torchpocket.space import SearchSpace
from torchpocket.utils import atomic_write_text, is_main_process, progress, seed_everything

DEFAULT_EPISODES = 200


def compute_reward(kind: str, val_acc: float, resource_flops: float, params: float) -> float:
    """AMC's rewards. ``acc``: -error; ``acc-flops`` / ``acc-params``: -error * log(resource)."""
    error = 1.0 - val_acc / 100.0
    if kind == "acc":
        return -error
    r = resource_flops if kind == "acc-flops" else params
    return -error * math.log(max(r, 1.0))


@dataclass
class SearchResult:
    best_policy: list[float]
    best_reward: float
    best_val_acc: float
    trials: list[dict[str, Any]]
    layer_names: list[str]
    uniform_policy: list[float] | None
    seconds: float
    resource_unit: str
    final: bool = True  # False: a parallel worker whose share is done; another worker runs the final stage


def episodes_for(cfg: dict[str, Any]) -> int:
    """Candidates to score: --episodes (default 200), capped by what the optimizer can use (uniform: 1)."""
    from torchpocket.config import pareto_window
    from torchpocket.hpo import HPOS
    from torchpocket.space import window_points

    n = cfg["search"]["episodes"]
    if n == 0:
        raise UserError("--episodes must be at least 1 (a search needs one candidate)")
    cap = HPOS.get(cfg["run"]["hpo"]).max_trials
    window = pareto_window(cfg)
    if cap is not None and window is not None:  # per point: uniform measures its curve across the window
        cap *= len(window_points(*window))
    n = DEFAULT_EPISODES if n < 0 else n
    return min(n, cap) if cap is not None else n


def read_policy_file(path: str) -> dict[str, float]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"policy file {path} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"policy file {path} does not parse as YAML: {e}") from None
    layers = data.get("layers") if isinstance(data, dict) and "layers" in data else data
    if not isinstance(layers, dict) or not all(isinstance(v, (int, float)) for v in layers.values()):
        raise UserError(f"policy file {path}: expected a mapping 'layers: {{layer name: value}}'")
    return {str(k): float(v) for k, v in layers.items()}


def score_candidate(learner: Any, model: nn.Module, policy: list[float], val_loader: Any, *, space: Any,
                    data: DataBundle, sc: dict[str, Any], device: torch.device,
                    full: tuple[float, float]) -> dict[str, Any]:
    """Compress, fast fine-tune (``--ft-steps``), evaluate on the reward split: one candidate's record."""
    try:
        cand = learner.compress(model, policy)
        if sc["ft_steps"]:
            learner.finetune(cand, teacher=model, steps=sc["ft_steps"])
        acc = evaluate(cand, val_loader, device=device)
        params = float(sum(p.numel() for p in cand.parameters()))
        if space.budget.unit == "flops":  # the budget's cost model is exact: no counting forward pass
            flops = space.budget.fraction(policy) * full[0]
        else:
            flops = count(cand, data)[0]
        reward = compute_reward(sc["reward"], acc, flops, params)
        return {"status": "ok", "val_acc": acc, "reward": reward, "flops": flops, "params": params}
    except (NonFiniteLoss, CandidateError) as e:  # diverged, or this policy cannot be built: keep searching
        return {"status": "failed", "val_acc": 0.0, "reward": compute_reward(sc["reward"], 0.0, *full),
                "reason": f"{type(e).__name__}: {e}"[:300]}
    except (MemoryError, torch.OutOfMemoryError) as e:  # anything else is a bug: it stops the run
        raise OutOfMemory(f"out of memory while scoring a candidate ({type(e).__name__}): lower --reward-val-size, "
                          "--calib-batches or --batch-size (or --ft-steps 0)") from None


class ProbeCache:
    """Scores of probes (one layer compressed alone) kept across runs: they do not depend on the target.

    One JSON file per (baseline weights, learner and its options, reward settings, seed, reward split size),
    under ``$TORCHPOCKET_CACHE/probes`` (default ``~/.cache/torchpocket/probes``).
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        if path is not None and path.is_file():
            try:
                self.entries = json.loads(path.read_text())
            except (json.JSONDecodeError, OSError):
                self.entries = {}  # a damaged cache is only a slower search

    @classmethod
    def for_search(cls, model: nn.Module, cfg: dict[str, Any], val_size: int, lrn: Any = None) -> ProbeCache:
        import hashlib

        h = hashlib.sha1()
        for k, v in sorted(model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        from torchpocket.hpo import HPOS

        learner = cfg["run"]["learner"]
        optimizer_sections = {HPOS.get(n).section for n in HPOS.names()}  # irrelevant to a probe's score
        sections = {sec: cfg[sec] for sec in sorted(cfg) if sec not in ("run", "data", "search")
                    and sec not in optimizer_sections}
        key = json.dumps({"weights": h.hexdigest(), "learner": learner, "sections": sections,
                          "seed": cfg["run"]["seed"], "val": val_size,
                          "measured": lrn.measured_options() if lrn is not None else {},
                          "dataset": cfg["run"]["dataset"],
                          "search": {k: cfg["search"][k] for k in ("ft_steps", "ft_lr", "reward")}},
                         sort_keys=True, default=str)
        digest = hashlib.sha1(key.encode()).hexdigest()[:16]
        root = Path(os.environ.get("TORCHPOCKET_CACHE", Path.home() / ".cache" / "torchpocket")) / "probes"
        return cls(root / f"{learner}-{digest}.json")

    @staticmethod
    def _key(policy: list[float]) -> str:
        return ",".join(f"{float(v):.6g}" for v in policy)

    def get(self, policy: list[float]) -> dict[str, Any] | None:
        return self.entries.get(self._key(policy))

    def put(self, policy: list[float], record: dict[str, Any]) -> None:
        if self.path is None or not is_main_process():
            return
        self.entries[self._key(policy)] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.entries))


def input_shape(data: DataBundle) -> tuple[int, int, int]:
    return data.input_shape


def count(model: nn.Module, data: DataBundle) -> tuple[float, float]:
    """FLOPs and parameters of ``model`` on one input of the dataset's shape."""
    from torchpocket.profile import profile_model

    prof = profile_model(model, input_shape(data))
    return float(prof.flops), float(prof.params)


def reward_loader(data: DataBundle, size: int) -> tuple[Any, int]:
    """The validation images that score every candidate (the first ``size``; 0 = the whole split)."""
    val = data.val
    if not isinstance(val, Split):
        return data.loader("val", batch_size=500), len(val)
    if size and size < len(val):
        val = val.subset(size)
    return TensorLoader(val.x, val.y, batch_size=500), len(val)


def make_optimizer(space: SearchSpace, cfg: dict[str, Any], episodes: int) -> Optimizer:
    """The run's optimizer with its own config section, seed, budget and (``--storage``) shared study."""
    run, sc = cfg["run"], cfg["search"]
    cls = HPOS.get(run["hpo"])
    kwargs: dict[str, Any] = {"seed": run["seed"], "total_trials": episodes}
    if cls.section:
        kwargs["config"] = cls.Config(**cfg[cls.section])
    if cls.takes_policy and sc["policy"]:
        kwargs["policy"] = space.from_dict(read_policy_file(sc["policy"]))
    kwargs.update(workers.storage_kwargs(cls, cfg))
    return create_optimizer(run["hpo"], space, **kwargs)


@dataclass
class Search:
    """One search in progress: what every trial needs, and the trials so far."""

    learner: Learner
    model: nn.Module
    data: DataBundle
    cfg: dict[str, Any]
    device: torch.device
    space: SearchSpace
    optimizer: Optimizer
    val_loader: Any
    full: tuple[float, float]
    probes: ProbeCache
    log: TrialLog | None
    state_path: Path | None
    study: StudyLog | None = None
    trials: list[dict[str, Any]] = field(default_factory=list)

    def resume(self) -> None:
        """Continue a killed search: the optimizer's saved state and the trials finished before it."""
        if not (self.cfg["search"]["resume"] and self.log is not None and self.state_path is not None):
            return
        done = 0
        for stale in self.state_path.parent.glob("*.tmp[0-9]*"):  # a write cut between its file and its rename
            stale.unlink(missing_ok=True)
        if self.state_path.exists():  # no state yet: killed during the first trial, start over
            try:
                state = torch.load(self.state_path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - truncated, foreign or not a torch file
                raise UserError(f"cannot read {self.state_path} ({type(e).__name__}: {str(e)[:120]}): this search "
                                "cannot be resumed; start a new run (the finished trials are in trials.csv)") from None
            self.optimizer.load_state_dict(state["optimizer"])
            done = state["trials"]
        self.trials = self.log.read()[:done]
        self.log.rewrite(self.trials)  # drop rows of a trial that was in flight
        if self.study is not None:
            self.study.rebuild(self.trials)
        print(f"resumed after {len(self.trials)} finished trials", flush=True)

    def trial(self, policy: list[float], number: int) -> dict[str, Any]:
        """Score one proposal (a probe from the cache when an earlier run scored it), tell, log, save."""
        run, sc = self.cfg["run"], self.cfg["search"]
        t0 = time.perf_counter()
        seed_everything(run["seed"] * 100_003 + number)
        record: dict[str, Any] = {"trial": number, "optimizer": run["hpo"], "kind": self.optimizer.last_kind,
                                  "policy": [float(v) for v in policy],
                                  "resource": self.space.budget.fraction(policy)}
        if sc["storage"]:
            record["worker"] = workers.worker_id()
        faults.point("trial-start")
        cached = self.probes.get(policy) if record["kind"] == "probe" else None
        if cached is not None:  # a probe scored by an earlier run on the same model, learner and reward split
            record.update(cached, cached_probe=True)
        else:
            record.update(score_candidate(self.learner, self.model, policy, self.val_loader, space=self.space,
                                          data=self.data, sc=sc, device=self.device, full=self.full))
            if record["kind"] == "probe" and record["status"] == "ok":
                self.probes.put(policy, {k: record[k] for k in ("status", "val_acc", "reward", "flops", "params")})
        record["seconds"] = round(time.perf_counter() - t0, 3)
        faults.point("trial-scored")
        if sc["storage"]:
            self.optimizer.annotate(**{k: record[k] for k in ("status", "val_acc", "resource", "seconds",
                                                              "worker", "kind")})
        self.optimizer.tell(policy, record["reward"])
        record.update(self.optimizer.trial_info())
        self.trials.append(record)
        if self.log and self.state_path is not None and is_main_process():
            self.log.append(record)
            faults.point("trial-logged")
            if self.study is not None:
                self.study.add(record)
            faults.point("study-added")
            atomic_torch_save(self.state_path, {"optimizer": self.optimizer.state_dict(),
                                                "trials": len(self.trials)})
        return record

    def result(self, seconds: float, *, final: bool = True) -> SearchResult:
        names, unit = self.space.names, self.space.budget.unit
        if not final:
            return SearchResult([], float("nan"), float("nan"), self.trials, names, None, seconds, unit, final=False)
        ok = [x for x in self.trials if x["status"] == "ok" and x.get("kind") != "probe"]  # probes break the budget
        if not ok:
            reasons = "; ".join(sorted({x.get("reason", "") for x in self.trials}))[:300]
            raise UserError(f"every candidate failed: {reasons}" if reasons else
                            "no candidate within the budget was scored: give more --episodes")
        best = max(ok, key=lambda x: x["reward"])
        uniform = self.space.budget.uniform() if len(self.space) else None
        return SearchResult(best["policy"], best["reward"], best["val_acc"], self.trials, names, uniform, seconds,
                            unit)


def start_search(learner: Learner, model: nn.Module, data: DataBundle, cfg: dict[str, Any], *,
                 run_dir: RunDir | None, device: torch.device, prepare: bool = True) -> tuple[Search, int]:
    """Prepare the learner, build the space, the optimizer, the reward split and the trial log."""
    from torchpocket.config import pareto_window

    sc = cfg["search"]
    if prepare:
        learner.prepare(model, data)
    window = pareto_window(cfg)
    space = learner.search_space(model, window[1] if window else cfg["run"]["target"], fill=sc["reward"] == "acc")
    if window is not None:
        space.budget.window(window[0])
    episodes = episodes_for(cfg)
    optimizer = make_optimizer(space, cfg, episodes)
    val_loader, n_val = reward_loader(data, sc["reward_val_size"])
    s = Search(learner, model, data, cfg, device, space, optimizer, val_loader, full=count(model, data),
               probes=ProbeCache.for_search(model, cfg, n_val, learner) if run_dir else ProbeCache(None),
               log=TrialLog(run_dir.path, space.names) if run_dir else None,
               state_path=run_dir.path / "search_state.pt" if run_dir else None,
               study=StudyLog(run_dir.path, space, fresh=True, pareto=window is not None)
               if run_dir and is_main_process() else None)
    s.resume()
    base_val = evaluate(model, val_loader, device=device)
    what = f"a front over [{window[0]:g}, {window[1]:g}]" if window else f"target {cfg['run']['target']:g}"
    print(f"baseline val acc on the reward split ({n_val} images): {base_val:.2f}%  |  "
          f"{len(space)} compressible layers, {episodes} trials with {cfg['run']['hpo']} ({what})", flush=True)
    return s, episodes


def search(learner: Learner, model: nn.Module, data: DataBundle, cfg: dict[str, Any], *, run_dir: RunDir | None,
           device: torch.device, prepare: bool = True) -> SearchResult:
    """The ask / compress / fine-tune / evaluate / tell loop.

    ``prepare=False`` reuses a learner already prepared on ``model`` and ``data`` (benchmarks
    running many searches with one calibration).
    """
    start = time.perf_counter()
    s, episodes = start_search(learner, model, data, cfg, run_dir=run_dir, device=device, prepare=prepare)
    run, sc = cfg["run"], cfg["search"]
    source = workers.TrialSource(s.optimizer, episodes, cfg)
    pick_only = bool(sc["pick"] and sc["resume"])  # choose from the trials there: finished or not, no new search
    bar = progress(total=episodes, desc=f"search ({run['hpo']})", quiet=run["quiet"] or pick_only)
    bar.update(len(s.trials))
    while not pick_only:
        while (nxt := source.next(len(s.trials))) is not None:
            policy = distributed.broadcast_object(list(nxt[0]))  # under torchrun rank 0 decides for every rank
            record = s.trial(policy, nxt[1])
            best = max((x["reward"] for x in s.trials if x["status"] == "ok"), default=float("nan"))
            bar.update(1)
            bar.set_postfix_str(f"best reward {best:.4f} last acc {record['val_acc']:.2f}% "
                                f"res {record['resource']:.3f} {record['seconds']:.1f}s")
        # a shared study with a heartbeat: every worker stays until the budget is finished, to run again a dead
        # worker's trial (without one, only the worker that runs the final stage waits, below)
        if not sc["storage"] or sc["final_only"] or not s.optimizer.retries_dead() or \
                not workers.wait_for_budget(s.optimizer, episodes, wait=sc["worker_wait"]):
            break
    bar.close()
    if sc["storage"]:
        if not pick_only and not workers.runs_final_stage(s.trials, episodes, cfg):
            return s.result(time.perf_counter() - start, final=False)
        s.trials = workers.shared_trials(s.optimizer, episodes, run["hpo"],
                                         wait=0.0 if sc["final_only"] or pick_only else sc["worker_wait"])
    return s.result(time.perf_counter() - start)


def search_summary(result: SearchResult) -> dict[str, Any]:
    """The search block of summary.json: the best trial, and how far it is above the uniform first trial."""
    ok = [t for t in result.trials if t["status"] == "ok" and t.get("kind") != "probe"]
    best = max(ok, key=lambda t: t["reward"]) if ok else None
    out: dict[str, Any] = {
        "best_trial": best["trial"] if best else None, "best_reward": result.best_reward,
        "best_val_acc": result.best_val_acc,
        "probes": sum(t.get("kind") == "probe" for t in result.trials),
        "cached_probes": sum(bool(t.get("cached_probe")) for t in result.trials),
        "workers": len({t.get("worker") for t in result.trials if t.get("worker")}) or 1}
    uni = next((t for t in ok if t.get("kind") == "uniform"), None)
    if uni is not None and best is not None:
        out.update(uniform_trial=uni["trial"], uniform_val_acc=uni["val_acc"], uniform_reward=uni["reward"],
                   best_minus_uniform_val_acc=best["val_acc"] - uni["val_acc"],
                   best_minus_uniform_reward=best["reward"] - uni["reward"])
    return out
