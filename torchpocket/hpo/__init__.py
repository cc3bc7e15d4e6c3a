"""Hyper-parameter optimizers and their registry (``--hpo``)."""

from __future__ import annotations

from typing import Any

from torchpocket.hpo.base import Optimizer
from torchpocket.registry import Registry
from torchpocket.space import Budget, LayerSpec, Policy, SearchSpace

HPOS: Registry = Registry("optimizer")
register_hpo = HPOS.register

__all__ = ["HPOS", "Budget", "LayerSpec", "Optimizer", "Policy", "SearchSpace", "create_optimizer", "register_hpo"]


def create_optimizer(name: str, space: SearchSpace, **kwargs: Any) -> Optimizer:
    """Build a registered optimizer by its CLI name."""
    return HPOS.get(name)(space, **kwargs)


def _import_all() -> None:
    """Import every module of this package once, so each optimizer registers itself (one file, one decorator)."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


_import_all()
