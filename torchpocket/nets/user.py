"""Networks of the user's own, from the command line: ``--net path/to/models.py:build_net`` or
``--net my_pkg.models:build_net``.

The callable is called like a registry entry, with the keyword arguments ``in_channels`` and
``num_classes``, and must return an ``nn.Module``. A file path is imported under a private module
name; a dotted name is imported like any module (it must be on ``sys.path``).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from torchpocket.errors import UserError


def is_user_net(name: str) -> bool:
    """``file.py:fn`` or ``module:fn`` (``tv:<name>`` is torchvision's)."""
    return ":" in name and not name.startswith(("tv:", "timm:"))


def user_net_factory(name: str) -> Callable[..., Any]:
    """The callable ``name`` points at, or one clear line saying what is wrong."""
    where, _, attr = name.rpartition(":")
    if not where or not attr.isidentifier():
        raise UserError(f"--net {name!r}: expected path/to/models.py:function or package.module:function")
    if where.endswith(".py") or "/" in where:
        path = Path(where)
        if not path.is_file():
            raise UserError(f"--net {name!r}: no such file {where}")
        spec = importlib.util.spec_from_file_location(f"torchpocket_user_net_{abs(hash(path.resolve()))}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - the user's file: any error there is theirs to see in one line
            raise UserError(f"--net {name!r}: importing {where} failed: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise UserError(f"--net {name!r}: cannot import {where}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"--net {name!r}: {where} has no callable {attr!r}")
    return fn


def create_user_net(name: str, *, in_channels: int, num_classes: int, **kwargs: Any) -> nn.Module:
    model = user_net_factory(name)(in_channels=in_channels, num_classes=num_classes, **kwargs)
    if not isinstance(model, nn.Module):
        raise UserError(f"--net {name!r} returned a {type(model).__name__}, not an nn.Module")
    return model
