"""``--net path/to/models.py:build_net`` and ``--net package.module:build_net``: the user's own network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import torchpocket
from tests.conftest import run_ok
from torchpocket.cli import main

MODELS = '''
import torch
from torch import nn


def build_net(*, in_channels, num_classes):
    return nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, num_classes))


def not_a_module(*, in_channels, num_classes):
    return 42

VALUE = 3
'''
TINY = ["--dataset", "synthetic", "--learner", "chn-pruned", "--target", "0.6", "--device", "cpu", "--quiet",
        "--epochs", "1", "--retrain-epochs", "0", "--no-export-onnx", "--reward-val-size", "64",
        "--latency-repeats", "2", "--calib-batches", "2"]

pytestmark = pytest.mark.usefixtures("shared_cache")


@pytest.fixture
def models(tmp_path: Path) -> Path:
    path = tmp_path / "my_models.py"
    path.write_text(MODELS)
    return path


def test_a_user_file_net_is_trained_pruned_saved_and_reloaded(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                               models: Path) -> None:
    net = f"{models}:build_net"
    run_dir = run_ok(capsys, *TINY, "--net", net, "--hpo", "uniform", "--out-dir", str(tmp_path / "runs"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["net"] == net and 0.5 < summary["flops_ratio"] <= 0.6 + 1e-6
    model = torchpocket.load(run_dir / "model.pt")  # rebuilt from the same file
    assert sum(p.numel() for p in model.parameters()) == summary["compressed"]["params"]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_a_dotted_module_net(capsys: pytest.CaptureFixture[str], tmp_path: Path, models: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(models.parent))
    run_dir = run_ok(capsys, *TINY, "--net", "my_models:build_net", "--hpo", "uniform", "--out-dir", str(tmp_path))
    assert json.loads((run_dir / "summary.json").read_text())["net"] == "my_models:build_net"


@pytest.mark.parametrize(("net", "expect"), [
    ("{dir}/nope.py:build_net", "no such file"),
    ("{dir}/my_models.py:missing", "has no callable 'missing'"),
    ("{dir}/my_models.py:VALUE", "has no callable 'VALUE'"),
    ("{dir}/my_models.py:not_a_module", "returned a int, not an nn.Module"),
    ("no_such_package_xyz.models:build", "cannot import no_such_package_xyz.models"),
])
def test_bad_user_nets_are_one_line_and_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path, models: Path,
                                               net: str, expect: str) -> None:
    rc = main([*TINY, "--net", net.format(dir=models.parent), "--hpo", "uniform", "--out-dir", str(tmp_path / "r")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and expect in err[0], err


def test_timm_nets(monkeypatch: pytest.MonkeyPatch) -> None:
    """``timm:<name>`` builds timm's model with the dataset's channels and classes (a stand-in timm here)."""
    import sys
    import types

    from torchpocket.errors import UserError
    from torchpocket.nets import check_net_name, create_net

    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(UserError, match=r"pip install 'torchpocket\[timm\]'"):
        check_net_name("timm:resnet18")
    calls = {}

    def create_model(name: str, **kw: object) -> torch.nn.Module:
        calls.update(kw, name=name)
        return torch.nn.Linear(2, 2)

    fake = types.SimpleNamespace(create_model=create_model, list_models=lambda: ["resnet18", "vit_tiny"])
    monkeypatch.setitem(sys.modules, "timm", fake)
    check_net_name("timm:resnet18")
    with pytest.raises(UserError, match="did you mean 'timm:resnet18'"):
        check_net_name("timm:resnet19")
    create_net("timm:resnet18", in_channels=1, num_classes=7)
    assert calls == {"name": "resnet18", "pretrained": False, "num_classes": 7, "in_chans": 1}
