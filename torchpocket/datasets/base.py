"""Splits, the in-memory batch loader with per-batch augmentation, and the dataset registry."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from torchpocket.registry import Registry

DATASETS: Registry = Registry("dataset")
register_dataset = DATASETS.register


@dataclass
class Augment:
    """Per-batch augmentation applied to normalised NCHW float tensors."""

    crop_pad: int = 0
    hflip: bool = False

    def __call__(self, x: Tensor, gen: torch.Generator) -> Tensor:
        if self.crop_pad:
            x = random_crop(x, self.crop_pad, gen)
        if self.hflip:
            flip = torch.rand(x.shape[0], generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return x


def random_crop(x: Tensor, pad: int, gen: torch.Generator) -> Tensor:
    """Zero-pad by ``pad`` and crop back at a random offset, one offset per image, vectorised."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]  # B,H,1
    cols = (ox[:, None] + torch.arange(w))[:, None, :]  # B,1,W
    out = padded[torch.arange(b)[:, None, None], :, rows, cols]  # B,H,W,C
    return out.permute(0, 3, 1, 2)  # NCHW view with channels-last strides: what the trainer wants anyway


class TensorLoader:
    """Batches from in-memory tensors: no per-image Python work, so a 2-core CPU is not input-bound.

    Shuffles with its own seeded generator (re-seeded per epoch with ``set_epoch``)
    and shards across ``world_size`` ranks when training distributed.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        *,
        batch_size: int,
        shuffle: bool = False,
        augment: Augment | None = None,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle, self.augment, self.drop_last = shuffle, augment, drop_last
        self.seed, self.epoch = seed, 0
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def dataset_size(self) -> int:
        return len(self.y)

    def _indices(self) -> Tensor:
        n = len(self.y)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            idx = torch.randperm(n, generator=g)
        else:
            idx = torch.arange(n)
        if self.world_size > 1:
            per = math.ceil(n / self.world_size)
            pad = per * self.world_size - n
            if pad:  # pad like DistributedSampler, repeating when there are fewer samples than ranks
                idx = torch.cat([idx, idx.repeat(math.ceil(pad / n))[:pad]])
            idx = idx[self.rank :: self.world_size]
        return idx

    def __len__(self) -> int:
        n = len(self._indices()) if self.world_size > 1 else len(self.y)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        idx = self._indices()
        gen = torch.Generator().manual_seed(self.seed * 7919 + self.epoch + 1)
        for i in range(len(self)):
            j = idx[i * self.batch_size : (i + 1) * self.batch_size]
            xb = self.x[j]
            if self.augment is not None:
                xb = self.augment(xb, gen)
            yield xb, self.y[j]


@dataclass
class Split:
    """One split held in memory: normalised float images (N,C,H,W) and int64 labels."""

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, n: int) -> Split:
        return Split(self.x[:n], self.y[:n])


@dataclass
class DataBundle:
    """What every learner receives: train / val / test plus what the nets need to know."""

    name: str
    train: Any  # Split, or a torch Dataset for data that does not fit in memory
    val: Any
    test: Any
    in_channels: int
    num_classes: int
    image_size: int
    augment: Augment = field(default_factory=Augment)
    num_workers: int = 0
    image_height: int | None = None  # None: square images (image_size x image_size)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image: what FLOPs, latency and ONNX export are measured at."""
        return (self.in_channels, self.image_height or self.image_size, self.image_size)

    def example(self) -> Tensor:
        """One training sample as a batch of one, float32 on the CPU (the shape traced for graphs and FLOPs)."""
        train = self.train
        x = train.x[:1] if isinstance(train, Split) else train[0][0][None]
        return x.detach().float().cpu()

    def sizes(self) -> str:
        return f"{self.name}: train {len(self.train)}, val {len(self.val)}, test {len(self.test)} images"

    def loader(
        self, split: str, *, batch_size: int, train: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> Any:
        """A loader over ``split`` ('train' | 'val' | 'test'); ``train`` turns on shuffling and augmentation."""
        data = getattr(self, split)
        if isinstance(data, Split):
            return TensorLoader(
                data.x, data.y, batch_size=batch_size, shuffle=train, augment=self.augment if train else None,
                drop_last=train, seed=seed, rank=rank, world_size=world_size,
            )
        from torch.utils.data import DataLoader, DistributedSampler

        sampler = DistributedSampler(data, world_size, rank, shuffle=train, seed=seed) if world_size > 1 else None
        loader = DataLoader(
            data, batch_size=batch_size, shuffle=train and sampler is None, sampler=sampler,
            num_workers=self.num_workers, drop_last=train, persistent_workers=self.num_workers > 0,
        )
        if sampler is not None:
            loader.set_epoch = sampler.set_epoch  # type: ignore[attr-defined]
        return loader


def carve_val(x: Tensor, y: Tensor, val_size: int, seed: int) -> tuple[Split, Split]:
    """Split training data into (train, val) with a fixed seed, so every run sees the same val split."""
    if not 0 <= val_size < len(y):
        from torchpocket.errors import UserError

        raise UserError(f"val size must be in [0, {len(y)}), got {val_size}")
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    val_idx, train_idx = perm[:val_size], perm[val_size:]
    return Split(x[train_idx], y[train_idx]), Split(x[val_idx], y[val_idx])


def normalise(x: Tensor, mean: list[float], std: list[float]) -> Tensor:
    """uint8 N,C,H,W (or N,H,W) -> float32 normalised N,C,H,W."""
    if x.dim() == 3:
        x = x[:, None]
    x = x.float().div_(255.0)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x - m) / s
