"""Every search, whatever its optimizer, as an Optuna study in the run directory (``study.db``), so Optuna's own
tools open it: ``optuna-dashboard sqlite:///runs/<run>/study.db``, or ``python run.py --dashboard runs/<run>``.

Each finished trial is added with ``Study.add_trial`` (``optuna.trial.create_trial``): the policy as params
(one float per layer, within its bounds), the reward as the value, and the validation accuracy, resource,
kind, status and seconds as user attributes. On ``--resume`` the study is rebuilt from the kept trials. A Pareto
search (``--pareto``) is a two-objective study (reward up, resource down), so the dashboard draws its front.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from torchpocket.errors import UserError
from torchpocket.space import SearchSpace

STUDY_FILE = "study.db"
STUDY_NAME = "torchpocket"


class StudyLog:
    """The run directory's Optuna study: one completed (or failed) trial per scored candidate."""

    def __init__(self, run_dir: Path, space: SearchSpace, *, fresh: bool, pareto: bool = False) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.path = Path(run_dir) / STUDY_FILE
        if fresh and self.path.exists():
            self.path.unlink()
        self.url = f"sqlite:///{self.path}"
        self.pareto = pareto  # two objectives: maximise the reward, minimise the resource
        self.study = optuna.create_study(storage=self.url, study_name=STUDY_NAME, load_if_exists=True,
                                         directions=["maximize", "minimize"] if pareto else ["maximize"])
        self.dists = {lay.name: optuna.distributions.FloatDistribution(float(lay.low), float(lay.high))
                      if lay.high > lay.low else optuna.distributions.FloatDistribution(float(lay.low),
                                                                                          float(lay.low) + 1e-12)
                      for lay in space.layers}
        self.names = space.names

    def add(self, record: dict[str, Any]) -> None:
        import optuna
        from optuna.trial import TrialState

        params = {n: min(max(float(v), self.dists[n].low), self.dists[n].high)
                  for n, v in zip(self.names, record["policy"])}
        ok = record.get("status") == "ok" and math.isfinite(float(record.get("reward", float("nan"))))
        attrs = {k: record[k] for k in ("trial", "kind", "status", "val_acc", "resource", "seconds", "optimizer",
                                        "reason") if k in record}
        values = ([float(record["reward"]), float(record["resource"])] if self.pareto else [float(record["reward"])])
        self.study.add_trial(optuna.trial.create_trial(
            state=TrialState.COMPLETE if ok else TrialState.FAIL, values=values if ok else None,
            params=params, distributions=self.dists, user_attrs=attrs))

    def rebuild(self, records: list[dict[str, Any]]) -> None:
        for r in records:
            self.add(r)


def dashboard(run_dir: str, *, port: int = 8080) -> None:
    """Serve the run's study with optuna-dashboard on loopback (blocks until Ctrl-C)."""
    path = Path(run_dir) / STUDY_FILE
    if not path.is_file():
        raise UserError(f"--dashboard {run_dir}: no {STUDY_FILE} there (a run directory of a search)")
    try:
        from optuna_dashboard import run_server
    except ImportError:
        raise UserError("--dashboard needs optuna-dashboard: pip install 'torchpocket[dashboard]' "
                        f"(or open it yourself: optuna-dashboard sqlite:///{path})") from None
    print(f"optuna-dashboard on http://127.0.0.1:{port}/ (study {STUDY_NAME!r} in {path}); Ctrl-C stops it",
          flush=True)
    run_server(f"sqlite:///{path}", host="127.0.0.1", port=port)
