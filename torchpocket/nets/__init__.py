"""Model definitions and their registry.

Every entry point takes ``in_channels`` and ``num_classes`` keyword arguments.
``tv:<name>`` builds any torchvision classification model (random init, never a
download) with its first convolution adapted to ``in_channels``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from torchpocket.errors import UserError
from torchpocket.registry import Registry, closest

NETS: Registry = Registry("net")
register_net = NETS.register


def create_net(name: str, *, in_channels: int = 3, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Build a registered net (or ``tv:<name>``, or the user's ``file.py:fn`` / ``module:fn``) by its CLI name."""
    from torchpocket.nets.user import create_user_net, is_user_net

    if is_user_net(name):
        return create_user_net(name, in_channels=in_channels, num_classes=num_classes, **kwargs)
    if name.startswith("timm:"):
        return _timm().create_model(name[5:], pretrained=False, num_classes=num_classes, in_chans=in_channels,
                                    **kwargs)
    if name.startswith("tv:"):
        from torchpocket.nets.tv import create_torchvision

        check_net_name(name)  # an unknown tv: name is a UserError, not torchvision's ValueError
        return create_torchvision(name[3:], in_channels=in_channels, num_classes=num_classes, **kwargs)
    return NETS.get(name)(in_channels=in_channels, num_classes=num_classes, **kwargs)


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise UserError("timm:<name> nets need timm: pip install 'torchpocket[timm]' (or pip install timm)") from None
    return timm


def net_names() -> list[str]:
    return NETS.names()


def check_net_name(name: str) -> None:
    """Raise :class:`UserError` if ``name`` is not a buildable net."""
    from torchpocket.nets.user import is_user_net, user_net_factory

    if is_user_net(name):
        user_net_factory(name)
        return
    if name.startswith("timm:"):
        valid = _timm().list_models()
        if name[5:] not in valid:
            close = closest(name[5:], valid)
            raise UserError(f"unknown timm model {name!r}" + (f" (did you mean 'timm:{close}'?)" if close else "")
                            + "; python -c 'import timm; print(timm.list_models())' lists them")
        return
    if name.startswith("tv:"):
        from torchpocket.nets.tv import torchvision_names

        valid = torchvision_names()
        if name[3:] not in valid:
            close = closest(name[3:], valid)
            hint = f" (did you mean 'tv:{close}'?)" if close else ""
            raise UserError(
                f"unknown torchvision model {name!r}{hint}; choose tv:<name> with one of: {', '.join(valid)}"
            )
        return
    NETS.get(name)


from torchpocket.nets import lenet, mobilenet, resnet_cifar, vgg  # noqa: E402,F401  (fill the registry)
