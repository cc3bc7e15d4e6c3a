"""weight-sparse specifics: exact density budget, masks through training, gradual schedule, records, export."""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
from torch import nn

from tests.learners.test_learner_suite import UserNet, build_net, layer_weights
from torchpocket.api import load, save_model
from torchpocket.datasets import DATASETS
from torchpocket.errors import UserError
from torchpocket.learners import LEARNERS
from torchpocket.learners.training import TrainConfig
from torchpocket.learners.weight_sparse import (
    MASK_ATTR,
    WeightSparseLearner,
    WsConfig,
    gradual_sparsity,
    kept_count,
    load_sparse,
    magnitude_mask,
    prunable_layers,
)

SHAPE = (3, 16, 16)


@functools.cache
def data() -> object:
    return DATASETS.get("synthetic")(shape=SHAPE, train_size=64, val_size=16, test_size=16)


def learner(model: nn.Module, *, steps: int = 0, **options: object) -> WeightSparseLearner:
    lrn = WeightSparseLearner(config=WsConfig(**options), quiet=True,
                              train_cfg=TrainConfig(batch_size=16, max_steps_per_epoch=steps, lr=0.05))
    lrn.prepare(model, data())
    return lrn


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return getattr(model, MASK_ATTR)["masks"]


def density(model: nn.Module, original: nn.Module) -> float:
    return layer_weights(model, nonzero=True) / layer_weights(original, nonzero=False)


def test_registered_with_its_options() -> None:
    assert LEARNERS.get("weight-sparse") is WeightSparseLearner
    assert WeightSparseLearner.policy_name == "density" and WeightSparseLearner.section == "ws"
    assert LEARNERS.doc("weight-sparse").startswith("Fine-grained weight sparsity")
    for bad in ({"conv_min_density": 0.0}, {"fc_min_density": 1.5}, {"begin": 0.6, "end": 0.5},
                {"update_every": 0}, {"exponent": 0.0}):
        with pytest.raises(UserError):
            WeightSparseLearner(config=WsConfig(**bad))


@pytest.mark.parametrize("target", [0.25, 0.5])
def test_density_at_target_never_above(target: float) -> None:
    model = build_net("resnet20").eval()
    lrn = learner(model)
    budget = lrn.search_space(model, target).budget
    assert budget.unit == "params"
    rng = np.random.default_rng(1)
    space = lrn.search_space(model, target)
    for policy in [budget.uniform(), *(budget.project(rng.uniform(space.lows, space.highs)) for _ in range(3))]:
        d = density(lrn.compress(model, policy), model)
        assert target - 0.01 <= d <= target, d
        assert d == pytest.approx(budget.fraction(policy), abs=1e-12)
    # accuracy-guaranteed protocol: a policy under the target stays where it is
    low = lrn.search_space(model, target, fill=False).budget
    assert low.project(list(space.lows)) == pytest.approx(list(space.lows))


def test_bounds_and_dense_first_last_layers() -> None:
    model = UserNet(in_channels=3).eval()
    lrn = learner(model)
    space = lrn.search_space(model, 0.3)
    assert "stem.0" not in space.names and "head" not in space.names  # first and last (execution order) dense
    assert space.meta["dense_layers"] == ["stem.0", "head"]
    assert set(space.lows) == {0.2} and set(space.highs) == {1.0}
    cand = lrn.compress(model, list(space.lows))
    assert torch.equal(cand.stem[0].weight, model.stem[0].weight) and torch.equal(cand.head.weight, model.head.weight)
    full = learner(model, skip_first=False, skip_last=False).search_space(model, 0.3)
    assert full.names[0] == "stem.0" and full.names[-1] == "head"
    assert full.lows[-1] == pytest.approx(0.02) and full.layers[-1].kind == "linear"
    assert {lay.kind for lay in full.layers} == {"conv", "dwconv", "linear"}


def test_magnitude_mask_is_exact_and_keeps_the_largest() -> None:
    w = torch.randn(8, 4, 3, 3)
    k = kept_count(0.25, w.numel())
    m = magnitude_mask(w, k)
    assert int(m.sum()) == k == 72
    assert w.abs()[m].min() >= w.abs()[~m].max()


def test_masks_stay_zero_through_finetune_and_retrain() -> None:
    model = build_net("resnet20").eval()
    lrn = learner(model, steps=2, begin=0.0, end=1.0, update_every=1)
    space = lrn.search_space(model, 0.3)
    cand = lrn.compress(model, space.budget.uniform())
    mods = dict(cand.named_modules())
    final = {n: int(m.sum()) for n, m in masks(cand).items()}
    before = {n: mods[n].weight.detach().clone() for n in final}
    lrn.finetune(cand, teacher=model, steps=3)
    for n, m in masks(cand).items():
        w = mods[n].weight.detach()
        assert int((w != 0).sum()) == final[n] and not w[~m].any(), n
        assert not torch.equal(w, before[n]), "fine-tuning changed nothing"

    # re-training starts dense: the teacher's weights come back while the candidate still holds them where kept
    fresh = lrn.compress(model, space.budget.uniform())
    assert lrn._restore_dense(fresh, model, masks(fresh))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert not lrn._restore_dense(copy.deepcopy(cand), model, masks(cand))  # fine-tuned: keeps its own weights

    seen: list[dict[str, int]] = []

    def on_epoch(epoch: int, stats: dict[str, float]) -> None:
        seen.append({n: int((mods[n].weight != 0).sum()) for n in final})

    lrn.retrain(cand, teacher=model, epochs=2, on_epoch=on_epoch)
    # Zhu & Gupta from dense: halfway through the schedule every layer is denser than its target ...
    assert all(final[n] < seen[0][n] < mods[n].weight.numel() for n in final)
    # ... and at the end exactly at it, its mask matching its weights
    for n, m in masks(cand).items():
        w = mods[n].weight.detach()
        assert int(m.sum()) == final[n] == int((w != 0).sum()) and not w[~m].any(), n
    assert density(cand, model) == pytest.approx(space.budget.fraction(space.budget.uniform()), abs=1e-12)


def test_gradual_schedule_formula() -> None:
    kw = {"final": 0.8, "initial": 0.0, "begin_step": 100, "end_step": 300, "exponent": 3.0}
    assert gradual_sparsity(0, **kw) == 0.0
    assert gradual_sparsity(100, **kw) == 0.0  # t = t0: s_i
    assert gradual_sparsity(200, **kw) == pytest.approx(0.8 + (0.0 - 0.8) * 0.5**3)  # midway: 0.7
    assert gradual_sparsity(250, **kw) == pytest.approx(0.8 - 0.8 * 0.25**3)
    assert gradual_sparsity(300, **kw) == 0.8  # t = t0 + n dt: s_f
    assert gradual_sparsity(10_000, **kw) == 0.8
    assert gradual_sparsity(5, final=0.5, begin_step=5, end_step=5) == 0.5  # no ramp: straight to s_f
    lrn = WeightSparseLearner(config=WsConfig())
    assert lrn.schedule_steps(1000) == (100, 500, 50)
    assert WeightSparseLearner(config=WsConfig(update_every=500)).schedule_steps(10) == (1, 5, 500)


def test_record_rebuilds_masks_and_outputs(tmp_path: object) -> None:
    model = build_net("resnet20").eval()
    lrn = learner(model)
    space = lrn.search_space(model, 0.25)
    cand = lrn.compress(model, space.budget.uniform()).eval()
    x = data().val.x[:4]
    with torch.no_grad():
        out = cand(x)
    path = tmp_path / "model.pt"  # type: ignore[operator]
    save_model(path, cand, config={}, net="resnet20", in_channels=3, num_classes=10, image_size=16,
               learner="weight-sparse", arch=lrn.arch_state(cand), policy=space.to_dict(space.budget.uniform()))
    loaded = load(path)
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
    assert masks(loaded).keys() == masks(cand).keys()
    assert all(torch.equal(masks(loaded)[n], m) for n, m in masks(cand).items())
    with pytest.raises(UserError, match="does not fit"):
        WeightSparseLearner.rebuild(build_net("plain20"), {**lrn.arch_state(cand)})


def test_export_round_trips_and_is_smaller(tmp_path: object) -> None:
    model = build_net("resnet20").eval()
    lrn = learner(model, skip_first=False, skip_last=False)
    space = lrn.search_space(model, 0.25)
    cand = lrn.compress(model, space.budget.uniform()).eval()
    x = data().val.x[:4]
    info = lrn.export(cand, tmp_path, x[:1])
    assert info["density"] == pytest.approx(space.budget.fraction(space.budget.uniform()))
    assert 0.24 <= info["density"] <= 0.25 and info["max_abs_diff"] == 0.0
    path = tmp_path / "model.sparse.pt"  # type: ignore[operator]
    assert info["sparse_bytes"] == path.stat().st_size < 0.4 * info["dense_bytes"]
    back = load_sparse(path, build_net("resnet20", seed=3))
    with torch.no_grad():
        assert torch.equal(back(x), cand(x))
    assert {n for n, _ in prunable_layers(back)} >= masks(back).keys() == masks(cand).keys()
    with pytest.raises(UserError, match="not a torchpocket sparse model"):
        torch.save({"x": 1}, tmp_path / "other.pt")  # type: ignore[operator]
        load_sparse(tmp_path / "other.pt", build_net("resnet20"))  # type: ignore[operator]
