"""``uniform-quant``: quantization-aware training with uniform fake quantization (Jacob et al. 2018).

As PocketFlow's UniformQuantLearner and HAQ (Wang et al. 2019):

* a policy value is the **weight bit-width** of one Conv2d / Linear layer (an integer in
  ``[--min-bits, --max-bits]``, default 2-8; 1 bit is binary, ``sign(w) * mean|w_c|``); the Budget
  counts weight bits (unit ``bits``): ``--target r`` keeps the fraction ``r`` of the fp32 weight bits,
  so 0.25 is 8 bits on average and any optimizer searches mixed precision under it (PocketFlow's
  ``uql_equivalent_bits``). ``--bits N`` puts every layer
  at N bits with no search (the pipeline runs ``--hpo none``);
* :meth:`compress` copies the model, traces it with ``torch.fx``, swaps each Conv2d / Linear for a
  fake-quant version (per-output-channel symmetric weights, scale ``max|w_c| / qmax``) and inserts
  per-tensor activation quantizers (``--act-bits``, default 8, asymmetric uint, EMA ranges) wherever an
  integer runtime holds a tensor: layer inputs, ``conv -> bn -> relu`` unit outputs, residual adds.
  Ranges are initialised on ``--quant-calib-batches`` training batches. Rounding uses the
  straight-through estimator, so fine-tuning / re-training (with distillation) is plain QAT. Batch-norm
  stays unfolded in training (per-channel symmetric weights commute with the fold); in eval mode each
  layer's folded bias is put on the integer model's int32 grid, so evaluation matches the int8 export;
* the checkpoint's architecture record holds the bits of every layer, the activation quantizers'
  bits and ranges (also buffers of the state_dict); :meth:`rebuild` re-traces a fresh network and
  re-inserts the same quantizers, so ``torchpocket.load`` gives back the quantized model;
* deployment: :func:`torchpocket.export.export_int8_onnx` writes ``model.int8.onnx``, a QDQ graph carrying
  these scales (batch-norm folded into the per-channel weight scales) that ONNX Runtime runs with
  integer kernels; the pipeline reports its accuracy, size and latency beside fp32.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, fx, nn

from torchpocket.datasets import DataBundle
from torchpocket.errors import UserError
from torchpocket.learners import register_learner
from torchpocket.learners._layers import layer_macs
from torchpocket.learners._quant import (
    UNIFORM_BITS,
    QuantConfig,
    act_quantizers,
    bits_space,
    calibrate,
    check_config,
    check_policy,
    quant_layers,
    quantize_weights_,
    resolve_reduce_range,
)
from torchpocket.learners._quant_deploy import float_model
from torchpocket.learners._quant_fx import insert_act_quant, insert_bias_grids, trace
from torchpocket.learners.base import Learner
from torchpocket.space import Policy, SearchSpace

ARCH_VERSION = 1


def _build(model: nn.Module, bits: dict[str, int], *, act_bits: int, ema: float, reduce_range: bool) -> nn.Module:
    """A copy of ``model`` with fake-quant weights (``bits`` per layer name) and activation quantizers."""
    gm = trace(copy.deepcopy(model))
    quantize_weights_(gm, bits, reduce_range=reduce_range)
    if act_bits:
        insert_act_quant(gm, bits, bits=act_bits, ema=ema)
        insert_bias_grids(gm)
    return gm


@register_learner("uniform-quant")
class UniformQuantLearner(Learner):
    """Uniform quantization-aware training (Jacob et al. 2018): per-layer weight bits, 8-bit activations, int8 ONNX"""

    Config = QuantConfig
    section = "quant"
    policy_name = "bits"
    resources = ("bits",)
    stage = "quantize"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_config(self.config, UNIFORM_BITS, "uniform-quant")
        self.reduce_range, self.reduce_range_why = resolve_reduce_range(self.config.reduce_range)
        self._calib: list[Tensor] = []
        self._macs: dict[str, int] = {}

    @classmethod
    def quick_options(cls) -> dict[str, Any]:
        """Activation ranges calibrated on two batches."""
        return {"calib_batches": 2}

    def prepare(self, model: nn.Module, data: DataBundle) -> None:
        """Keep ``--quant-calib-batches`` training batches (no augmentation) and count each layer's MACs."""
        super().prepare(model, data)
        self._calib = []
        for i, (x, _) in enumerate(self._loader("train")):
            if i >= self.config.calib_batches:
                break
            self._calib.append(x)
        self._macs = layer_macs(model, data.example())

    def search_space(self, model: nn.Module, target: float, *, fill: bool = True) -> SearchSpace:
        """Weight bits of every Conv2d / Linear layer; the Budget keeps total weight bits <= target * fp32 bits."""
        if any(hasattr(m, "qbits") or hasattr(m, "codebook_bits") for m in model.modules()):
            raise UserError("this model is already quantized; start uniform-quant from a full-precision or "
                            "pruned checkpoint")
        trace(model)  # refuse an untraceable model up front, with the reason
        return bits_space(model, target, cfg=self.config, fill=fill, macs=self._macs)

    def activation_bits(self) -> int:
        """``--act-bits`` (32 when activations stay float: ``--act-bits 0``)."""
        return int(self.config.act_bits) or 32

    def compress(self, model: nn.Module, policy: Policy) -> nn.Module:
        """A fake-quantized copy of ``model`` (bits per layer from ``policy``), activation ranges calibrated."""
        layers = quant_layers(model)
        bits = check_policy(policy, layers, UNIFORM_BITS, "uniform-quant")
        c = self.config
        new = _build(model, {n: b for (n, _), b in zip(layers, bits)}, act_bits=c.act_bits, ema=c.act_ema,
                     reduce_range=self.reduce_range)
        if self._calib:
            calibrate(new, self._calib)
        return new

    # -- checkpoint record -------------------------------------------------------------------------
    def arch_state(self, model: nn.Module) -> dict[str, Any]:
        """Bits per layer, activation quantizers (bits, observed range) and options, as plain data."""
        layers = {n: int(m.qbits) for n, m in model.named_modules() if hasattr(m, "qbits")}
        acts = {n: {"bits": q.bits, "lo": float(q.lo), "hi": float(q.hi), "scale": q.qparams()[0],
                    "zero_point": q.qparams()[1]} for n, q in act_quantizers(model).items()}
        eight = [int(m.qmax) for m in model.modules() if getattr(m, "qbits", 0) == 8]
        reduce_range = eight[0] == 63 if eight else self.reduce_range  # only 8-bit layers differ
        act_bits = next(iter(acts.values()))["bits"] if acts else 0
        ema = next((q.ema for q in act_quantizers(model).values()), self.config.act_ema)
        return {"version": ARCH_VERSION, "layers": layers, "act_bits": act_bits, "act_ema": ema,
                "reduce_range": bool(reduce_range), "activations": acts}

    @classmethod
    def rebuild(cls, model: nn.Module, arch: dict[str, Any]) -> nn.Module:
        """Re-trace a freshly built ``model`` and re-insert the recorded quantizers (ranges included)."""
        if not arch:
            return model
        if arch.get("version") != ARCH_VERSION:
            raise UserError(f"unsupported uniform-quant record version {arch.get('version')!r} "
                            f"(expected {ARCH_VERSION})")
        bits = {str(k): int(v) for k, v in arch["layers"].items()}
        mods = dict(model.named_modules())
        missing = [n for n in bits if not isinstance(mods.get(n), (nn.Conv2d, nn.Linear))]
        if missing:
            raise UserError(f"the recorded quantization does not fit this network: no Conv2d / Linear "
                            f"layer {missing[0]!r}")
        gm = _build(model, bits, act_bits=int(arch.get("act_bits", 0)), ema=float(arch.get("act_ema", 0.99)),
                    reduce_range=bool(arch.get("reduce_range", True)))
        recorded = arch.get("activations", {})
        found = act_quantizers(gm)
        if set(recorded) != set(found):
            raise UserError(f"the recorded activation quantizers ({len(recorded)}) do not match this network's "
                            f"graph ({len(found)})")
        with torch.no_grad():
            for name, q in found.items():
                q.lo.fill_(float(recorded[name]["lo"]))
                q.hi.fill_(float(recorded[name]["hi"]))
                q.seen.fill_(1)
        return gm

    def onnx_float_model(self, model: nn.Module) -> nn.Module:
        """The fp32 network for ``model.onnx``: quantized weights as floats, no activation quantization."""
        return float_model(model)

    def int8_deploy(self) -> bool:
        """``model.int8.onnx`` needs weights of at most 8 bits and activation quantizers."""
        c = self.config
        return bool(c.act_bits) and (c.bits if c.bits is not None else c.max_bits) <= 8

    def deploy(self, model: nn.Module, fp32_onnx: Any, data: Any, run_dir: Any, *,
               repeats: int = 20) -> dict[str, Any]:
        """``model.int8.onnx`` beside ``model.onnx`` when every weight has at most 8 bits (summary key ``int8``)."""
        from torchpocket.export import int8_summary

        bits = [int(m.qbits) for m in model.modules() if hasattr(m, "qbits")]
        if not act_quantizers(model) or not bits or max(bits) > 8:
            return {"int8": {"skipped": "the int8 model needs weights of at most 8 bits and activation quantizers "
                                        "(--act-bits > 0)"}}
        return {"int8": int8_summary(model, fp32_onnx, data, run_dir, repeats=repeats,
                                     first_layer=self.config.int8_first_layer)}

    def export(self, model: nn.Module, run_dir: Any, example: Tensor) -> dict[str, Any]:
        """Bits per layer and average weight bits for summary.json (the int8 ONNX comes from :meth:`deploy`)."""
        layers = {n: int(m.qbits) for n, m in model.named_modules() if hasattr(m, "qbits")}
        sizes = {n: int(m.weight.numel()) for n, m in model.named_modules() if hasattr(m, "qbits")}
        total = sum(sizes.values())
        eight = [int(m.qmax) for m in model.modules() if getattr(m, "qbits", 0) == 8]
        rr = ({"setting": self.config.reduce_range, "used": "on" if eight[0] == 63 else "off",
               "why": self.reduce_range_why if (eight[0] == 63) == self.reduce_range
               else "the checkpoint's own setting"} if eight else None)
        return {"weight_bits": layers, "reduce_range": rr,
                "average_weight_bits": sum(layers[n] * sizes[n] for n in layers) / max(total, 1),
                "activation_bits": next((q.bits for q in act_quantizers(model).values()), 0)}


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` came from this learner (a traced module with fake-quant layers)."""
    return isinstance(model, fx.GraphModule) and any(hasattr(m, "qbits") for m in model.modules())
