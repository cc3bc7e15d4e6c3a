"""VGG-16 with batch norm, CIFAR variant (one 512-wide classifier layer)."""

from __future__ import annotations

from torch import Tensor, nn

from torchpocket.nets import register_net

_CFG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]


class CifarVGG(nn.Module):
    def __init__(self, cfg: list, *, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(c, 512), nn.BatchNorm1d(512), nn.ReLU(inplace=True), nn.Linear(512, num_classes)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register_net("vgg16")
def vgg16(*, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """VGG-16 with batch norm, CIFAR variant (Simonyan & Zisserman 2015)"""
    return CifarVGG(_CFG16, in_channels=in_channels, num_classes=num_classes)
