"""chn-pruned specifics: selection quality, options, exact budget, channel groups and records."""

from __future__ import annotations

import copy
import dataclasses
import functools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.learners.test_learner_suite import UserNet, build_net, flops_of, n_params
from torchpocket.config import SECTIONS
from torchpocket.datasets import DATASETS
from torchpocket.errors import UserError
from torchpocket.learners import LEARNERS
from torchpocket.learners.channel_graph import apply_ops, find_channel_groups, keep_counts
from torchpocket.learners.chn_pruned import ChnConfig, ChnPrunedLearner, sample_rows
from torchpocket.learners.training import TrainConfig


@functools.cache
def data(size: int = 16, n: int = 64) -> object:
    return DATASETS.get("synthetic")(shape=(3, size, size), train_size=n, val_size=32, test_size=16)


def learner(model: nn.Module, bundle: object = None, **options: object) -> ChnPrunedLearner:
    lrn = ChnPrunedLearner(config=ChnConfig(**options), train_cfg=TrainConfig(batch_size=64))
    lrn.prepare(model, bundle or data())
    return lrn


def fan_in(m: nn.Module) -> int:
    return m.in_channels if isinstance(m, nn.Conv2d) else m.in_features


def rel_error(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    a.eval()
    b.eval()
    with torch.no_grad():
        ya, yb = a(x), b(x)
    return float((ya - yb).pow(2).sum() / yb.pow(2).sum())


class TwoConv(nn.Module):
    """conv -> ReLU -> conv; the second conv's output is the model's output (its inputs are prunable)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 3, padding=1)
        self.conv2 = nn.Conv2d(24, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(x)))


def trained_ish() -> TwoConv:
    """Channels of very different strength, and eight that nearly copy others (what LASSO should see through)."""
    torch.manual_seed(3)
    m = TwoConv()
    with torch.no_grad():
        scale = torch.logspace(-1.5, 0.5, 24)[torch.randperm(24)]
        m.conv1.weight.mul_(scale[:, None, None, None])
        m.conv1.weight[16:] = m.conv1.weight[:8] * 1.01
        m.conv1.bias[16:] = m.conv1.bias[:8] * 1.01
    return m.eval()


def test_lasso_and_reconstruction_beat_random_selection() -> None:
    model = trained_ish()
    bundle = data(12, 256)
    x = bundle.val.x
    err = {}
    for select in ("lasso", "random", "l1"):
        for recon in (True, False):
            lrn = learner(model, bundle, select=select, reconstruct=recon)
            space = lrn.search_space(model, 1.0)
            assert space.names == ["conv2"]
            cand = lrn.compress(model, [0.5])
            assert cand.conv1.out_channels == cand.conv2.in_channels == 12
            err[select, recon] = rel_error(cand, model, x)
    assert err["lasso", True] < 0.5 * err["random", True]
    assert err["lasso", True] < 0.5 * err["random", False]
    assert err["lasso", True] < err["lasso", False]  # least squares helps...
    assert err["random", True] < err["random", False]  # ... whatever was selected
    assert err["lasso", True] <= err["l1", True] * 1.05


def test_selects_share_the_architecture_and_round_channels() -> None:
    model = build_net("plain20").eval()
    archs, flops = [], []
    for select in ("lasso", "l1", "random"):
        lrn = learner(model, select=select, channel_round=4)
        space = lrn.search_space(model, 0.5)
        policy = space.budget.project(np.random.default_rng(1).uniform(space.lows, space.highs))
        cand = lrn.compress(model, policy)
        for name in space.names:
            c, full = fan_in(cand.get_submodule(name)), fan_in(model.get_submodule(name))
            assert c == full or c % 4 == 0, (name, c)
        assert any(fan_in(cand.get_submodule(n)) < fan_in(model.get_submodule(n)) for n in space.names)
        x = data().val.x[:1]
        flops.append(flops_of(cand, x))
        assert flops[-1] / flops_of(model, x) == pytest.approx(space.budget.fraction(policy), rel=1e-9)
        archs.append(lrn.arch_state(cand)["ops"])
    assert flops[0] == flops[1] == flops[2]
    assert archs[0] != archs[1] and archs[1] != archs[2]  # same widths, different channels


def test_keep_counts_are_monotone_rounded_and_full_at_one() -> None:
    sizes = np.array([9, 16, 64, 3])
    prev = np.zeros(4)
    for r in np.linspace(0, 1, 201):
        k = keep_counts(np.full(4, r), sizes, 4)
        assert (k >= prev).all() and (k >= 1).all() and (k <= sizes).all()
        assert all(v == s or v % 4 == 0 or s < 4 for v, s in zip(k, sizes))
        prev = k
    assert keep_counts(np.ones(4), sizes, 4).tolist() == sizes.tolist()
    assert keep_counts(np.full(4, 0.5), sizes, 1).tolist() == [5, 8, 32, 2]


def test_without_reconstruction_kept_weights_are_untouched() -> None:
    model = build_net("resnet20").eval()
    lrn = learner(model, select="l1", reconstruct=False)
    space = lrn.search_space(model, 0.5)
    cand = lrn.compress(model, [0.5] * len(space))
    ops = {(n, h): idx for n, h, idx in lrn.arch_state(cand)["ops"]}
    removed = ops["layer2.1.conv2", "prune_conv_in_channels"]
    kept = [i for i in range(32) if i not in removed]
    assert len(kept) == 16
    torch.testing.assert_close(cand.layer2[1].conv2.weight, model.layer2[1].conv2.weight[:, kept], rtol=0, atol=0)
    # AMC's l1: the consumer's strongest input channels survive
    l1 = model.layer2[1].conv2.weight.abs().sum((0, 2, 3))
    assert set(kept) == set(torch.topk(l1, 16).indices.tolist())


def test_coupled_channels_pruned_together() -> None:
    model = build_net("resnet20").eval()
    skip = learner(model)
    both = learner(model, coupled="prune", select="l1")
    assert len(both.search_space(model, 0.5)) > len(skip.search_space(model, 0.5))
    assert "layer1.0.conv1" in skip.info.skipped and "layer1.0.conv1" not in both.info.skipped
    space = both.search_space(model, 0.3)
    policy = space.budget.project(list(space.lows))
    cand = both.compress(model, policy)
    stream = cand.conv1.out_channels
    assert stream < 16
    assert cand.layer1[0].conv2.out_channels == cand.layer1[2].conv2.out_channels == stream
    assert cand.layer2[0].conv1.in_channels == cand.layer2[0].shortcut[0].in_channels == stream
    x = data().val.x[:2]
    assert flops_of(cand, x[:1]) / flops_of(model, x[:1]) == pytest.approx(space.budget.fraction(policy), rel=1e-9)
    assert cand(x).shape == (2, 10)


def test_params_resource_and_accuracy_guaranteed_protocol() -> None:
    model = build_net("resnet20").eval()
    lrn = learner(model, resource="params", select="random")
    space = lrn.search_space(model, 0.6, fill=False)
    assert space.budget.unit == "params" and not space.budget.fill
    low = list(space.lows)
    assert space.budget.project(low) == low  # under the target: left alone without fill
    policy = space.budget.project([1.0] * len(space))
    cand = lrn.compress(model, policy)
    ratio = n_params(cand) / n_params(model)
    assert ratio == pytest.approx(space.budget.fraction(policy), rel=1e-9) and ratio <= 0.6
    per_layer = space.budget.layer_costs(policy)
    assert len(per_layer) == len(space) and all(c > 0 for c in per_layer)


def test_flattened_features_follow_their_channels() -> None:
    model = build_net("lenet5").eval()  # Linear(16*5*5) after flatten: one unit = a channel's 25 features
    lrn = learner(model)
    g = next(g for g in lrn.info.groups if g.name == "classifier.0")
    assert g.kind == "linear" and g.units == 16
    assert all(len(ix) == 25 for ix in g.consumer_member("classifier.0").unit_idxs)
    space = lrn.search_space(model, 0.5)
    cand = lrn.compress(model, [0.5] * len(space))
    assert cand.classifier[0].in_features == 25 * cand.features[3].out_channels == 25 * 8
    rebuilt = ChnPrunedLearner.rebuild(build_net("lenet5"), lrn.arch_state(cand))
    rebuilt.load_state_dict(cand.state_dict())
    x = data().val.x[:2]
    assert torch.equal(rebuilt.eval()(x), cand.eval()(x))


def test_user_network_concat_depthwise_and_residual() -> None:
    model = build_net("user").eval()
    info = find_channel_groups(model, data().val.x[:1])
    groups = {g.name: g for g in info.groups}
    assert set(groups) == {"a2.0", "pw.0"}  # the residual stream (stem, a1, b, head inputs) is left alone
    pw = groups["pw.0"]
    assert pw.kind == "dwconv" and pw.units == 32 and sorted(len(c) for c in pw.classes) == [16, 16]
    assert {m.module for m in pw.members} >= {"a2.0", "a2.1", "b.0", "b.1", "dw.0", "dw.1", "pw.0"}
    lrn = learner(model)
    space = lrn.search_space(model, 0.5)
    cand = lrn.compress(model, list(space.lows))
    a, b = cand.a2[0].out_channels, cand.b[0].out_channels
    assert a == b and a < 16  # each side of the concat keeps its share
    assert cand.dw[0].groups == cand.dw[0].in_channels == cand.dw[0].out_channels == cand.pw[0].in_channels == a + b
    assert cand(data().val.x[:2]).shape == (2, 10)
    assert isinstance(cand, UserNet)


def masked(model: nn.Module, ops: list) -> nn.Module:
    """The original model with the recorded channels zeroed instead of removed."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, fn, idx in ops:
            mod = m.get_submodule(name)
            if fn.endswith("in_channels"):
                mod.weight[:, idx] = 0
            else:
                mod.weight[idx] = 0
                if mod.bias is not None:
                    mod.bias[idx] = 0
    return m.eval()


@pytest.mark.parametrize("net", ["resnet20", "mobilenet_v2", "user", "lenet5"])
def test_cut_equals_zeroing_the_same_channels(net: str) -> None:
    """Removing a group's channels everywhere == zeroing them everywhere: the groups are complete and consistent."""
    model = build_net(net).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial affine terms so a forgotten BN would show
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    lrn = learner(model, select="random", reconstruct=False, coupled="prune")
    space = lrn.search_space(model, 0.5)
    cand = lrn.compress(model, space.budget.project(np.random.default_rng(0).uniform(space.lows, space.highs)))
    ops = lrn.arch_state(cand)["ops"]
    assert {n for n, _, _ in ops} >= set(space.names)
    x = data().val.x[:4]
    with torch.no_grad():
        want = masked(model, ops)(x)
        torch.testing.assert_close(cand.eval()(x), want, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(want, model(x), atol=1e-3)


def test_candidates_need_no_data_and_are_deterministic() -> None:
    model = build_net("resnet20").eval()
    lrn = learner(model)
    lrn.data = None  # compress() must work from the statistics extracted in prepare()
    space = lrn.search_space(model, 0.5)
    policy = space.budget.project(np.random.default_rng(2).uniform(space.lows, space.highs))
    a, b = lrn.compress(model, policy), lrn.compress(model, policy)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k


def test_policies_written_with_six_decimals_rebuild_the_same_widths() -> None:
    model = build_net("plain20").eval()
    lrn = learner(model, select="l1", reconstruct=False)
    space = lrn.search_space(model, 0.5)
    rng = np.random.default_rng(5)
    for _ in range(20):  # projection lands right under rounding boundaries; six decimals must not cross them
        policy = space.budget.project(rng.uniform(space.lows, space.highs))
        assert lrn.cost.kept_units([round(v, 6) for v in policy]) == lrn.cost.kept_units(policy)
        assert space.budget.fraction([round(v, 6) for v in policy]) == space.budget.fraction(policy) <= 0.5


def test_bad_records_unreachable_targets_and_options_are_user_errors() -> None:
    with pytest.raises(UserError, match="layer 'nope'"):
        record = {"version": 1, "ops": [["nope", "prune_conv_in_channels", [0]]]}
        ChnPrunedLearner.rebuild(build_net("resnet20"), record)
    with pytest.raises(UserError, match="unknown pruning function"):
        apply_ops(build_net("resnet20"), [["conv1", "os.system", [0]]])
    with pytest.raises(UserError, match="does not fit"):
        apply_ops(build_net("resnet20"), [["conv1", "prune_conv_out_channels", [99]]])
    model = build_net("resnet20").eval()
    with pytest.raises(UserError, match="unreachable"):
        learner(model, select="l1", reconstruct=False).search_space(model, 0.05)
    with pytest.raises(UserError, match="channel-round"):
        ChnPrunedLearner(config=ChnConfig(channel_round=0))
    with pytest.raises(UserError, match="cp-low"):
        ChnPrunedLearner(config=ChnConfig(low=0.0))


def test_sampled_patches_match_unfold() -> None:
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2)
    x = torch.randn(3, 4, 11, 9)
    out = conv(x)
    rows = sample_rows(conv, x, out, points=10_000, gen=torch.Generator().manual_seed(0))
    cols = F.unfold(x, 3, dilation=2, padding=2, stride=2).transpose(1, 2).reshape(-1, 36)
    assert rows.shape == cols.shape
    torch.testing.assert_close(rows.T @ rows, cols.T @ cols)
    y = rows @ conv.weight.flatten(1).T + conv.bias  # each row is the patch behind one output position
    torch.testing.assert_close(y.pow(2).sum(0), out.permute(0, 2, 3, 1).reshape(-1, 6).pow(2).sum(0))


def test_registered_with_config_section_and_flags() -> None:
    assert LEARNERS.get("chn-pruned") is ChnPrunedLearner
    assert SECTIONS["chn"] is ChnConfig
    assert ChnPrunedLearner.__doc__ and "\n" not in ChnPrunedLearner.__doc__.strip()
    flags = {f.name: f.metadata["flag"] for f in dataclasses.fields(ChnConfig)}
    assert flags == {"select": "--cp-select", "reconstruct": "--cp-reconstruct", "channel_round": "--channel-round",
                     "calib_batches": "--calib-batches", "points_per_layer": "--cp-points", "coupled": "--cp-coupled",
                     "resource": "--resource", "low": "--cp-low", "high": "--cp-high"}
    assert all(f.metadata["help"] for f in dataclasses.fields(ChnConfig))
