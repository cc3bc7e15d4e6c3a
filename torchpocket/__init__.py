"""torchpocket: automated model compression for PyTorch (PocketFlow / AMC style)."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def compress(*args: Any, **kwargs: Any) -> Any:
    """Compress a user's model: see :func:`torchpocket.api.compress`."""
    from torchpocket.api import compress as _compress

    return _compress(*args, **kwargs)


def load(*args: Any, **kwargs: Any) -> Any:
    """Rebuild a compressed model from a checkpoint: see :func:`torchpocket.api.load`."""
    from torchpocket.api import load as _load

    return _load(*args, **kwargs)
