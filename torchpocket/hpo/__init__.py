"""Hyper-parameter optimizers and their registry (``--hpo``)."""

from __future__ import annotations

from typing import Any

from torchpocket.hpo.base import Optimizer
from torchpocket.hpo.space import Budget, LayerSpec, Policy, SearchSpace
from torchpocket.registry import Registry

HPOS: Registry = Registry("optimizer")
register_hpo = HPOS.register

__all__ = ["HPOS", "Budget", "LayerSpec", "Optimizer", "Policy", "SearchSpace", "create_optimizer", "register_hpo"]


def create_optimizer(name: str, space: SearchSpace, **kwargs: Any) -> Optimizer:
    """Build a registered optimizer by its CLI name."""
    return HPOS.get(name)(space, **kwargs)


from torchpocket.hpo import ddpg, fixed, gp, optuna_opt, sensitivity, simple  # noqa: E402,F401  (fill the registry)
