"""Compression learners and their registry (``--learner``).

``A+B`` (two registered names joined by ``+``) is a composite learner built on first use by
:func:`torchpocket.learners.composite.compose`: it is not registered, so ``--list`` shows the parts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torchpocket.learners.base import Learner
from torchpocket.registry import Registry


class LearnerRegistry(Registry):
    """The learner registry: a registered name, or ``A+B`` of two registered ones (a composite, built once)."""

    def __init__(self) -> None:
        super().__init__("learner")
        self._composites: dict[str, type[Learner]] = {}

    def register(self, name: str, doc: str | None = None) -> Callable[[Any], Any]:
        deco = super().register(name, doc)

        def named(obj: Any) -> Any:
            obj = deco(obj)
            if isinstance(obj, type):
                obj.cli_name = name
            return obj

        return named

    def get(self, name: str) -> Any:
        if "+" in name and name not in self._items:
            if name not in self._composites:
                from torchpocket.learners.composite import compose

                parts = name.split("+")
                self._composites[name] = compose(name, [super(LearnerRegistry, self).get(p) for p in parts])
            return self._composites[name]
        return super().get(name)

    def doc(self, name: str) -> str:
        if "+" in name and name not in self._items:
            return (self.get(name).__doc__ or "").strip().splitlines()[0]
        return super().doc(name)

    def __contains__(self, name: object) -> bool:
        if isinstance(name, str) and "+" in name and name not in self._items:
            try:
                self.get(name)
            except Exception:  # noqa: BLE001 - membership: an unknown or refused composite is not in
                return False
            return True
        return super().__contains__(name)


LEARNERS: LearnerRegistry = LearnerRegistry()
register_learner = LEARNERS.register

__all__ = ["LEARNERS", "Learner", "create_learner", "register_learner"]


def create_learner(name: str, **kwargs: Any) -> Learner:
    """Build a registered learner (or an ``A+B`` composite) by its CLI name."""
    return LEARNERS.get(name)(**kwargs)


def _import_all() -> None:
    """Import every module of this package once, so each learner registers itself."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_import_all()
