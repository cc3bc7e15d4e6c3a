"""LeNet-5 (LeCun et al. 1998), with ReLU and max pooling."""

from __future__ import annotations

from torch import Tensor, nn

from torchpocket.nets import register_net


class LeNet5(nn.Module):
    def __init__(self, *, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=2), nn.ReLU(inplace=True), nn.AdaptiveMaxPool2d(5),
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * 25, 120), nn.ReLU(inplace=True), nn.Linear(120, 84), nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


@register_net("lenet5")
def lenet5(*, in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """LeNet-5 (LeCun et al. 1998) with ReLU; any input of 8x8 or larger (digits, MNIST, CIFAR)"""
    return LeNet5(in_channels=in_channels, num_classes=num_classes)
