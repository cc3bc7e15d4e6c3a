"""Layer enumeration shared by the learners that act on every Conv2d / Linear weight."""

from __future__ import annotations

from torch import Tensor, nn


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv2d (depthwise included) and Linear modules with a weight, in registration order, each weight once
    (tied ones skipped)."""
    seen: set[int] = set()
    out = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and isinstance(getattr(m, "weight", None), Tensor):
            if id(m.weight) in seen:
                continue
            seen.add(id(m.weight))
            out.append((name, m))
    return out


def layer_kind(m: nn.Module) -> str:
    """AMC's layer type for the search space's embedding: linear, dwconv or conv."""
    if isinstance(m, nn.Linear):
        return "linear"
    return "dwconv" if m.groups > 1 and m.groups == m.in_channels else "conv"
