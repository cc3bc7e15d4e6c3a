"""uniform-quant: fake quantization with the straight-through estimator, quantizer placement, rebuild, int8 ONNX."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import Tensor, nn

from torchpocket.api import load, save_model
from torchpocket.datasets import DATASETS
from torchpocket.errors import UnsupportedModel, UserError
from torchpocket.export import export_int8_onnx, onnx_predict
from torchpocket.learners import create_learner
from torchpocket.learners._quant import ActQuant, QuantConfig, act_quantizers, fake_quant_weight, weight_codes
from torchpocket.learners._quant_deploy import deploy_module, float_model
from torchpocket.learners.training import TrainConfig
from torchpocket.nets import create_net

SHAPE = (3, 16, 16)


@functools.cache
def data() -> Any:
    return DATASETS.get("synthetic")(shape=SHAPE, train_size=64, val_size=32, test_size=32)


def randomise_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g))
            m.weight.data.copy_(torch.randn(n, generator=g))  # negative factors too: the fold must handle them
            m.bias.data.copy_(0.2 * torch.randn(n, generator=g))
    return model


def learner(**cfg: Any) -> Any:
    lrn = create_learner("uniform-quant", config=QuantConfig(**cfg), train_cfg=TrainConfig(batch_size=16), seed=0)
    return lrn


def compressed(bits: int = 8, **cfg: Any) -> tuple[Any, nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = randomise_bn(create_net("resnet20", in_channels=3, num_classes=10)).eval()
    lrn = learner(**cfg)
    lrn.prepare(model, data())
    space = lrn.search_space(model, 1.0)
    return lrn, model, lrn.compress(model, [float(bits)] * len(space)).eval()


def test_weight_fake_quant_is_per_channel_symmetric_with_ste() -> None:
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    for bits, qmax in ((2, 1), (4, 7), (8, 127)):
        q = fake_quant_weight(w, qmax)
        s = w.detach().abs().reshape(6, -1).amax(1) / qmax
        codes = q.detach() / s.reshape(-1, 1, 1, 1)
        assert torch.allclose(codes, codes.round(), atol=1e-4)
        assert codes.abs().max() <= qmax + 1e-4
        for c in range(6):  # each channel's extreme value is exactly representable
            assert q[c].detach().abs().max().item() == pytest.approx(w[c].detach().abs().max().item(), rel=1e-5)
        assert max(r.unique().numel() for r in q.detach().reshape(6, -1)) <= 2 * qmax + 1, bits
    g = torch.randn_like(w)
    (fake_quant_weight(w, 7) * g).sum().backward()
    torch.testing.assert_close(w.grad, g)  # straight-through: inside the range the gradient passes unchanged


def test_one_bit_weights_are_binary_with_mean_scale_and_ste() -> None:
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    q = fake_quant_weight(w, 1, binary=True)
    a = w.detach().abs().reshape(6, -1).mean(1).reshape(-1, 1, 1, 1)
    torch.testing.assert_close(q.detach(), torch.where(w.detach() >= 0, a, -a))  # sign(w) * mean|w_c|, no 0
    assert all(r.unique().numel() == 2 for r in q.detach().reshape(6, -1))
    g = torch.randn_like(w)
    (q * g).sum().backward()
    torch.testing.assert_close(w.grad, g)


def test_one_bit_layers_hold_two_codes_and_the_integer_model_matches(tmp_path: Path) -> None:
    _, _, cand = compressed(1)
    codes = weight_codes(cand)
    assert codes and all(b == 1 and set(c.unique().tolist()) == {-1, 1} for c, b in codes.values())
    path = export_int8_onnx(cand, tmp_path / "w1.int8.onnx", SHAPE)
    x = torch.randn(128, *SHAPE, generator=torch.Generator().manual_seed(6))
    got = onnx_predict(path, x)
    with torch.no_grad():
        ref = cand(x).numpy()
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.99
    assert np.abs(got - ref).mean() < 0.01 * np.abs(ref).mean()


def test_activation_quantizer_ema_and_zero_point() -> None:
    q = ActQuant(8, ema=0.5)
    x = torch.linspace(0.5, 3.0, 100)  # all positive: the grid is widened to contain 0, exactly representable
    q.train()
    assert torch.equal(q(torch.zeros(3)), torch.zeros(3)) and int(q.seen) == 1
    y = q(x)
    assert float(q.lo) == pytest.approx(0.25) and float(q.hi) == pytest.approx(1.5)  # EMA: 0.5 * 0 + 0.5 * x
    scale, zp = q.qparams()
    assert zp == 0 and scale == pytest.approx(1.5 / 255)
    assert float(y.max()) == pytest.approx(1.5, abs=1e-6)  # clipped to the observed range
    q.eval()
    before = (float(q.lo), float(q.hi))
    q(x * 10)
    assert (float(q.lo), float(q.hi)) == before  # eval mode never moves the range
    fresh = ActQuant(4).eval()
    assert torch.equal(fresh(x), x)  # nothing observed yet: identity
    xg = torch.tensor([-1.0, 0.2, 1.0], requires_grad=True)
    q.train()
    q(xg).sum().backward()
    assert xg.grad.tolist() == [0.0, 1.0, 1.0]  # STE: zero outside the (EMA) range, one inside


def test_compress_places_quantizers_and_keeps_the_teacher() -> None:
    lrn, model, cand = compressed(4)
    assert cand is not model and not act_quantizers(model)
    code = cand.code
    # the network input, every conv unit output and every residual add are quantized; the logits are not
    # (the last line returns the fc layer's bias grid, not an activation quantizer)
    assert "act_quant_0 = self.act_quant_0(x)" in code
    assert code.count("self.act_quant_") == len(act_quantizers(cand)) >= 1 + 19
    assert code.strip().splitlines()[-1].strip().startswith("return bias_grid_")  # fc, then its bias grid
    assert all(int(q.seen) > 0 for q in act_quantizers(cand).values())  # calibrated in compress()
    for name, (codes, bits) in weight_codes(cand).items():
        assert bits == 4 and codes.abs().max() <= 7 and codes.unique().numel() <= 15, name


def test_reduce_range_only_narrows_8_bit_weights() -> None:
    _, _, narrow = compressed(8, reduce_range="on")
    _, _, full = compressed(8, reduce_range="off")
    assert max(int(c.abs().max()) for c, _ in weight_codes(narrow).values()) == 63
    assert max(int(c.abs().max()) for c, _ in weight_codes(full).values()) == 127


@pytest.mark.parametrize(("flags", "machine", "want"), [
    ({"avx2": True, "avx512_vnni": True}, "x86_64", False),  # VNNI: u8s8 products sum in 32 bits
    ({"avx2": True, "avx_vnni": True}, "x86_64", False),
    ({"avx2": True}, "x86_64", True),  # AVX2 only: 16-bit pair sums overflow with full-range weights
    ({"asimd": True}, "aarch64", False),
])
def test_reduce_range_auto_follows_the_cpu(flags: dict, machine: str, want: bool,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import platform

    import torchpocket.utils
    from torchpocket.learners._quant import resolve_reduce_range

    monkeypatch.setattr(torchpocket.utils, "cpu_flags", lambda: flags)
    monkeypatch.setattr(platform, "machine", lambda: machine)
    used, why = resolve_reduce_range("auto")
    assert used is want and why.startswith("auto: ")
    assert resolve_reduce_range("on")[0] is True and resolve_reduce_range("off")[0] is False
    lrn, _, cand = compressed(8)  # the learner applies what auto chose: 63 with 7-bit weights, else 127
    assert max(int(c.abs().max()) for c, _ in weight_codes(cand).values()) == (63 if want else 127)
    rec = lrn.export(cand, None, torch.zeros(1))["reduce_range"]
    assert rec == {"setting": "auto", "used": "on" if want else "off", "why": why}


def test_qat_step_trains_the_latent_weights() -> None:
    lrn, model, cand = compressed(4)
    before = {n: p.detach().clone() for n, p in cand.named_parameters()}
    lrn.finetune(cand, teacher=model, steps=2)
    moved = [n for n, p in cand.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert any(n.endswith("conv1.weight") for n in moved)
    for _, (codes, bits) in weight_codes(cand).items():
        assert codes.unique().numel() <= 2**bits


def test_rebuild_and_load_restore_bits_and_ranges(tmp_path: Path) -> None:
    lrn, model, cand = compressed(6)
    arch = lrn.arch_state(cand)
    assert set(arch["layers"].values()) == {6} and len(arch["activations"]) == len(act_quantizers(cand))
    path = tmp_path / "model.pt"
    save_model(path, cand, config={}, net="resnet20", in_channels=3, num_classes=10, image_size=16,
               learner="uniform-quant", arch=arch)
    loaded = load(path)
    x = data().val.x[:8]
    with torch.no_grad():
        assert torch.equal(loaded(x), cand(x))
    ranges = {n: (float(q.lo), float(q.hi)) for n, q in act_quantizers(loaded).items()}
    assert ranges == {n: (float(q.lo), float(q.hi)) for n, q in act_quantizers(cand).items()}


def test_deploy_module_folds_batch_norm_exactly() -> None:
    _, _, cand = compressed(8)
    dep = deploy_module(cand)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in dep.modules())
    x = torch.randn(64, *SHAPE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = cand(x), dep(x)
    # folding changes float rounding only: a few activations may round to the neighbouring level
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.95
    assert (a - b).abs().mean() < 0.05 * a.abs().mean()


def test_int8_onnx_carries_our_scales_and_runs_integer_kernels(tmp_path: Path) -> None:
    _, _, cand = compressed(8, reduce_range="on")
    path = export_int8_onnx(cand, tmp_path / "model.int8.onnx", SHAPE)
    m = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    convs = [n for n in m.graph.node if n.op_type in ("Conv", "Gemm")]
    producer = {o: n for n in m.graph.node for o in n.output}
    assert len(convs) == 22
    for node in convs:  # weight: int8 initializer -> DequantizeLinear; bias: int32 -> DequantizeLinear
        dq_w, dq_b = producer[node.input[1]], producer[node.input[2]]
        assert dq_w.op_type == dq_b.op_type == "DequantizeLinear"
        assert inits[dq_w.input[0]].dtype == np.int8 and np.abs(inits[dq_w.input[0]]).max() <= 63
        assert inits[dq_b.input[0]].dtype == np.int32
    assert not any(v.dtype == np.float32 and v.ndim == 4 for v in inits.values())  # no float conv weights left
    # the activation scales are the ones the fake quantizers learned (no re-calibration)
    first_q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear")
    assert float(inits[first_q.input[1]]) == pytest.approx(act_quantizers(cand)["act_quant_0"].qparams()[0])
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert {"QLinearConv", "QLinearAdd"} <= ops and "Conv" not in ops
    x = torch.randn(256, *SHAPE, generator=torch.Generator().manual_seed(4))
    got = onnx_predict(path, x)
    with torch.no_grad():
        ref = cand(x).numpy()
    # the fake-quant model simulates the integer model, int32 bias grid included: the same numbers up to
    # float rounding (a rare activation a step apart), so the same decisions even on random logits
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.99
    assert np.abs(got - ref).mean() < 0.01 * np.abs(ref).mean()


def test_first_conv_in_fp32_keeps_the_trained_codes_and_the_rest_int8(tmp_path: Path) -> None:
    from torchpocket.export import export_onnx, float_first_conv

    _, _, cand = compressed(8, reduce_range="off")
    p8 = export_int8_onnx(cand, tmp_path / "model.int8.onnx", SHAPE)
    assert float_first_conv(p8, tmp_path / "first.onnx") == "/conv1/Conv"
    m8, mf = (onnx.load(str(p)) for p in (p8, tmp_path / "first.onnx"))
    inits8 = {i.name: numpy_helper.to_array(i) for i in m8.graph.initializer}
    initsf = {i.name: numpy_helper.to_array(i) for i in mf.graph.initializer}
    producer = {o: n for n in m8.graph.node for o in n.output}
    conv8 = next(n for n in m8.graph.node if n.op_type == "Conv")
    convf = [n for n in mf.graph.node if n.op_type in ("Conv", "Gemm")]
    assert convf[0].input[0] == "input" and initsf[convf[0].input[1]].dtype == np.float32
    dq = producer[conv8.input[1]]  # the float weight is exactly code x scale of the int8 file
    codes, scale = inits8[dq.input[0]].astype(np.float32), inits8[dq.input[1]]
    assert np.allclose(initsf[convf[0].input[1]], codes * scale.reshape(-1, 1, 1, 1), rtol=1e-6, atol=0)
    assert sum(v.dtype == np.int8 and v.ndim == 4 for v in initsf.values()) == 20  # the other 20 still int8
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == "input" for n in mf.graph.node)
    x = torch.rand(128, *SHAPE, generator=torch.Generator().manual_seed(5))  # inside the input quantizer's range
    a, b = onnx_predict(p8, x), onnx_predict(tmp_path / "first.onnx", x)
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.95 and np.abs(a - b).mean() < 0.05 * np.abs(a).mean()
    fp32 = export_onnx(float_model(cand), tmp_path / "model.onnx", SHAPE)  # no quantized input: nothing to do
    assert float_first_conv(fp32, tmp_path / "none.onnx") is None and not (tmp_path / "none.onnx").exists()


def test_float_model_is_the_quantized_network_in_fp32() -> None:
    _, _, cand = compressed(4)
    fm = float_model(cand)
    assert not any(hasattr(m, "qbits") for m in fm.modules())
    w = dict(fm.named_modules())["layer1.0.conv1"].weight
    q = dict(cand.named_modules())["layer1.0.conv1"].quantized_weight()
    assert torch.equal(w, q.detach())


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.conv(x).mean((2, 3))
        return self.conv(-x).mean((2, 3))


def test_untraceable_model_is_refused_with_the_reason() -> None:
    lrn = learner()
    lrn.prepare(Untraceable(), data())
    with pytest.raises(UnsupportedModel, match="torch.fx"):
        lrn.search_space(Untraceable(), 0.25)


@pytest.mark.parametrize(("cfg", "match"), [
    ({"bits": 0}, "--bits must be between 1 and 8"),
    ({"bits": 9}, "--bits must be between 1 and 8"),
    ({"min_bits": 6, "max_bits": 4}, "must not exceed --max-bits"),
    ({"min_bits": 0}, "--min-bits must be between 1 and 8"),
    ({"act_bits": 12}, "--act-bits"),
])
def test_bad_bit_settings(cfg: dict[str, Any], match: str) -> None:
    with pytest.raises(UserError, match=match):
        learner(**cfg)


def test_mixed_precision_budget_and_bits_flag() -> None:
    torch.manual_seed(0)
    model = create_net("resnet20", in_channels=3, num_classes=10).eval()
    lrn = learner()
    lrn.prepare(model, data())
    space = lrn.search_space(model, 0.125)  # 4 bits on average
    b = space.budget
    assert b.unit == "bits" and list(space.lows) == [2.0] * len(space) and list(space.highs) == [8.0] * len(space)
    assert b.uniform() == [4.0] * len(space)
    p = b.project(np.random.default_rng(0).uniform(2, 8, len(space)))
    assert all(v == int(v) for v in p) and b.satisfied(p) and b.fraction(p) > 0.125 - 0.01
    with pytest.raises(UserError, match="unreachable"):
        lrn.search_space(model, 0.05)  # below 2 bits everywhere
    fixed = learner(bits=3)
    fixed.prepare(model, data())
    assert fixed.search_space(model, 1.0).budget.uniform() == [3.0] * len(space)


def test_full_range_8_bit_weights_survive_a_rebuild(tmp_path: Path) -> None:
    lrn, _, cand = compressed(8, reduce_range="off")
    arch = lrn.arch_state(cand)
    assert arch["reduce_range"] is False
    path = tmp_path / "model.pt"
    save_model(path, cand, config={}, net="resnet20", in_channels=3, num_classes=10, image_size=16,
               learner="uniform-quant", arch=arch)
    assert max(int(c.abs().max()) for c, _ in weight_codes(load(path)).values()) == 127


def test_low_bit_activations_export_inside_the_uint8_grid(tmp_path: Path) -> None:
    _, _, cand = compressed(4, act_bits=4)
    assert {q.bits for q in act_quantizers(cand).values()} == {4}
    path = export_int8_onnx(cand, tmp_path / "a4.int8.onnx", SHAPE)
    assert any(n.op_type == "Clip" for n in onnx.load(str(path)).graph.node)  # the 4-bit grid's clipping
    x = torch.randn(128, *SHAPE, generator=torch.Generator().manual_seed(5))
    got = onnx_predict(path, x)
    with torch.no_grad():
        ref = cand(x).numpy()
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.99
    assert np.abs(got - ref).mean() < 0.01 * np.abs(ref).mean()


def test_bias_grid_simulates_the_integer_bias_in_eval_only() -> None:
    from torchpocket.learners._quant_fx import BiasGrid

    _, _, cand = compressed(4, act_bits=4)  # coarse activations: a coarse int32 bias grid
    grids = [m for m in cand.modules() if isinstance(m, BiasGrid)]
    assert len(grids) == 22  # every quantized layer reads a quantized input
    x = torch.randn(8, *SHAPE)
    with torch.no_grad():
        on = cand(x)
        for g in grids:
            g.enabled = False
        off = cand(x)
    assert not torch.equal(on, off)
    d = grids[0].offset()
    layer, bn, quant = grids[0]._refs
    f = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).abs()
    step = (layer.weight.abs().reshape(layer.weight.shape[0], -1).amax(1) / layer.qmax) * quant.qparams()[0] * f
    assert torch.all(d.abs() <= step / 2 + 1e-6)  # at most half a grid step per channel
    g = grids[0]
    g.enabled = True
    g.train()
    y = torch.randn(2, d.numel(), 4, 4)
    assert torch.equal(g(y), y)  # training is untouched
