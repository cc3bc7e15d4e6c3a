"""MobileNet v1 / v2, CIFAR-size variants (stride 1 stem, fewer early downsamplings)."""

from __future__ import annotations

from torch import Tensor, nn

from torchpocket.nets import register_net


def _conv_bn(cin: int, cout: int, k: int, stride: int, groups: int = 1, act: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return layers


class MobileNetV1(nn.Module):
    # (out channels, stride) of each depthwise-separable block; CIFAR variant as in AMC's experiments
    CFG = [(64, 1), (128, 1), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
           (512, 1), (1024, 2), (1024, 1)]

    def __init__(self, *, in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        c = int(32 * width)
        layers = _conv_bn(in_channels, c, 3, 1)
        for out, stride in self.CFG:
            out = int(out * width)
            layers += _conv_bn(c, c, 3, stride, groups=c)
            layers += _conv_bn(c, out, 1, 1)
            c = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += _conv_bn(cin, hidden, 1, 1)
        layers += _conv_bn(hidden, hidden, 3, stride, groups=hidden)
        layers += _conv_bn(hidden, cout, 1, 1, act=False)
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    # (expansion, out channels, repeats, first stride); CIFAR variant: stride 1 stem and first stages
    CFG = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, *, in_channels: int = 3, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        c = int(32 * width)
        layers: list[nn.Module] = list(_conv_bn(in_channels, c, 3, 1))
        for t, out, n, s in self.CFG:
            out = int(out * width)
            for i in range(n):
                layers.append(InvertedResidual(c, out, s if i == 0 else 1, t))
                c = out
        last = int(1280 * max(1.0, width))
        layers += _conv_bn(c, last, 1, 1)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register_net("mobilenet_v1")
def mobilenet_v1(*, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """MobileNet v1 (Howard et al. 2017), CIFAR-size variant"""
    return MobileNetV1(in_channels=in_channels, num_classes=num_classes)


@register_net("mobilenet_v2")
def mobilenet_v2(*, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """MobileNet v2 (Sandler et al. 2018), CIFAR-size variant"""
    return MobileNetV2(in_channels=in_channels, num_classes=num_classes)
