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


def _import_all() -> None:
    """Import every module of this package once, so each learner registers itself."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_all()
