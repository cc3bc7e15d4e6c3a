"""``python run.py``: one run from a validated config, in its run directory (search, then the final stage)."""

from __future__ import annotations

import contextlib
import io
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from torchpocket import distributed
from torchpocket.config import SECTIONS, dump_yaml, pareto_window, redacted
from torchpocket.datasets import DataBundle
from torchpocket.errors import UserError
from torchpocket.hpo import HPOS
from torchpocket.learners import LEARNERS, Learner
from torchpocket.pipeline.baseline import load_data, resolve_baseline, train_baseline, train_config
from torchpocket.pipeline.final import finalize
from torchpocket.pipeline.front import finish_front
from torchpocket.pipeline.rundir import RunDir
from torchpocket.pipeline.search import episodes_for, search
from torchpocket.utils import atomic_write_text, resolve_device, seed_everything, unmask_url


def make_learner(cfg: dict[str, Any], device: torch.device) -> Learner:
    """The run's learner with its own config section (and the sections it shares with another learner)."""
    cls = LEARNERS.get(cfg["run"]["learner"])
    config = cls.Config(**cfg[cls.section]) if cls.section and cls.Config else None
    # options a learner shares with another one's section (dis-chn-pruned reads chn-pruned's graph options)
    extra = {kw: SECTIONS[sec](**cfg[sec]) for kw, sec in cls.extra_sections.items()}
    return cls(config=config, train_cfg=train_config(cfg), device=device, quiet=cfg["run"]["quiet"],
               seed=cfg["run"]["seed"], resource=cfg["run"]["resource"], **extra)


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
    if cfg["search"]["policy"] and not HPOS.get(run_cfg["hpo"]).takes_policy:
        takes = ", ".join(n for n in HPOS.names() if HPOS.get(n).takes_policy)
        raise UserError(f"--policy applies a fixed policy: use it with --hpo {takes}")
    episodes_for(cfg)  # validates --episodes before touching data
    learner = make_learner(cfg, device)  # validates the learner's own options before anything is written
    if learner.searchable and run_cfg["target"] >= 1.0 and run_cfg["hpo"] != "none" and not cfg["search"]["pareto"]:
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
        atomic_write_text(run_dir.path / "config.yaml", dump_yaml(redacted(cfg)))  # no storage password
        if not learner.searchable:
            return train_baseline(learner, cfg, data, run_dir, device)
        base, info = resolve_baseline(cfg, data, device)
        base.to(device).eval()
        result = search(learner, base, data, cfg, run_dir=run_dir, device=device)
        if not result.final:
            return {"final": False, "trials": len(result.trials)}
        if pareto_window(cfg) is not None:
            return finish_front(learner, base, result, data, cfg, run_dir=run_dir, device=device,
                                base_arch=info["base_arch"], net=run_cfg["net"])
        print(f"search done in {result.seconds:.0f}s: best reward {result.best_reward:.4f}, "
              f"val acc {result.best_val_acc:.2f}% (reward split)", flush=True)
        return finalize(learner, base, result, data, cfg, run_dir=run_dir, device=device,
                        base_arch=info["base_arch"], net=run_cfg["net"])


def _resume_config(cfg: dict[str, Any]) -> dict[str, Any]:
    from torchpocket.config import default_config, merge

    d = Path(cfg["search"]["resume"])
    # killed while writing its first file: an empty run directory, or one holding that file's temporary copy
    if d.is_dir() and not (d / "config.yaml").is_file() and (not any(d.iterdir()) or any(d.glob("*config.yaml.tmp*"))):
        raise UserError(f"--resume {d}: this run was stopped before it saved its config.yaml, so nothing of it ran; "
                        "start it again with its command")
    # a run killed before its first trial was logged has only config.yaml and log.txt: it starts over there
    if not (d / "config.yaml").is_file() or not any((d / f).exists() for f in ("trials.jsonl", "search_state.pt",
                                                                                "log.txt")):
        raise UserError(f"--resume {d}: not a torchpocket run directory with a search to continue "
                        "(expected config.yaml with search_state.pt, trials.jsonl or log.txt)")
    saved = merge(default_config(), yaml.safe_load((d / "config.yaml").read_text()), str(d / "config.yaml"))
    for key in ("quiet", "device", "threads"):
        saved["run"][key] = cfg["run"][key]
    saved["search"]["resume"] = str(d)
    if cfg["search"]["pick"]:  # choose points of a Pareto run's front, with no new search
        if not saved["search"]["pareto"]:
            raise UserError(f"--pick chooses points of a Pareto front, and {d} searched one target (no --pareto)")
        saved["search"]["pick"] = cfg["search"]["pick"]
    # the saved storage URL has its password masked: take the one given again, else let the driver find it
    # (PGPASSWORD, ~/.pgpass)
    saved["search"]["storage"] = cfg["search"]["storage"] or unmask_url(saved["search"]["storage"])
    return saved
