"""The shared learner suite: every searchable registered learner must pass it (Optuna ``pytest_samplers`` style).

Cases are (learner, net, target) over ``LEARNERS`` (searchable ones), a set of
registry nets, torchvision nets and a network defined here (residual add,
depthwise conv, ``torch.cat``), written only against the Learner contract:
``prepare`` / ``search_space`` / ``compress`` / ``arch_state`` / ``rebuild``.

Expectations that depend on what a learner's Budget measures are keyed by its
``unit``: for ``flops`` / ``params`` the compressed model must physically shrink,
its measured resource must equal the Budget's figure, sit at or under the target
and within ``tol`` (absolute fraction of the original) of it, and the policy at
the upper bounds must reproduce the original outputs. Other units (bits, ...)
get the unit-independent checks only until they add a row to ``EXPECT``. A learner whose
Budget counts something other than the physical model names it in ``SearchSpace.meta["measure"]``
(``nonzero-weights``: unstructured sparsity, same shapes, counted as non-zero Conv / Linear weights).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from torchpocket.api import load, save_model
from torchpocket.datasets import DATASETS
from torchpocket.errors import UnsupportedModel
from torchpocket.learners import LEARNERS, create_learner
from torchpocket.learners.training import TrainConfig
from torchpocket.nets import create_net

IMAGE = (3, 16, 16)
SMALL_NETS = ["resnet20", "plain20", "user"]  # at every target
BIG_NETS = ["resnet56", "vgg16", "mobilenet_v1", "mobilenet_v2", "tv:resnet18", "tv:mobilenet_v2"]  # at BIG_TARGET
TARGETS = (0.3, 0.5, 0.7)
BIG_TARGET = 0.3  # the cheapest to calibrate and solve; the small nets cover every target


class UserNet(nn.Module):
    """A network no registry knows: residual add, torch.cat of two branches, depthwise conv, functional ops."""

    def __init__(self, *, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()

        def cbr(cin: int, cout: int, k: int, groups: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU())

        self.stem = cbr(in_channels, 16, 3)
        self.a1, self.a2 = cbr(16, 32, 3), cbr(32, 16, 3)
        self.b = cbr(16, 16, 1)
        self.dw = cbr(32, 32, 3, groups=32)
        self.pw = nn.Sequential(nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        s = self.stem(x)
        y = self.pw(self.dw(torch.cat([self.a2(self.a1(s)), self.b(s)], 1)))
        return self.head(F.adaptive_avg_pool2d(F.relu(y + s), 1).flatten(1))


def build_net(name: str, *, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if name == "user":
        return UserNet(in_channels=IMAGE[0])
    return create_net(name, in_channels=IMAGE[0], num_classes=10)


# -- what each Budget unit promises -------------------------------------------------------------


def flops_of(model: nn.Module, x: Tensor) -> float:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return float(counter.get_total_flops())


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class Expect:
    measure: Callable[[nn.Module, nn.Module, Tensor], float] | None = None  # compressed / original resource
    shrinks: bool = False  # fewer parameters in the compressed model
    identity_at_high: bool = False  # the policy at the upper bounds changes nothing
    tol: float = 0.02  # fill=True lands within tol (fraction of the original) under the target


def layer_weights(model: nn.Module, *, nonzero: bool) -> int:
    """Weights of the Conv2d / Linear layers (each tensor once), all or only the non-zero ones."""
    ws = {id(m.weight): m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    return sum(int((w != 0).sum()) if nonzero else w.numel() for w in ws.values())


EXPECT: dict[str, Expect] = {
    "flops": Expect(lambda c, o, x: flops_of(c, x) / flops_of(o, x), True, True),
    "params": Expect(lambda c, o, x: n_params(c) / n_params(o), True, True),
    "nonzero-weights": Expect(
        lambda c, o, x: layer_weights(c, nonzero=True) / layer_weights(o, nonzero=False), False, True, tol=0.01),
}


def is_plain(obj: Any) -> bool:
    """Plain data that torch.load(weights_only=True) and JSON both understand."""
    if isinstance(obj, dict):
        return all(isinstance(k, str) and is_plain(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(is_plain(v) for v in obj)
    return obj is None or isinstance(obj, (str, int, float, bool))


# -- cases -------------------------------------------------------------------------------------


def searchable_learners() -> list[str]:
    return [n for n in LEARNERS.names() if getattr(LEARNERS.get(n), "searchable", True)]


def cases() -> list[Any]:
    out = []
    for learner in searchable_learners():
        for net in SMALL_NETS + BIG_NETS:
            for t in TARGETS if net in SMALL_NETS else (BIG_TARGET,):
                out.append(pytest.param(learner, net, t, id=f"{learner}-{net}-{t}"))
    return out


@functools.cache
def dataset() -> Any:
    return DATASETS.get("synthetic")(shape=IMAGE, train_size=64, val_size=16, test_size=16)


@functools.lru_cache(maxsize=1)  # cases run net by net: keep only the current one's calibration
def prepared(learner_name: str, net: str) -> tuple[Any, nn.Module]:
    model = build_net(net).eval()
    learner = create_learner(learner_name, train_cfg=TrainConfig(batch_size=32), quiet=True, seed=0)
    learner.prepare(model, dataset())
    return learner, model


@pytest.mark.parametrize(("learner_name", "net", "target"), cases())
def test_learner_contract(learner_name: str, net: str, target: float, tmp_path: Any) -> None:
    try:
        learner, model = prepared(learner_name, net)
        space = learner.search_space(model, target)
    except UnsupportedModel as e:  # a learner may refuse an architecture, with a clear reason
        pytest.skip(f"{learner_name} refuses {net}: {e}")
    data = dataset()
    x = data.val.x[:4]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = model(x)

    budget = space.budget
    assert len(space) > 0 and budget.fill  # resource-constrained protocol by default ...
    assert not learner.search_space(model, target, fill=False).budget.fill  # ... accuracy-guaranteed on request
    assert len(set(space.names)) == len(space.names)
    policy = budget.project(np.random.default_rng(0).uniform(space.lows, space.highs))
    assert len(policy) == len(space) and budget.satisfied(policy)

    cand = learner.compress(model, policy)
    assert cand is not model
    for k, v in model.state_dict().items():  # the teacher is untouched
        assert torch.equal(v, state[k]), f"compress() changed the original model's {k}"
    cand.eval()
    with torch.no_grad():
        assert torch.equal(model(x), ref)
        out = cand(x)
    assert out.shape == ref.shape and torch.isfinite(out).all()

    expect = EXPECT.get(space.meta.get("measure", budget.unit), Expect())
    if expect.measure is not None:
        ratio = expect.measure(cand, model, x[:1])
        assert ratio == pytest.approx(budget.fraction(policy), rel=1e-6, abs=1e-9), "Budget disagrees with the model"
        assert ratio <= target * (1 + 1e-9), f"{budget.unit} ratio {ratio:.4f} over target {target}"
        assert ratio >= target - expect.tol, f"{budget.unit} ratio {ratio:.4f} not within {expect.tol} of {target}"
    if expect.shrinks:
        assert n_params(cand) < n_params(model)
    if expect.identity_at_high and target == (TARGETS[0] if net in SMALL_NETS else BIG_TARGET):
        same = learner.compress(model, list(space.highs))
        same.eval()
        with torch.no_grad():
            torch.testing.assert_close(same(x), ref, atol=1e-4, rtol=1e-4)

    # the architecture record rebuilds the same model from a freshly built net ...
    arch = learner.arch_state(cand)
    assert is_plain(arch)
    rebuilt = type(learner).rebuild(build_net(net, seed=1), arch)
    rebuilt.load_state_dict(cand.state_dict())
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), out)
    # ... and so does torchpocket.load (weights_only=True) from a saved file
    path = tmp_path / "model.pt"
    registry_net = None if net == "user" else net
    save_model(path, cand, config={}, net=registry_net, in_channels=IMAGE[0], num_classes=10, image_size=IMAGE[-1],
               learner=learner_name, arch=arch, policy=space.to_dict(policy))
    loaded = load(path, model=build_net(net, seed=2) if registry_net is None else None)
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
