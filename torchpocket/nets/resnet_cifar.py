"""CIFAR-style ResNets (He et al. 2016, option A/B shortcuts as 1x1 conv) and plain nets (AMC)."""

from __future__ import annotations

from torch import Tensor, nn

from torchpocket.nets import register_net


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, residual: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.residual = residual
        self.shortcut: nn.Module = nn.Identity()
        if residual and (stride != 1 or in_planes != planes):
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + self.shortcut(x)
        return self.relu(out)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 (or 28x28) inputs: 16/32/64 channels in three stages."""

    def __init__(self, depth: int, *, in_channels: int = 3, num_classes: int = 10, residual: bool = True) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        layers: list[nn.Module] = []
        in_planes = 16
        for i, planes in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride, residual))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.pool(x).flatten(1))


def _resnet(depth: int, doc: str) -> None:
    def build(*, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
        return CifarResNet(depth, in_channels=in_channels, num_classes=num_classes)

    build.__doc__ = doc
    register_net(f"resnet{depth}")(build)


for _d in (20, 32, 44, 56, 110):
    _resnet(_d, f"CIFAR-style ResNet-{_d} (He et al. 2016), 16/32/64 channels")


@register_net("plain20")
def plain20(*, in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """Plain-20: ResNet-20 without shortcuts (AMC's CIFAR-10 experiment)"""
    return CifarResNet(20, in_channels=in_channels, num_classes=num_classes, residual=False)
