"""Python API: ``torchpocket.load`` (rebuild a compressed model from its file) and ``torchpocket.compress``."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from torchpocket.errors import UserError
from torchpocket.learners.training import load_checkpoint, save_checkpoint


def save_model(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    config: dict[str, Any],
    net: str | None,
    in_channels: int,
    num_classes: int,
    image_size: int,
    learner: str = "full-prec",
    arch: dict[str, Any] | None = None,
    policy: dict[str, float] | None = None,
    metrics: dict[str, Any] | None = None,
    base_arch: list[dict[str, Any]] | None = None,
) -> None:
    """Write a model checkpoint: config, what the learner changed and the weights (weights_only-loadable).

    ``base_arch`` chains compressions: the (learner, arch) steps that turned the
    registry net into the model this learner started from (prune, then quantize).
    """
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_checkpoint(path, {
        "config": config, "net": net, "in_channels": in_channels, "num_classes": num_classes,
        "image_size": image_size, "learner": learner, "arch": arch or {}, "policy": policy,
        "metrics": metrics or {}, "base_arch": base_arch or [], "state_dict": state,
    })


def arch_chain(ckpt: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (learner, arch) step recorded in a checkpoint, oldest first."""
    steps = list(ckpt.get("base_arch") or [])
    if ckpt.get("learner") and ckpt["learner"] != "full-prec":
        steps.append({"learner": ckpt["learner"], "arch": ckpt.get("arch") or {}})
    return steps


def rebuild_architecture(model: nn.Module, steps: list[dict[str, Any]]) -> nn.Module:
    from torchpocket.learners import LEARNERS

    for step in steps:
        model = LEARNERS.get(step["learner"]).rebuild(model, step["arch"])
    return model


def load(path: str | os.PathLike, model: nn.Module | None = None, *, expect_net: str | None = None) -> nn.Module:
    """Rebuild the (compressed) model stored at ``path`` and load its weights with ``weights_only=True``.

    The architecture comes from the checkpoint: the registry net it names (or
    ``model``, for a network the user defined), then every learner's recorded
    changes (kept channels, masks, quantizers).
    """
    ckpt = load_checkpoint(path)
    if model is None:
        from torchpocket.nets import create_net

        if not ckpt.get("net"):
            raise UserError(f"{path} holds a user-defined model: pass it, torchpocket.load(path, model=MyNet())")
        model = create_net(ckpt["net"], in_channels=ckpt["in_channels"], num_classes=ckpt["num_classes"])
    elif expect_net and ckpt.get("net") and ckpt["net"] != expect_net:
        raise UserError(f"checkpoint {path} is for net {ckpt['net']!r}, not {expect_net!r}")
    model = rebuild_architecture(model, arch_chain(ckpt))
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UserError(
            f"checkpoint {path} does not fit this architecture (saved for net {ckpt.get('net')!r}): "
            f"{' '.join(first[1:2] or first[:1])[:200]}"
        ) from None
    model.eval()
    return model


def compress(model: nn.Module, train_loader: Any = None, val_loader: Any = None, **kwargs: Any) -> Any:
    from torchpocket.pipeline import compress_model

    return compress_model(model, train_loader, val_loader, **kwargs)


__all__ = ["compress", "load", "save_model", "torch"]
