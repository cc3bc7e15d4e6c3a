"""Shared pieces of the quantization learners (``uniform-quant``, ``non-uniform-quant``).

* the config section ``quant`` both learners read (``--bits``, ``--min-bits``, ``--max-bits`` ...);
* the weight-bits search space: one policy value per Conv2d / Linear layer = its weight bit-width
  (an integer: ``LayerSpec.step = 1``), a Budget on total weight bits (unit ``bits``: ``target`` is the
  fraction of the fp32 weight bits kept, 0.25 = 8 bits on average);
* uniform fake quantization (Jacob et al. 2018): weights per output channel, symmetric, scale
  ``max|w_c| / qmax`` (at 1 bit, binary: ``sign(w) * mean|w_c|``, Rastegari et al. 2016's BWN);
  activations per tensor, asymmetric (``uint``), range observed as an exponential moving average
  and nudged so that 0 is exact; rounding with the straight-through estimator
  (``torch.fake_quantize_*``: gradient 1 inside the range, 0 outside);
* :func:`weight_codes`: the integer code of every quantized weight (what the tests count).

Where the activation quantizers go is :mod:`~torchpocket.learners._quant_fx`; the network for
ONNX export is :mod:`~torchpocket.learners._quant_deploy`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchpocket.errors import UnsupportedModel, UserError
from torchpocket.learners._layers import weight_layers as quant_layers
from torchpocket.options import opt
from torchpocket.space import Budget, LayerSpec, Policy, SearchSpace

FP_BITS = 32
UNIFORM_BITS = (1, 8)  # 1 bit: binary {-a, +a} (BWN); 2 bits and up: symmetric {-qmax..qmax}; int8 holds 8
NON_UNIFORM_BITS = (1, 8)  # 2 centroids at 1 bit; indices packed into bytes


@dataclass
class QuantConfig:
    """Options of ``uniform-quant`` and ``non-uniform-quant`` (config section ``quant``)."""

    bits: int | None = opt(None, "every quantized layer at this many weight bits, no search (implies --hpo none; "
                           "default: bits from the policy / --target)", flag="--bits")
    min_bits: int = opt(2, "smallest weight bit-width of a layer in a mixed-precision search", flag="--min-bits")
    max_bits: int = opt(8, "largest weight bit-width of a layer in a mixed-precision search", flag="--max-bits")
    act_bits: int = opt(8, "uniform-quant: activation bits, per tensor (0 = weights only, and then no int8 "
                        "ONNX model)", flag="--act-bits")
    act_ema: float = opt(0.99, "uniform-quant: decay of the moving average of activation ranges during "
                         "training (TF QAT: 0.999)", flag="--act-ema")
    reduce_range: str = opt("auto", "uniform-quant: 8-bit weights in [-63, 63] (on: 7 bits, what ONNX Runtime's "
                            "u8s8 kernels on x86 CPUs without VNNI need to avoid overflowing their 16-bit sums) or "
                            "[-127, 127] (off); auto: off where the CPU has VNNI (avx512_vnni, avx_vnni, amx_int8) "
                            "or is not x86, on otherwise. Recorded in the checkpoint and summary.json",
                            flag="--reduce-range", choices=("auto", "on", "off"))
    int8_first_layer: str = opt("auto", "uniform-quant: model.int8.onnx runs the first convolution (the one on "
                                "the network input) in int8 or fp32; auto: both are timed against each other at "
                                "batch 64 on this CPU and the faster ships (recorded in summary.json)",
                                flag="--int8-first-layer", choices=("auto", "int8", "fp32"))
    calib_batches: int = opt(4, "training batches that initialise activation ranges of a candidate",
                             flag="--quant-calib-batches")
    kmeans_init: str = opt("linear", "non-uniform-quant: centroid initialisation (Han et al.: linear is best)",
                           flag="--kmeans-init", choices=("linear", "quantile"))
    kmeans_iters: int = opt(20, "non-uniform-quant: Lloyd iterations of the per-layer k-means",
                            flag="--kmeans-iters")
    kmeans_grad: str = opt("mean", "non-uniform-quant: a centroid's gradient is the sum of its weights' "
                           "gradients divided by the cluster size (mean) or not (sum: Han et al. verbatim, needs "
                           "a far smaller learning rate)", flag="--kmeans-grad", choices=("mean", "sum"))

    @classmethod
    def check(cls, cfg: dict[str, Any]) -> None:
        """``--bits N`` fixes every layer's bit-width: a quantization learner, and no search (``--hpo none``)."""
        from torchpocket.learners import LEARNERS

        bits = cfg["quant"]["bits"]
        if bits is None:
            return
        run = cfg["run"]
        if LEARNERS.get(run["learner"]).section != "quant":
            raise UserError(f"--bits applies to the quantization learners (uniform-quant, non-uniform-quant), "
                            f"not {run['learner']!r}")
        if run["hpo"] != "none":
            raise UserError(f"--bits {bits} puts every layer at {bits} bits, there is nothing to search: drop "
                            f"--hpo {run['hpo']} (or drop --bits and give --target to search mixed precision)")
        if cfg["search"]["policy"]:
            raise UserError("--bits and --policy both fix the bits: give one of them")




def check_config(c: QuantConfig, supported: tuple[int, int], learner: str) -> None:
    """Reject bad bit settings with one clear line (a :class:`UserError`)."""
    lo, hi = supported
    if c.bits is not None and not lo <= c.bits <= hi:
        raise UserError(f"--bits must be between {lo} and {hi} for {learner}, got {c.bits}")
    for flag, v in (("--min-bits", c.min_bits), ("--max-bits", c.max_bits)):
        if not lo <= v <= hi:
            raise UserError(f"{flag} must be between {lo} and {hi} for {learner}, got {v}")
    if c.min_bits > c.max_bits:
        raise UserError(f"--min-bits ({c.min_bits}) must not exceed --max-bits ({c.max_bits})")
    if c.act_bits and not 2 <= c.act_bits <= 8:
        raise UserError(f"--act-bits must be 0 (off) or between 2 and 8, got {c.act_bits}")
    if not 0 <= c.act_ema < 1:
        raise UserError(f"--act-ema must be in [0, 1), got {c.act_ema}")
    if c.calib_batches < 1:
        raise UserError(f"--quant-calib-batches must be at least 1, got {c.calib_batches}")
    if c.kmeans_iters < 0:
        raise UserError(f"--kmeans-iters must not be negative, got {c.kmeans_iters}")


# -- layers and the search space --------------------------------------------------------------






def bits_space(model: nn.Module, target: float, *, cfg: QuantConfig, fill: bool,
               macs: dict[str, int] | None = None) -> SearchSpace:
    """One entry per Conv2d / Linear layer: its weight bit-width (integer), Budget on total weight bits."""
    layers = quant_layers(model)
    if not layers:
        raise UnsupportedModel("no Conv2d / Linear layer to quantize in this model")
    lo, hi = (cfg.bits, cfg.bits) if cfg.bits is not None else (cfg.min_bits, cfg.max_bits)
    sizes = [int(m.weight.numel()) for _, m in layers]
    specs = [LayerSpec.from_module(name, m, flops=(macs or {}).get(name, 0), low=lo, high=hi, step=1.0)
             for name, m in layers]

    def layer_costs(p: Policy) -> list[float]:
        return [float(as_bits(b)) * n for b, n in zip(p, sizes)]

    budget = Budget.from_layers(specs, layer_costs, full=float(FP_BITS * sum(sizes)), target=target, fill=fill,
                                unit="bits")
    return SearchSpace(specs, budget, meta={
        "resource": "bits", "measure": "weight-bits",
        "policy": "weight bit-width of each Conv2d / Linear layer (fraction of the fp32 weight bits kept)"})


def as_bits(v: float) -> int:
    """A policy value as an integer bit-width (the Budget already rounds; this guards hand-written policies)."""
    return int(math.floor(float(v) + 0.5))


def check_policy(policy: Policy, layers: list[tuple[str, nn.Module]], supported: tuple[int, int],
                 learner: str) -> list[int]:
    if len(policy) != len(layers):
        raise UserError(f"{learner} expects one bit-width per Conv2d / Linear layer ({len(layers)}), "
                        f"got {len(policy)} values")
    bits = [as_bits(b) for b in policy]
    bad = [b for b in bits if not supported[0] <= b <= supported[1]]
    if bad:
        raise UserError(f"{learner} supports {supported[0]}-{supported[1]} bits per layer, the policy has {bad[0]}")
    return bits


# -- uniform fake quantization ------------------------------------------------------------------


def resolve_reduce_range(setting: str | bool) -> tuple[bool, str]:
    """``--reduce-range`` as used: (7-bit 8-bit weights?, why). ``auto`` reads this CPU's flags."""
    import platform

    from torchpocket.utils import cpu_flags

    if isinstance(setting, bool):
        setting = "on" if setting else "off"
    if setting in ("on", "off"):
        return setting == "on", f"--reduce-range {setting}"
    flags = cpu_flags()
    vnni = [f for f in ("avx512_vnni", "avx_vnni", "amx_int8") if flags.get(f)]
    if vnni:
        return False, f"auto: this CPU has {vnni[0]} (u8s8 products accumulate in 32 bits, full range is safe)"
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False, f"auto: {platform.machine()} is not x86 (no 16-bit u8s8 intermediate sums)"
    return True, "auto: this x86 CPU has no VNNI (ONNX Runtime's u8s8 kernels sum pairs in 16 bits)"


def weight_qmax(bits: int, reduce_range: bool) -> int:
    """Largest integer code of a symmetric ``bits``-bit weight (8 bits with reduce_range: 63, ORT's AVX2 range).

    At 1 bit the codes are the binary {-1, +1}, so the largest is 1 as at 2 bits ({-1, 0, +1}); what differs
    is the scale and the missing 0 (see :func:`weight_scale`).
    """
    if bits == 1:
        return 1
    return 63 if bits == 8 and reduce_range else 2 ** (bits - 1) - 1


def weight_scale(w: Tensor, qmax: int, *, binary: bool = False) -> Tensor:
    """Per-output-channel symmetric scale (float32, never 0): ``max|w_c| / qmax``, or ``mean|w_c|`` if binary.

    The binary scale is the one that minimises ``||w_c - a * sign(w_c)||`` (Rastegari et al. 2016).
    """
    a = w.detach().abs().reshape(w.shape[0], -1)
    s = a.mean(1) if binary else a.amax(1) / qmax
    return s.clamp_min(1e-12).float()


def fake_quant_weight(w: Tensor, qmax: int, *, binary: bool = False) -> Tensor:
    """Per-channel symmetric fake quantization with the straight-through estimator (binary: ``a * sign(w)``)."""
    s = weight_scale(w, qmax, binary=binary).to(w.device)
    if binary:
        s = s.to(w.dtype).reshape(-1, *([1] * (w.dim() - 1)))
        return torch.where(w.detach() >= 0, s, -s) + (w - w.detach())  # exact values, identity gradient
    zp = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w, s, zp, 0, -qmax, qmax)


class _QuantWeightMixin:
    """Conv2d / Linear whose forward uses the fake-quantized weight (the latent fp32 weight is trained)."""

    qbits: int
    qmax: int

    def quant_scale(self) -> Tensor:
        """The per-output-channel scale of the integer codes (``weight = scale * code``)."""
        return weight_scale(self.weight, self.qmax, binary=self.qbits == 1)  # type: ignore[attr-defined]

    def quantized_weight(self) -> Tensor:
        return fake_quant_weight(self.weight, self.qmax, binary=self.qbits == 1)  # type: ignore[attr-defined]

    def weight_codes(self) -> tuple[Tensor, int]:
        w = self.weight.detach()  # type: ignore[attr-defined]
        if self.qbits == 1:
            return torch.where(w >= 0, 1, -1).to(torch.int64), 1
        s = self.quant_scale().reshape(-1, *([1] * (w.dim() - 1)))
        return torch.round(w / s).clamp(-self.qmax, self.qmax).to(torch.int64), self.qbits


class QConv2d(_QuantWeightMixin, nn.Conv2d):
    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class QLinear(_QuantWeightMixin, nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)


def quantize_weights_(model: nn.Module, bits: dict[str, int], *, reduce_range: bool) -> None:
    """Turn the named Conv2d / Linear modules of ``model`` into their fake-quant versions, in place."""
    mods = dict(model.named_modules())
    for name, b in bits.items():
        m = mods[name]
        m.__class__ = QConv2d if isinstance(m, nn.Conv2d) else QLinear
        m.qbits, m.qmax = int(b), weight_qmax(int(b), reduce_range)


class ActQuant(nn.Module):
    """Per-tensor asymmetric fake quantization of an activation, range from an EMA of observed min / max.

    Updates its range in training mode (and in eval mode while ``observe`` is set: calibration);
    passes values through unchanged until it has seen one batch. ``deploy`` makes it export as an
    ONNX uint8 QuantizeLinear / DequantizeLinear pair with constant scale and zero point.
    """

    def __init__(self, bits: int, *, ema: float = 0.99) -> None:
        super().__init__()
        self.bits, self.ema = int(bits), float(ema)
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        self.observe = False
        self.deploy = False

    @torch.no_grad()
    def _update(self, x: Tensor) -> None:
        lo, hi = x.min().float(), x.max().float()
        if int(self.seen) == 0:
            self.lo.copy_(lo)
            self.hi.copy_(hi)
        elif self.observe:  # calibration: running mean of per-batch extremes
            k = float(self.seen)
            self.lo.mul_(k / (k + 1)).add_(lo / (k + 1))
            self.hi.mul_(k / (k + 1)).add_(hi / (k + 1))
        else:
            self.lo.mul_(self.ema).add_(lo * (1 - self.ema))
            self.hi.mul_(self.ema).add_(hi * (1 - self.ema))
        self.seen.add_(1)

    def qparams(self) -> tuple[float, int]:
        """(scale, zero point) of the current range, widened to contain 0 (Jacob et al.'s nudging)."""
        n = 2 ** self.bits - 1
        lo, hi = min(float(self.lo), 0.0), max(float(self.hi), 0.0)
        scale = max((hi - lo) / n, 1e-8)
        zp = int(min(max(round(-lo / scale), 0), n))
        return scale, zp

    def forward(self, x: Tensor) -> Tensor:
        if self.training or self.observe:
            self._update(x.detach())
        if int(self.seen) == 0:
            return x
        scale, zp = self.qparams()
        n = 2 ** self.bits - 1
        if self.deploy:
            if self.bits < 8:  # the narrower grid inside uint8: clip to it, then the same scale / zero point
                x = torch.clamp(x, (0 - zp) * scale, (n - zp) * scale)
            return torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, 255)
        return torch.fake_quantize_per_tensor_affine(x, scale, zp, 0, n)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def act_quantizers(model: nn.Module) -> dict[str, ActQuant]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ActQuant)}


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Tensor]) -> None:
    """Initialise every activation range from ``batches`` (eval mode: batch-norm statistics untouched)."""
    aqs = list(act_quantizers(model).values())
    if not aqs:
        return
    was = model.training
    model.eval()
    p = next(model.parameters(), None)
    try:
        for q in aqs:
            q.seen.zero_()
            q.observe = True
        for x in batches:
            model(x.to(p.device if p is not None else "cpu"))
    finally:
        for q in aqs:
            q.observe = False
        model.train(was)


def weight_codes(model: nn.Module) -> dict[str, tuple[Tensor, int]]:
    """Integer code of every weight of every quantized layer, with its bit-width (uniform and k-means)."""
    return {n: m.weight_codes() for n, m in model.named_modules() if hasattr(m, "weight_codes")
            and callable(m.weight_codes)}


