"""Layer enumeration shared by the learners that act on every Conv2d / Linear weight."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

MASK_ATTR = "_torchpocket_ws"  # {"density": {layer: float}, "masks": {layer: bool Tensor}} on a sparse module


def weight_masks(model: nn.Module) -> dict[str, Tensor]:
    """The weight masks a sparsifier left on ``model`` (layer name -> bool tensor, True = kept), else ``{}``."""
    return dict((getattr(model, MASK_ATTR, None) or {}).get("masks", {}))


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv2d (depthwise included) and Linear modules with a weight, in registration order, each weight once
    (tied ones skipped)."""
    seen: set[int] = set()
    out = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and isinstance(getattr(m, "weight", None), Tensor):
            # a stored weight is tied by identity; a computed one (a codebook layer's) is the module's own: its
            # tensor is made anew on each access, and a freed one's id may come back for another layer
            p = m._parameters.get("weight")
            key = id(p) if p is not None else id(m)
            if key in seen:
                continue
            seen.add(key)
            out.append((name, m))
    return out


def layer_macs(model: nn.Module, x: Tensor) -> dict[str, int]:
    """Multiply-adds of each :func:`weight_layers` layer for one sample of ``x`` (moved to the model's device),
    keyed in execution order (layers the forward pass never reaches are absent). Modes are restored."""
    macs: dict[str, int] = {}

    def hook(name: str) -> Any:
        def fn(mod: nn.Module, _inp: Any, out: Tensor) -> None:
            per_out = mod.weight[0].numel()  # in/groups * kernel area, or in_features
            macs.setdefault(name, int(out[0].numel() if isinstance(mod, nn.Conv2d) else out.numel() // max(
                out.shape[0], 1)) * int(per_out))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in weight_layers(model)]
    modes = {m: m.training for m in model.modules()}
    p = next(model.parameters(), None)
    try:
        model.eval()
        with torch.no_grad():
            model(x.to(p.device if p is not None else "cpu"))
    finally:
        for h in handles:
            h.remove()
        for m, was in modes.items():
            m.training = was
    return macs
