"""The end of a Pareto search (``--pareto LO:HI``): the front's files, and ``--pick R[,R...]``.

``pareto.csv``, ``pareto.png``, ``summary.json`` (its ``pareto`` block: front, hypervolume, uniform curve, the
front against uniform at fixed resources) and ``report.md`` / ``report.html`` go in the run directory. Each
picked resource R is the front's best trial at resource <= R, finalised as a single-target run would be
(compress, re-train with distillation, test once, export) under ``<run>/pick-R/``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from torchpocket import pareto
from torchpocket.config import pareto_window, pick_points
from torchpocket.datasets import DataBundle
from torchpocket.errors import UserError
from torchpocket.learners import Learner
from torchpocket.pipeline.final import finalize
from torchpocket.pipeline.rundir import RunDir
from torchpocket.pipeline.search import SearchResult
from torchpocket.report_html import write_html
from torchpocket.utils import atomic_write_text, machine_description


def pick_folder(r: float) -> str:
    return f"pick-{r:g}"


def finish_front(learner: Learner, base: nn.Module, result: SearchResult, data: DataBundle, cfg: dict[str, Any], *,
                 run_dir: RunDir, device: torch.device, base_arch: list[dict[str, Any]],
                 net: str | None) -> dict[str, Any]:
    """Write the front's files; finalise every ``--pick`` point; return the run's summary."""
    window = pareto_window(cfg)
    assert window is not None
    lo, hi = window
    run = cfg["run"]
    block = pareto.front_block(result.trials, lo, hi)
    pareto.write_csv(run_dir.path / pareto.PARETO_CSV, result.trials, result.layer_names)
    picks = pick_points(cfg)
    pareto.plot(run_dir.path / pareto.PARETO_PNG, result.trials, lo, hi, resource=result.resource_unit, picks=picks)
    print(f"front: {block['front_size']} points over [{lo:g}, {hi:g}] from {block['trials']} trials, hypervolume "
          f"{block['hypervolume']:.3f} (mean val acc {block['front_mean_val_acc']:.2f}%"
          + (f", uniform {block['uniform_mean_val_acc']:.2f}%" if "uniform_mean_val_acc" in block else "") + ")",
          flush=True)
    rows = []
    for r in picks:
        best = pareto.best_at(result.trials, r)
        if best is None:
            raise UserError(f"--pick {r:g}: no scored trial keeps {result.resource_unit} <= {r:g} (the front starts "
                            f"at {block['front'][0]['resource']:.3f})" if block["front"] else
                            f"--pick {r:g}: no trial of this search was scored")
        sub = RunDir(run_dir.path / pick_folder(r))
        sub.path.mkdir(exist_ok=True)
        sub_cfg = copy.deepcopy(cfg)
        sub_cfg["run"]["target"] = r
        print(f"pick {r:g}: trial {best['trial']} ({result.resource_unit} {best['resource']:.3f}, val acc "
              f"{best['val_acc']:.2f}% on the reward split) -> {sub.path}", flush=True)
        chosen = SearchResult(best["policy"], best["reward"], best["val_acc"], result.trials, result.layer_names,
                              None, result.seconds, result.resource_unit)
        summary = finalize(learner, base, chosen, data, sub_cfg, run_dir=sub, device=device, base_arch=base_arch,
                           net=net)
        rows.append({"pick": r, "trial": best["trial"], "resource": best["resource"], "val_acc": best["val_acc"],
                     "test_acc": summary["compressed"]["test_acc"], "folder": pick_folder(r)})
    summary = {"pareto": block, "picks": rows, "search_seconds": result.seconds, "trials": len(result.trials),
               "machine": machine_description(), "learner": run["learner"], "hpo": run["hpo"],
               "resource": result.resource_unit}
    run_dir.write_json("summary.json", summary)
    title = f"{run['learner']} / {run['hpo']} / {net} / {run['dataset']} @ front [{lo:g}, {hi:g}]"
    report = run_dir.path / "report.md"
    atomic_write_text(report, "\n".join([f"# {title}", "", *pareto.markdown(block, picks=rows)]) + "\n")
    write_html(report)
    if not picks:
        print(f"pick a point with: python run.py --resume {run_dir.path} --pick {0.5 * (lo + hi):.2g}", flush=True)
    return summary
