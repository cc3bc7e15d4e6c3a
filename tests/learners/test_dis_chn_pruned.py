"""dis-chn-pruned specifics: stages and heads, gradient-norm selection, the joint loss, records, refusals."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.learners.test_learner_suite import build_net, flops_of
from torchpocket.api import load, save_model
from torchpocket.datasets import DATASETS
from torchpocket.errors import UnsupportedModel, UserError
from torchpocket.learners import LEARNERS
from torchpocket.learners.chn_pruned import ChnConfig, ChnPrunedLearner
from torchpocket.learners.dis_chn_pruned import AuxHead, DcpConfig, DisChnPrunedLearner, find_stages
from torchpocket.learners.training import TrainConfig

FAST = {"head_steps": 20, "layer_steps": 3, "block_steps": 3, "select_steps": 4, "samples": 64, "batch": 32,
        "lsq_batches": 1}


@functools.cache
def data(size: int = 16, n: int = 64) -> Any:
    return DATASETS.get("synthetic")(shape=(3, size, size), train_size=n, val_size=16, test_size=16)


def dcp(model: nn.Module, bundle: Any = None, **options: Any) -> DisChnPrunedLearner:
    lrn = DisChnPrunedLearner(config=DcpConfig(**{**FAST, **options}), train_cfg=TrainConfig(batch_size=32))
    lrn.prepare(model, bundle or data())
    return lrn


@functools.cache
def resnet20() -> tuple[nn.Module, DisChnPrunedLearner]:
    model = build_net("resnet20").eval()
    return model, dcp(model)


def test_registered_with_its_own_section() -> None:
    assert LEARNERS.get("dis-chn-pruned") is DisChnPrunedLearner
    assert DisChnPrunedLearner.section == "dcp" and DisChnPrunedLearner.Config is DcpConfig
    with pytest.raises(UserError, match="--dcp-batch"):
        DisChnPrunedLearner(config=DcpConfig(batch=0))
    with pytest.raises(UserError, match="must not be negative"):
        DisChnPrunedLearner(config=DcpConfig(layer_steps=-1))


def test_heads_sit_on_block_outputs_in_order() -> None:
    model, lrn = resnet20()
    plan = lrn.plan
    assert len(plan.cuts) == 3 and len(lrn.heads) == 3
    # stage outputs are whole residual blocks (every path crosses them), never a layer inside one
    assert all(c.count(".") == 1 and c.startswith("layer") for c in plan.cuts), plan.cuts
    order = [n for n, _ in model.named_modules()]
    assert [order.index(c) for c in plan.cuts] == sorted(order.index(c) for c in plan.cuts)
    assert plan.stage_of == sorted(plan.stage_of) and set(plan.stage_of) == {0, 1, 2, 3}
    assert lrn.head_history[-1] < lrn.head_history[0]  # the heads learned something on the frozen baseline


def test_result_has_chn_pruned_shapes_and_no_heads() -> None:
    model, lrn = resnet20()
    chn = ChnPrunedLearner(config=ChnConfig(select="l1", reconstruct=False), train_cfg=TrainConfig(batch_size=32))
    chn.prepare(model, data())
    space, space_chn = lrn.search_space(model, 0.5), chn.search_space(model, 0.5)
    assert space.names == space_chn.names
    policy = space.budget.project(np.random.default_rng(2).uniform(space.lows, space.highs))
    assert space.budget.fraction(policy) == pytest.approx(space_chn.budget.fraction(policy), rel=1e-12)
    cand, ref = lrn.compress(model, policy), chn.compress(model, policy)
    shapes = {k: tuple(v.shape) for k, v in cand.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert not any(isinstance(m, AuxHead) for m in cand.modules())
    x = data().val.x[:2]
    assert flops_of(cand, x[:1]) == flops_of(ref, x[:1])
    assert all(p.requires_grad for p in cand.parameters())  # ready for fine-tuning
    # the record has the same form as chn-pruned's, and rebuilds the same model
    arch = lrn.arch_state(cand)
    assert set(arch) == set(chn.arch_state(ref)) and arch["ops"]
    rebuilt = DisChnPrunedLearner.rebuild(build_net("resnet20", seed=5), arch)
    rebuilt.load_state_dict(cand.state_dict())
    cand.eval()
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), cand(x))


def test_teacher_untouched_and_load_round_trip(tmp_path: Any) -> None:
    model = build_net("resnet20").eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    lrn = dcp(model)
    space = lrn.search_space(model, 0.5)
    cand = lrn.compress(model, space.budget.uniform())
    assert not model.training and all(p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    path = tmp_path / "model.pt"
    save_model(path, cand, config={}, net="resnet20", in_channels=3, num_classes=10, image_size=16,
               learner="dis-chn-pruned", arch=lrn.arch_state(cand), policy=space.to_dict(space.budget.uniform()))
    x = data().val.x[:3]
    cand.eval()
    with torch.no_grad():
        assert torch.equal(load(path)(x), cand(x))


class DeadChannels(nn.Module):
    """conv1 -> ReLU -> conv2 -> GAP -> fc; conv1's channels 0-3 are dead, yet conv2's weights on them are largest."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)
        with torch.no_grad():
            self.conv1.weight[:4] = 0
            self.conv1.bias[:4] = 0
            self.conv2.weight[:, :4] *= 20  # L1 (AMC) would keep exactly the dead channels

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(y.mean((2, 3)))


def test_selection_follows_gradient_norms() -> None:
    torch.manual_seed(0)
    model = DeadChannels().eval()
    lrn = dcp(model, select_steps=8)
    space = lrn.search_space(model, 1.0)
    assert space.names == ["conv2", "fc"]
    cand = lrn.compress(model, [0.5, 1.0])
    ops = {(n, h): idx for n, h, idx in lrn.arch_state(cand)["ops"]}
    assert ops["conv2", "prune_conv_in_channels"] == [0, 1, 2, 3]  # dead channels have zero gradient
    assert ops["conv1", "prune_conv_out_channels"] == [0, 1, 2, 3]
    l1 = ChnPrunedLearner(config=ChnConfig(select="l1", reconstruct=False))
    l1.prepare(model, data())
    ops_l1 = {(n, h): idx for n, h, idx in l1.arch_state(l1.compress(model, [0.5, 1.0]))["ops"]}
    assert ops_l1["conv2", "prune_conv_in_channels"] == [4, 5, 6, 7]  # ... which magnitude ranking gets wrong


def test_joint_loss_decreases_during_layer_optimisation() -> None:
    model, _ = resnet20()
    # one pool batch: every step sees the same images, so the per-step losses are comparable
    lrn = dcp(model, samples=32, batch=32, layer_steps=15, block_steps=0, lsq_batches=0, stages=1, lr=1e-3)
    space = lrn.search_space(model, 0.5)
    lrn.compress(model, space.budget.uniform())
    hist = lrn.last_stats["layer_loss"]
    assert hist and all(len(v) == 15 for v in hist.values())
    for name, v in hist.items():
        assert v[-1] < v[0], (name, v)
    sel = lrn.last_stats["selection_loss"]
    assert all(v[-1] < v[0] for v in sel.values())  # adding channels by gradient norm lowers the joint loss


def test_nothing_pruned_changes_nothing() -> None:
    model, lrn = resnet20()
    space = lrn.search_space(model, 0.5)
    same = lrn.compress(model, list(space.highs)).eval()
    x = data().val.x[:2]
    with torch.no_grad():
        assert torch.equal(same(x), model(x))


class Segmenter(nn.Module):
    """A dense-prediction net: its output is a feature map, not (batch, classes) logits."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(F.relu(self.a(x)))


class Recurrent(nn.Module):
    """The same conv applied twice (shared weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.a(x))
        y = F.relu(self.b(F.relu(self.b(y))))
        return self.fc(y.mean((2, 3)))


def test_refused_architectures_say_why() -> None:
    with pytest.raises(UnsupportedModel, match=r"\(batch, classes\) logits.*returns \(1, 4, 16, 16\)"):
        dcp(Segmenter().eval())
    with pytest.raises(UnsupportedModel, match="'b' runs 2 times per forward pass"):
        find_stages(Recurrent().eval(), data().train.x[:1], _groups_of(Recurrent().eval()), 3)


def _groups_of(model: nn.Module) -> list[Any]:
    from torchpocket.learners.channel_graph import find_channel_groups

    return find_channel_groups(model, data().train.x[:1]).groups


def test_deterministic_in_the_seed_whatever_the_global_generator() -> None:
    model = DeadChannels().eval()
    outs = []
    for g in (1, 2):
        torch.manual_seed(g)  # prepare / compress must not depend on the global generator's state
        lrn = dcp(model)
        outs.append(lrn.compress(model, [0.5, 0.5]).state_dict())
    assert outs[0].keys() == outs[1].keys()
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
