"""``--init`` beyond torchpocket checkpoints: a plain state_dict for ``--net``, a whole pickled model behind
``--trust-checkpoint``, and one clear line for anything else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run_ok
from torchpocket.cli import main
from torchpocket.nets import create_net

TINY = ["--dataset", "synthetic", "--net", "resnet20", "--learner", "chn-pruned", "--target", "0.6", "--device",
        "cpu", "--quiet", "--retrain-epochs", "0", "--no-export-onnx", "--reward-val-size", "64",
        "--latency-repeats", "2", "--calib-batches", "2", "--hpo", "uniform"]

pytestmark = pytest.mark.usefixtures("shared_cache")


def net() -> torch.nn.Module:
    torch.manual_seed(3)
    return create_net("resnet20", in_channels=3, num_classes=10)  # the synthetic dataset's shape


@pytest.mark.parametrize("wrap", [False, True])
def test_a_plain_state_dict_starts_the_run(capsys: pytest.CaptureFixture[str], tmp_path: Path, wrap: bool) -> None:
    path = tmp_path / "weights.pt"
    sd = net().state_dict()
    torch.save({"state_dict": sd, "epoch": 3} if wrap else sd, path)
    run_dir = run_ok(capsys, *TINY, "--init", str(path), "--out-dir", str(tmp_path / "runs"))
    assert json.loads((run_dir / "summary.json").read_text())["net"] == "resnet20"


def test_a_whole_pickled_model_needs_trust(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(net(), path)
    rc = main([*TINY, "--init", str(path), "--out-dir", str(tmp_path / "a")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and "--trust-checkpoint" in err[0]
    assert not (tmp_path / "a").exists()  # refused before anything was written
    run_ok(capsys, *TINY, "--init", str(path), "--trust-checkpoint", "--out-dir", str(tmp_path / "b"))


def test_a_state_dict_of_another_net_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    torch.save(create_net("resnet32", in_channels=3, num_classes=10).state_dict(), path)
    rc = main([*TINY, "--init", str(path), "--out-dir", str(tmp_path / "r")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and "is not a state_dict of --net resnet20" in err[0]


def test_a_file_of_something_else_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "list.pt"
    torch.save([1, 2, 3], path)
    rc = main([*TINY, "--init", str(path), "--out-dir", str(tmp_path / "r")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and "neither a torchpocket checkpoint nor a state_dict" in err[0]
