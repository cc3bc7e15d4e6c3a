"""ImageNet (or any ImageFolder tree with train/ and val/): streamed from disk with workers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from torchpocket.datasets.base import DataBundle, register_dataset
from torchpocket.errors import UserError

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


@register_dataset("imagenet")
def imagenet(*, data_dir: str | None = None, val_size: int = 10000, seed: int = 0, image_size: int = 224,
             num_workers: int = 4, **_: Any) -> DataBundle:
    """ImageNet-1k as an ImageFolder tree (--data-dir with train/ and val/); val split carved from train"""
    from torchvision import datasets as tvd
    from torchvision import transforms as T

    root = Path(data_dir) if data_dir else None
    if root is None or not (root / "train").is_dir() or not (root / "val").is_dir():
        raise UserError(
            f"imagenet needs --data-dir with train/ and val/ class folders (ImageFolder layout), got {root}"
        )
    norm = T.Normalize(MEAN, STD)
    train_tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    eval_tf = T.Compose([T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size), T.ToTensor(), norm])
    try:
        train_aug = tvd.ImageFolder(str(root / "train"), train_tf)
        train_eval = tvd.ImageFolder(str(root / "train"), eval_tf)
        test = tvd.ImageFolder(str(root / "val"), eval_tf)
    except FileNotFoundError as e:  # no class folders, or no images in them
        raise UserError(f"imagenet --data-dir {root}: {e}") from None
    if test.classes != train_aug.classes:  # labels are class-folder indices: both trees must list the same classes
        missing = sorted(set(train_aug.classes) ^ set(test.classes))
        raise UserError(f"imagenet --data-dir {root}: train/ and val/ have different class folders "
                        f"({len(train_aug.classes)} vs {len(test.classes)}; differing: {', '.join(missing[:5])})")
    n = len(train_aug)
    if not 0 <= val_size < n:
        raise UserError(f"val size must be in [0, {n}), got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return DataBundle(
        "imagenet", Subset(train_aug, perm[val_size:]), Subset(train_eval, perm[:val_size]), test,
        in_channels=3, num_classes=len(train_aug.classes), image_size=image_size, num_workers=num_workers,
    )
