"""Any torchvision classification model as ``tv:<name>`` (random init, never a download)."""

from __future__ import annotations

from functools import cache
from typing import Any

from torch import nn


@cache
def torchvision_names() -> list[str]:
    from torchvision import models

    return sorted(models.list_models(module=models))


def create_torchvision(name: str, *, in_channels: int = 3, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    from torchvision import models

    model = models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        _adapt_first_conv(model, in_channels)
    return model


def _adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    """Replace the first Conv2d by one with ``in_channels`` inputs (same geometry)."""
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                new = nn.Conv2d(
                    in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                    child.dilation, groups=1 if child.groups == child.in_channels else child.groups,
                    bias=child.bias is not None,
                )
                setattr(parent, child_name, new)
                return
    raise ValueError("model has no Conv2d to adapt")
