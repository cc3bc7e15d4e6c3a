"""The pipeline: ask, compress, (fast fine-tune), evaluate on the validation split, reward, tell, log;
then re-train the best candidate with distillation, test it once, and write the run directory.

Everything a candidate needs from the original model is extracted once
(``learner.prepare``); each trial is appended and flushed to ``trials.jsonl`` /
``trials.csv`` and the optimizer state is saved atomically after every trial, so
``--resume RUN_DIR`` loses at most the trial in flight and makes the same
decisions as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import datetime as _dt
import io
import json
import math
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from torchpocket import distributed
from torchpocket.config import dump_yaml, opt, register_section
from torchpocket.datasets import DataBundle, Split, load_dataset
from torchpocket.errors import UserError
from torchpocket.learners.training import NonFiniteLoss, TrainConfig, evaluate, fit
from torchpocket.utils import (
    Tee,
    atomic_write_text,
    is_main_process,
    machine_description,
    progress,
    resolve_device,
    seed_everything,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_DIR = REPO_ROOT / "benchmarks"


@dataclass
class SearchConfig:
    episodes: int = opt(-1, "candidates to evaluate (-1 = 30 for a search, 1 with --hpo none / uniform)")
    ft_steps: int = opt(0, "fast fine-tuning steps per candidate, distilled from the original (0 = AMC: none)")
    ft_lr: float = opt(0.01, "learning rate of fast fine-tuning")
    reward: str = opt("acc", "acc: -error, resource-constrained | acc-flops / acc-params: -error*log(resource), "
                      "accuracy-guaranteed (may go below the target)", choices=("acc", "acc-flops", "acc-params"))
    reward_val_size: int = opt(2000, "validation images used to score each candidate (0 = the whole split)")
    retrain_epochs: int = opt(1, "epochs of re-training (with distillation) for the best candidate")
    retrain_lr: float = opt(0.01, "peak learning rate of the re-training (cosine-decayed; the baseline's is --lr)")
    policy: str | None = opt(None, "policy.yaml to apply with --hpo none (per-layer values)")
    storage: str | None = opt(None, "Optuna RDB URL (sqlite:///search.db, postgresql://...) shared by workers")
    study_name: str | None = opt(None, "Optuna study name in --storage (default: derived from the run settings)")
    final_only: bool = opt(False, "with --storage: no search, run the final stage on the best trial stored (when "
                                  "the worker that drew the last trial died)")
    worker_wait: float = opt(3600.0, "with --storage: seconds the worker that drew the last trial waits for the "
                                     "other workers' trials before its final stage")
    resume: str | None = opt(None, "run directory of a killed search: continue from its last finished trial")
    export_onnx: bool = opt(True, "write model.onnx and check it against PyTorch with ONNX Runtime")
    latency_repeats: int = opt(20, "repeats for the latency figures in summary.json (median)")


register_section("search", SearchConfig)

DEFAULT_EPISODES = 30


# ----------------------------------------------------------------------------- run directory


@dataclass
class RunDir:
    path: Path
    _files: list[Any] = field(default_factory=list)

    @classmethod
    def create(cls, cfg: dict[str, Any]) -> RunDir:
        run = cfg["run"]
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        net = (run["net"] or "model").replace(":", "-").replace("/", "-")
        name = f"{stamp}-{run['learner']}-{run['hpo']}-{net}-{run['dataset']}"
        root = Path(run["out_dir"])
        root.mkdir(parents=True, exist_ok=True)
        path, k = root / name, 1
        while True:
            try:
                path.mkdir()  # never reuse an existing directory
                break
            except FileExistsError:
                k += 1
                path = root / f"{name}-{k}"
        return cls(path)

    @contextlib.contextmanager
    def tee(self) -> Iterator[None]:
        """Everything printed also goes to log.txt."""
        log = open(self.path / "log.txt", "a", buffering=1)
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = Tee(out, log), Tee(err, log)  # type: ignore[assignment]
        try:
            yield
        finally:
            sys.stdout, sys.stderr = out, err
            log.close()

    def write_json(self, name: str, obj: Any) -> None:
        atomic_write_text(self.path / name, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


class TrialLog:
    """trials.jsonl (the record resume reads) and trials.csv (one column per layer), flushed per trial."""

    FIELDS = ["trial", "optimizer", "kind", "status", "resource", "val_acc", "reward", "seconds", "reason"]

    def __init__(self, path: Path, layer_names: list[str]) -> None:
        self.jsonl, self.csv, self.names = path / "trials.jsonl", path / "trials.csv", layer_names

    def read(self) -> list[dict[str, Any]]:
        if not self.jsonl.exists():
            return []
        out = []
        for line in self.jsonl.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a kill: the trial in flight, re-run on resume
        return out

    def rewrite(self, trials: list[dict[str, Any]]) -> None:
        atomic_write_text(self.jsonl, "".join(json.dumps(t) + "\n" for t in trials))
        with open(self.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(self.FIELDS + self.names)
            for t in trials:
                w.writerow(self._row(t))

    def _row(self, t: dict[str, Any]) -> list[Any]:
        return [t.get(k, "") for k in self.FIELDS] + list(t["policy"])

    def append(self, t: dict[str, Any]) -> None:
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(t) + "\n")
            f.flush()
            os.fsync(f.fileno())
        new = not self.csv.exists()
        with open(self.csv, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(self.FIELDS + self.names)
            w.writerow(self._row(t))


# ----------------------------------------------------------------------------- data and models


class LoaderBundle(DataBundle):
    """A DataBundle over loaders the user already has (Python API): the loaders are used as given."""

    def __init__(self, train_loader: Any, val_loader: Any, test_loader: Any = None) -> None:
        x, y = next(iter(train_loader))
        super().__init__("user", _LoaderSplit(train_loader), _LoaderSplit(val_loader),
                         _LoaderSplit(test_loader or val_loader), in_channels=int(x.shape[1]),
                         num_classes=0, image_size=int(x.shape[-1]))
        self._loaders = {"train": train_loader, "val": val_loader, "test": test_loader or val_loader}

    def loader(self, split: str, **_: Any) -> Any:
        return self._loaders[split]


class _LoaderSplit:
    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __len__(self) -> int:
        ds = getattr(self.loader, "dataset", None)
        return len(ds) if ds is not None else len(self.loader) * getattr(self.loader, "batch_size", 1)

    def __getitem__(self, i: int) -> Any:
        ds = getattr(self.loader, "dataset", None)
        if ds is not None:
            return ds[i]
        x, y = next(iter(self.loader))
        return x[i], y[i]


def load_data(cfg: dict[str, Any]) -> DataBundle:
    d, run = cfg["data"], cfg["run"]
    kw: dict[str, Any] = {"data_dir": d["data_dir"], "seed": 0}
    if d["val_size"] >= 0:
        kw["val_size"] = d["val_size"]
    if run["dataset"] == "imagenet":
        kw["num_workers"] = d["num_workers"]
    data = load_dataset(run["dataset"], **kw)
    print(data.sizes(), flush=True)
    return data


def _train_cfg(cfg: dict[str, Any]) -> TrainConfig:
    return TrainConfig(**cfg["train"])


def baseline_cache_path(cfg: dict[str, Any]) -> Path:
    import hashlib

    run = cfg["run"]
    key = json.dumps({"net": run["net"], "dataset": run["dataset"], "seed": run["seed"], "train": cfg["train"],
                      "val_size": cfg["data"]["val_size"]}, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    root = Path(os.environ.get("TORCHPOCKET_CACHE", Path.home() / ".cache" / "torchpocket")) / "baselines"
    return root / f"{run['net'].replace(':', '-')}-{run['dataset']}-s{run['seed']}-{digest}.pt"


def shipped_baseline(net: str, dataset: str) -> Path | None:
    p = SHIPPED_DIR / f"{net.replace(':', '-')}-{dataset}.pt"
    return p if p.is_file() else None


def resolve_baseline(cfg: dict[str, Any], data: DataBundle, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """The model a compression run starts from: --init, else the shipped checkpoint, else a cached or new baseline."""
    from torchpocket.api import arch_chain, load, save_model
    from torchpocket.learners.training import load_checkpoint
    from torchpocket.nets import create_net

    run = cfg["run"]
    if run["init"]:
        ckpt = load_checkpoint(run["init"])
        _check_compatible(ckpt, data, run["init"])
        model = load(run["init"])
        run["net"] = ckpt.get("net") or run["net"]
        print(f"starting from {run['init']} (net {run['net']}, learner {ckpt.get('learner')})", flush=True)
        return model, {"source": str(run["init"]), "base_arch": arch_chain(ckpt)}
    shipped = shipped_baseline(run["net"], run["dataset"])
    if shipped is not None:
        ckpt = load_checkpoint(shipped)
        _check_compatible(ckpt, data, str(shipped))
        print(f"starting from the shipped baseline {shipped.relative_to(REPO_ROOT)}", flush=True)
        return load(shipped), {"source": str(shipped), "base_arch": []}
    cache = baseline_cache_path(cfg)
    if cache.is_file():
        print(f"starting from the cached baseline {cache}", flush=True)
        return load(cache), {"source": str(cache), "base_arch": []}
    tc = _train_cfg(cfg)
    print(f"no --init and no shipped baseline for {run['net']} on {run['dataset']}: training one for "
          f"{tc.epochs} epochs (cached at {cache})", flush=True)
    model = create_net(run["net"], in_channels=data.in_channels, num_classes=data.num_classes).to(device)
    fit(model, data.loader("train", batch_size=tc.batch_size, train=True, seed=run["seed"]),
        data.loader("val", batch_size=512), cfg=tc, device=device, quiet=run["quiet"], desc="baseline")
    model.to(memory_format=torch.contiguous_format)
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_model(cache, model, config=cfg, net=run["net"], in_channels=data.in_channels,
               num_classes=data.num_classes, image_size=data.image_size)
    return model, {"source": str(cache), "base_arch": []}


def _check_compatible(ckpt: dict[str, Any], data: DataBundle, path: str) -> None:
    if ckpt.get("in_channels") != data.in_channels or ckpt.get("num_classes") != data.num_classes:
        raise UserError(
            f"checkpoint {path} takes {ckpt.get('in_channels')}-channel input with {ckpt.get('num_classes')} classes, "
            f"but {data.name} has {data.in_channels} channels and {data.num_classes} classes"
        )


# ----------------------------------------------------------------------------- rewards


def compute_reward(kind: str, val_acc: float, resource_flops: float, params: float) -> float:
    """AMC's rewards. ``acc``: -error; ``acc-flops`` / ``acc-params``: -error * log(resource)."""
    error = 1.0 - val_acc / 100.0
    if kind == "acc":
        return -error
    r = resource_flops if kind == "acc-flops" else params
    return -error * math.log(max(r, 1.0))


# ----------------------------------------------------------------------------- search


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


def _study_name(cfg: dict[str, Any]) -> str:
    run = cfg["run"]
    return cfg["search"]["study_name"] or (
        f"{run['learner']}-{run['hpo']}-{run['net']}-{run['dataset']}-t{run['target']}")


def episodes_for(cfg: dict[str, Any]) -> int:
    """Candidates to score: --episodes (default 30), capped by what the optimizer can use (uniform: 1)."""
    from torchpocket.hpo import HPOS

    n = cfg["search"]["episodes"]
    if n == 0:
        raise UserError("--episodes must be at least 1 (a search needs one candidate)")
    cap = HPOS.get(cfg["run"]["hpo"]).max_trials
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
            flops = _count(cand, data)[0]
        reward = compute_reward(sc["reward"], acc, flops, params)
        return {"status": "ok", "val_acc": acc, "reward": reward, "flops": flops, "params": params}
    except (NonFiniteLoss, RuntimeError, ValueError) as e:  # diverged or failed to build: keep searching
        return {"status": "failed", "val_acc": 0.0, "reward": compute_reward(sc["reward"], 0.0, *full),
                "reason": f"{type(e).__name__}: {e}"[:300]}


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
    def for_search(cls, model: nn.Module, cfg: dict[str, Any], val_size: int) -> ProbeCache:
        import hashlib

        h = hashlib.sha1()
        for k, v in sorted(model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        from torchpocket.hpo import HPOS

        learner = cfg["run"]["learner"]
        optimizer_sections = {_section_of(HPOS.get(n)) for n in HPOS.names()}  # irrelevant to a probe's score
        sections = {sec: cfg[sec] for sec in sorted(cfg) if sec not in ("run", "data", "search")
                    and sec not in optimizer_sections}
        key = json.dumps({"weights": h.hexdigest(), "learner": learner, "sections": sections,
                          "seed": cfg["run"]["seed"], "val": val_size, "dataset": cfg["run"]["dataset"],
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


def search(
    learner: Any,
    model: nn.Module,
    data: DataBundle,
    cfg: dict[str, Any],
    *,
    run_dir: RunDir | None,
    device: torch.device,
    prepare: bool = True,
) -> SearchResult:
    """The ask / compress / fine-tune / evaluate / tell loop.

    ``prepare=False`` reuses a learner already prepared on ``model`` and ``data`` (benchmarks
    running many searches with one calibration).
    """
    from torchpocket.hpo import HPOS, create_optimizer

    run, sc = cfg["run"], cfg["search"]
    fill = sc["reward"] == "acc"
    start = time.perf_counter()
    if prepare:
        learner.prepare(model, data)
    space = learner.search_space(model, run["target"], fill=fill)
    names = space.names
    episodes = episodes_for(cfg)
    hpo_cls = HPOS.get(run["hpo"])
    kwargs: dict[str, Any] = {"seed": run["seed"], "total_trials": episodes}
    section = _section_of(hpo_cls)
    if section:
        kwargs["config"] = _dataclass_from(hpo_cls, cfg[section])
    if run["hpo"] == "none" and sc["policy"]:
        kwargs["policy"] = space.from_dict(read_policy_file(sc["policy"]))
    if sc["storage"]:
        if not getattr(hpo_cls, "parallel", False):
            raise UserError(
                f"--storage needs an Optuna-backed optimizer (tpe, evolution, optuna-gp), not {run['hpo']!r}")
        # one study for every worker; each worker's sampler gets its own seed so they do not propose alike
        kwargs.update(storage=sc["storage"], study_name=_study_name(cfg), seed=run["seed"] + os.getpid())
    optimizer = create_optimizer(run["hpo"], space, **kwargs)

    val = data.val
    if isinstance(val, Split) and sc["reward_val_size"] and sc["reward_val_size"] < len(val):
        val = val.subset(sc["reward_val_size"])
    val_loader = (data.loader("val", batch_size=500) if not isinstance(val, Split)
                  else _split_loader(val, 500))
    full_flops, full_params = _count(model, data)
    probes = ProbeCache.for_search(model, cfg, len(val)) if run_dir else ProbeCache(None)

    log = TrialLog(run_dir.path, names) if run_dir else None
    trials: list[dict[str, Any]] = []
    state_path = run_dir.path / "search_state.pt" if run_dir else None
    if sc["resume"] and log is not None and state_path is not None:
        done = 0
        if state_path.exists():  # no state yet: killed during the first trial, start over
            state = torch.load(state_path, map_location="cpu", weights_only=True)
            optimizer.load_state_dict(state["optimizer"])
            done = state["trials"]
        trials = log.read()[:done]
        log.rewrite(trials)  # drop rows of a trial that was in flight
        print(f"resumed after {len(trials)} finished trials", flush=True)
    base_val = evaluate(model, val_loader, device=device)
    print(f"baseline val acc on the reward split ({len(val)} images): {base_val:.2f}%  |  "
          f"{len(names)} compressible layers, {episodes} trials with {run['hpo']}", flush=True)

    shared = bool(sc["storage"])  # parallel workers: trial numbers are study-wide, the budget is shared
    worker = f"{socket.gethostname()}:{os.getpid()}"
    if sc["final_only"] and not shared:
        raise UserError("--final-only runs the final stage of a search kept in --storage: give --storage")

    def next_trial(t: int) -> tuple[list[float], int] | None:
        if sc["final_only"]:
            return None
        if not shared:
            return (optimizer.ask(), t) if t < episodes else None
        policy = optimizer.ask()
        if optimizer.last_number >= episodes:  # the other workers used the budget up
            optimizer.abandon(policy, "over the shared budget")
            return None
        return policy, optimizer.last_number

    bar = progress(total=episodes, desc=f"search ({run['hpo']})", quiet=run["quiet"])
    bar.update(len(trials))
    t = len(trials)
    while (nxt := next_trial(t)) is not None:
        policy, number = nxt
        policy = distributed.broadcast_object(list(policy))  # under torchrun rank 0 decides for every rank
        t0 = time.perf_counter()
        seed_everything(run["seed"] * 100_003 + number)
        record: dict[str, Any] = {"trial": number, "optimizer": run["hpo"], "kind": optimizer.last_kind,
                                  "policy": [float(v) for v in policy], "resource": space.budget.fraction(policy)}
        if shared:
            record["worker"] = worker
        cached = probes.get(policy) if record["kind"] == "probe" else None
        if cached is not None:  # a probe scored by an earlier run on the same model, learner and reward split
            record.update(cached, cached_probe=True)
        else:
            record.update(score_candidate(learner, model, policy, val_loader, space=space, data=data, sc=sc,
                                          device=device, full=(full_flops, full_params)))
            if record["kind"] == "probe" and record["status"] == "ok":
                probes.put(policy, {k: record[k] for k in ("status", "val_acc", "reward", "flops", "params")})
        reward = record["reward"]
        record["seconds"] = round(time.perf_counter() - t0, 3)
        if shared:
            optimizer.annotate(**{k: record[k] for k in ("status", "val_acc", "resource", "seconds", "worker",
                                                         "kind")})
        optimizer.tell(policy, reward)
        trials.append(record)
        t += 1
        if log and state_path is not None and is_main_process():
            log.append(record)
            buf_state = {"optimizer": optimizer.state_dict(), "trials": len(trials)}
            _atomic_torch_save(state_path, buf_state)
        best = max((x["reward"] for x in trials if x["status"] == "ok"), default=float("nan"))
        bar.update(1)
        bar.set_postfix_str(f"best reward {best:.4f} last acc {record['val_acc']:.2f}% "
                            f"res {record['resource']:.3f} {record['seconds']:.1f}s")
    bar.close()
    final = True
    if shared:
        mine = [x["trial"] for x in trials]
        final = sc["final_only"] or (episodes - 1) in mine  # the worker that drew the last trial finishes
        if not final:
            print(f"this worker evaluated trials {mine}; the search's {episodes} trials are all drawn, and the "
                  f"worker that drew the last one runs the final stage", flush=True)
            return SearchResult([], float("nan"), float("nan"), trials, names, None,
                                time.perf_counter() - start, space.budget.unit, final=False)
        trials = _shared_trials(optimizer, episodes, run["hpo"], wait=0.0 if sc["final_only"] else sc["worker_wait"])
    ok = [x for x in trials if x["status"] == "ok" and x.get("kind") != "probe"]  # probes break the budget
    if not ok:
        reasons = "; ".join(sorted({x.get("reason", "") for x in trials}))[:300]
        raise UserError(f"every candidate failed: {reasons}" if reasons else
                        "no candidate within the budget was scored: give more --episodes")
    best_t = max(ok, key=lambda x: x["reward"])
    uniform = space.budget.uniform() if len(space) else None
    return SearchResult(best_t["policy"], best_t["reward"], best_t["val_acc"], trials, names, uniform,
                        time.perf_counter() - start, space.budget.unit, final=final)


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


def _shared_trials(optimizer: Any, episodes: int, hpo: str, *, wait: float) -> list[dict[str, Any]]:
    """Every worker's trials from the shared study, once the budget's trials are all finished (or ``wait``
    seconds have passed): the union that the final stage chooses from."""
    deadline = time.monotonic() + wait
    while True:
        rows = [r for r in optimizer.shared_trials() if r["number"] < episodes]
        if all(r["state"] not in ("RUNNING", "WAITING") for r in rows) or time.monotonic() >= deadline:
            break
        time.sleep(1.0)
    out = []
    for r in rows:
        if r["state"] != "COMPLETE" or "policy" not in r:
            continue
        out.append({"trial": r["number"], "optimizer": hpo, "kind": r.get("kind", "search"),
                    "policy": [float(v) for v in r["policy"]],
                    "resource": r.get("resource"), "status": r.get("status", "ok"), "val_acc": r.get("val_acc"),
                    "reward": float(r["value"]), "seconds": r.get("seconds"), "worker": r.get("worker")})
    running = sum(r["state"] == "RUNNING" for r in rows)
    print(f"shared study: {len(out)} finished trials of {episodes}" + (f", {running} still running (not waited for)"
                                                                         if running else ""), flush=True)
    return out


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _split_loader(split: Split, batch_size: int) -> Any:
    from torchpocket.datasets import TensorLoader

    return TensorLoader(split.x, split.y, batch_size=batch_size)


def _atomic_torch_save(path: Path, obj: Any) -> None:
    import io

    from torchpocket.utils import atomic_write_bytes

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _input_shape(data: DataBundle) -> tuple[int, int, int]:
    return (data.in_channels, data.image_size, data.image_size)


def _count(model: nn.Module, data: DataBundle) -> tuple[float, float]:
    from torchpocket.profile import profile_model

    prof = profile_model(model, _input_shape(data))
    return float(prof.flops), float(prof.params)


def _section_of(cls: type) -> str | None:
    from torchpocket.config import SECTIONS

    cfg_cls = getattr(cls, "Config", None)
    for name, c in SECTIONS.items():
        if c is cfg_cls and cfg_cls is not None:
            return name
    return getattr(cls, "section", None)


def _dataclass_from(cls: type, values: dict[str, Any]) -> Any:
    cfg_cls = getattr(cls, "Config", None)
    if cfg_cls is None:
        from torchpocket.config import SECTIONS

        cfg_cls = SECTIONS[_section_of(cls)]  # type: ignore[index]
    return cfg_cls(**values)


def make_learner(cfg: dict[str, Any], device: torch.device) -> Any:
    from torchpocket.learners import LEARNERS

    cls = LEARNERS.get(cfg["run"]["learner"])
    section = _section_of(cls)
    config = _dataclass_from(cls, cfg[section]) if section else None
    from torchpocket.config import SECTIONS

    # options a learner shares with another one's section (dis-chn-pruned reads chn-pruned's graph options)
    extra = {kw: SECTIONS[sec](**cfg[sec]) for kw, sec in getattr(cls, "extra_sections", {}).items()}
    return cls(config=config, train_cfg=_train_cfg(cfg), device=device, quiet=cfg["run"]["quiet"],
               seed=cfg["run"]["seed"], **extra)


# ----------------------------------------------------------------------------- final stage


def finalize(
    learner: Any,
    base: nn.Module,
    result: SearchResult | None,
    data: DataBundle,
    cfg: dict[str, Any],
    *,
    run_dir: RunDir,
    device: torch.device,
    base_arch: list[dict[str, Any]],
    net: str | None,
) -> dict[str, Any]:
    """Best policy -> compress -> re-train with distillation -> test once -> model.pt, policy.yaml, summary, report."""
    from torchpocket.api import save_model

    run, sc = cfg["run"], cfg["search"]
    seed_everything(run["seed"])
    policy = result.best_policy if result else []
    final = learner.compress(base, policy).to(device)
    val_loader = data.loader("val", batch_size=500)
    val_before = evaluate(final, val_loader, device=device)
    print(f"best candidate: val acc {val_before:.2f}% before re-training", flush=True)
    retrain_s = time.perf_counter()
    history = (learner.retrain(final, teacher=base, epochs=sc["retrain_epochs"], lr=sc["retrain_lr"])
               if sc["retrain_epochs"] else [])
    retrain_s = time.perf_counter() - retrain_s
    final.to(memory_format=torch.contiguous_format)
    test_loader = data.loader("test", batch_size=500)
    test_final = evaluate(final, test_loader, device=device)
    test_base = evaluate(base, test_loader, device=device)
    if not distributed.is_main():  # rank 0 writes the files and measures latency
        return {"test_acc": test_final}
    names = result.layer_names if result else []
    policy_map = dict(zip(names, policy))
    arch = learner.arch_state(final)
    metrics = {"test_acc": test_final, "val_acc_before_retrain": val_before,
               "val_acc": history[-1]["val_acc"] if history else val_before}
    save_model(run_dir.path / "model.pt", final.cpu(), config=cfg, net=net, in_channels=data.in_channels,
               num_classes=data.num_classes, image_size=data.image_size, learner=run["learner"], arch=arch,
               policy=policy_map or None, metrics=metrics, base_arch=base_arch)
    atomic_write_text(run_dir.path / "policy.yaml", dump_yaml({
        "learner": run["learner"], "hpo": run["hpo"], "target": run["target"],
        "meaning": getattr(learner, "policy_name", "ratio"), "layers": policy_map}))
    summary = _summary(base.cpu(), final.cpu(), data, cfg, test_base, test_final, result, retrain_s, run_dir,
                       learner=learner)
    if getattr(getattr(learner, "config", None), "resource", None) == "latency" and result is not None:
        pred = learner.latency_summary(policy)  # HAQ-style lookup table vs what the final model measures
        pred["measured_ms_b1"] = summary["compressed"]["latency_ms_b1"]
        summary["latency_prediction"] = pred
        print(f"latency: predicted {json.dumps(pred)}", flush=True)
    extra = learner.export(final, run_dir.path, torch.zeros(1, *_input_shape(data)))
    if extra:
        summary["export"] = extra
    run_dir.write_json("summary.json", summary)
    run_dir.write_json("metrics.json", {**metrics, "retrain_history": history,
                                        "best_trial_val_acc": result.best_val_acc if result else None})
    if result is not None and result.trials:
        from torchpocket.report import write_report

        write_report(run_dir.path, trials=result.trials, summary=summary, layer_names=names,
                     best_policy=list(policy), uniform_policy=result.uniform_policy,
                     title=f"{run['learner']} / {run['hpo']} / {net} / {run['dataset']} @ {run['target']}")
    print(f"test acc: baseline {test_base:.2f}% -> compressed {test_final:.2f}%  |  FLOPs kept "
          f"{summary['compressed']['flops'] / max(summary['baseline']['flops'], 1):.3f}  |  run directory "
          f"{run_dir.path}", flush=True)
    return summary


def _summary(base: nn.Module, final: nn.Module, data: DataBundle, cfg: dict[str, Any], test_base: float,
             test_final: float, result: SearchResult | None, retrain_s: float, run_dir: RunDir, *,
             learner: Any = None) -> dict[str, Any]:
    from torchpocket.profile import compare_latency, profile_model

    shape = _input_shape(data)
    pb, pf = profile_model(base, shape), profile_model(final, shape)
    reps = cfg["search"]["latency_repeats"]
    lat1 = compare_latency({"baseline": base, "compressed": final}, shape, batch_size=1, repeats=reps)
    lat64 = compare_latency({"baseline": base, "compressed": final}, shape, batch_size=64, repeats=max(3, reps // 4))
    summary: dict[str, Any] = {
        "learner": cfg["run"]["learner"], "hpo": cfg["run"]["hpo"], "net": cfg["run"]["net"],
        "dataset": cfg["run"]["dataset"], "target": cfg["run"]["target"],
        "baseline": {"test_acc": test_base, "flops": pb.flops, "params": pb.params, "size_bytes": pb.bytes,
                     "latency_ms_b1": 1e3 * lat1["baseline"], "latency_ms_b64": 1e3 * lat64["baseline"]},
        "compressed": {"test_acc": test_final, "flops": pf.flops, "params": pf.params, "size_bytes": pf.bytes,
                       "latency_ms_b1": 1e3 * lat1["compressed"], "latency_ms_b64": 1e3 * lat64["compressed"]},
        "flops_ratio": pf.flops / max(pb.flops, 1), "params_ratio": pf.params / max(pb.params, 1),
        "speedup_b1": lat1["baseline"] / lat1["compressed"], "speedup_b64": lat64["baseline"] / lat64["compressed"],
        "search_seconds": result.seconds if result else 0.0, "retrain_seconds": retrain_s,
        "trials": len(result.trials) if result else 0,
        "seconds_per_trial": _mean([t["seconds"] or 0.0 for t in result.trials]) if result else 0.0,
        "machine": machine_description(),
    }
    if result is not None and result.trials:
        summary["search"] = search_summary(result)
    if cfg["search"]["export_onnx"]:
        path = None
        try:
            from torchpocket.export import check_onnx, export_onnx, file_size, onnx_latency

            # a quantization learner's fp32 ONNX is the same network with its quantized weights as floats
            fp32 = learner.onnx_float_model(final) if hasattr(learner, "onnx_float_model") else final
            path = export_onnx(fp32, run_dir.path / "model.onnx", shape)
            diff = check_onnx(fp32, path, shape)
            summary["onnx"] = {"path": "model.onnx", "max_abs_diff": diff, "size_bytes": file_size(path),
                               "latency_ms_b1": 1e3 * onnx_latency(path, shape, batch_size=1, repeats=reps)}
        except Exception as e:  # noqa: BLE001 - an unexportable op must not lose the finished run
            reason = " ".join(str(e).split())[:300]
            print(f"warning: ONNX export skipped: {type(e).__name__}: {reason}", file=sys.stderr, flush=True)
            summary["onnx"] = {"skipped": f"{type(e).__name__}: {reason}"}
            path = None
        if getattr(learner, "int8_export", False) and path is not None:
            summary["int8"] = int8_summary(final, path, data, run_dir.path, repeats=reps)
    return summary


INT8_MIN_AGREEMENT = 0.99  # top-1 agreement of the exported integer model with the fake-quant model


def int8_summary(model: nn.Module, fp32_onnx: Path, data: DataBundle, out_dir: Path, *,
                 repeats: int = 20) -> dict[str, Any]:
    """Write ``model.int8.onnx`` (QDQ, the model's own scales) and put it beside the fp32 ONNX model.

    Test accuracy of both in ONNX Runtime, top-1 agreement of the int8 model with the PyTorch
    fake-quant model on the test split (warned below 99%), file sizes, and latency at batch 1 and 64
    measured round-robin in this process. A model that cannot be exported is reported, not fatal.
    """
    from torchpocket.export import compare_onnx_latency, export_int8_onnx, file_size, onnx_predict, onnx_session
    from torchpocket.learners._quant import act_quantizers

    bits = [int(m.qbits) for m in model.modules() if hasattr(m, "qbits")]
    if not act_quantizers(model) or not bits or max(bits) > 8:
        return {"skipped": "the int8 model needs weights of at most 8 bits and activation quantizers "
                           "(--act-bits > 0)"}
    shape = _input_shape(data)
    try:
        p8 = export_int8_onnx(model, out_dir / "model.int8.onnx", shape)
    except Exception as e:  # noqa: BLE001 - an unexportable op must not lose the finished run
        reason = " ".join(str(e).split())[:300]
        print(f"warning: int8 ONNX export skipped: {type(e).__name__}: {reason}", file=sys.stderr, flush=True)
        return {"skipped": f"{type(e).__name__}: {reason}"}
    threads = torch.get_num_threads()
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    s8, s32 = onnx_session(p8, threads=threads), onnx_session(fp32_onnx, threads=threads)
    n = agree = ok8 = ok32 = 0
    for x, y in data.loader("test", batch_size=500):
        with torch.no_grad():
            ref = model(x.to(dev)).argmax(1).cpu().numpy()
        got8 = onnx_predict(s8, x).argmax(1)
        got32 = onnx_predict(s32, x).argmax(1)
        yy = y.numpy()
        n += len(yy)
        agree += int((got8 == ref).sum())
        ok8 += int((got8 == yy).sum())
        ok32 += int((got32 == yy).sum())
    lat1 = compare_onnx_latency({"fp32": fp32_onnx, "int8": p8}, shape, batch_size=1, threads=threads,
                                repeats=repeats)
    lat64 = compare_onnx_latency({"fp32": fp32_onnx, "int8": p8}, shape, batch_size=64, threads=threads,
                                 repeats=max(3, repeats // 4))
    out = {"path": p8.name, "format": "QDQ, uint8 activations (per tensor), int8 weights (per channel)",
           "test_acc": 100 * ok8 / max(n, 1), "fp32_onnx_test_acc": 100 * ok32 / max(n, 1),
           "agreement_with_pytorch": agree / max(n, 1), "size_bytes": file_size(p8),
           "fp32_size_bytes": file_size(fp32_onnx),
           "latency_ms_b1": 1e3 * lat1["int8"], "fp32_latency_ms_b1": 1e3 * lat1["fp32"],
           "latency_ms_b64": 1e3 * lat64["int8"], "fp32_latency_ms_b64": 1e3 * lat64["fp32"],
           "speedup_b1": lat1["fp32"] / lat1["int8"], "speedup_b64": lat64["fp32"] / lat64["int8"],
           "runtime": "onnxruntime CPU", "threads": threads}
    print(f"int8 ONNX: test acc {out['test_acc']:.2f}% (fp32 ONNX {out['fp32_onnx_test_acc']:.2f}%), top-1 "
          f"agreement with PyTorch {100 * out['agreement_with_pytorch']:.2f}%, {out['size_bytes']} bytes vs "
          f"{out['fp32_size_bytes']}, batch 64 {out['latency_ms_b64']:.2f} ms vs {out['fp32_latency_ms_b64']:.2f} "
          f"ms ({out['speedup_b64']:.2f}x)", flush=True)
    if out["agreement_with_pytorch"] < INT8_MIN_AGREEMENT:
        print(f"warning: the int8 ONNX model agrees with the fake-quant model on only "
              f"{100 * out['agreement_with_pytorch']:.2f}% of the test images", file=sys.stderr, flush=True)
    return out


# ----------------------------------------------------------------------------- entry points


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """What ``python run.py`` does once the config is validated."""
    if cfg["search"]["resume"]:
        cfg = _resume_config(cfg)
    run_cfg = cfg["run"]
    if run_cfg["threads"]:
        torch.set_num_threads(run_cfg["threads"])
    device = resolve_device(run_cfg["device"])
    if distributed.init_from_env(device):  # launched by torchrun: every rank runs this, rank 0 decides and writes
        device = distributed.local_device(device)
        if cfg["search"]["storage"] or cfg["search"]["resume"]:
            raise UserError("under torchrun, give neither --storage nor --resume: parallel search workers are "
                            "separate run.py processes, and a data-parallel run restarts from scratch")
    seed_everything(run_cfg["seed"])
    if cfg["search"]["policy"] and run_cfg["hpo"] != "none":
        raise UserError("--policy applies a fixed policy: use it with --hpo none")
    episodes_for(cfg)  # validates --episodes before touching data
    check_bits_flag(cfg)
    learner = make_learner(cfg, device)  # validates the learner's own options before anything is written
    if learner.searchable and run_cfg["target"] >= 1.0 and run_cfg["hpo"] != "none":
        print(f"warning: --target {run_cfg['target']:g} keeps everything; pass e.g. --target 0.5", file=sys.stderr)
    data = load_data(cfg)
    if not distributed.is_main():  # one run directory, on rank 0; the other ranks compute and stay silent
        with tempfile.TemporaryDirectory(prefix="torchpocket-rank") as tmp, \
                contextlib.redirect_stdout(io.StringIO()):
            return _run_in(RunDir(Path(tmp)), cfg, learner, data, device)
    run_dir = RunDir(Path(cfg["search"]["resume"])) if cfg["search"]["resume"] else RunDir.create(cfg)
    return _run_in(run_dir, cfg, learner, data, device)


def _run_in(run_dir: RunDir, cfg: dict[str, Any], learner: Any, data: DataBundle,
            device: torch.device) -> dict[str, Any]:
    run_cfg = cfg["run"]
    with run_dir.tee():
        print(f"run directory: {run_dir.path}", flush=True)
        atomic_write_text(run_dir.path / "config.yaml", dump_yaml(cfg))
        if not learner.searchable:
            return _train_baseline(learner, cfg, data, run_dir, device)
        base, info = resolve_baseline(cfg, data, device)
        base.to(device).eval()
        result = search(learner, base, data, cfg, run_dir=run_dir, device=device)
        if not result.final:
            return {"final": False, "trials": len(result.trials)}
        print(f"search done in {result.seconds:.0f}s: best reward {result.best_reward:.4f}, "
              f"val acc {result.best_val_acc:.2f}% (reward split)", flush=True)
        return finalize(learner, base, result, data, cfg, run_dir=run_dir, device=device,
                        base_arch=info["base_arch"], net=run_cfg["net"])


def check_bits_flag(cfg: dict[str, Any]) -> None:
    """``--bits N`` fixes every layer's bit-width: a quantization learner, and no search (``--hpo none``)."""
    from torchpocket.learners import LEARNERS

    bits = cfg.get("quant", {}).get("bits")
    if bits is None:
        return
    run = cfg["run"]
    if getattr(LEARNERS.get(run["learner"]), "section", None) != "quant":
        raise UserError(f"--bits applies to the quantization learners (uniform-quant, non-uniform-quant), "
                        f"not {run['learner']!r}")
    if run["hpo"] != "none":
        raise UserError(f"--bits {bits} puts every layer at {bits} bits, there is nothing to search: drop --hpo "
                        f"{run['hpo']} (or drop --bits and give --target to search mixed precision)")
    if cfg["search"]["policy"]:
        raise UserError("--bits and --policy both fix the bits: give one of them")


def _resume_config(cfg: dict[str, Any]) -> dict[str, Any]:
    from torchpocket.config import default_config, merge

    d = Path(cfg["search"]["resume"])
    if not (d / "config.yaml").is_file() or not (d / "trials.jsonl").exists() and not (d / "search_state.pt").exists():
        raise UserError(f"--resume {d}: not a torchpocket run directory with a search to continue "
                        "(expected config.yaml and search_state.pt)")
    saved = merge(default_config(), yaml.safe_load((d / "config.yaml").read_text()), str(d / "config.yaml"))
    for key in ("quiet", "device", "threads"):
        saved["run"][key] = cfg["run"][key]
    saved["search"]["resume"] = str(d)
    return saved


def _train_baseline(learner: Any, cfg: dict[str, Any], data: DataBundle, run_dir: RunDir,
                    device: torch.device) -> dict[str, Any]:
    """``--learner full-prec``: train (or continue from --init) and write model.pt + summary.json."""
    from torchpocket.api import arch_chain, load, save_model
    from torchpocket.learners.training import load_checkpoint
    from torchpocket.nets import create_net

    run, tc = cfg["run"], _train_cfg(cfg)
    base_arch: list[dict[str, Any]] = []
    if run["init"]:  # continue training any checkpoint, a compressed one included
        ckpt = load_checkpoint(run["init"])
        _check_compatible(ckpt, data, run["init"])
        base_arch = arch_chain(ckpt)
        model = load(run["init"])
    else:
        model = create_net(run["net"], in_channels=data.in_channels, num_classes=data.num_classes)
    model.to(device)
    start = time.perf_counter()
    train_loader = data.loader("train", batch_size=distributed.per_rank_batch(tc.batch_size), train=True,
                               seed=run["seed"], rank=distributed.rank(), world_size=distributed.world_size())
    history = fit(model, train_loader, data.loader("val", batch_size=512), cfg=tc, device=device, quiet=run["quiet"])
    seconds = time.perf_counter() - start
    model.to(memory_format=torch.contiguous_format)
    test_acc = evaluate(model, data.loader("test", batch_size=512), device=device)
    metrics = {"test_acc": test_acc, "val_acc": history[-1]["val_acc"] if history else None,
               "train_seconds": seconds, "history": history}
    save_model(run_dir.path / "model.pt", model.cpu(), config=cfg, net=run["net"], in_channels=data.in_channels,
               num_classes=data.num_classes, image_size=data.image_size, metrics={"test_acc": test_acc},
               base_arch=base_arch)
    run_dir.write_json("metrics.json", metrics)
    summary = {"learner": "full-prec", "net": run["net"], "dataset": run["dataset"], "test_acc": test_acc,
               "epochs": tc.epochs, "train_seconds": seconds}
    run_dir.write_json("summary.json", summary)
    print(f"test acc {test_acc:.2f}%  |  model {run_dir.path / 'model.pt'}", flush=True)
    return summary


def compress_model(
    model: nn.Module,
    train_loader: Any,
    val_loader: Any,
    *,
    learner: str = "chn-pruned",
    hpo: str = "ddpg",
    target: float = 0.5,
    test_loader: Any = None,
    out_dir: str | None = None,
    device: str = "cpu",
    **overrides: Any,
) -> tuple[nn.Module, SearchResult]:
    """Compress a model the user defined themselves, with their own loaders (no registry entry needed).

    ``overrides`` are config fields by name (``episodes=20, ft_steps=100, retrain_epochs=0, ...``).
    Returns the compressed model and the search result; with ``out_dir`` a run directory is written too.
    """
    from torchpocket.config import default_config, iter_fields, merge, validate

    cfg = default_config()
    cfg["run"].update(learner=learner, hpo=hpo, target=target, net="user", device=device, quiet=True)
    by_name = {f.name: section for section, f, _ in iter_fields()}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        if key not in by_name:
            raise UserError(f"unknown option {key!r} for compress()")
        nested.setdefault(by_name[key], {})[key] = value
    cfg = merge(cfg, nested, "compress()")
    cfg["run"]["net"] = "resnet20"  # validate() checks a registry net name; a user model has none
    validate(cfg)
    check_bits_flag(cfg)
    cfg["run"]["net"] = None
    dev = resolve_device(device)
    data = LoaderBundle(train_loader, val_loader, test_loader)
    teacher = copy.deepcopy(model).to(dev).eval()
    with torch.no_grad():
        data.num_classes = int(teacher(next(iter(val_loader))[0][:1].to(dev)).shape[1])
    learner_obj = make_learner(cfg, dev)
    rd = None
    if out_dir:
        cfg["run"]["out_dir"], cfg["run"]["net"] = out_dir, "user"
        rd = RunDir.create(cfg)
    result = search(learner_obj, teacher, data, cfg, run_dir=rd, device=dev)
    if rd is not None:
        finalize(learner_obj, teacher, result, data, cfg, run_dir=rd, device=dev, base_arch=[], net=None)
        from torchpocket.api import load

        return load(rd.path / "model.pt", model=copy.deepcopy(model)), result
    final = learner_obj.compress(teacher, result.best_policy)
    if cfg["search"]["retrain_epochs"]:
        learner_obj.retrain(final, teacher=teacher, epochs=cfg["search"]["retrain_epochs"],
                            lr=cfg["search"]["retrain_lr"])
    return final.eval(), result
