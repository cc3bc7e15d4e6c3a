"""Profile: MACs against hand-computed counts, params/bytes, and that profiling leaves the model untouched."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from torchpocket.nets import create_net
from torchpocket.profile import LayerProfile, ModelProfile, compare_latency, measure_latency, profile_model


def _resnet_cifar_macs(depth: int, hw: int = 32) -> int:
    """Hand count for the CIFAR ResNet (1x1-conv shortcuts where the shape changes), 3x32x32 input."""
    n = (depth - 2) // 6
    macs = 3 * 16 * 9 * hw * hw  # stem
    cin = 16
    for stage, c in enumerate((16, 32, 64)):
        s = hw // (2**stage)
        for _ in range(n):
            macs += cin * c * 9 * s * s + c * c * 9 * s * s
            if cin != c:
                macs += cin * c * s * s  # shortcut
            cin = c
    return macs + 64 * 10  # fc


@pytest.mark.parametrize(("name", "paper_macs"), [("resnet20", 40.8e6), ("resnet56", 125e6)])
def test_resnet_macs(name: str, paper_macs: float) -> None:
    prof = profile_model(create_net(name), (3, 32, 32))
    depth = int(name[6:])
    assert prof.macs == _resnet_cifar_macs(depth)
    assert abs(prof.macs - paper_macs) / paper_macs < 0.02
    assert prof.flops == 2 * prof.macs
    assert sum(lp.macs for lp in prof.layers) == prof.macs


def test_depthwise_and_linear_macs() -> None:
    c, h, w, k = 8, 10, 12, 3
    model = nn.Sequential(nn.Conv2d(c, c, k, padding=1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                          nn.Flatten(), nn.Linear(c * h * w, 7))
    prof = profile_model(model, (c, h, w))
    by_name = {lp.name: lp for lp in prof.layers}
    assert list(by_name) == ["0", "1", "4"]  # ReLU / Flatten own no parameters: no row
    dw, bn, fc = by_name["0"], by_name["1"], by_name["4"]
    assert dw.macs == k * k * c * h * w != k * k * c * c * h * w
    assert dw.type == "Conv2d" and dw.out_shape == (c, h, w)
    assert fc.macs == c * h * w * 7 and fc.out_shape == (7,)
    assert bn.macs == 0 and bn.flops == 0
    assert prof.macs == dw.macs + fc.macs


def test_params_and_bytes() -> None:
    model = create_net("mobilenet_v2")
    prof = profile_model(model, (3, 32, 32))
    assert prof.params == sum(p.numel() for p in model.parameters())
    assert sum(lp.params for lp in prof.layers) == prof.params
    expected_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert prof.bytes == expected_bytes
    bn = nn.BatchNorm2d(16)  # 32 float params + 32 float running stats + one int64 counter
    (row,) = profile_model(nn.Sequential(bn), (16, 4, 4)).layers
    assert (row.params, row.bytes) == (32, 64 * 4 + 8)
    half = nn.Sequential(nn.Linear(4, 3)).half()
    assert profile_model(half, (4,)).bytes == 15 * 2


def test_model_left_unchanged() -> None:
    model = create_net("resnet20", in_channels=1)
    model.train()
    model.layer1.eval()  # mixed modes must come back as they were
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prof = profile_model(model, (1, 28, 28))
    assert model.training and not model.layer1.training and model.layer2.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks for m in model.modules())
    macs = 16 * 9 * 28 * 28
    assert prof.layers[0] == LayerProfile(name="conv1", type="Conv2d", macs=macs, flops=2 * macs, params=16 * 9,
                                          bytes=16 * 9 * 4, out_shape=(16, 28, 28))
    assert prof.layers[-1].name == "fc" and prof.layers[-1].out_shape == (10,)


def test_table() -> None:
    prof = profile_model(create_net("resnet20"), (3, 32, 32))
    assert isinstance(prof, ModelProfile)
    table = prof.table()
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(prof.layers) + 1
    assert "layer1.0.conv1" in table and f"{prof.macs:,}" in lines[-1]


def test_latency() -> None:
    model = create_net("lenet5", in_channels=1)
    threads = torch.get_num_threads()
    t = measure_latency(model, (1, 28, 28), batch_size=2, threads=1, warmup=1, repeats=3)
    assert math.isfinite(t) and t > 0
    assert torch.get_num_threads() == threads
    other = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    res = compare_latency({"net": model, "linear": other}, (1, 28, 28), batch_size=2, warmup=1, repeats=3)
    assert set(res) == {"net", "linear"}
    assert all(math.isfinite(v) and v > 0 for v in res.values())
    assert model.training  # eval only during the measurement

