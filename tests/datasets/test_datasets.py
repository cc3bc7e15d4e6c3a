"""Dataset readers on tiny files written in the real formats, and the in-memory loader."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from torchpocket.datasets import DATASETS, Augment, DataBundle, Split, TensorLoader, load_dataset
from torchpocket.datasets.base import carve_val, random_crop
from torchpocket.datasets.idx import FILES, STATS, read_idx
from torchpocket.errors import UserError

# ---------------------------------------------------------------- IDX (MNIST / Fashion-MNIST)


def _idx_bytes(arr: np.ndarray) -> bytes:
    magic = struct.pack(">HBB", 0, 0x08, arr.ndim)  # 0x00000803 for images, 0x00000801 for labels
    return magic + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def _write_idx(path: Path, arr: np.ndarray) -> None:
    path.write_bytes(gzip.compress(_idx_bytes(arr)))


def _make_idx_dir(root: Path, n_train: int = 40, n_test: int = 12, size: int = 28) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train_y": (np.arange(n_train) % 10).astype(np.uint8),
        "test_x": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "test_y": ((np.arange(n_test) * 3) % 10).astype(np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for key, fname in FILES.items():
        _write_idx(root / fname, arrays[key])
    return arrays


def test_idx_magic_numbers_are_the_real_ones(tmp_path: Path) -> None:
    data = _idx_bytes(np.zeros((2, 3, 4), np.uint8))
    assert data[:4] == bytes.fromhex("00000803")
    assert _idx_bytes(np.zeros(5, np.uint8))[:4] == bytes.fromhex("00000801")
    (tmp_path / "raw-idx3-ubyte").write_bytes(data)  # uncompressed IDX files are read too
    assert read_idx(tmp_path / "raw-idx3-ubyte").shape == (2, 3, 4)


def test_fashion_mnist_from_data_dir(tmp_path: Path) -> None:
    arrays = _make_idx_dir(tmp_path)
    data = load_dataset("fashion-mnist", data_dir=str(tmp_path), val_size=10, seed=3)
    assert isinstance(data, DataBundle)
    assert (len(data.train), len(data.val), len(data.test)) == (30, 10, 12)
    assert (data.in_channels, data.num_classes, data.image_size) == (1, 10, 28)
    assert data.augment == Augment(crop_pad=2, hflip=True)
    assert data.train.x.shape == (30, 1, 28, 28) and data.train.x.dtype == torch.float32
    assert data.train.y.dtype == torch.int64
    mean, std = STATS["fashion-mnist"]
    expected_test = (torch.from_numpy(arrays["test_x"]).float()[:, None] / 255 - mean) / std
    torch.testing.assert_close(data.test.x, expected_test)
    assert data.test.y.tolist() == arrays["test_y"].tolist()
    # every train/val image keeps its own label
    all_x = (torch.from_numpy(arrays["train_x"]).float()[:, None] / 255 - mean) / std
    for split in (data.train, data.val):
        for img, label in zip(split.x, split.y):
            (i,) = [k for k in range(len(all_x)) if torch.equal(all_x[k], img)]
            assert label.item() == arrays["train_y"][i]


def test_idx_val_carve_is_deterministic_and_disjoint(tmp_path: Path) -> None:
    _make_idx_dir(tmp_path)
    a = load_dataset("fashion-mnist", data_dir=str(tmp_path), val_size=8, seed=1)
    b = load_dataset("fashion-mnist", data_dir=str(tmp_path), val_size=8, seed=1)
    c = load_dataset("fashion-mnist", data_dir=str(tmp_path), val_size=8, seed=2)
    assert torch.equal(a.val.x, b.val.x) and torch.equal(a.train.y, b.train.y)
    assert not torch.equal(a.val.x, c.val.x)
    train_rows = {tuple(r.tolist()) for r in a.train.x.flatten(1)}
    val_rows = {tuple(r.tolist()) for r in a.val.x.flatten(1)}
    assert len(train_rows) == 32 and len(val_rows) == 8 and not train_rows & val_rows


def test_idx_files_in_a_subfolder_named_after_the_dataset(tmp_path: Path) -> None:
    _make_idx_dir(tmp_path / "mnist")
    data = load_dataset("mnist", data_dir=str(tmp_path), val_size=5)
    assert (len(data.train), len(data.val), len(data.test)) == (35, 5, 12)
    assert data.augment.hflip is False  # digits must not be mirrored


def test_val_size_out_of_range_is_a_user_error(tmp_path: Path) -> None:
    _make_idx_dir(tmp_path)
    with pytest.raises(UserError, match="val size"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path), val_size=40)


def test_missing_idx_files_name_every_place_tried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    def no_download(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("network disabled in tests")

    monkeypatch.setattr(torchvision.datasets, "MNIST", no_download)
    monkeypatch.setenv("TORCHPOCKET_CACHE", str(tmp_path / "cache"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / FILES["train_x"]).write_bytes(b"")  # a partial set of files is not enough
    with pytest.raises(UserError) as exc:
        load_dataset("mnist", data_dir=str(empty), val_size=5)
    msg = str(exc.value)
    assert "mnist data not found" in msg
    assert f"--data-dir {empty}" in msg
    for fname in FILES.values():
        assert fname in msg
    assert str(tmp_path / "cache" / "data" / "mnist") in msg
    assert "download via torchvision (RuntimeError: network disabled in tests)" in msg


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda raw: raw[:-7],  # truncated pixel data
        lambda raw: raw[:3],  # truncated header
        lambda raw: b"\x00\x00\x0d\x03" + raw[4:],  # float IDX, not unsigned byte
        lambda raw: b"\x01" + raw[1:],  # bad magic
    ],
    ids=["short-data", "short-header", "wrong-dtype", "bad-magic"],
)
def test_corrupt_idx_file_is_a_user_error(tmp_path: Path, corrupt: Any) -> None:
    arrays = _make_idx_dir(tmp_path)
    path = tmp_path / FILES["train_x"]
    path.write_bytes(gzip.compress(corrupt(_idx_bytes(arrays["train_x"]))))
    with pytest.raises(UserError, match=FILES["train_x"]):
        load_dataset("fashion-mnist", data_dir=str(tmp_path), val_size=5)


def test_truncated_gzip_stream_is_a_user_error(tmp_path: Path) -> None:
    _make_idx_dir(tmp_path)
    path = tmp_path / FILES["test_x"]
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match="cannot read IDX file"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path), val_size=5)


def test_idx_count_shape_and_label_mismatches_are_user_errors(tmp_path: Path) -> None:
    arrays = _make_idx_dir(tmp_path)
    _write_idx(tmp_path / FILES["test_y"], arrays["test_y"][:-1])
    with pytest.raises(UserError, match="differ in count"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path), val_size=5)
    _write_idx(tmp_path / FILES["test_y"], arrays["test_x"])  # images where labels belong
    with pytest.raises(UserError, match="expected test images"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path), val_size=5)
    _write_idx(tmp_path / FILES["test_y"], np.full(len(arrays["test_x"]), 10, np.uint8))
    with pytest.raises(UserError, match="labels must be in 0..9"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path), val_size=5)


# ---------------------------------------------------------------- CIFAR


class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes bytes as Python 2 strings, like the original CIFAR files (protocol 2, no _codecs)."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_bytes(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def _dump(obj: Any, protocol: str) -> bytes:
    if protocol == "py2":
        buf = io.BytesIO()
        _Py2Pickler(buf, protocol=2).dump(obj)
        # numpy 1.x module name, as in the files from cs.toronto.edu (GLOBAL is text: safe to replace)
        return buf.getvalue().replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    return pickle.dumps(obj, protocol=int(protocol))


def _cifar_batch(n: int, label_key: bytes, classes: int, seed: int) -> tuple[dict[bytes, Any], np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, classes, n)]
    return {b"batch_label": b"batch", label_key: labels, b"data": data, b"filenames": [b"x.png"] * n}, data, labels


def _make_cifar10(root: Path, protocol: str = "py2", per_batch: int = 4, n_test: int = 6) -> tuple[np.ndarray, list]:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    xs, ys = [], []
    for i in range(1, 6):
        batch, data, labels = _cifar_batch(per_batch, b"labels", 10, seed=i)
        (d / f"data_batch_{i}").write_bytes(_dump(batch, protocol))
        xs.append(data)
        ys += labels
    batch, test_x, test_y = _cifar_batch(n_test, b"labels", 10, seed=99)
    (d / "test_batch").write_bytes(_dump(batch, protocol))
    return np.concatenate(xs), ys


@pytest.mark.parametrize("protocol", ["py2", "2", "4", "5"])
def test_cifar10_from_batch_files(tmp_path: Path, protocol: str) -> None:
    train_x, train_y = _make_cifar10(tmp_path, protocol)
    data = load_dataset("cifar10", data_dir=str(tmp_path), val_size=5, seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (15, 5, 6)
    assert (data.in_channels, data.num_classes, data.image_size) == (3, 10, 32)
    assert data.augment == Augment(crop_pad=4, hflip=True)
    assert data.train.x.shape == (15, 3, 32, 32)
    # the union of train and val is the five batches in order, carved by a seeded permutation
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    assert data.val.y.tolist() == [train_y[i] for i in perm[:5]]
    assert data.train.y.tolist() == [train_y[i] for i in perm[5:]]
    first = torch.from_numpy(train_x[int(perm[5])].reshape(3, 32, 32)).float() / 255
    mean, std = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2470, 0.2435, 0.2616])
    torch.testing.assert_close(data.train.x[0], (first - mean[:, None, None]) / std[:, None, None])


def test_cifar10_files_directly_in_data_dir(tmp_path: Path) -> None:
    _make_cifar10(tmp_path)
    data = load_dataset("cifar10", data_dir=str(tmp_path / "cifar-10-batches-py"), val_size=0)
    assert (len(data.train), len(data.val), len(data.test)) == (20, 0, 6)


def test_cifar10_from_the_cache_without_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHPOCKET_CACHE", str(tmp_path))
    _make_cifar10(tmp_path / "data")
    assert len(load_dataset("cifar10", val_size=4).train) == 16


def test_cifar_pickle_with_unexpected_global_is_refused(tmp_path: Path) -> None:
    _make_cifar10(tmp_path)

    class Evil:
        def __reduce__(self) -> tuple:
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    batch, _, _ = _cifar_batch(4, b"labels", 10, seed=1)
    batch[b"data"] = Evil()
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(UserError, match=r"data_batch_3.*unexpected object (posix|nt)\.system"):
        load_dataset("cifar10", data_dir=str(tmp_path), val_size=5)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (pickle.dumps([1, 2, 3]), "cannot read CIFAR batch"),  # not a dict
        (pickle.dumps({b"labels": [1]}), "cannot read CIFAR batch"),  # no data
        (b"\x80\x02}q", "cannot read CIFAR batch"),  # truncated
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1]}), "2 images but 1 labels"),
        (pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]}), r"labels must be in 0..9"),
    ],
    ids=["list", "no-data", "truncated", "count", "label-range"],
)
def test_malformed_cifar_batch_is_a_user_error(tmp_path: Path, content: bytes, match: str) -> None:
    _make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(content)
    with pytest.raises(UserError, match=match):
        load_dataset("cifar10", data_dir=str(tmp_path), val_size=5)


def test_cifar_missing_without_network_is_a_user_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    def no_download(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("network disabled in tests")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", no_download)
    expected = r"cifar10 not found under .*cifar-10-batches-py/ with data_batch_1.*test_batch"
    with pytest.raises(UserError, match=expected):
        load_dataset("cifar10", data_dir=str(tmp_path), val_size=5)


def test_cifar100_from_train_and_test_files(tmp_path: Path) -> None:
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    train, _, train_y = _cifar_batch(12, b"fine_labels", 100, seed=1)
    train[b"coarse_labels"] = [v // 5 for v in train_y]
    test, _, test_y = _cifar_batch(5, b"fine_labels", 100, seed=2)
    (d / "train").write_bytes(_dump(train, "py2"))
    (d / "test").write_bytes(_dump(test, "py2"))
    data = load_dataset("cifar100", data_dir=str(tmp_path), val_size=2)
    assert (len(data.train), len(data.val), len(data.test)) == (10, 2, 5)
    assert data.num_classes == 100
    assert data.test.y.tolist() == test_y  # fine labels, not coarse ones
    assert sorted(data.train.y.tolist() + data.val.y.tolist()) == sorted(train_y)


# ---------------------------------------------------------------- offline datasets


def test_digits_offline() -> None:
    data = load_dataset("digits", val_size=200)
    assert len(data.train) + len(data.val) + len(data.test) == 1797
    assert (len(data.val), len(data.test)) == (200, 360)
    assert data.train.x.shape[1:] == (1, 8, 8)
    assert (data.in_channels, data.num_classes, data.image_size) == (1, 10, 8)
    labels = torch.cat([data.train.y, data.val.y, data.test.y])
    assert set(labels.tolist()) == set(range(10))
    assert abs(torch.cat([data.train.x, data.val.x, data.test.x]).mean().item()) < 0.5  # roughly normalised
    # the test split does not depend on the val size or seed
    other = load_dataset("digits", val_size=50, seed=7)
    assert torch.equal(other.test.x, data.test.x)


def test_synthetic_is_seeded() -> None:
    a = load_dataset("synthetic", seed=4, shape=(1, 12, 12), num_classes=3, train_size=20, val_size=6, test_size=5)
    b = load_dataset("synthetic", seed=4, shape=(1, 12, 12), num_classes=3, train_size=20, val_size=6, test_size=5)
    c = load_dataset("synthetic", seed=5, shape=(1, 12, 12), num_classes=3, train_size=20, val_size=6, test_size=5)
    assert (len(a.train), len(a.val), len(a.test)) == (20, 6, 5)
    assert a.train.x.shape == (20, 1, 12, 12) and (a.in_channels, a.num_classes, a.image_size) == (1, 3, 12)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(a, split).x, getattr(b, split).x)
        assert torch.equal(getattr(a, split).y, getattr(b, split).y)
    assert not torch.equal(a.train.x, c.train.x)
    assert int(a.train.y.max()) < 3


def test_every_dataset_is_registered_with_a_doc() -> None:
    assert {"fashion-mnist", "mnist", "cifar10", "cifar100", "imagenet", "digits", "synthetic"} <= set(DATASETS)
    for name in DATASETS:
        assert DATASETS.doc(name)
    with pytest.raises(UserError, match="did you mean 'cifar10'"):
        load_dataset("cifar1")


# ---------------------------------------------------------------- ImageFolder


def _make_image_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 3) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in classes:
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(d / f"{i}.png")


def test_imagenet_image_folder(tmp_path: Path) -> None:
    _make_image_folder(tmp_path)
    data = load_dataset("imagenet", data_dir=str(tmp_path), val_size=2, image_size=16, num_workers=0)
    assert (len(data.train), len(data.val), len(data.test)) == (4, 2, 6)
    assert (data.in_channels, data.num_classes, data.image_size) == (3, 2, 16)
    x, y = data.train[0]
    assert x.shape == (3, 16, 16) and y in (0, 1)
    assert data.test[5][0].shape == (3, 16, 16) and data.test[5][1] == 1
    assert not set(data.train.indices) & set(data.val.indices)
    assert sorted(data.train.indices + data.val.indices) == list(range(6))
    xb, yb = next(iter(data.loader("val", batch_size=2)))
    assert xb.shape == (2, 3, 16, 16) and yb.shape == (2,)


def test_imagenet_without_train_dir_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "val").mkdir()
    with pytest.raises(UserError, match="train/ and val/"):
        load_dataset("imagenet", data_dir=str(tmp_path))
    with pytest.raises(UserError, match="train/ and val/"):
        load_dataset("imagenet")


def test_imagenet_bad_trees_are_user_errors(tmp_path: Path) -> None:
    _make_image_folder(tmp_path / "a")
    (tmp_path / "a" / "val" / "dog" / "0.png").rename(tmp_path / "a" / "val" / "0.png")
    for f in (tmp_path / "a" / "val" / "dog").iterdir():
        f.unlink()
    (tmp_path / "a" / "val" / "dog").rmdir()
    with pytest.raises(UserError, match="different class folders"):
        load_dataset("imagenet", data_dir=str(tmp_path / "a"), val_size=1)
    (tmp_path / "b" / "train").mkdir(parents=True)
    (tmp_path / "b" / "val").mkdir()
    with pytest.raises(UserError, match="imagenet --data-dir"):
        load_dataset("imagenet", data_dir=str(tmp_path / "b"), val_size=1)


# ---------------------------------------------------------------- TensorLoader and augmentation


def _numbered(n: int) -> tuple[Tensor, Tensor]:
    """Images whose pixels all equal their index, so a batch reveals which images it holds."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 4, 4).clone()
    return x, torch.arange(n)


def _epoch(loader: TensorLoader) -> list[int]:
    out: list[int] = []
    for xb, yb in loader:
        assert torch.equal(xb[:, 0, 0, 0].long(), yb)  # images stay paired with their labels
        out += yb.tolist()
    return out


def test_loader_covers_the_data_once_per_epoch() -> None:
    x, y = _numbered(10)
    loader = TensorLoader(x, y, batch_size=3)
    assert len(loader) == 4 and loader.dataset_size == 10
    assert [len(b[1]) for b in loader] == [3, 3, 3, 1]
    assert _epoch(loader) == list(range(10))
    shuffled = TensorLoader(x, y, batch_size=3, shuffle=True, seed=1)
    seen = _epoch(shuffled)
    assert sorted(seen) == list(range(10)) and seen != list(range(10))
    dropped = TensorLoader(x, y, batch_size=3, shuffle=True, drop_last=True)
    assert len(dropped) == 3 and len(_epoch(dropped)) == 9


def test_shuffle_depends_on_epoch_and_seed_only() -> None:
    x, y = _numbered(32)
    a = TensorLoader(x, y, batch_size=8, shuffle=True, seed=0)
    b = TensorLoader(x, y, batch_size=8, shuffle=True, seed=0)
    e0 = _epoch(a)
    assert e0 == _epoch(a) == _epoch(b)  # same epoch, same order
    a.set_epoch(1)
    e1 = _epoch(a)
    assert e1 != e0 and sorted(e1) == sorted(e0)
    b.set_epoch(1)
    assert _epoch(b) == e1
    assert _epoch(TensorLoader(x, y, batch_size=8, shuffle=True, seed=1)) != e0


@pytest.mark.parametrize("n", [12, 13])
def test_sharding_splits_the_epoch_between_ranks(n: int) -> None:
    x, y = _numbered(n)
    shards = []
    for rank in range(2):
        loader = TensorLoader(x, y, batch_size=4, shuffle=True, seed=3, rank=rank, world_size=2)
        loader.set_epoch(2)
        shards.append(_epoch(loader))
        assert len(loader) == 2
    assert len(shards[0]) == len(shards[1]) == (n + 1) // 2  # equal lengths, padded like DistributedSampler
    assert sorted(set(shards[0]) | set(shards[1])) == list(range(n))
    assert len(set(shards[0]) & set(shards[1])) == n % 2  # disjoint unless padding repeats one sample


def test_sharding_with_fewer_samples_than_ranks_gives_every_rank_a_batch() -> None:
    x, y = _numbered(1)
    lengths = [len(TensorLoader(x, y, batch_size=2, rank=r, world_size=4)) for r in range(4)]
    assert lengths == [1, 1, 1, 1]  # unequal lengths would hang DDP's collectives
    assert [_epoch(TensorLoader(x, y, batch_size=2, rank=r, world_size=4)) for r in range(4)] == [[0]] * 4


def test_random_crop_keeps_shape_and_pad_zero_is_identity() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 8, 6)
    torch.testing.assert_close(random_crop(x, 0, g), x, rtol=0, atol=0)
    out = random_crop(x, 2, g)
    assert out.shape == x.shape


def test_random_crop_is_a_shifted_window_of_the_zero_padded_image() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 2, 5, 5)
    out = random_crop(x, 1, g)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    shifts = set()
    for i in range(len(x)):
        matches = [(oy, ox) for oy in range(3) for ox in range(3)
                   if torch.equal(out[i], padded[i, :, oy : oy + 5, ox : ox + 5])]
        assert matches, f"image {i} is not a crop of its padded self"
        shifts.add(matches[0])
    assert len(shifts) > 1  # offsets differ per image


def test_hflip_flips_exactly_the_selected_images() -> None:
    x = torch.randn(64, 1, 3, 4)
    out = Augment(hflip=True)(x, torch.Generator().manual_seed(5))
    flip = torch.rand(64, generator=torch.Generator().manual_seed(5)) < 0.5  # the same draw as the augment's
    assert 0 < int(flip.sum()) < 64
    torch.testing.assert_close(out[flip], x[flip].flip(3), rtol=0, atol=0)
    torch.testing.assert_close(out[~flip], x[~flip], rtol=0, atol=0)


def test_no_augment_is_identity_and_train_loader_augments() -> None:
    x = torch.randn(8, 3, 6, 6)
    torch.testing.assert_close(Augment()(x, torch.Generator()), x, rtol=0, atol=0)
    bundle = DataBundle("t", Split(x, torch.arange(8)), Split(x, torch.arange(8)), Split(x, torch.arange(8)),
                        in_channels=3, num_classes=8, image_size=6, augment=Augment(crop_pad=2, hflip=True))
    train = bundle.loader("train", batch_size=4, train=True, seed=0)
    assert train.shuffle and train.drop_last and train.augment is bundle.augment
    xb, yb = next(iter(train))
    assert xb.shape == (4, 3, 6, 6) and not torch.equal(xb, x[yb])
    test = bundle.loader("test", batch_size=4)
    assert not test.shuffle and test.augment is None
    xb, yb = next(iter(test))
    assert torch.equal(xb, x[:4]) and yb.tolist() == [0, 1, 2, 3]


def test_carve_val_rejects_bad_sizes() -> None:
    x, y = _numbered(5)
    with pytest.raises(UserError, match=r"val size must be in \[0, 5\)"):
        carve_val(x, y, 5, seed=0)
    with pytest.raises(UserError):
        carve_val(x, y, -1, seed=0)
    train, val = carve_val(x, y, 0, seed=0)
    assert (len(train), len(val)) == (5, 0)
