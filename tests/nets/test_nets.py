"""Every registered net (and a couple of torchvision ones) builds and runs; names are checked helpfully."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchpocket.errors import UserError
from torchpocket.nets import NETS, check_net_name, create_net, net_names, register_net

TV_NETS = ["tv:resnet18", "tv:mobilenet_v2"]


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", NETS.names())
def test_registered_net_builds_and_runs(name: str, in_channels: int) -> None:
    model = create_net(name, in_channels=in_channels, num_classes=7).eval()
    with torch.no_grad():
        for size in (28, 32):
            out = model(torch.randn(2, in_channels, size, size))
            assert out.shape == (2, 7), f"{name} at {size}x{size}"
            assert torch.isfinite(out).all()


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", TV_NETS)
def test_torchvision_net_builds_and_runs(name: str, in_channels: int) -> None:
    model = create_net(name, in_channels=in_channels, num_classes=7).eval()
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == in_channels
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, 32, 32))
    assert out.shape == (2, 7)


def test_in_channels_adaptation_keeps_first_conv_geometry() -> None:
    rgb = create_net("tv:resnet18", in_channels=3, num_classes=7)
    grey = create_net("tv:resnet18", in_channels=1, num_classes=7)
    a, b = rgb.conv1, grey.conv1
    assert isinstance(b, nn.Conv2d)
    assert (b.in_channels, b.out_channels) == (1, a.out_channels)
    assert (b.kernel_size, b.stride, b.padding, b.groups) == (a.kernel_size, a.stride, a.padding, a.groups)
    assert (b.bias is None) == (a.bias is None)
    assert _params(rgb) - _params(grey) == 2 * a.out_channels * a.kernel_size[0] * a.kernel_size[1]


def test_every_registered_net_has_a_doc_line() -> None:
    assert net_names() == NETS.names()
    for name in NETS.names():
        assert NETS.doc(name), f"{name} has no one-line doc (shown by --list)"


def test_duplicate_registration_raises() -> None:
    with pytest.raises(ValueError, match="resnet20"):
        register_net("resnet20")(lambda **kw: nn.Identity())
    assert isinstance(create_net("resnet20"), nn.Module)  # the original entry is untouched


def test_unknown_net_lists_names_and_suggests_closest() -> None:
    with pytest.raises(UserError) as exc:
        create_net("resnet2")
    msg = str(exc.value)
    assert "did you mean 'resnet20'?" in msg
    for name in NETS.names():
        assert name in msg
    with pytest.raises(UserError, match="resnet20"):
        check_net_name("resnet2")


def test_check_net_name_accepts_valid_names() -> None:
    for name in ["resnet20", "lenet5", *TV_NETS]:
        check_net_name(name)  # no exception


def test_unknown_torchvision_name_suggests_closest() -> None:
    with pytest.raises(UserError, match=r"did you mean 'tv:resnet18'\?"):
        check_net_name("tv:resnet1")
    with pytest.raises(UserError, match=r"did you mean 'tv:resnet18'\?"):  # create_net checks too
        create_net("tv:resnet1")


@pytest.mark.parametrize(("name", "low", "high"), [("resnet20", 0.26e6, 0.28e6), ("resnet56", 0.84e6, 0.87e6)])
def test_cifar_resnet_parameter_counts(name: str, low: float, high: float) -> None:
    assert low <= _params(create_net(name, in_channels=3, num_classes=10)) <= high


def test_plain20_has_no_shortcuts_but_resnet20_does() -> None:
    x = torch.randn(2, 3, 32, 32)
    plain, res = create_net("plain20").eval(), create_net("resnet20").eval()
    assert _params(plain) < _params(res)  # resnet20's 1x1 projection shortcuts are the only difference
    assert not any(getattr(m, "residual", False) for m in plain.modules())
    assert any(getattr(m, "residual", False) for m in res.modules())
    with torch.no_grad():
        assert plain(x).shape == res(x).shape == (2, 10)


def test_default_num_classes_is_ten() -> None:
    with torch.no_grad():
        assert create_net("lenet5", in_channels=1).eval()(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_lenet5_runs_at_its_documented_minimum_size() -> None:
    assert "8x8" in NETS.doc("lenet5")
    with torch.no_grad():
        assert create_net("lenet5", in_channels=1).eval()(torch.randn(2, 1, 8, 8)).shape == (2, 10)
