"""CIFAR-10 / CIFAR-100 in torchvision's python-pickle format (downloaded when missing)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchpocket.datasets.base import Augment, DataBundle, Split, carve_val, normalise, register_dataset
from torchpocket.errors import UserError

LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}
MEAN = [0.4914, 0.4822, 0.4465]
STD = [0.2470, 0.2435, 0.2616]


class _NumpyOnly(pickle.Unpickler):
    """The CIFAR pickles hold dicts of bytes, lists and numpy arrays: refuse anything else.

    Besides the original (Python 2, protocol 2) files, accept the same dicts re-pickled by
    Python 3: protocol 2 stores bytes via ``_codecs.encode``, protocol 5 arrays via ``_frombuffer``.
    """

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR batch file")


def read_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            d = _NumpyOnly(f, encoding="bytes").load()
        x = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(d[label_key], dtype=np.int64)
    except (OSError, pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError) as e:
        raise UserError(f"cannot read CIFAR batch {path}: {e}") from None
    if len(x) != len(y):
        raise UserError(f"{path}: {len(x)} images but {len(y)} labels")
    return x, y


def _check_labels(y: np.ndarray, classes: int, where: Path) -> None:
    if y.size and (y.min() < 0 or y.max() >= classes):
        raise UserError(f"{where}: labels must be in 0..{classes - 1}, got {int(y.min())}..{int(y.max())}")


def find_cifar_dir(name: str, data_dir: str | None) -> Path:
    folder, train_files, test_files, _, _ = LAYOUT[name]
    cache = Path(os.environ.get("TORCHPOCKET_CACHE", Path.home() / ".cache" / "torchpocket")) / "data"
    root = Path(data_dir) if data_dir else cache  # the same cache as MNIST / Fashion-MNIST and the baselines
    for d in (root / folder, root):
        if all((d / f).is_file() for f in train_files + test_files):
            return d
    try:
        from torchvision import datasets as tvd

        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        cls(str(root), train=True, download=True)
        return root / folder
    except Exception as e:  # noqa: BLE001 - one user-facing line
        raise UserError(
            f"{name} not found under {root} (expected {folder}/ with {', '.join(train_files + test_files)}) "
            f"and the download failed: {type(e).__name__}"
        ) from None


def load_cifar(name: str, *, data_dir: str | None = None, val_size: int = 5000, seed: int = 0) -> DataBundle:
    d = find_cifar_dir(name, data_dir)
    _, train_files, test_files, key, classes = LAYOUT[name]
    tr = [read_batch(d / f, key) for f in train_files]
    te = [read_batch(d / f, key) for f in test_files]
    for _, labels in tr + te:
        _check_labels(labels, classes, d)
    x = normalise(torch.from_numpy(np.concatenate([a for a, _ in tr])), MEAN, STD)
    y = torch.from_numpy(np.concatenate([b for _, b in tr]))
    train, val = carve_val(x, y, val_size, seed)
    test = Split(normalise(torch.from_numpy(np.concatenate([a for a, _ in te])), MEAN, STD),
                 torch.from_numpy(np.concatenate([b for _, b in te])))
    return DataBundle(name, train, val, test, in_channels=3, num_classes=classes, image_size=32,
                      augment=Augment(crop_pad=4, hflip=True))


@register_dataset("cifar10")
def cifar10(**kw: Any) -> DataBundle:
    """CIFAR-10: 32x32 colour images, 10 classes (downloaded when missing)"""
    return load_cifar("cifar10", **kw)


@register_dataset("cifar100")
def cifar100(**kw: Any) -> DataBundle:
    """CIFAR-100: 32x32 colour images, 100 classes (downloaded when missing)"""
    return load_cifar("cifar100", **kw)
