"""Always-offline datasets: scikit-learn's bundled digits, and seeded synthetic tensors."""

from __future__ import annotations

from typing import Any

import torch

from torchpocket.datasets.base import Augment, DataBundle, Split, carve_val, register_dataset


@register_dataset("digits")
def digits(*, val_size: int = 300, seed: int = 0, **_: Any) -> DataBundle:
    """scikit-learn's bundled 8x8 handwritten digits (1797 images, offline; good for tests)"""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = (x - 0.3) / 0.4
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(12345))
    test_idx, rest = perm[:360], perm[360:]
    train, val = carve_val(x[rest], y[rest], min(val_size, len(rest) - 1), seed)
    return DataBundle("digits", train, val, Split(x[test_idx], y[test_idx]), in_channels=1, num_classes=10,
                      image_size=8, augment=Augment(crop_pad=1))


@register_dataset("synthetic")
def synthetic(*, val_size: int = 64, seed: int = 0, shape: tuple[int, int, int] = (3, 32, 32), num_classes: int = 10,
              train_size: int = 512, test_size: int = 128, **_: Any) -> DataBundle:
    """Seeded random images with class-dependent means (any shape; for tests and timing)"""
    g = torch.Generator().manual_seed(seed + 777)
    n = train_size + val_size + test_size
    y = torch.randint(0, num_classes, (n,), generator=g)
    centres = torch.randn(num_classes, *shape, generator=g)
    x = 0.5 * centres[y] + torch.randn(n, *shape, generator=g)
    train, val = carve_val(x[: train_size + val_size], y[: train_size + val_size], val_size, seed)
    test = Split(x[train_size + val_size :], y[train_size + val_size :])
    return DataBundle("synthetic", train, val, test, in_channels=shape[0], num_classes=num_classes,
                      image_size=shape[-1], augment=Augment())
