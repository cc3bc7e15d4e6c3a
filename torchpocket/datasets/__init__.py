"""Datasets and their registry. Every dataset yields train / val / test; val is carved from train with a fixed seed."""

from __future__ import annotations

from typing import Any

from torchpocket.datasets.base import DATASETS, Augment, DataBundle, Split, TensorLoader, register_dataset

__all__ = ["DATASETS", "Augment", "DataBundle", "Split", "TensorLoader", "register_dataset", "load_dataset"]


def load_dataset(name: str, **kwargs: Any) -> DataBundle:
    """Load a registered dataset by its CLI name."""
    return DATASETS.get(name)(**kwargs)


from torchpocket.datasets import cifar, files, idx, imagenet, small  # noqa: E402,F401  (fill the registry)
