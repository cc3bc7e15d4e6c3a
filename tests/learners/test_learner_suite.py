"""The shared learner suite: every searchable registered learner must pass it (Optuna ``pytest_samplers`` style).

Cases are (learner, net, target) over ``LEARNERS`` (searchable ones), a set of
registry nets, torchvision nets and a network defined here (residual add,
depthwise conv, ``torch.cat``), written only against the Learner contract:
``prepare`` / ``search_space`` / ``compress`` / ``arch_state`` / ``rebuild``.

Expectations that depend on what a learner's Budget measures are keyed by its
``unit``: for ``flops`` / ``params`` the compressed model must physically shrink,
its measured resource must equal the Budget's figure, sit at or under the target
and within ``tol`` (absolute fraction of the original) of it, and the policy at
the upper bounds must reproduce the original outputs. For ``weight-bits`` (the
quantization learners) the measured resource is the bits of the integer codes each
layer holds over the fp32 weight bits, every layer must hold at most ``2^bits`` codes
(and weight values per output channel) at the policy's bit-width, and targets are
scaled by ``BITS_SCALE`` (8 bits is 0.25 of fp32). Other units get the
unit-independent checks only until they add a row to ``EXPECT``. A learner whose
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
from torchpocket.learners._quant import weight_codes
from torchpocket.learners.dis_chn_pruned import DcpConfig
from torchpocket.learners.training import TrainConfig
from torchpocket.nets import create_net

IMAGE = (3, 16, 16)
# options that keep a learner's per-candidate training short on the suite's tiny data (the contract is the same)
QUICK: dict[str, dict[str, Any]] = {
    "dis-chn-pruned": {"config": DcpConfig(head_steps=10, block_steps=2, select_steps=2, samples=96, batch=32,
                                           lsq_batches=1)},
}
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


def weight_bits(model: nn.Module) -> int:
    """Bits of the quantized Conv2d / Linear weights (integer codes x bit-width), fp32 for the others."""
    codes = weight_codes(model)
    total, seen = 0, set()
    for n, m in model.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        p = m._parameters.get("weight")  # a weight-shared layer computes its weight: no tensor identity
        if p is not None and id(p) in seen:
            continue
        seen.add(id(p))
        total += codes[n][1] * m.weight.numel() if n in codes else 32 * m.weight.numel()
    return total


EXPECT: dict[str, Expect] = {
    "flops": Expect(lambda c, o, x: flops_of(c, x) / flops_of(o, x), True, True),
    "params": Expect(lambda c, o, x: n_params(c) / n_params(o), True, True),
    "nonzero-weights": Expect(
        lambda c, o, x: layer_weights(c, nonzero=True) / layer_weights(o, nonzero=False), False, True, tol=0.01),
    # quantization: the fraction of the fp32 weight bits, counted from the integer codes each layer holds
    "weight-bits": Expect(lambda c, o, x: weight_bits(c) / (32 * layer_weights(o, nonzero=False)), tol=0.02),
}


def check_bits_honoured(model: nn.Module, bits: dict[str, float]) -> None:
    """Every quantized layer holds at most 2^bits integer codes (and weight values per output channel)."""
    codes = weight_codes(model)
    assert set(codes) == set(bits), "the quantized layers are not the policy's layers"
    mods = dict(model.named_modules())
    for name, (code, b) in codes.items():
        assert b == round(bits[name]), f"{name}: {b} bits, the policy says {bits[name]}"
        assert code.unique().numel() <= 2**b, f"{name}: {code.unique().numel()} codes at {b} bits"
        m = mods[name]
        w = (m.quantized_weight() if hasattr(m, "quantized_weight") else m.weight).detach()
        per_channel = max(row.unique().numel() for row in w.reshape(w.shape[0], -1))
        assert per_channel <= 2**b, f"{name}: {per_channel} distinct weights in one channel at {b} bits"


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


BITS_SCALE = 0.25  # a bits learner's targets: 8 bits (0.25 of fp32) is their ceiling, so 0.3 -> 2.4 bits average


def cases() -> list[Any]:
    out = []
    for learner in searchable_learners():
        scale = BITS_SCALE if getattr(LEARNERS.get(learner), "policy_name", "") == "bits" else 1.0
        for net in SMALL_NETS + BIG_NETS:
            for t in TARGETS if net in SMALL_NETS else (BIG_TARGET,):
                out.append(pytest.param(learner, net, t * scale, id=f"{learner}-{net}-{t * scale:g}"))
    return out


@functools.cache
def dataset() -> Any:
    return DATASETS.get("synthetic")(shape=IMAGE, train_size=64, val_size=16, test_size=16)


@functools.lru_cache(maxsize=1)  # cases run net by net: keep only the current one's calibration
def prepared(learner_name: str, net: str) -> tuple[Any, nn.Module]:
    model = build_net(net).eval()
    learner = create_learner(learner_name, train_cfg=TrainConfig(batch_size=32), quiet=True, seed=0,
                             **QUICK.get(learner_name, {}))
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
        reachable = min(target, budget.fraction(list(space.highs)))  # e.g. 8 bits everywhere is 0.25 of fp32
        assert ratio >= reachable - expect.tol, f"{budget.unit} ratio {ratio:.4f} not within {expect.tol} of {target}"
    if budget.unit == "bits":
        check_bits_honoured(cand, space.to_dict(policy))
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
    # ... and a learner's own deployment file, when it writes one, reloads to the same outputs
    extra = learner.export(cand, tmp_path, x[:1])
    if "reload_identical" in extra:
        assert extra["reload_identical"], f"{learner_name}'s export does not reload identically"
