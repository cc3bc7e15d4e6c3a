"""Composite learners ``A+B``: one per-layer policy holding both decisions, one joint Budget, one model.

``chn-pruned+uniform-quant`` prunes channels and quantizes the pruned network in one search (APQ's idea,
Wang et al. 2020; the two-stage DRL of "Deep Model Compression via Deep Reinforcement Learning" in one
episode). The class is built from the two registered learners by :func:`compose`, not written per pair:

* **policy**: A's decisions (named ``A:<layer>``), then B's (``B:<layer>``), each with its own bounds and step,
  so every optimizer (DDPG's AMC state included: the static features of each decision's layer) sees one vector;
* **Budget** (``--resource``): ``bitops`` counts ``sum over Conv2d / Linear of MACs x weight bits x activation
  bits`` (HAWQ-V3 / APQ), MACs as A's policy leaves them (its exact cost model), against the fp32 network's
  ``MACs x 32 x 32``; ``bytes`` counts the stored weights at their bit-widths plus every other parameter in
  fp32, against the fp32 parameters. Both are exact functions of the policy, non-decreasing in every value;
  the uniform policy moves every value the same fraction of its range (``Budget.uniform_path``);
* **compress**: A's compress, then B's on the result; **checkpoint**: both records in order, so
  ``torchpocket.load`` replays A's cut and then B's quantizers;
* **fine-tuning, re-training, exports**: B's (QAT and ``model.int8.onnx`` for ``uniform-quant``);
  summary fields: both, and the joint resource of the final policy.

A is a learner whose ``stage`` is ``structure`` and which reports :meth:`Learner.module_sizes`; B one whose
``stage`` is ``quantize``. Anything else is refused in one line.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, ClassVar

import numpy as np
from torch import Tensor, nn

from torchpocket.datasets import DataBundle
from torchpocket.errors import UserError
from torchpocket.learners._channel_latency import INT8_RUNTIME
from torchpocket.learners._layers import layer_macs, weight_layers
from torchpocket.learners.base import Learner
from torchpocket.space import Budget, Policy, SearchSpace

ARCH_VERSION = 1
FIRST_ARCH = "_torchpocket_composite_first"  # A's record, kept on B's model (B may rebuild the module: fx)
FP = 32


def _firsts() -> list[str]:
    from torchpocket.learners import LEARNERS

    return [n for n in LEARNERS.names() if LEARNERS.get(n).stage == "structure"
            and LEARNERS.get(n).module_sizes is not Learner.module_sizes]


def _seconds() -> list[str]:
    from torchpocket.learners import LEARNERS

    return [n for n in LEARNERS.names() if LEARNERS.get(n).stage == "quantize"]


def _keeps(name: str) -> bool:
    from torchpocket.learners import LEARNERS

    return bool(LEARNERS.get(name).keeps_masks)


def composite_names() -> list[str]:
    """Every ``A+B`` the registered learners allow."""
    from torchpocket.learners import LEARNERS

    return [f"{a}+{b}" for a in _firsts() for b in _seconds() if not LEARNERS.get(a).sparse or _keeps(b)]


def compose(name: str, parts: list[type[Learner]]) -> type[Learner]:
    """The learner class ``A+B`` of two registered learners, or a one-line :class:`UserError` saying why not."""
    if len(parts) != 2:
        raise UserError(f"--learner {name}: a composite joins two learners (A+B: a pruner or sparsifier, then a "
                        f"quantizer), got {len(parts)}")
    first, second = parts
    if first.stage == "quantize" and second.stage == "quantize":
        raise UserError(f"--learner {name}: two quantizers; a composite is a pruner then a quantizer, e.g. "
                        f"chn-pruned+{second.cli_name}")
    if second.stage != "quantize":
        raise UserError(f"--learner {name}: {second.cli_name} cannot come second; the second part is a quantizer "
                        f"({', '.join(_seconds())})")
    if first.sparse and not second.keeps_masks:
        raise UserError(f"--learner {name}: {second.cli_name} would not keep {first.cli_name}'s zeros through "
                        f"training; quantizers that do: {', '.join(n for n in _seconds() if _keeps(n))}")
    if first.stage != "structure" or first.module_sizes is Learner.module_sizes:
        why = ("does not report the per-layer sizes a joint Budget needs yet" if first.stage == "structure"
               else "changes no structure")
        raise UserError(f"--learner {name}: {first.cli_name} cannot come first ({why}); the first part is one "
                        f"of: {', '.join(_firsts())}")
    extra = {"first_config": first.section, "second_config": second.section}
    extra.update({f"first.{k}": s for k, s in first.extra_sections.items()})
    extra.update({f"second.{k}": s for k, s in second.extra_sections.items()})
    # a sparsifier's kernels run dense: BitOps hardly move with it, bytes do (Deep Compression's measure)
    resources = ("bytes", "bitops") if first.sparse else ("bitops", "bytes")
    if "latency" in first.resources:  # A's latency table, timed as B's model is deployed
        resources = (*resources, "latency")
    attrs = {"parts": (first, second), "cli_name": name, "resources": resources,
             "extra_sections": {k: s for k, s in extra.items() if s},
             "policy_name": f"{first.policy_name} / {second.policy_name}",
             "__doc__": f"{first.cli_name} then {second.cli_name}, searched jointly under one budget",
             "__module__": __name__}
    return type(f"Composite[{name}]", (CompositeLearner,), attrs)


class CompositeLearner(Learner):
    """Base of the classes :func:`compose` builds: ``parts`` = (A, B)."""

    parts: ClassVar[tuple[type[Learner], type[Learner]]]
    resources = ("bitops", "bytes")

    def __init__(self, *, first_config: Any = None, second_config: Any = None, resource: str = "auto",
                 **kwargs: Any) -> None:
        own = {k: v for k, v in kwargs.items() if "." not in k and k != "config"}  # the pipeline's config=None
        super().__init__(resource=resource, **own)
        a, b = self.parts
        a_extra = {k.split(".", 1)[1]: v for k, v in kwargs.items() if k.startswith("first.")}
        b_extra = {k.split(".", 1)[1]: v for k, v in kwargs.items() if k.startswith("second.")}
        self.first = a(config=first_config, **own, **a_extra)
        self.second = b(config=second_config, **own, **b_extra)
        if self.resource == "latency" and self.second.int8_deploy():
            self.first.latency_runtime = INT8_RUNTIME  # every layer timed as model.int8.onnx runs it
        self._macs: dict[str, int] = {}
        self._weights: dict[str, int] = {}
        self._split = 0
        self._model: nn.Module | None = None
        self._qnames: list[str] = []

    @classmethod
    def quick_parts(cls) -> dict[str, Any]:
        """Each part's quick options (tests, smoke runs) as the constructor's ``first_config`` / ``second_config``."""
        out = {}
        for key, part in zip(("first_config", "second_config"), cls.parts):
            if part.quick_options():
                out[key] = dataclasses.replace(part.Config(), **part.quick_options())
        return out

    # -- the contract --------------------------------------------------------------------------
    def prepare(self, model: nn.Module, data: DataBundle) -> None:
        """Both parts' :meth:`prepare` on the original model, and each Conv2d / Linear's MACs and weights."""
        super().prepare(model, data)
        self.first.prepare(model, data)
        self.second.prepare(model, data)
        self._macs = layer_macs(model, data.example())
        self._weights = {n: int(m.weight.numel()) for n, m in weight_layers(model)}

    def search_space(self, model: nn.Module, target: float, *, fill: bool = True) -> SearchSpace:
        """A's layers then B's, renamed ``A:<layer>`` / ``B:<layer>``; a Budget on the joint resource."""
        sa = self.first.search_space(model, 1.0, fill=fill)
        sb = self.second.search_space(model, 1.0, fill=fill)
        a, b = self.parts
        layers = [dataclasses.replace(lay, name=f"{a.cli_name}:{lay.name}") for lay in sa.layers]
        layers += [dataclasses.replace(lay, name=f"{b.cli_name}:{lay.name}") for lay in sb.layers]
        self._split, self._model, self._qnames = len(sa.layers), model, list(sb.names)
        cost, full = self._joint_cost(model, self.resource)
        lows, highs = np.array([lay.low for lay in layers]), np.array([lay.high for lay in layers])
        # under a latency table B's values cost nothing (an int8 kernel runs 2-bit and 8-bit weights alike; a
        # codebook runs in float): the projection leaves them alone and the uniform policy keeps them at the top
        inert = np.arange(len(layers)) >= self._split if self.resource == "latency" else np.zeros(len(layers), bool)

        def path(t: float) -> list[float]:  # every (costing) value the same fraction t of its range
            return list(np.where(inert, highs, lows + t * (highs - lows)))

        budget = Budget(cost_fn=cost, full=full, target=target, lows=lows, highs=highs,
                        steps=[lay.step for lay in layers], fill=fill, unit=self.resource, uniform_path=path,
                        inert=inert)
        meta = {"resource": self.resource, "measure": self.resource, "split": self._split,
                **({"latency": dict(self.first.latency_model().meta)} if self.resource == "latency" else {}),
                "policy": f"{a.cli_name}: {sa.meta.get('policy', a.policy_name)}; then {b.cli_name}: "
                          f"{sb.meta.get('policy', b.policy_name)}",
                "activation_bits": self.second.activation_bits(), "parts": [sa.meta, sb.meta]}
        return SearchSpace(layers, budget, meta=meta)

    def _joint_cost(self, model: nn.Module, unit: str) -> tuple[Any, float]:
        """(cost of a whole policy, the fp32 network's) in BitOps, bytes or seconds (A's latency table, timed
        in ONNX Runtime int8 when B ships ``model.int8.onnx``: then against the unpruned fp32 model's time)."""
        if unit == "latency":
            lat = self.first.latency_model()
            return (lambda policy: lat.predict(policy[: self._split])), float(lat.meta.get("fp32_full", lat.full))
        qnames, abits = self._qnames, self.second.activation_bits()
        params = float(sum(p.numel() for p in model.parameters()))

        def cost(policy: Policy) -> float:
            pa, pb = policy[: self._split], policy[self._split:]
            sizes, total = self.first.module_sizes(model, pa)
            bits = [float(int(np.floor(v + 0.5))) for v in pb]
            if unit == "bitops":
                return float(sum(sizes.get(n, (self._macs.get(n, 0), 0))[0] * w * abits for n, w in zip(qnames, bits)))
            rows = [sizes.get(n, (0.0, float(self._weights[n]))) for n in qnames]
            weights = [r[1] for r in rows]
            positions = sum(r[2] if len(r) > 2 else 0.0 for r in rows)  # a sparse layer's bitmask
            return float(sum(k * w for k, w in zip(weights, bits)) + positions + FP * (total - sum(weights))) / 8

        full = float(sum(self._macs.get(n, 0) for n in qnames)) * FP * FP if unit == "bitops" else FP * params / 8
        return cost, full

    def split(self, policy: Policy) -> tuple[Policy, Policy]:
        if not self._split:
            raise RuntimeError("call search_space() before compress(): it fixes where A's decisions end")
        return list(policy[: self._split]), list(policy[self._split:])

    def compress(self, model: nn.Module, policy: Policy) -> nn.Module:
        """A's compress, then B's on its result; A's record rides on the new module."""
        pa, pb = self.split(policy)
        mid = self.first.compress(model, pa)
        record = self.first.arch_state(mid)
        out = self.second.compress(mid, pb)
        setattr(out, FIRST_ARCH, record)
        return out

    # -- training and deployment: the second part's rules ----------------------------------------
    def finetune(self, model: nn.Module, *, teacher: nn.Module | None, steps: int) -> dict[str, float]:
        return self.second.finetune(model, teacher=teacher, steps=steps)

    def retrain(self, model: nn.Module, *, teacher: nn.Module | None, epochs: int, lr: float | None = None,
                on_epoch: Any = None) -> list[dict[str, float]]:
        return self.second.retrain(model, teacher=teacher, epochs=epochs, lr=lr, on_epoch=on_epoch)

    def after_step(self, model: nn.Module) -> None:
        self.second.after_step(model)

    def activation_bits(self) -> int:
        return self.second.activation_bits()

    def export(self, model: nn.Module, run_dir: Any, example: Tensor) -> dict[str, Any]:
        return self.second.export(model, run_dir, example)

    def onnx_float_model(self, model: nn.Module) -> nn.Module:
        return self.second.onnx_float_model(model)

    def deploy(self, model: nn.Module, fp32_onnx: Any, data: DataBundle, run_dir: Any, *,
               repeats: int = 20) -> dict[str, Any]:
        return self.second.deploy(model, fp32_onnx, data, run_dir, repeats=repeats)

    def measured_options(self) -> dict[str, Any]:
        return {p.cli_name: p.measured_options() for p in (self.first, self.second) if p.measured_options()}

    def summary_fields(self, policy: Policy, summary: dict[str, Any]) -> dict[str, Any]:
        """Both parts' fields, and the final policy's joint resources (BitOps and bytes, fractions of fp32)."""
        pa, pb = self.split(policy)
        out = {**self.first.summary_fields(pa, summary), **self.second.summary_fields(pb, summary)}
        out["joint"] = {"resource": self.resource, "parts": [p.cli_name for p in self.parts],
                        "activation_bits": self.second.activation_bits(), **self.joint_fractions(policy)}
        if self.resource == "latency":
            out["joint"]["latency_prediction"] = self.latency_prediction(pa, summary)
        return out

    def latency_prediction(self, pa: Policy, summary: dict[str, Any]) -> dict[str, Any]:
        """The table's prediction for A's final policy beside what the shipped model measures at batch 1:
        ``model.int8.onnx`` when B ships one, else ``model.onnx`` (None when not exported)."""
        pred = self.first.latency_summary(pa)
        lat = self.first.latency_model()
        pred["fp32_full_ms"] = 1e3 * float(lat.meta.get("fp32_full", lat.full))
        pred["predicted_fraction"] = pred["predicted_ms"] / pred["fp32_full_ms"]
        key = "int8" if pred["runtime"] == INT8_RUNTIME else "onnx"
        pred["measured_ms_b1"] = summary.get(key, {}).get("latency_ms_b1")
        pred["measured_file"] = "model.int8.onnx" if key == "int8" else "model.onnx"
        if pred["measured_ms_b1"] and pred["batch"] == 1:
            pred["prediction_error"] = pred["predicted_ms"] / pred["measured_ms_b1"] - 1
        return pred

    def joint_fractions(self, policy: Policy) -> dict[str, float]:
        """The policy's BitOps and bytes as fractions of the fp32 network's (whatever ``--resource`` is)."""
        assert self._model is not None, "call search_space() first"
        out = {}
        for unit in [u for u in self.resources if u != "latency" or self.resource == "latency"]:
            cost, full = self._joint_cost(self._model, unit)
            out[f"{unit}_fraction"] = cost(list(policy)) / full
        return out

    # -- checkpoint record -------------------------------------------------------------------------
    def arch_state(self, model: nn.Module) -> dict[str, Any]:
        """``{"version", "parts": [{"learner": A, "arch": ...}, {"learner": B, "arch": ...}]}``."""
        a, b = self.parts
        first = getattr(model, FIRST_ARCH, None)
        if first is None:
            first = self.first.arch_state(model)
        return {"version": ARCH_VERSION, "parts": [{"learner": a.cli_name, "arch": copy.deepcopy(first)},
                                                   {"learner": b.cli_name, "arch": self.second.arch_state(model)}]}

    @classmethod
    def rebuild(cls, model: nn.Module, arch: dict[str, Any]) -> nn.Module:
        """A's record replayed on a fresh ``model``, then B's on the result."""
        if not arch:
            return model
        if arch.get("version") != ARCH_VERSION:
            raise UserError(f"unsupported composite record version {arch.get('version')!r} (expected {ARCH_VERSION})")
        parts = arch.get("parts") or []
        names = [p.get("learner") for p in parts]
        if names != [p.cli_name for p in cls.parts]:
            raise UserError(f"this record chains {'+'.join(map(str, names))}, not {cls.cli_name}")
        mid = cls.parts[0].rebuild(model, parts[0]["arch"])
        out = cls.parts[1].rebuild(mid, parts[1]["arch"])
        setattr(out, FIRST_ARCH, copy.deepcopy(parts[0]["arch"]))
        return out
