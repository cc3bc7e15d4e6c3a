"""The one helper every component's config dataclass uses: a field with its command-line help.

A leaf module (it imports nothing of torchpocket), so learners and optimizers declare their options
without importing :mod:`torchpocket.config`, which assembles every section from the registries.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


def opt(default: Any, help: str, *, flag: str | None = None, choices: tuple | None = None,  # noqa: A002
        positive: bool = False) -> Any:
    """A config field with its command-line help (and optionally its flag name, its choices, and whether it must
    be positive; ``config.validate`` checks both).

    Without ``flag``, a field of the ``run``, ``data``, ``train`` or ``search`` section is ``--<name>`` and a
    plug-in's field is ``--<section>-<name>`` (underscores become dashes).
    """
    return field(default=default, metadata={"help": help, "flag": flag, "choices": choices, "positive": positive})
