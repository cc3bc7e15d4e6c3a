"""``--dataset npz`` and ``--dataset imagefolder``: the user's own data, on small files the tests write."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_ok
from torchpocket.cli import main
from torchpocket.datasets import load_dataset

RUN = ["--net", "lenet5", "--learner", "chn-pruned", "--target", "0.6", "--device", "cpu", "--quiet", "--epochs", "1",
       "--retrain-epochs", "0", "--no-export-onnx", "--reward-val-size", "32", "--latency-repeats", "2",
       "--calib-batches", "1", "--hpo", "uniform", "--batch-size", "16"]

pytestmark = pytest.mark.usefixtures("shared_cache")


def write_npz(path: Path, *, val: bool = False, channels_last: bool = True) -> Path:
    rng = np.random.default_rng(0)

    def images(n: int) -> np.ndarray:
        shape = (n, 28, 28, 3) if channels_last else (n, 3, 28, 28)
        return rng.integers(0, 256, shape, dtype=np.uint8)

    arrays = {"x_train": images(120), "y_train": rng.integers(0, 4, 120), "x_test": images(40),
              "y_test": rng.integers(0, 4, 40)}
    if val:
        arrays.update(x_val=images(30), y_val=rng.integers(0, 4, 30))
    np.savez(path, **arrays)
    return path


def write_folder(root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(1)
    for split, n in (("train", 12), ("test", 4)):
        for cls in ("cat", "dog", "fox"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                size = (40, 30) if i % 2 else (30, 36)  # any size: resized and centre-cropped
                arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / cls / f"{i}.png")
    return root


@pytest.mark.parametrize(("val", "channels_last"), [(False, True), (True, False)])
def test_npz_splits_shapes_and_normalisation(tmp_path: Path, val: bool, channels_last: bool) -> None:
    data = load_dataset("npz", data_dir=str(write_npz(tmp_path / "d.npz", val=val, channels_last=channels_last)))
    assert (data.in_channels, data.num_classes, data.image_size) == (3, 4, 28)
    assert (len(data.train), len(data.val), len(data.test)) == ((120, 30, 40) if val else (108, 12, 40))
    assert abs(float(data.train.x.mean())) < 0.1 and abs(float(data.train.x.std()) - 1) < 0.1


def test_a_run_on_an_npz_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = write_npz(tmp_path / "d.npz")
    run_dir = run_ok(capsys, *RUN, "--dataset", "npz", "--data-dir", str(path), "--out-dir", str(tmp_path / "r"))
    assert json.loads((run_dir / "summary.json").read_text())["dataset"] == "npz"


def test_a_run_on_an_image_folder(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    root = write_folder(tmp_path / "imgs")
    data = load_dataset("imagefolder", data_dir=str(root), image_size=24)
    assert (data.in_channels, data.num_classes, data.image_size, len(data.test)) == (3, 3, 24, 12)
    run_dir = run_ok(capsys, *RUN, "--dataset", "imagefolder", "--data-dir", str(root), "--image-size", "28",
                     "--out-dir", str(tmp_path / "r"))
    assert json.loads((run_dir / "summary.json").read_text())["dataset"] == "imagefolder"


@pytest.mark.parametrize(("dataset", "make", "expect"), [
    ("npz", lambda p: None, "needs --data-dir"),
    ("npz", lambda p: (p / "x.npz").write_bytes(b"nope"), "cannot be read as .npz"),
    ("npz", lambda p: np.savez(p / "x.npz", x_train=np.zeros((2, 4, 4))), "lacks y_train, x_test, y_test"),
    ("imagefolder", lambda p: (p / "x.npz").mkdir(), "is not a folder"),
])
def test_bad_user_data_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path, dataset: str, make: object,
                                   expect: str) -> None:
    make(tmp_path)
    extra = [] if expect == "needs --data-dir" else ["--data-dir", str(tmp_path / "x.npz")]
    rc = main([*RUN, "--dataset", dataset, *extra, "--out-dir", str(tmp_path / "r")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and expect in err[0], err
