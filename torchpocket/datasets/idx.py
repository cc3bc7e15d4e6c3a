"""MNIST and Fashion-MNIST from the standard IDX ``.gz`` files."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch

from torchpocket.datasets.base import Augment, DataBundle, Split, carve_val, normalise, register_dataset
from torchpocket.errors import UserError

FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}
DEBIAN_DIR = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}
STATS = {"fashion-mnist": (0.2860, 0.3530), "mnist": (0.1307, 0.3081)}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (gzip-compressed or not) into a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
        arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        return arr.reshape(shape).copy()
    except (OSError, ValueError, struct.error, EOFError) as e:
        raise UserError(f"cannot read IDX file {path}: {e}") from None


def _has_files(d: str | Path) -> bool:
    return all((Path(d) / f).is_file() for f in FILES.values())


def find_idx_dir(name: str, data_dir: str | None) -> Path:
    """--data-dir, then Debian's package, then a torchvision download into the cache."""
    tried = []
    if data_dir:
        for d in (Path(data_dir), Path(data_dir) / name):
            if _has_files(d):
                return d
        tried.append(f"--data-dir {data_dir} (expected {', '.join(FILES.values())})")
    deb = DEBIAN_DIR.get(name)
    if deb:
        if _has_files(deb):
            return Path(deb)
        tried.append(f"{deb} (apt-get install dataset-{name})")
    cache = Path(os.environ.get("TORCHPOCKET_CACHE", Path.home() / ".cache" / "torchpocket")) / "data"
    if _has_files(cache / name):
        return cache / name
    tried.append(f"{cache / name}")
    try:
        from torchvision import datasets as tvd

        cls = tvd.FashionMNIST if name == "fashion-mnist" else tvd.MNIST
        cls(str(cache / "tv"), train=True, download=True)
        cls(str(cache / "tv"), train=False, download=True)
        raw = cache / "tv" / cls.__name__ / "raw"
        if _has_files(raw):
            return raw
        tried.append(f"download via torchvision (no {', '.join(FILES.values())} in {raw})")
    except Exception as e:  # noqa: BLE001 - any download failure becomes one user-facing line
        tried.append(f"download via torchvision ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    raise UserError(f"{name} data not found; tried: " + "; ".join(tried))


def load_idx_dataset(name: str, *, data_dir: str | None = None, val_size: int = 5000, seed: int = 0) -> DataBundle:
    d = find_idx_dir(name, data_dir)
    arrays = {k: read_idx(d / f) for k, f in FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if images.ndim != 3 or labels.ndim != 1:
            raise UserError(f"{d}: expected {split} images N x H x W and labels N, got shapes {images.shape} and "
                            f"{labels.shape}")
        if len(images) != len(labels):
            raise UserError(f"{d}: {split} images and labels differ in count")
        if labels.size and labels.max() >= 10:
            raise UserError(f"{d}: {split} labels must be in 0..9, got {int(labels.max())}")
    mean, std = STATS[name]
    x = normalise(torch.from_numpy(arrays["train_x"]), [mean], [std])
    y = torch.from_numpy(arrays["train_y"].astype(np.int64))
    train, val = carve_val(x, y, val_size, seed)
    test = Split(normalise(torch.from_numpy(arrays["test_x"]), [mean], [std]),
                 torch.from_numpy(arrays["test_y"].astype(np.int64)))
    return DataBundle(
        name, train, val, test, in_channels=1, num_classes=10, image_size=x.shape[-1],
        augment=Augment(crop_pad=2, hflip=name == "fashion-mnist"),
    )


@register_dataset("fashion-mnist")
def fashion_mnist(**kw: object) -> DataBundle:
    """Fashion-MNIST (Xiao et al. 2017): 28x28 grey clothing images, 10 classes"""
    return load_idx_dataset("fashion-mnist", **kw)  # type: ignore[arg-type]


@register_dataset("mnist")
def mnist(**kw: object) -> DataBundle:
    """MNIST handwritten digits: 28x28 grey, 10 classes"""
    return load_idx_dataset("mnist", **kw)  # type: ignore[arg-type]
