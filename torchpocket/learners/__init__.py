"""Compression learners and their registry (``--learner``)."""

from __future__ import annotations

from typing import Any

from torchpocket.learners.base import Learner
from torchpocket.registry import Registry

LEARNERS: Registry = Registry("learner")
register_learner = LEARNERS.register

__all__ = ["LEARNERS", "Learner", "create_learner", "register_learner"]


def create_learner(name: str, **kwargs: Any) -> Learner:
    """Build a registered learner by its CLI name."""
    return LEARNERS.get(name)(**kwargs)


from torchpocket.learners import chn_pruned, full_prec, weight_sparse  # noqa: E402,F401  (fill the registry)
