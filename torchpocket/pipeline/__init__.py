"""The pipeline: one run, one job per module.

- :mod:`~torchpocket.pipeline.rundir`: the run directory and the trial log;
- :mod:`~torchpocket.pipeline.baseline`: the data and the model a run starts from;
- :mod:`~torchpocket.pipeline.search`: the ask / score / tell loop (:func:`score_candidate` scores one);
- :mod:`~torchpocket.pipeline.workers`: parallel workers sharing one Optuna storage;
- :mod:`~torchpocket.pipeline.final`: re-train the chosen candidate, test once, write the files;
- :mod:`~torchpocket.pipeline.run`: ``python run.py`` end to end.

The pipeline reads only the ``run``, ``data``, ``train`` and ``search`` sections and the plug-ins'
declared hooks and capabilities; a learner's or optimizer's own section goes to its ``Config``.
"""

from __future__ import annotations

from torchpocket.config import SearchConfig
from torchpocket.pipeline.baseline import load_data, resolve_baseline, train_config
from torchpocket.pipeline.final import finalize
from torchpocket.pipeline.run import make_learner, run
from torchpocket.pipeline.rundir import RunDir, TrialLog
from torchpocket.pipeline.search import (
    DEFAULT_EPISODES,
    SearchResult,
    compute_reward,
    episodes_for,
    reward_loader,
    score_candidate,
    search,
)

__all__ = ["DEFAULT_EPISODES", "RunDir", "SearchConfig", "SearchResult", "TrialLog", "compute_reward",
           "episodes_for", "finalize", "load_data", "make_learner", "resolve_baseline", "reward_loader", "run",
           "score_candidate", "search", "train_config"]
