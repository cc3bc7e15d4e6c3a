"""chn-pruned specifics: selection quality, options, exact budget, channel groups and records."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from pathlib import Path

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
from torchpocket.learners._channel_cost import keep_counts
from torchpocket.learners._channel_latency import LatencyEntry, isotonic, monotone_table, width_grid
from torchpocket.learners.channel_graph import apply_ops, find_channel_groups
from torchpocket.learners.chn_pruned import ChnConfig, ChnPrunedLearner, sample_rows
from torchpocket.learners.training import TrainConfig


@functools.cache
def data(size: int = 16, n: int = 64) -> object:
    return DATASETS.get("synthetic")(shape=(3, size, size), train_size=n, val_size=32, test_size=16)


def learner(model: nn.Module, bundle: object = None, **options: object) -> ChnPrunedLearner:
    resource = str(options.pop("resource", "auto"))
    options.setdefault("channel_round", 1)  # every width reachable: these tests are about other things
    options.setdefault("latency_runtime", "eager")  # no ONNX export per timed width (one test times ONNX Runtime)
    lrn = ChnPrunedLearner(config=ChnConfig(**options), train_cfg=TrainConfig(batch_size=64), resource=resource)
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


def test_dense_concat_with_unpruned_slices_meets_the_budget_exactly() -> None:
    """A DenseNet layer's input is the block input (one group) cat the earlier layers' outputs, which no group
    prunes: the cost model keeps those slices in the width, so the promise is the FLOPs the model really has
    (it promised 0.497 and delivered 0.290 on densenet121 before)."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.DenseNet(growth_rate=8, block_config=(3, 3), num_init_features=16, bn_size=2,
                                        num_classes=10).eval()
    lrn = learner(model)
    x = data().val.x[:1]
    for target in (0.7, 0.5):
        space = lrn.search_space(model, target)
        for policy in (space.budget.uniform(), space.budget.project(list(np.linspace(0.3, 1.0, len(space))))):
            cand = lrn.compress(model, policy).eval()
            measured = flops_of(cand, x) / flops_of(model, x)
            assert measured == pytest.approx(space.budget.fraction(policy), rel=1e-9)
            assert measured <= target + 1e-9
            shares = np.asarray(space.budget.layer_costs(policy))  # each group's share: non-negative, and they add up
            assert np.all(shares >= 0) and shares.sum() <= space.budget.cost(policy) + 1e-6


class GroupedSENet(nn.Module):
    """A RegNetY-like block: 1x1, grouped 3x3, squeeze-and-excitation gate, 1x1, residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.fc1, self.fc2 = nn.Conv2d(32, 8, 1), nn.Conv2d(8, 32, 1)
        self.c = nn.Sequential(nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        y = self.b(self.a(s))
        y = y * torch.sigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return self.head(F.adaptive_avg_pool2d(F.relu(self.c(y) + s), 1).flatten(1))


def test_grouped_convs_lose_whole_groups_and_se_gates_follow_their_block() -> None:
    """The grouped conv's groups are the units (ResNeXt / RegNet); the SE gate's product is not a residual tie
    (MobileNetV3 / EfficientNet / RegNetY); the promise is the FLOPs the cut model has, and the record replays."""
    torch.manual_seed(0)
    model = GroupedSENet().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    x = data().val.x[:4]
    info = find_channel_groups(model, x)
    groups = {g.name: g for g in info.groups}
    assert set(groups) == {"c.0", "fc2"} and "stem.0" not in groups  # the residual stream is left alone
    blk = groups["c.0"]
    assert blk.units == 4 and not blk.coupled and blk.consumers == ["fc1", "c.0"]
    handlers = {m.module: m.handler for m in blk.members}
    assert handlers["b.0"] == "prune_grouped_conv_groups" and handlers["a.0"] == "prune_conv_out_channels"
    assert handlers["fc2"] == "prune_conv_out_channels"
    assert [len(u) for u in blk.consumer_member("c.0").unit_idxs] == [8] * 4
    lrn = learner(model, select="random", reconstruct=False)
    for target in (0.8, 0.6):
        space = lrn.search_space(model, target)
        policy = space.budget.project([0.5, 1.0])
        cand = lrn.compress(model, policy).eval()
        kept = cand.b[0].groups
        assert kept < 4 and cand.b[0].in_channels == cand.b[0].out_channels == cand.a[0].out_channels == 8 * kept
        assert cand.fc1.in_channels == cand.fc2.out_channels == cand.c[0].in_channels == 8 * kept
        assert flops_of(cand, x[:1]) / flops_of(model, x[:1]) == pytest.approx(space.budget.fraction(policy), rel=1e-9)
        ops = lrn.arch_state(cand)["ops"]
        with torch.no_grad():
            torch.testing.assert_close(cand(x), masked(model, ops)(x), atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(apply_ops(copy.deepcopy(model), ops).eval()(x), cand(x))
    with pytest.raises(UserError, match="whole groups"):
        apply_ops(copy.deepcopy(model), [["b.0", "prune_grouped_conv_groups", [0, 1, 2]]])


class ChannelsLastMLPNet(nn.Module):
    """A ConvNeXt block: depthwise 7x7, channels-last LayerNorm, Linear 4x expansion, layer scale, residual."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 7, padding=3, groups=8)
        self.norm = nn.LayerNorm(8)
        self.fc1, self.fc2 = nn.Linear(8, 32), nn.Linear(32, 8)
        self.gamma = nn.Parameter(torch.full((8,), 0.5))
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        y = self.fc2(F.gelu(self.fc1(self.norm(self.dw(s).permute(0, 2, 3, 1)))))
        y = s + (self.gamma * y).permute(0, 3, 1, 2)
        return self.head(y.mean(dim=(2, 3)))


def test_linear_on_feature_maps_prunes_its_hidden_width() -> None:
    """A Linear on a channels-last map traces as bias + matmul, a two-input op that is no residual tie: the
    expansion's hidden width is prunable (ConvNeXt, ViT MLPs), and the promise is the FLOPs the model has."""
    torch.manual_seed(0)
    model = ChannelsLastMLPNet().eval()
    x = data().val.x[:4]
    info = find_channel_groups(model, x)
    assert [g.name for g in info.groups] == ["fc2"] and not info.groups[0].coupled and info.groups[0].units == 32
    lrn = learner(model, select="random", reconstruct=False)
    space = lrn.search_space(model, 0.7)
    policy = space.budget.uniform()
    cand = lrn.compress(model, policy).eval()
    assert cand.fc1.out_features == cand.fc2.in_features < 32
    assert flops_of(cand, x[:1]) / flops_of(model, x[:1]) == pytest.approx(space.budget.fraction(policy), rel=1e-9)
    with torch.no_grad():
        torch.testing.assert_close(cand(x), masked(model, lrn.arch_state(cand)["ops"])(x), atol=1e-5, rtol=1e-4)


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
                     "latency_batch": "--latency-batch", "latency_runtime": "--latency-runtime",
                     "lut_repeats": "--lut-repeats",
                     "lut_points": "--lut-points", "lut_cache": "--lut-cache", "low": "--cp-low", "high": "--cp-high",
                     "skip": "--cp-skip", "round_batch": "--channel-round-batch"}
    assert ChnPrunedLearner.resources == ("flops", "params", "latency")  # --resource (the run's), flops first
    assert all(f.metadata["help"] for f in dataclasses.fields(ChnConfig))


# -- --resource latency ---------------------------------------------------------------------------

FAST_LUT = {"select": "l1", "reconstruct": False, "lut_repeats": 2, "lut_points": 3}


def test_latency_budget_is_met_by_projected_policies() -> None:
    model = build_net("user").eval()  # concat, depthwise conv, residual add, Linear head
    lrn = learner(model, resource="latency", coupled="prune", **FAST_LUT)
    lat = lrn.latency_model()
    assert lrn.latency_model() is lat  # built once in prepare(), then reused
    target = 0.5 * (1 + lat.predict([ChnConfig.low] * lrn.cost.n_groups) / lat.full)  # reachable whatever the timings
    space = lrn.search_space(model, target)
    assert lrn.latency_model() is lat and space.meta["latency"]["layers"] == len(lat.entries)
    b = space.budget
    assert b.unit == "latency" and b.full == lat.full > 0
    rng = np.random.default_rng(0)
    for _ in range(5):
        policy = b.project(rng.uniform(space.lows, space.highs))
        pred = lrn.predicted_latency(policy)
        assert pred == b.cost(policy) <= target * lat.full * (1 + 1e-9)
        assert pred == lrn.predicted_latency(list(policy))  # deterministic once built
        per_group = b.layer_costs(policy)
        assert len(per_group) == len(space) and all(c >= 0 for c in per_group)
        assert sum(per_group) <= pred * (1 + 1e-12)
        for i in range(len(space)):  # non-decreasing in every preserve ratio (the Budget's bisection relies on it)
            up = list(policy)
            up[i] = min(1.0, up[i] + 0.3)
            assert lrn.predicted_latency(up) >= pred * (1 - 1e-12)
    cand = lrn.compress(model, policy)
    assert cand(data().val.x[:2]).shape == (2, 10)
    summary = lrn.latency_summary(policy)
    assert summary["predicted_ms"] == pytest.approx(1e3 * pred) and summary["batch"] == 1
    assert summary["predicted_ratio"] <= target * (1 + 1e-9) and summary["lut_build_seconds"] > 0


def test_latency_table_is_monotone_and_full_at_ones() -> None:
    model = build_net("user").eval()
    lrn = learner(model, resource="latency", coupled="prune", latency_batch=2, **FAST_LUT)
    lat = lrn.latency_model()
    assert lat.meta["batch"] == 2 and lat.meta["threads"] == torch.get_num_threads()
    mods = dict(model.named_modules())
    assert {e.name for e in lat.entries} == {n for n, m in mods.items() if isinstance(m, (nn.Conv2d, nn.Linear))}
    for e in lat.entries:
        assert (np.diff(e.table, axis=0) >= 0).all() and (np.diff(e.table, axis=1) >= 0).all(), e.name
        assert (e.table > 0).all() and len(e.cin) <= 3 and len(e.cout) <= 3
        m = mods[e.name]
        full_out = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        assert e.cout[-1] == full_out  # the full width is always timed
        if not (isinstance(m, nn.Conv2d) and m.groups > 1):
            assert e.cin[-1] == fan_in(m)
    assert any(e.table.shape[0] > 1 and e.table.shape[1] > 1 for e in lat.entries)  # both widths vary (a1.0)
    assert next(e for e in lat.entries if e.name == "a1.0").extras == ["a1.1", "a1.2"]  # its BN and ReLU
    ones = [1.0] * lrn.cost.n_groups
    lut_total = lat.rest + sum(e.calls * e.table[-1, -1] for e in lat.entries)
    assert lrn.predicted_latency(ones) == pytest.approx(lut_total, rel=1e-12) == lat.full
    assert lat.rest == pytest.approx(max(0.0, lat.measured_full - (lut_total - lat.rest)), abs=1e-12)


def test_latency_interpolation_and_grid() -> None:
    e = LatencyEntry("x", 0, 2, np.array([4.0, 8.0]), np.array([1.0, 3.0]), np.array([[1.0, 2.0], [3.0, 5.0]]), [])
    assert e.at(4, 1) == 2 * 1.0 and e.at(8, 3) == 2 * 5.0
    assert e.at(6, 2) == pytest.approx(2 * 2.75)  # bilinear
    assert e.at(100, 100) == 2 * 5.0 and e.at(0, 0) == 2 * 1.0  # flat outside the grid
    assert isotonic(np.array([5.0, 1.0, 2.0, 3.0, 4.0])).tolist() == pytest.approx([8 / 3, 8 / 3, 8 / 3, 3, 4])
    t = monotone_table(np.random.default_rng(0).normal(size=(4, 5)))
    assert (np.diff(t, axis=0) >= 0).all() and (np.diff(t, axis=1) >= 0).all()
    assert width_grid(3, 16, 6).tolist() == [3, 6, 8, 11, 13, 16]
    assert width_grid(4, 16, 6, np.array([4, 8, 12, 16, 16])).tolist() == [4, 8, 12, 16]  # rounding: exact widths
    assert width_grid(5, 5, 4).tolist() == [5]


def test_latency_rounded_widths_and_other_resources() -> None:
    model = TwoConv().eval()
    lrn = learner(model, **{**FAST_LUT, "channel_round": 8, "lut_points": 8})  # flops: the table is built on use
    assert lrn._latency is None
    (e,) = [e for e in lrn.latency_model().entries if e.name == "conv2"]
    assert e.cin.tolist() == [8, 16, 24] and e.cout.tolist() == [16]
    (e1,) = [e for e in lrn.latency_model().entries if e.name == "conv1"]
    assert e1.cin.tolist() == [3] and e1.cout.tolist() == [8, 16, 24]
    assert lrn.predicted_latency([0.2]) <= lrn.predicted_latency([1.0]) == lrn.latency_model().full
    assert lrn.search_space(model, 0.5).budget.unit == "flops"


def test_latency_table_timed_in_onnx_runtime(tmp_path: Path) -> None:
    """--latency-runtime onnxruntime: every layer width and the whole model timed as exported ONNX in ONNX Runtime;
    the table says so, stays monotone, and is cached apart from the eager one."""
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1)).eval()
    lrn = learner(model, data(32), resource="latency", latency_runtime="onnxruntime", lut_cache=str(tmp_path),
                  **FAST_LUT)
    lat = lrn.latency_model()
    assert lat.meta["runtime"] == "onnxruntime" and lat.measured_full > 0 and len(lat.entries) == 2
    assert lat.entries[1].table[-1, -1] > lat.entries[1].table[0, 0]  # a narrower input is faster
    for e in lat.entries:
        assert (np.diff(e.table, axis=0) >= 0).all() and (np.diff(e.table, axis=1) >= 0).all() and e.table.min() > 0
    floor = lat.predict([lrn.config.low] * lrn.cost.n_groups) / lat.full
    target = 0.5 * (floor + 1.0)  # reachable whatever this machine measures
    space = lrn.search_space(model, target)
    policy = space.budget.project(space.budget.uniform())
    assert lat.predict(policy) <= target * lat.full * (1 + 1e-9)
    assert lrn.latency_summary(policy)["runtime"] == "onnxruntime"
    fit = lat.meta["fit"]  # the whole model timed at full and at the narrowest widths: the table goes through both
    low = [lrn.config.low] * lrn.cost.n_groups
    narrow = lrn.cut_to_widths(model, low)
    assert narrow[0].out_channels == lrn.cost.widths(lrn.cost.counts(low))[1][0] < 64
    if fit["used"]:
        assert lat.predict(low) == pytest.approx(fit["narrow_measured"], rel=1e-6)
        assert lat.full == pytest.approx(lat.measured_full, rel=1e-6) and lat.rest == pytest.approx(fit["b"])
    else:  # a fit through both would need a negative scale or rest: the single-measurement rule stands
        assert not (fit["a"] > 0 and fit["b"] >= 0)
    eager = learner(model, data(32), resource="latency", lut_cache=str(tmp_path), **FAST_LUT)
    assert eager.latency_model().meta["runtime"] == "eager" and len(list(tmp_path.glob("lut-*.json"))) == 2
    assert "fit" not in eager.latency_model().meta


def test_latency_table_cached_on_disk(tmp_path: Path) -> None:
    model = TwoConv().eval()
    first = learner(model, resource="latency", lut_cache=str(tmp_path), **FAST_LUT)
    (path,) = tmp_path.glob("lut-*.json")
    again = learner(model, resource="latency", lut_cache=str(tmp_path), **FAST_LUT)
    a, b = first.latency_model(), again.latency_model()
    assert b.meta["loaded_from"] == str(path) and "loaded_from" not in a.meta
    assert [e.table.tolist() for e in a.entries] == [e.table.tolist() for e in b.entries]
    assert b.full == a.full and again.predicted_latency([0.5]) == first.predicted_latency([0.5])
    other = learner(model, resource="latency", lut_cache=str(tmp_path), latency_batch=2, **FAST_LUT)
    assert "loaded_from" not in other.latency_model().meta and len(list(tmp_path.glob("lut-*.json"))) == 2
    path.write_text(path.read_text().replace('"name": "conv2"', '"name": "nope"'))
    with pytest.warns(UserWarning, match="ignoring the latency table"):
        rebuilt = learner(model, resource="latency", lut_cache=str(tmp_path), **FAST_LUT)
    assert "loaded_from" not in rebuilt.latency_model().meta


@pytest.mark.parametrize(("option", "value", "match"), [("latency_batch", 0, "latency-batch"),
                                                         ("lut_repeats", 0, "lut-repeats"),
                                                         ("lut_points", 1, "lut-points")])
def test_bad_latency_options_are_user_errors(option: str, value: int, match: str) -> None:
    with pytest.raises(UserError, match=match):
        ChnPrunedLearner(config=ChnConfig(**{option: value}), resource="latency")


def test_cp_skip_freezes_layers_and_the_summary_says_which(capsys: pytest.CaptureFixture[str],
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import run_ok
    from torchpocket.cli import main

    monkeypatch.setenv("TORCHPOCKET_CACHE", str(tmp_path / "cache"))
    tiny = ["--dataset", "synthetic", "--net", "resnet20", "--learner", "chn-pruned", "--target", "0.6", "--device",
            "cpu", "--quiet", "--epochs", "1", "--retrain-epochs", "0", "--no-export-onnx", "--reward-val-size", "64",
            "--latency-repeats", "2", "--calib-batches", "2"]
    run_dir = run_ok(capsys, *tiny, "--hpo", "random", "--episodes", "4", "--cp-skip", r"layer1\..*", "layer3.2.conv2",
                     "--out-dir", str(tmp_path / "r"))
    summary = json.loads((run_dir / "summary.json").read_text())
    frozen = summary["layers"]["frozen"]
    assert sorted(frozen) == ["layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2", "layer3.2.conv2"]
    assert len(summary["layers"]["searched"]) == 5 and summary["flops_ratio"] <= 0.6 + 1e-6
    names = (run_dir / "trials.csv").read_text().splitlines()[0].split(",")
    rows = [json.loads(ln) for ln in (run_dir / "trials.jsonl").read_text().splitlines()]
    cols = [i for i, n in enumerate(names[-9:]) if n in frozen]
    assert all(r["policy"][i] == 1.0 for r in rows for i in cols)  # the search never touched them
    for bad, expect in ((["--cp-skip", "layer9.*"], "matches no prunable layer"),
                        (["--cp-skip", "layer[1"], "is not a regular expression")):
        rc = main([*tiny, "--hpo", "uniform", *bad, "--out-dir", str(tmp_path / "bad")])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert rc == 2 and len(err) == 1 and expect in err[0], err


def test_tracing_a_model_too_big_for_the_memory_bound_is_refused_in_one_line(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The graph analysis copies and traces the model under an address-space cap: a model that needs more than
    the bound is refused with the fix named, not grown until the OOM killer ends the process."""
    big = nn.Sequential(nn.Linear(4096, 8192), nn.ReLU(), nn.Linear(8192, 10))  # 134 MB of weights to copy
    x = torch.randn(1, 4096)
    monkeypatch.setenv("TORCHPOCKET_GRAPH_MEMORY_GIB", "0.05")
    with pytest.raises(UserError, match="needed more than 0.05 GiB.*TORCHPOCKET_GRAPH_MEMORY_GIB"):
        find_channel_groups(big, x)
    monkeypatch.setenv("TORCHPOCKET_GRAPH_MEMORY_GIB", "4")
    assert [g.name for g in find_channel_groups(big, x).groups] == ["2"]  # the cap is lifted again afterwards
    monkeypatch.setenv("TORCHPOCKET_GRAPH_MEMORY_GIB", "lots")
    with pytest.raises(UserError, match="number of GiB"):
        find_channel_groups(big, x)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "regnet_y_400mf"])
def test_torchvision_se_and_grouped_models_meet_the_budget_exactly(name: str) -> None:
    """Real torchvision code with squeeze-excitation (both) and grouped convs (RegNetY): reachable at 0.5 with the
    default bounds, the promise is what FlopCounterMode measures on the cut model, and the record replays."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    bundle = data(32, 32)
    lrn = learner(model, bundle, select="l1", reconstruct=False)
    space = lrn.search_space(model, 0.5)
    policy = space.budget.project(space.budget.uniform())
    cand = lrn.compress(model, policy).eval()
    x = bundle.val.x[:2]
    measured = flops_of(cand, x[:1]) / flops_of(model, x[:1])
    assert measured == pytest.approx(space.budget.fraction(policy), rel=1e-9) and 0.45 <= measured <= 0.5 + 1e-9
    with torch.no_grad():
        rebuilt = apply_ops(torchvision.models.get_model(name, weights=None, num_classes=10).eval(),
                            lrn.arch_state(cand)["ops"])
        rebuilt.load_state_dict(cand.state_dict())
        torch.testing.assert_close(rebuilt.eval()(x), cand(x))


def test_graph_analysis_past_its_time_bound_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchpocket.learners.channel_graph as cg

    real = cg._analyse_group

    def slow(*args: object, **kwargs: object) -> object:
        import time

        time.sleep(0.3)
        return real(*args, **kwargs)

    monkeypatch.setattr(cg, "_analyse_group", slow)
    monkeypatch.setenv("TORCHPOCKET_GRAPH_SECONDS", "0.2")
    model = build_net("resnet20").eval()
    with pytest.raises(UserError, match=r"took more than 0.2 s.*TORCHPOCKET_GRAPH_SECONDS"):
        find_channel_groups(model, data().val.x[:1])
    monkeypatch.setenv("TORCHPOCKET_GRAPH_SECONDS", "60")
    assert find_channel_groups(model, data().val.x[:1]).groups  # and the alarm is off again afterwards
