"""One registry per plug-in family, filled by decorators (timm / Optuna style)."""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

from torchpocket.errors import UserError

T = TypeVar("T")


def closest(name: str, choices: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The choice most similar to ``name`` (difflib ratio), or None below ``cutoff``.

    Ties go to the longer common prefix, then alphabetical order, so ``resnet2`` suggests
    ``resnet20`` rather than ``resnet32`` (both score the same for difflib).
    """
    best, best_key = None, None
    for choice in sorted(choices):
        ratio = difflib.SequenceMatcher(None, choice, name).ratio()
        key = (ratio, len(os.path.commonprefix([name, choice])))
        if ratio >= cutoff and (best_key is None or key > best_key):
            best, best_key = choice, key
    return best


class Registry(Generic[T]):
    """A name -> object mapping with helpful errors.

    A duplicate name raises ``ValueError`` (a bug); an unknown name raises
    :class:`UserError` listing the valid choices and the closest one. Tests that
    register a plug-in of their own do it inside :meth:`restoring` (or call
    :meth:`unregister`), so the rest of the session sees the registry unchanged.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._docs: dict[str, str] = {}

    def register(self, name: str, doc: str | None = None) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"duplicate {self.kind} name {name!r}")
            self._items[name] = obj
            text = doc or (getattr(obj, "__doc__", None) or "").strip().splitlines()
            self._docs[name] = text if isinstance(text, str) else (text[0] if text else "")
            return obj

        return deco

    def unregister(self, name: str) -> T:
        """Remove ``name`` and return what it held (a test's plug-in); an unknown name raises :class:`UserError`."""
        obj = self.get(name)
        del self._items[name]
        self._docs.pop(name, None)
        return obj

    @contextmanager
    def restoring(self) -> Iterator[Registry[T]]:
        """Undo, on exit, every registration and removal made inside the block (a test's temporary plug-ins)::

            with LEARNERS.restoring():
                import my_plugin  # its @register_learner runs here ...
                ...               # ... and the name is gone again after the block
        """
        items, docs = dict(self._items), dict(self._docs)
        try:
            yield self
        finally:
            self._items.clear()
            self._items.update(items)
            self._docs.clear()
            self._docs.update(docs)

    def get(self, name: str) -> T:
        if name in self._items:
            return self._items[name]
        raise UserError(self.unknown_message(name))

    def unknown_message(self, name: str) -> str:
        choices = ", ".join(self.names())
        close = closest(name, self.names())
        hint = f" (did you mean {close!r}?)" if close else ""
        return f"unknown {self.kind} {name!r}{hint}; choose one of: {choices}"

    def names(self) -> list[str]:
        return sorted(self._items)

    def doc(self, name: str) -> str:
        return self._docs.get(name, "")

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
