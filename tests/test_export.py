"""ONNX export: ONNX Runtime must reproduce PyTorch's outputs, for batch 1 and 3 (dynamic batch axis)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import onnx
import pytest
import torch
from torch import Tensor, nn

from torchpocket.errors import UserError
from torchpocket.export import (
    ExportMismatch,
    check_onnx,
    compare_onnx_latency,
    export_int8_onnx,
    export_onnx,
    file_size,
    onnx_latency,
    onnx_predict,
)
from torchpocket.nets import create_net


class AddCat(nn.Module):
    """Residual add and channel concat, the two couplings a pruner has to get right."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.c = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.a(x)
        h = torch.relu(h + self.b(h))
        h = torch.cat([h, self.c(x)], dim=1)
        return self.fc(h.mean((2, 3)))


def _randomise_bn(model: nn.Module) -> None:
    """Non-trivial running statistics, so a graph exported with train-mode BatchNorm would not match."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)


@pytest.mark.parametrize(("name", "shape"), [("resnet20", (1, 28, 28)), ("mobilenet_v2", (3, 32, 32)),
                                             ("addcat", (3, 16, 16))])
def test_export_matches_pytorch(tmp_path: Path, name: str, shape: tuple[int, ...]) -> None:
    model = AddCat() if name == "addcat" else create_net(name, in_channels=shape[0])
    _randomise_bn(model)
    model.train()  # export and check must use eval mode and give train mode back
    path = export_onnx(model, tmp_path / "sub" / "model.onnx", shape)
    assert path == tmp_path / "sub" / "model.onnx" and file_size(path) > 1000
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx"]  # no temporary file left
    assert model.training
    graph = onnx.load(str(path)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch axis
    for batch in (1, 3):
        diff = check_onnx(model, path, shape, batch_size=batch)
        assert 0 <= diff < 1e-4
    assert model.training


def test_mismatch_is_detected(tmp_path: Path) -> None:
    model = AddCat()
    path = export_onnx(model, tmp_path / "m.onnx", (3, 8, 8))
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.fc.bias.add_(0.1)
    with pytest.raises(ExportMismatch, match="differs"):
        check_onnx(other, path, (3, 8, 8), batch_size=2)
    # a larger tolerance accepts the same difference
    assert check_onnx(other, path, (3, 8, 8), batch_size=2, atol=0.2) == pytest.approx(0.1, abs=1e-4)


def test_fixed_batch_and_latency(tmp_path: Path) -> None:
    model = AddCat()
    path = export_onnx(model, tmp_path / "fixed.onnx", (3, 8, 8), dynamic_batch=False, opset=13)
    m = onnx.load(str(path))
    assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
    assert any(o.domain in ("", "ai.onnx") and o.version == 13 for o in m.opset_import)
    check_onnx(model, path, (3, 8, 8), batch_size=1)
    with pytest.raises(Exception):  # noqa: B017  (ONNX Runtime's own error type)
        check_onnx(model, path, (3, 8, 8), batch_size=3)
    t = onnx_latency(path, (3, 8, 8), threads=1, warmup=1, repeats=3)
    assert math.isfinite(t) and t > 0


def test_onnx_predict_and_round_robin_latency(tmp_path: Path) -> None:
    model = AddCat().eval()
    a = export_onnx(model, tmp_path / "a.onnx", (3, 8, 8))
    b = export_onnx(model, tmp_path / "b.onnx", (3, 8, 8))
    x = torch.randn(7, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(onnx_predict(a, x, batch_size=3)), model(x), atol=1e-4,
                                   rtol=1e-4)
    t = compare_onnx_latency({"a": a, "b": b}, (3, 8, 8), batch_size=2, threads=1, warmup=1, repeats=3)
    assert set(t) == {"a", "b"} and all(math.isfinite(v) and v > 0 for v in t.values())
    with pytest.raises(ValueError):
        compare_onnx_latency({"a": a}, (3, 8, 8), batch_size=1, repeats=0)


def test_int8_export_needs_a_quantized_model(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="uniform-quant model"):
        export_int8_onnx(AddCat(), tmp_path / "m.int8.onnx", (3, 8, 8))
    assert not list(tmp_path.iterdir())
