"""Your own data from the command line: ``--dataset npz --data-dir FILE.npz`` and ``--dataset imagefolder
--data-dir DIR``.

- ``npz``: arrays ``x_train``, ``y_train``, ``x_test``, ``y_test`` (and optionally ``x_val``, ``y_val``);
  images as (N, H, W), (N, H, W, C) or (N, C, H, W), uint8 (0..255) or float; integer labels.
- ``imagefolder``: ``DIR/train/<class>/*.png|jpg...``, ``DIR/test/<class>/...`` and optionally
  ``DIR/val/<class>/...`` (torchvision's ImageFolder layout); every image is resized (shorter side)
  and centre-cropped to ``--image-size`` and held in memory, so this is for datasets that fit in RAM
  (``--dataset imagenet`` streams from disk).

Without a val split, val is carved from train with the fixed seed (10% of train, at most 5,000 images,
or ``--val-size``). Images are normalised with the training split's per-channel mean and std.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchpocket.datasets.base import Augment, DataBundle, Split, carve_val, register_dataset
from torchpocket.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _as_nchw(x: np.ndarray, name: str) -> torch.Tensor:
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = x.transpose(0, 3, 1, 2)
    elif x.ndim != 4:
        raise UserError(f"{name}: expected images of shape (N, H, W), (N, H, W, C) or (N, C, H, W), got {x.shape}")
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t.float().div_(255.0) if t.dtype == torch.uint8 else t.float()


def _labels(y: np.ndarray, name: str) -> torch.Tensor:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"{name}: expected a 1-d array of integer class labels, got {y.dtype} {y.shape}")
    return torch.from_numpy(y.astype(np.int64))


def _bundle(name: str, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor] | None,
            test: tuple[torch.Tensor, torch.Tensor], *, val_size: int, seed: int) -> DataBundle:
    """Normalise by the training split's statistics, carve val when there is none, check the shapes agree."""
    xs = [train[0], test[0]] + ([val[0]] if val else [])
    if len({tuple(x.shape[1:]) for x in xs}) != 1:
        raise UserError(f"{name}: train / val / test images differ in shape: {[tuple(x.shape[1:]) for x in xs]}")
    mean = train[0].mean(dim=(0, 2, 3), keepdim=True)
    std = train[0].std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)

    def norm(x: torch.Tensor) -> torch.Tensor:
        return (x - mean) / std

    if val is None:
        n = val_size if val_size >= 0 else min(5000, max(1, len(train[1]) // 10))
        tr, va = carve_val(norm(train[0]), train[1], n, seed)
    else:
        tr, va = Split(norm(train[0]), train[1]), Split(norm(val[0]), val[1])
    te = Split(norm(test[0]), test[1])
    classes = int(max(int(s.y.max()) for s in (tr, va, te) if len(s)) + 1)
    c, h, w = tr.x.shape[1:]
    return DataBundle(name, tr, va, te, in_channels=int(c), num_classes=classes, image_size=int(w),
                      image_height=int(h) if h != w else None, augment=Augment(crop_pad=max(1, int(w) // 16)))


@register_dataset("npz")
def npz(*, data_dir: str | None = None, val_size: int = -1, seed: int = 0, **_: Any) -> DataBundle:
    """Your arrays: --data-dir FILE.npz with x_train, y_train, x_test, y_test (optionally x_val, y_val)"""
    if not data_dir:
        raise UserError("--dataset npz needs --data-dir FILE.npz (arrays x_train, y_train, x_test, y_test)")
    path = Path(data_dir)
    if not path.is_file():
        raise UserError(f"--dataset npz: no such file {data_dir}")
    try:
        arrays = np.load(path, allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - not an npz, truncated, pickled objects
        raise UserError(f"--dataset npz: {data_dir} cannot be read as .npz: {type(e).__name__}: {e}") from None
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise UserError(f"--dataset npz: {data_dir} lacks {', '.join(missing)} (has {', '.join(arrays.files)})")

    def pair(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = _as_nchw(arrays[f"x_{split}"], f"{data_dir}: x_{split}"), _labels(arrays[f"y_{split}"], f"y_{split}")
        if len(x) != len(y):
            raise UserError(f"--dataset npz: x_{split} has {len(x)} images, y_{split} {len(y)} labels")
        return x, y

    val = pair("val") if "x_val" in arrays and "y_val" in arrays else None
    return _bundle("npz", pair("train"), val, pair("test"), val_size=val_size, seed=seed)


def _read_folder(root: Path, classes: list[str], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    xs, ys = [], []
    for label, cls in enumerate(classes):
        folder = root / cls
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        for f in files:
            with Image.open(f) as im:
                im = im.convert("RGB")
                scale = size / min(im.size)
                im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))))
                left, top = (im.width - size) // 2, (im.height - size) // 2
                im = im.crop((left, top, left + size, top + size))
                xs.append(torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1))
            ys.append(label)
    if not xs:
        raise UserError(f"--dataset imagefolder: no images under {root} (expected {root}/<class>/*.png|jpg)")
    return torch.stack(xs).float().div_(255.0), torch.tensor(ys, dtype=torch.int64)


@register_dataset("imagefolder")
def imagefolder(*, data_dir: str | None = None, val_size: int = -1, seed: int = 0, image_size: int = 32,
                **_: Any) -> DataBundle:
    """Your images: --data-dir DIR with train/ [val/] test/ folders of class sub-folders (held in memory)"""
    if not data_dir:
        raise UserError("--dataset imagefolder needs --data-dir DIR (with train/<class>/..., test/<class>/...)")
    root = Path(data_dir)
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise UserError(f"--dataset imagefolder: {root / split} is not a folder (expected {root}/{split}/<class>/)")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise UserError(f"--dataset imagefolder: {root / 'train'} has no class sub-folders")
    size = image_size if image_size > 0 else 32
    val = _read_folder(root / "val", classes, size) if (root / "val").is_dir() else None
    return _bundle("imagefolder", _read_folder(root / "train", classes, size), val,
                   _read_folder(root / "test", classes, size), val_size=val_size, seed=seed)
