"""The shared learner suite: every searchable registered learner must pass it (Optuna ``pytest_samplers`` style).

Cases are (learner, net, target) over ``LEARNERS`` (searchable ones), a set of
registry nets, torchvision nets and a network defined here (residual add,
depthwise conv, ``torch.cat``), written only against the Learner contract:
``prepare`` / ``search_space`` / ``compress`` / ``finetune`` / ``retrain`` /
``arch_state`` / ``rebuild``. Each learner is built with its own ``quick_options()``
(short calibration, few steps) so the suite stays fast without knowing its internals.
The checks are plain functions (``check_*``) that the parametrised tests call for every
registered learner, and ``tests/plugins/test_plugins.py`` for its toy learner.

After a few steps of ``finetune`` and one epoch of ``retrain`` (distilled) on the
small nets, the candidate keeps its architecture (state_dict shapes), still measures
what the Budget says (masks kept zeros, pruned channels stayed out), still honours
its bit-widths, and its record still rebuilds it and reloads through ``torchpocket.load``.

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

import dataclasses
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
from torchpocket.learners import LEARNERS, Learner, create_learner
from torchpocket.learners._layers import layer_macs
from torchpocket.learners._quant import weight_codes
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
        total += codes[n][1] * codes[n][0].numel() if n in codes else 32 * m.weight.numel()
    return total


def position_bits(model: nn.Module) -> int:
    """One bit per weight of every layer stored sparse (a weight-shared layer with a mask: its bitmask)."""
    return sum(int(m._buffers["mask"].numel()) for m in model.modules() if "mask" in getattr(m, "_buffers", {}))


def other_params(model: nn.Module) -> int:
    """Parameters other than the Conv2d / Linear weights and their codebooks (biases, norms): stored in fp32."""
    skip = {id(m._parameters[k]) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))
            for k in ("weight", "centroids") if m._parameters.get(k) is not None}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


EXPECT: dict[str, Expect] = {
    "flops": Expect(lambda c, o, x: flops_of(c, x) / flops_of(o, x), True, True),
    "params": Expect(lambda c, o, x: n_params(c) / n_params(o), True, True),
    "nonzero-weights": Expect(
        lambda c, o, x: layer_weights(c, nonzero=True) / layer_weights(o, nonzero=False), False, True, tol=0.01),
    # quantization: the fraction of the fp32 weight bits, counted from the integer codes each layer holds
    "weight-bits": Expect(lambda c, o, x: weight_bits(c) / (32 * layer_weights(o, nonzero=False)), tol=0.02),
    # composites: counted on the model (its MACs by forward hooks, its codes' bit-widths, its activation quantizers)
    "bitops": Expect(lambda c, o, x: bitops(c, x) / (bitops(o, x)), tol=0.01),
    "bytes": Expect(lambda c, o, x: (weight_bits(c) + position_bits(c) + 32 * other_params(c)) / (32 * n_params(o)),
                    tol=0.01),
}


def bitops(model: nn.Module, x: Tensor) -> float:
    """Sum over Conv2d / Linear of MACs x weight bits x activation bits (32 where float), on one sample of ``x``."""
    codes = weight_codes(model)
    acts = [m.bits for m in model.modules() if type(m).__name__ == "ActQuant"]
    abits = acts[0] if acts else 32
    return float(sum(macs * (codes[n][1] if n in codes else 32) * abits for n, macs in layer_macs(model, x).items()))


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
        mask = m._buffers.get("mask")  # a sparse layer: its pruned weights are zeros, not codes
        rows = [r[k] for r, k in zip(w.reshape(w.shape[0], -1), mask.reshape(w.shape[0], -1))] if mask is not None \
            else list(w.reshape(w.shape[0], -1))
        per_channel = max(row.unique().numel() for row in rows)
        assert per_channel <= 2**b, f"{name}: {per_channel} distinct weights in one channel at {b} bits"


def check_bits_of(space: Any, cand: nn.Module, policy: list[float]) -> None:
    """A bits learner's (or a composite's quantizer part's) codes honour the policy's bit-widths."""
    if space.budget.unit == "bits":
        check_bits_honoured(cand, space.to_dict(policy))
    elif "split" in space.meta:  # a composite: its second part's decisions, named "<B>:<layer>"
        k = space.meta["split"]
        check_bits_honoured(cand, {n.split(":", 1)[1]: v for n, v in zip(space.names[k:], policy[k:])})


def is_plain(obj: Any) -> bool:
    """Plain data that torch.load(weights_only=True) and JSON both understand."""
    if isinstance(obj, dict):
        return all(isinstance(k, str) and is_plain(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(is_plain(v) for v in obj)
    return obj is None or isinstance(obj, (str, int, float, bool))


# -- cases -------------------------------------------------------------------------------------


COMPOSITES = ["chn-pruned+uniform-quant", "chn-pruned+non-uniform-quant", "weight-sparse+non-uniform-quant"]
COMPOSITE_NETS = {"chn-pruned+uniform-quant": SMALL_NETS + ["mobilenet_v2"], "chn-pruned+non-uniform-quant": ["user"],
                  "weight-sparse+non-uniform-quant": ["user", "resnet20"]}
JOINT_SCALE = 1 / 16  # a composite's BitOps targets: 8-bit weights x 8-bit activations are 1/16 of fp32 x fp32
BYTES_SCALE = 0.3  # a sparse composite's bytes targets (a bitmask bit per weight and 2-8 bits per kept one)


def searchable_learners() -> list[str]:
    return [n for n in LEARNERS.names() if getattr(LEARNERS.get(n), "searchable", True)] + COMPOSITES


BITS_SCALE = 0.25  # a bits learner's targets: 8 bits (0.25 of fp32) is their ceiling, so 0.3 -> 2.4 bits average
TRAIN_TARGET = 0.5  # the target of the fine-tune / re-train check (small nets only)


def target_scale(learner: str) -> float:
    if "+" in learner:
        return JOINT_SCALE if LEARNERS.get(learner).resources[0] == "bitops" else BYTES_SCALE
    return BITS_SCALE if getattr(LEARNERS.get(learner), "policy_name", "") == "bits" else 1.0


def contract_cases(scale: float = 1.0) -> list[tuple[str, float]]:
    """(net, target) of the contract check: every target on the small nets, BIG_TARGET on the big ones, each
    times ``scale`` (a learner's :func:`target_scale`)."""
    return [(net, t * scale) for net in SMALL_NETS + BIG_NETS
            for t in (TARGETS if net in SMALL_NETS else (BIG_TARGET,))]


def training_cases(scale: float = 1.0) -> list[tuple[str, float]]:
    """(net, target) of the fine-tune / re-train check: the small nets at TRAIN_TARGET times ``scale``."""
    return [(net, TRAIN_TARGET * scale) for net in SMALL_NETS]


def cases() -> list[Any]:
    return [pytest.param(learner, net, t, id=f"{learner}-{net}-{t:g}")
            for learner in searchable_learners() for net, t in contract_cases(target_scale(learner))
            if net in COMPOSITE_NETS.get(learner, [net])]


def train_cases() -> list[Any]:
    return [pytest.param(learner, net, t, id=f"{learner}-{net}-{t:g}")
            for learner in searchable_learners() for net, t in training_cases(target_scale(learner))
            if net in COMPOSITE_NETS.get(learner, [net])]


def quick_kwargs(learner_name: str) -> dict[str, Any]:
    """``create_learner`` keywords with the learner's own quick options (its ``quick_options`` hook) applied."""
    cls = LEARNERS.get(learner_name)
    if hasattr(cls, "quick_parts"):  # a composite: each part's quick options
        return cls.quick_parts()
    quick = cls.quick_options()
    if not quick:
        return {}
    assert cls.Config is not None, f"{learner_name}.quick_options() overrides options of a learner without Config"
    return {"config": dataclasses.replace(cls.Config(), **quick)}


@functools.cache
def dataset() -> Any:
    return DATASETS.get("synthetic")(shape=IMAGE, train_size=64, val_size=16, test_size=16)


@functools.lru_cache(maxsize=1)  # cases run net by net: keep only the current one's calibration
def prepared(learner_name: str, net: str) -> tuple[Any, nn.Module]:
    model = build_net(net).eval()
    learner = create_learner(learner_name, train_cfg=TrainConfig(batch_size=32), quiet=True, seed=0,
                             **quick_kwargs(learner_name))
    learner.prepare(model, dataset())
    return learner, model


def prepared_space(learner_name: str, net: str, target: float) -> tuple[Any, nn.Module, Any]:
    """The prepared learner, its model and search space; skips when the learner refuses the net."""
    try:
        learner, model = prepared(learner_name, net)
        return learner, model, learner.search_space(model, target)
    except UnsupportedModel as e:  # a learner may refuse an architecture, with a clear reason
        pytest.skip(f"{learner_name} refuses {net}: {e}")


# -- checks: plain functions, run for every registered learner below and for the toy plug-in in tests/plugins ---


def check_declarations(learner_name: str) -> None:
    """A registered learner is a Learner with a one-line doc; its quick options are fields of its Config."""
    cls = LEARNERS.get(learner_name)
    assert issubclass(cls, Learner)
    assert LEARNERS.doc(learner_name), f"{learner_name} has no one-line docstring for --list"
    quick = cls.quick_options()
    assert isinstance(quick, dict)
    if quick:
        assert cls.Config is not None and set(quick) <= {f.name for f in dataclasses.fields(cls.Config)}, \
            f"{learner_name}.quick_options() names options its Config lacks: {sorted(quick)}"
    assert isinstance(create_learner(learner_name, **quick_kwargs(learner_name)), cls)


def check_reloads(learner: Any, learner_name: str, net: str, cand: nn.Module, policy: dict[str, float],
                  x: Tensor, out: Tensor, tmp_path: Any) -> None:
    """The architecture record rebuilds ``cand`` from a freshly built net, and so does torchpocket.load."""
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
               learner=learner_name, arch=arch, policy=policy)
    loaded = load(path, model=build_net(net, seed=2) if registry_net is None else None)
    with torch.no_grad():
        assert torch.equal(loaded(x), out)


def check_learner_contract(learner_name: str, net: str, target: float, tmp_path: Any) -> None:
    learner, model, space = prepared_space(learner_name, net, target)
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
    check_bits_of(space, cand, policy)
    if expect.shrinks:
        assert n_params(cand) < n_params(model)
    if expect.identity_at_high and target == (TARGETS[0] if net in SMALL_NETS else BIG_TARGET):
        same = learner.compress(model, list(space.highs))
        same.eval()
        with torch.no_grad():
            torch.testing.assert_close(same(x), ref, atol=1e-4, rtol=1e-4)

    # the architecture record rebuilds the same model from a freshly built net, and so does torchpocket.load ...
    check_reloads(learner, learner_name, net, cand, space.to_dict(policy), x, out, tmp_path)
    # ... and a learner's own deployment file, when it writes one, reloads to the same outputs
    extra = learner.export(cand, tmp_path, x[:1])
    if "reload_identical" in extra:
        assert extra["reload_identical"], f"{learner_name}'s export does not reload identically"


def check_training_keeps_the_compression(learner_name: str, net: str, target: float, tmp_path: Any) -> None:
    """``finetune`` and ``retrain`` (a few steps, distilled) keep what ``compress`` made: the architecture, the
    masks / codes the Budget counts, a reloadable record; the teacher stays untouched."""
    learner, model, space = prepared_space(learner_name, net, target)
    x = dataset().val.x[:4]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    budget = space.budget
    policy = budget.project(np.random.default_rng(1).uniform(space.lows, space.highs))
    cand = learner.compress(model, policy)
    shapes = {k: tuple(v.shape) for k, v in cand.state_dict().items()}

    stats = learner.finetune(cand, teacher=model, steps=2)
    assert np.isfinite(stats["loss"])
    history = learner.retrain(cand, teacher=model, epochs=1, lr=0.01)
    assert len(history) == 1 and np.isfinite(history[0]["loss"])
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), f"training the candidate changed the teacher's {k}"
    assert {k: tuple(v.shape) for k, v in cand.state_dict().items()} == shapes, "training changed the architecture"

    cand = cand.to(memory_format=torch.contiguous_format).eval()  # the trainer's channels_last, for exact reloads
    with torch.no_grad():
        out = cand(x)
    assert torch.isfinite(out).all()
    expect = EXPECT.get(space.meta.get("measure", budget.unit), Expect())
    if expect.measure is not None:  # pruned weights stayed zero, pruned channels stayed out
        ratio = expect.measure(cand, model, x[:1])
        assert ratio == pytest.approx(budget.fraction(policy), rel=1e-6, abs=1e-9), \
            "after fine-tuning and re-training the model no longer measures what the Budget says"
    check_bits_of(space, cand, policy)  # the codes stayed within each layer's bit-width
    check_reloads(learner, learner_name, net, cand, space.to_dict(policy), x, out, tmp_path)


# -- the suite, over every registered learner ----------------------------------------------------------------


@pytest.mark.parametrize("learner_name", LEARNERS.names() + COMPOSITES)
def test_learner_declarations(learner_name: str) -> None:
    check_declarations(learner_name)


@pytest.mark.parametrize(("learner_name", "net", "target"), cases())
def test_learner_contract(learner_name: str, net: str, target: float, tmp_path: Any) -> None:
    check_learner_contract(learner_name, net, target, tmp_path)


@pytest.mark.parametrize(("learner_name", "net", "target"), train_cases())
def test_training_keeps_the_compression(learner_name: str, net: str, target: float, tmp_path: Any) -> None:
    check_training_keeps_the_compression(learner_name, net, target, tmp_path)
