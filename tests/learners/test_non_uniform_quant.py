"""non-uniform-quant: exact 1-D k-means, centroid fine-tuning with fixed assignments, codebook file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from torchpocket.api import load, save_model
from torchpocket.datasets import DATASETS
from torchpocket.errors import UserError
from torchpocket.learners import create_learner
from torchpocket.learners._quant import QuantConfig, weight_codes
from torchpocket.learners.non_uniform_quant import (
    kmeans_1d,
    load_codebook,
    pack_indices,
    save_codebook,
    unpack_indices,
)
from torchpocket.learners.training import TrainConfig
from torchpocket.nets import create_net

SHAPE = (3, 16, 16)


def brute_force_lloyd(x: torch.Tensor, c: torch.Tensor, iters: int) -> torch.Tensor:
    for _ in range(iters):
        idx = (x[:, None] - c[None]).abs().argmin(1)
        c = torch.stack([x[idx == j].mean() if (idx == j).any() else c[j] for j in range(len(c))]).sort().values
    return c


@pytest.mark.parametrize("k", [2, 4, 16])
def test_kmeans_matches_brute_force_lloyd(k: int) -> None:
    x = torch.randn(3000, generator=torch.Generator().manual_seed(k)) ** 3
    c, idx = kmeans_1d(x, k, init="linear", iters=30)
    ref = brute_force_lloyd(x.double(), torch.linspace(float(x.min()), float(x.max()), k).double(), 30)
    torch.testing.assert_close(c.double(), ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(idx, (x[:, None] - c[None]).abs().argmin(1))  # nearest centroid
    q, _ = kmeans_1d(x, k, init="quantile", iters=0)
    assert not torch.allclose(q, torch.linspace(float(x.min()), float(x.max()), k))  # the other initialisation


@pytest.mark.parametrize("bits", range(1, 9))
def test_index_packing_round_trips(bits: int) -> None:
    idx = torch.randint(0, 2**bits, (1001,), generator=torch.Generator().manual_seed(bits))
    packed = pack_indices(idx, bits)
    assert packed.nbytes == (1001 * bits + 7) // 8
    assert np.array_equal(unpack_indices(packed, bits, 1001), idx.numpy().astype(np.uint8))


def learner(**cfg: Any) -> Any:
    return create_learner("non-uniform-quant", config=QuantConfig(**cfg), train_cfg=TrainConfig(batch_size=16))


def compressed(bits: int) -> tuple[Any, nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = create_net("resnet20", in_channels=3, num_classes=10).eval()
    data = DATASETS.get("synthetic")(shape=SHAPE, train_size=64, val_size=16, test_size=16)
    lrn = learner()
    lrn.prepare(model, data)
    space = lrn.search_space(model, 1.0)
    return lrn, model, lrn.compress(model, [float(bits)] * len(space))


def test_weights_are_centroids_and_fine_tuning_moves_only_centroids() -> None:
    lrn, model, cand = compressed(2)
    mods = dict(cand.named_modules())
    assign_before = {n: mods[n].assign.clone() for n in weight_codes(cand)}
    cent_before = {n: mods[n].centroids.detach().clone() for n in weight_codes(cand)}
    for name in assign_before:
        assert mods[name].weight.unique().numel() <= 4, name
        assert "weight" not in dict(mods[name].named_parameters())
    lrn.finetune(cand, teacher=model, steps=2)
    moved = 0
    for name in assign_before:
        assert torch.equal(mods[name].assign, assign_before[name])  # assignments fixed
        moved += not torch.equal(mods[name].centroids.detach(), cent_before[name])
        assert mods[name].weight.unique().numel() <= 4
    assert moved > 0


def test_centroid_gradient_is_accumulated_over_its_cluster() -> None:
    _, _, cand = compressed(3)
    m = dict(cand.named_modules())["layer1.0.conv1"]
    g = torch.randn(m.assign.shape)
    idx = m.assign.long().reshape(-1)
    total = torch.zeros(8).index_add_(0, idx, g.reshape(-1))
    counts = torch.bincount(idx, minlength=8).clamp_min(1).float()
    (m.weight * g).sum().backward()  # default --kmeans-grad mean: the cluster's sum over its size
    torch.testing.assert_close(m.centroids.grad, total / counts)
    m.centroids.grad = None
    m.grad_mode = "sum"  # Han et al. verbatim
    (m.weight * g).sum().backward()
    torch.testing.assert_close(m.centroids.grad, total)
    with torch.no_grad():
        assert torch.equal(m.weight, m.centroids[idx].reshape(m.assign.shape))  # same values either way


def test_codebook_file_is_small_and_reloads_identically(tmp_path: Path) -> None:
    lrn, model, cand = compressed(4)
    cand.eval()
    x = torch.randn(4, *SHAPE)
    path = tmp_path / "m.codebook.pt"
    nbytes = save_codebook(cand, path)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert nbytes < 4 * weights / 5  # 4-bit indices (1/8 of fp32) plus codebooks, batch-norm and file overhead
    fresh = create_net("resnet20", in_channels=3, num_classes=10)
    with torch.no_grad():
        assert torch.equal(load_codebook(path, fresh)(x), cand(x))
    extra = lrn.export(cand, tmp_path, x[:1])
    assert extra["reload_identical"] and extra["average_weight_bits"] == 4
    assert extra["compression"] > 4
    # the checkpoint route: torchpocket.load rebuilds the weight sharing
    save_model(tmp_path / "model.pt", cand, config={}, net="resnet20", in_channels=3, num_classes=10,
               image_size=16, learner="non-uniform-quant", arch=lrn.arch_state(cand))
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "model.pt")(x), cand(x))


def test_non_uniform_bits_range() -> None:
    learner(bits=1)  # two centroids are fine here, unlike symmetric uniform quantization
    with pytest.raises(UserError, match="between 1 and 8"):
        learner(bits=9)
    with pytest.raises(UserError, match="must not exceed"):
        learner(min_bits=5, max_bits=3)


def test_fp32_onnx_model_bakes_the_shared_weights(tmp_path: Path) -> None:
    from torchpocket.export import check_onnx, export_onnx

    lrn, _, cand = compressed(3)
    cand.eval()
    flat = lrn.onnx_float_model(cand)
    assert not weight_codes(flat) and weight_codes(cand)  # the run's model keeps its codebooks
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        assert torch.equal(flat(x), cand(x))
    path = export_onnx(flat, tmp_path / "m.onnx", SHAPE)
    assert check_onnx(flat, path, SHAPE) < 1e-4
