"""Composite learners ``A+B`` (beyond the shared suite, which runs them too): refusals, the joint Budgets against
the models they describe, the uniform path, and a whole run that ships ``model.int8.onnx``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import run_ok
from tests.learners.test_learner_suite import EXPECT, bitops, build_net, dataset, quick_kwargs
from tests.test_cli import QUICK, assert_user_error
from torchpocket.api import load
from torchpocket.config import default_config, merge
from torchpocket.errors import UserError
from torchpocket.learners import LEARNERS, create_learner
from torchpocket.learners.training import TrainConfig

NAME = "chn-pruned+uniform-quant"


@pytest.mark.parametrize(("name", "expect"), [
    ("uniform-quant+non-uniform-quant", "two quantizers"),
    ("full-prec+uniform-quant", "full-prec cannot come first"),
    ("weight-sparse+uniform-quant", "uniform-quant would not keep weight-sparse's zeros"),
    ("chn-pruned+dis-chn-pruned", "dis-chn-pruned cannot come second"),
    ("chn-pruned+uniform-quant+non-uniform-quant", "joins two learners"),
    ("chn-prund+uniform-quant", "did you mean 'chn-pruned'"),
])
def test_bad_compositions_are_refused_in_one_line(capsys: pytest.CaptureFixture[str], name: str, expect: str) -> None:
    assert_user_error(capsys, *QUICK, "--learner", name, "--hpo", "random", "--target", "0.05", expect=expect)
    assert name not in LEARNERS


def test_resource_must_be_one_the_learner_counts(capsys: pytest.CaptureFixture[str]) -> None:
    line = assert_user_error(capsys, *QUICK, "--learner", NAME, "--hpo", "random", "--target", "0.05",
                             "--resource", "flops", expect="--resource flops is not one")
    assert "bitops, bytes" in line
    assert_user_error(capsys, *QUICK, "--learner", "chn-pruned", "--hpo", "random", "--target", "0.5",
                      "--resource", "bitops", expect="choose one of: flops, params, latency")


def test_a_saved_config_with_the_old_chn_resource_still_loads() -> None:
    cfg = merge(default_config(), {"chn": {"resource": "latency", "low": 0.3}}, "config.yaml")
    assert cfg["run"]["resource"] == "latency" and cfg["chn"]["low"] == 0.3 and "resource" not in cfg["chn"]


def prepared(resource: str) -> tuple[object, torch.nn.Module]:
    model = build_net("user").eval()
    lrn = create_learner(NAME, train_cfg=TrainConfig(batch_size=32), resource=resource, **quick_kwargs(NAME))
    lrn.prepare(model, dataset())
    return lrn, model


@pytest.mark.parametrize(("resource", "target"), [("bitops", 0.02), ("bytes", 0.08)])
def test_joint_budget_is_what_the_model_measures(resource: str, target: float) -> None:
    lrn, model = prepared(resource)
    space = lrn.search_space(model, target)
    assert space.budget.unit == resource and space.meta["split"] == len(lrn.first.search_space(model, 1.0))
    x = dataset().val.x[:1]
    rng = np.random.default_rng(3)
    for _ in range(3):
        policy = space.budget.project(rng.uniform(space.lows, space.highs))
        cand = lrn.compress(model, policy).eval()
        measured = EXPECT[resource].measure(cand, model, x)
        assert measured == pytest.approx(space.budget.fraction(policy), rel=1e-6)
        assert target - 0.01 <= measured <= target * (1 + 1e-9)
        assert lrn.joint_fractions(policy)[f"{resource}_fraction"] == pytest.approx(measured, rel=1e-6)


def test_uniform_moves_every_value_the_same_fraction_of_its_range() -> None:
    lrn, model = prepared("bitops")
    space = lrn.search_space(model, 0.02)
    u = np.asarray(space.budget.uniform())
    k = space.meta["split"]
    t = (u[:k] - space.lows[:k]) / (space.highs[:k] - space.lows[:k])
    assert np.allclose(t, t[0]) and 0 < t[0] < 1  # one preserve ratio ...
    assert len(set(u[k:])) == 1  # ... and one bit-width (rounded), both meeting the target
    assert space.budget.satisfied(list(u)) and space.budget.fraction(list(u)) > 0.5 * 0.02


def test_latency_budget_is_the_int8_table_and_leaves_the_bits_alone() -> None:
    """``--resource latency``: A's lookup table timed in ONNX Runtime int8 (as ``model.int8.onnx`` runs), a fraction
    of the unpruned fp32 model's time; weight bits cost nothing there, so projection and uniform leave them high."""
    from torchpocket.learners._channel_latency import INT8_RUNTIME

    lrn, model = prepared("latency")
    assert lrn.first.latency_runtime == INT8_RUNTIME and lrn.first.resource == "flops"
    top = lrn.search_space(model, 100.0)  # any target (this tiny net runs slower in int8 than in fp32)
    k = top.meta["split"]
    assert top.meta["latency"]["runtime"] == INT8_RUNTIME and top.meta["latency"]["fp32_full"] > 0
    floor, high = top.budget.fraction(list(top.lows)), top.budget.fraction(list(top.highs))
    assert 0 < floor < high  # narrower layers are predicted faster
    space = lrn.search_space(model, 0.5 * (floor + high))
    rng = np.random.default_rng(0)
    for _ in range(3):
        raw = space.budget.clip(rng.uniform(space.lows, space.highs))
        few_bits = np.concatenate([raw[:k], space.lows[k:]])
        assert space.budget.cost(list(raw)) == space.budget.cost(list(few_bits))  # bits: no time
        projected = np.asarray(space.budget.project(list(space.highs)))
        assert space.budget.satisfied(list(projected)) and (projected[:k] < space.highs[:k]).any()
        assert np.array_equal(projected[k:], space.highs[k:])  # pruning met the target, the bits untouched
    u = np.asarray(space.budget.uniform())
    assert np.array_equal(u[k:], space.highs[k:]) and space.budget.satisfied(list(u))
    pa, _ = lrn.split(list(u))
    pred = lrn.latency_prediction(pa, {"int8": {"latency_ms_b1": 2.0}})
    assert pred["runtime"] == INT8_RUNTIME and pred["measured_file"] == "model.int8.onnx"
    assert pred["predicted_fraction"] == pytest.approx(space.budget.fraction(list(u)))
    assert pred["prediction_error"] == pytest.approx(pred["predicted_ms"] / 2.0 - 1)


@pytest.mark.usefixtures("shared_cache")
def test_a_joint_run_ships_an_int8_model_that_reloads(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    run_dir = run_ok(capsys, "--dataset", "synthetic", "--net", "resnet20", "--learner", NAME, "--resource",
                     "bitops", "--target", "0.03", "--hpo", "random", "--episodes", "3", "--device", "cpu", "--quiet",
                     "--epochs", "1", "--retrain-epochs", "0", "--reward-val-size", "64", "--latency-repeats", "2",
                     "--calib-batches", "2", "--quant-calib-batches", "2", "--out-dir", str(tmp_path))
    summary = json.loads((run_dir / "summary.json").read_text())
    joint = summary["joint"]
    assert joint["resource"] == "bitops" and joint["parts"] == ["chn-pruned", "uniform-quant"]
    assert 0.02 < joint["bitops_fraction"] <= 0.03 + 1e-9 and summary["flops_ratio"] < 1.0
    assert (run_dir / "model.int8.onnx").is_file() and summary["int8"]["size_bytes"] > 0
    model = load(run_dir / "model.pt")
    ckpt = torch.load(run_dir / "model.pt", weights_only=True)
    x = torch.rand(1, ckpt["in_channels"], ckpt["image_size"], ckpt["image_size"])
    base = build_net_like(summary, ckpt["in_channels"])
    assert bitops(model, x) / bitops(base, x) == pytest.approx(joint["bitops_fraction"], rel=1e-6)
    with pytest.raises(UserError, match="not chn-pruned\\+non-uniform-quant"):
        LEARNERS.get("chn-pruned+non-uniform-quant").rebuild(build_net_like(summary, ckpt["in_channels"]),
                                                              ckpt["arch"])


def build_net_like(summary: dict, in_channels: int) -> torch.nn.Module:
    from torchpocket.nets import create_net

    return create_net(summary["net"], in_channels=in_channels, num_classes=10).eval()


def test_each_part_gets_its_own_config_sections() -> None:
    from torchpocket.pipeline import make_learner

    cfg = default_config()
    cfg["run"].update(learner="dis-chn-pruned+uniform-quant", resource="bytes")
    cfg["chn"]["low"], cfg["quant"]["act_bits"], cfg["dcp"]["stages"] = 0.3, 6, 2
    lrn = make_learner(cfg, torch.device("cpu"))
    assert lrn.resource == "bytes" and lrn.first.resource == "flops"  # the composite's, and its part's own
    assert lrn.first.config.low == 0.3 and lrn.first.dcp.stages == 2 and lrn.activation_bits() == 6
    assert "dis-chn-pruned+uniform-quant" in LEARNERS and LEARNERS.doc("dis-chn-pruned+uniform-quant")
