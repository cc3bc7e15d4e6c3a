"""--channel-round auto: granules chosen from timings, kept in the cache, offered by the Budget, capped when needed."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.learners.test_chn_pruned import TwoConv, data
from tests.learners.test_learner_suite import build_net, flops_of
from torchpocket.errors import UserError
from torchpocket.learners import _channel_round as cr
from torchpocket.learners import chn_pruned
from torchpocket.learners._channel_cost import CostModel, keep_counts
from torchpocket.learners.channel_graph import find_channel_groups
from torchpocket.learners.chn_pruned import ChnConfig, ChnPrunedLearner, parse_channel_round
from torchpocket.learners.training import TrainConfig


def staircase(step: int) -> object:
    """A timer whose convolutions cost ceil(cin / step) * ceil(cout / step): SIMD blocks of ``step`` channels."""

    def timer(cases: list[tuple[nn.Module, torch.Tensor]]) -> list[float]:
        out = []
        for m, _ in cases:
            layer = m[0]
            cin = layer.in_channels // layer.groups if isinstance(layer, nn.Conv2d) else layer.in_features
            cout = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
            out.append(1e-3 * math.ceil(cin / step) * math.ceil(cout / step))
        return out

    return timer


def test_choose_granule_finds_the_staircase_step() -> None:
    ws = list(range(4, 65))
    for step in (8, 16):
        secs = [math.ceil(w / step) for w in ws]
        assert cr.choose_granule(ws, secs, 64, 4)[0] == step
    assert cr.choose_granule(ws, [float(w) for w in ws], 64, 4)[0] == 1  # linear: every width pays
    rng = np.random.default_rng(0)
    noisy = [math.ceil(w / 8) * (1 + 0.02 * rng.standard_normal()) for w in ws]
    assert cr.choose_granule(ws, noisy, 64, 4)[0] == 8
    ws16 = list(range(4, 17))  # a 16-wide layer on a 16-step staircase: granule 16 would leave it unprunable
    assert cr.choose_granule(ws16, [1.0] * len(ws16), 16, 4)[0] == 8
    coarse = list(range(8, 129, 2))  # widths timed every 2: granule 2 cannot be judged, 4 can
    g, costs = cr.choose_granule(coarse, [math.ceil(w / 4) for w in coarse], 128, 8, step=2)
    assert g == 4 and "2" not in costs


def test_probe_times_each_group_and_the_budget_offers_only_its_multiples() -> None:
    model = TwoConv().eval()
    x = data().example()
    cost = CostModel(find_channel_groups(model, x))
    plan = cr.probe_rounding(model, x, cost, low=0.2, timer=staircase(8))
    assert plan.granules == [8] and plan.evidence[0]["cost"]["8"] == pytest.approx(1.0)
    assert plan.evidence[0]["cost"]["16"] > 1.05  # 24 channels: rounding 17..23 up to 24 is free, 9..15 to 16 not
    lrn = ChnPrunedLearner(config=ChnConfig(channel_round="auto", select="l1", reconstruct=False),
                           train_cfg=TrainConfig(batch_size=64))
    orig = chn_pruned.probe_rounding
    chn_pruned.probe_rounding = functools.partial(orig, timer=staircase(8))
    try:
        lrn.prepare(model, data())
    finally:
        chn_pruned.probe_rounding = orig
    space = lrn.search_space(model, 0.5)
    for r in np.linspace(0.2, 1.0, 17):
        policy = space.budget.project([float(r)])
        k = int(lrn.cost.counts(policy)[0])
        assert k % 8 == 0 or k == 24, (r, k)
        cand = lrn.compress(model, policy)
        assert cand.conv1.out_channels == k
        assert flops_of(cand, x) <= 0.5 * flops_of(model, x) * (1 + 1e-6)
    summary = lrn.summary_fields(space.budget.project([0.5]), {})["channel_round"]
    assert summary["setting"] == "auto" and summary["per_layer"] == {"conv2": 8} and summary["capped_at"] is None


def test_coarse_granules_are_capped_when_they_put_the_target_out_of_reach(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_net("resnet20").eval()
    monkeypatch.setattr(chn_pruned, "probe_rounding", functools.partial(cr.probe_rounding, timer=staircase(32)))
    lrn = ChnPrunedLearner(config=ChnConfig(channel_round="auto", select="l1", reconstruct=False),
                           train_cfg=TrainConfig(batch_size=64))
    lrn.prepare(model, data())
    measured = lrn.rounding.granules
    assert max(measured) >= 16  # the 32- and 64-wide stages on a 32-step staircase
    lrn.search_space(model, 0.55)  # the measured granules keep >= 0.509 of the FLOPs at the 0.2 bounds
    assert lrn.cost.round_to == measured and lrn.rounding.meta["capped_at"] is None
    floor_policy = [0.2] * len(measured)
    space = lrn.search_space(model, 0.3)  # 0.3 is below what the measured granules allow at the 0.2 bounds
    assert CostModel(lrn.info, round_to=measured).cost(floor_policy) > 0.3 * lrn.cost.cost([1.0] * len(measured))
    cap = lrn.rounding.meta["capped_at"]
    assert cap is not None and lrn.cost.round_to == [min(g, cap) for g in measured]
    policy = space.budget.project(space.budget.uniform())
    assert lrn.cost.cost(policy) <= 0.3 * lrn.cost.cost([1.0] * len(measured)) * (1 + 1e-9)
    assert lrn.measured_options() == {"channel_round": lrn.cost.round_to}


def test_the_plan_is_kept_and_the_first_kept_wins(tmp_path: Path) -> None:
    names = ["a", "b"]
    calls = []

    def probe(granules: list[int]) -> cr.RoundingPlan:
        calls.append(granules)
        return cr.RoundingPlan(granules, names, [{}, {}], {"seconds": 1.0})

    path = tmp_path / "widths" / "round-x.json"
    first = cr.load_or_probe(path, names, lambda: probe([8, 16]))
    assert first.granules == [8, 16] and "loaded_from" not in first.meta and path.is_file()
    again = cr.load_or_probe(path, names, lambda: probe([1, 1]))
    assert again.granules == [8, 16] and again.meta["loaded_from"] == str(path) and len(calls) == 1
    with pytest.raises(ValueError, match="another model"):
        cr.RoundingPlan.from_dict(json.loads(path.read_text()), ["a", "c"])
    path.write_text("{damaged")
    assert cr.load_or_probe(path, names, lambda: probe([4, 4])).granules == [4, 4]  # measured again, replaced
    assert json.loads(path.read_text())["granules"] == [4, 4]
    assert not list(path.parent.glob("*.tmp"))


def test_keep_counts_takes_one_granule_per_entry() -> None:
    sizes = np.array([64, 64, 24])
    k = keep_counts(np.array([0.3, 0.3, 0.9]), sizes, np.array([16, 1, 8]))
    assert k.tolist() == [16, 19, 24]
    for r in np.linspace(0, 1, 41):  # non-decreasing, at least one granule, full at 1
        k = keep_counts(np.full(3, r), sizes, np.array([16, 4, 8]))
        assert (k >= [16, 4, 8]).all() and (k <= sizes).all()
    assert keep_counts(np.ones(3), sizes, np.array([16, 4, 8])).tolist() == [64, 64, 24]


def test_channel_round_values() -> None:
    assert parse_channel_round("auto") == "auto" and parse_channel_round(8) == 8 and parse_channel_round("4") == 4
    for bad in ("0", "-2", "2.5", "fast", ""):
        with pytest.raises(UserError, match="--channel-round must be auto or a whole number"):
            parse_channel_round(bad)
