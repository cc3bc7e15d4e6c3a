"""``chn-pruned``: channel pruning with LASSO channel selection and least-squares reconstruction.

AMC (He et al. 2018) search on top of "Channel Pruning for Accelerating Very Deep
Neural Networks" (He et al. 2017), as in PocketFlow's ChannelPrunedLearner:

* a policy value is the **preserve ratio of a prunable layer's input channels**; the
  producer's output channels and everything coupled to them (batch norms, depthwise
  convs, other consumers, concatenations) go with them -- see :mod:`channel_graph`;
* :meth:`prepare` extracts the calibration statistics **once** from the original model
  on training batches: for every consumer layer, the second moment ``E[x x^T]`` of its
  input patches at ``points_per_layer`` random positions per image (AMC's sampled
  feature-map points). Because the consumer's original output is ``y = W x``, this one
  matrix gives both LASSO's and least squares' sufficient statistics, so a candidate
  never touches data again;
* channel selection (``select``): ``lasso`` solves He et al.'s LASSO over per-channel
  output contributions ``Z_c = W_c x_c`` (``y ~ sum_c beta_c Z_c``) along its LARS path
  (per group, computed once as far as needed and cached), and for k channels takes the
  support at the largest penalty where exactly k coefficients are non-zero (the exact
  form of PocketFlow's bisection on the penalty);
  ``l1`` ranks channels by the L1 norm of the consumer's weights on them (AMC);
  ``random`` is a seeded permutation. Channels tied by a residual addition are ranked by
  the L1 norm of every coupled layer's weights (group importance);
* ``reconstruct``: each consumer's remaining weights are re-fitted by (ridge-toward-the-
  original) least squares so its output on the calibration points is preserved;
* ``--resource latency`` (HAQ's idea, applied to channel pruning): the Budget constrains the
  latency predicted by a per-layer lookup table timed on this machine at a grid of widths
  (:class:`~torchpocket.learners._channel_latency.LatencyModel`); :meth:`predicted_latency` gives
  the prediction for any policy, to compare with the final model's measured latency;
* the cut is real: Torch-Pruning's pruning functions shrink Conv2d / BatchNorm / Linear
  layers, and the list of cuts is the architecture record that :meth:`rebuild` replays.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from torchpocket.datasets import DataBundle
from torchpocket.errors import UserError
from torchpocket.learners import register_learner
from torchpocket.learners._channel_cost import CostModel
from torchpocket.learners._channel_latency import INT8_RUNTIME, RUNTIMES, LatencyModel, build_latency_model
from torchpocket.learners._channel_round import RoundingPlan, cache_root, load_or_probe, plan_key, probe_rounding
from torchpocket.learners._importance import IMPORTANCE, Calib, Ranking
from torchpocket.learners.base import Learner
from torchpocket.learners.channel_graph import ChannelGroup, GraphInfo, apply_ops, find_channel_groups
from torchpocket.options import opt
from torchpocket.space import Budget, LayerSpec, Policy, SearchSpace
from torchpocket.utils import atomic_write_text, machine_description, progress

ARCH_ATTR = "_torchpocket_chn_arch"  # the pruning record rides on the pruned module (survives deepcopy)
_RIDGE = 1e-3  # least squares: pull toward the original weights, relative to the Gram matrix's mean diagonal
_MAX_GRAM_DIM = 8192  # consumers with more input features (kernel x channels) get no calibration statistics
_DOUBLE_DIM = 1024  # least squares in float64 up to this many unknowns per output, float32 above


@dataclass
class ChnConfig:
    """Options of ``chn-pruned`` (config section ``chn``)."""

    select: str = opt("lasso", "channel selection: LASSO on sampled feature maps (He et al. 2017), L1 weight "
                      "magnitude (AMC) or random", flag="--cp-select", choices=("lasso", "l1", "random"))
    reconstruct: bool = opt(True, "re-fit each pruned layer's consumer by least squares on the calibration points",
                            flag="--cp-reconstruct")
    channel_round: str = opt("1", "keep a multiple of this many channels in every pruned layer; auto: per layer, "
                             "the largest granule (2 to 32) that rounding up to costs no time, timed on this machine "
                             "once and kept under $TORCHPOCKET_CACHE/widths", flag="--channel-round")
    round_batch: int = opt(16, "batch size of --channel-round auto's timings", flag="--channel-round-batch",
                           positive=True)
    calib_batches: int = opt(8, "training batches (of --batch-size) whose feature maps are sampled once for "
                             "LASSO and reconstruction (AMC: 60 of 50)", flag="--calib-batches", positive=True)
    points_per_layer: int = opt(10, "random feature-map positions sampled per image and layer (AMC: 10)",
                                flag="--cp-points")
    coupled: str = opt("skip", "channels tied by residual additions: leave them alone, or prune them together "
                       "(ranked by group L1 norm)", flag="--cp-coupled", choices=("skip", "prune"))
    latency_batch: int = opt(1, "batch size of the latency lookup table's timings (--resource latency)",
                             flag="--latency-batch")
    latency_runtime: str = opt("onnxruntime", "runtime the latency lookup table is timed in: ONNX Runtime (CPU, the "
                               "runtime of model.onnx) or eager PyTorch", flag="--latency-runtime",
                               choices=RUNTIMES)
    lut_repeats: int = opt(10, "timed runs per layer and width in the latency lookup table (median, after 3 "
                           "warm-up runs)", flag="--lut-repeats")
    lut_points: int = opt(6, "widths per dimension (input, output) timed per layer in the latency lookup table, "
                          "from the narrowest allowed to the full width", flag="--lut-points")
    lut_cache: str | None = opt(None, "folder keeping latency lookup tables for later runs with the same network, "
                                "input, batch, threads, machine and table options (default: build in every run)",
                                flag="--lut-cache")
    low: float = opt(0.2, "smallest preserve ratio of a layer's input channels (AMC: 0.2)", flag="--cp-low")
    high: float = opt(1.0, "largest preserve ratio of a layer's input channels", flag="--cp-high")
    skip: list[str] | None = opt(None, "regular expressions (each a full match) of layer names to leave unpruned: "
                                 "the search never touches them; summary.json lists searched and frozen layers",
                                 flag="--cp-skip")

    @classmethod
    def check(cls, cfg: dict[str, Any]) -> None:
        import re

        parse_channel_round(cfg["chn"]["channel_round"])
        for pattern in cfg["chn"]["skip"] or []:
            try:
                re.compile(pattern)
            except re.error as e:
                raise UserError(f"--cp-skip {pattern!r} is not a regular expression: {e}") from None


def parse_channel_round(value: Any) -> int | str:
    """``--channel-round``: ``auto`` or a whole number of channels of at least 1."""
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1 or str(n) != text:
        raise UserError(f"--channel-round must be auto or a whole number of channels (at least 1), got {value!r}")
    return n


@register_learner("chn-pruned")
class ChnPrunedLearner(Learner):
    """Channel pruning (AMC / He et al. 2017): LASSO channel selection + least-squares reconstruction"""

    Config = ChnConfig
    section = "chn"
    policy_name = "preserve ratio"
    resources = ("flops", "params", "latency")
    stage = "structure"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        c = self.config
        self.channel_round = parse_channel_round(c.channel_round)
        if c.calib_batches < 1 or c.points_per_layer < 1:
            raise UserError(f"--calib-batches and --cp-points must be at least 1, got {c.calib_batches} and "
                            f"{c.points_per_layer}")
        if not 0 < c.low <= c.high <= 1:
            raise UserError(f"need 0 < --cp-low <= --cp-high <= 1, got {c.low} and {c.high}")
        if c.latency_batch < 1 or c.lut_repeats < 1:
            raise UserError(f"--latency-batch and --lut-repeats must be at least 1, got {c.latency_batch} and "
                            f"{c.lut_repeats}")
        if c.lut_points < 2:
            raise UserError(f"--lut-points must be at least 2 (the narrowest and the full width), got {c.lut_points}")
        self.info: GraphInfo | None = None
        self.cost: CostModel | None = None
        self.rounding: RoundingPlan | None = None  # --channel-round auto's measured granules
        self._calib: dict[str, Calib] = {}
        self._rankings: dict[int, Ranking] = {}  # per group, from the --cp-select importance criterion
        self._input_shape: list[int] = []
        self._example: Tensor | None = None
        self._model: nn.Module | None = None  # the prepared (original) model, for the latency table
        self._latency: LatencyModel | None = None  # built on first use, then reused
        # the runtime the table is timed in: --latency-runtime, or INT8_RUNTIME when a composite's second part
        # ships model.int8.onnx (set before prepare)
        self.latency_runtime: str = c.latency_runtime

    @classmethod
    def quick_options(cls) -> dict[str, Any]:
        """Two calibration batches, a 3 x 3 latency table timed twice per width."""
        return {"calib_batches": 2, "lut_repeats": 2, "lut_points": 3}

    # -- prepare: graph, costs and calibration, once --------------------------------------------
    def prepare(self, model: nn.Module, data: DataBundle) -> None:
        """Find the channel groups, build the exact cost model and extract calibration statistics."""
        self._prepare_graph(model, data)
        self._prepare_selection(model)

    def _prepare_graph(self, model: nn.Module, data: DataBundle) -> None:
        """The selection-independent part of :meth:`prepare`: channel groups, cost model, latency table."""
        super().prepare(model, data)
        c = self.config
        example = data.example()
        self._input_shape = list(example.shape)
        self.info = find_channel_groups(model, example, coupled=c.coupled)
        self.rounding = None
        if self.channel_round == "auto":
            self.rounding = self._rounding_plan(model, example)
            self.cost = CostModel(self.info, round_to=self.rounding.granules)
        else:
            self.cost = CostModel(self.info, round_to=self.channel_round)
        self._example, self._model, self._latency = example, model, None
        if self.resource == "latency":
            self.latency_model()

    def _prepare_selection(self, model: nn.Module) -> None:
        """What LASSO / L1 / random selection and reconstruction need: calibration statistics and rankings."""
        assert self.info is not None
        importance = IMPORTANCE[self.config.select]
        need = set()
        for g in self.info.groups:
            if self.config.reconstruct or importance.needs_calibration(g):
                need.update(g.consumers)
        self._calib = self._calibrate(model, sorted(need)) if need else {}
        self._rankings = {i: importance.ranking(model, g, i, self._calib, self.seed)
                          for i, g in enumerate(self.info.groups)}

    def _calibration_inputs(self) -> Iterator[Tensor]:
        assert self.data is not None
        bs, nb = self.train_cfg.batch_size, self.config.calib_batches
        train = self.data.train
        if hasattr(train, "x"):
            idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed + 4242))[: nb * bs]
            for i in range(0, len(idx), bs):
                yield train.x[idx[i : i + bs]]
            return
        for i, (x, _) in enumerate(self.data.loader("train", batch_size=bs, train=True, seed=self.seed)):
            if i >= nb:
                break
            yield x

    def _calibrate(self, model: nn.Module, consumers: list[str]) -> dict[str, Calib]:
        net = copy.deepcopy(model).to(self.device).eval()
        mods = dict(net.named_modules())
        points = self.config.points_per_layer
        gen = torch.Generator().manual_seed(self.seed + 99)
        acc: dict[str, list[Any]] = {}
        handles = []

        def hook(name: str) -> Any:
            def fn(mod: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
                rows = sample_rows(mod, inputs[0].detach(), out, points=points, gen=gen).float()
                a = acc.setdefault(name, [torch.zeros(rows.shape[1], rows.shape[1], device=rows.device), 0])
                a[0].addmm_(rows.T, rows)
                a[1] += rows.shape[0]
            return fn

        for name in consumers:
            m = mods[name]
            d = (m.in_channels * int(np.prod(m.kernel_size))) if isinstance(m, nn.Conv2d) else m.in_features
            if d <= _MAX_GRAM_DIM:
                handles.append(m.register_forward_hook(hook(name)))
        try:
            with torch.no_grad():
                for x in self._calibration_inputs():
                    net(x.to(self.device))
        finally:
            for h in handles:
                h.remove()
        out: dict[str, Calib] = {}
        for name, (g, n) in acc.items():
            m = mods[name]
            gram = (g / max(n, 1)).cpu()
            w = m.weight.detach().float().cpu().flatten(1)
            kk = int(np.prod(m.kernel_size)) if isinstance(m, nn.Conv2d) else 1
            out[name] = Calib(gram, gram @ w.T, w, kk, n)
        return out

    # -- selection ------------------------------------------------------------------------------
    def _keep(self, index: int, per_class: list[int]) -> list[int]:
        return self._rankings[index].keep(self.info.groups[index].classes, per_class)

    # -- the contract ---------------------------------------------------------------------------
    def _prepared(self, model: nn.Module) -> tuple[GraphInfo, CostModel]:
        if self.info is None or self.cost is None:
            raise RuntimeError("chn-pruned: call prepare(model, data) before search_space() / compress()")
        names = {n for n, _ in model.named_modules()}
        missing = [n for g in self.info.groups for n in g.consumers if n not in names]
        if missing:
            raise UserError(f"chn-pruned was prepared on another model (no layer {missing[0]!r} here)")
        return self.info, self.cost

    def search_space(self, model: nn.Module, target: float, *, fill: bool = True) -> SearchSpace:
        """One layer per prunable channel group; the Budget's cost is the pruned model's exact resource.

        ``fill=False`` gives the accuracy-guaranteed protocol (the Budget only lowers
        policies that are over the target).
        """
        info, cost = self._prepared(model)
        c, res = self.config, self.resource
        if not info.groups:
            why = "; ".join(f"{k}: {v}" for k, v in list(info.skipped.items())[:4])
            raise UserError(f"chn-pruned found no prunable channels in this model ({why})")
        mods = dict(model.named_modules())
        full_flops = cost.layer_costs([1.0] * len(info.groups), "flops")
        frozen = self.frozen_layers([g.name for g in info.groups])
        layers = []
        for i, g in enumerate(info.groups):
            geom = info.layers[g.name]
            layers.append(LayerSpec(
                name=g.name, kind=g.kind, in_channels=g.units, out_channels=geom.out0, stride=geom.stride,
                kernel=geom.kernel[0], params=int(sum(p.numel() for n in g.consumers for p in mods[n].parameters())),
                flops=int(full_flops[i]), low=c.high if g.name in frozen else c.low, high=c.high,
            ))
        meta: dict[str, Any] = {"resource": res, "skipped": dict(info.skipped),
                                "policy": "preserve ratio of each layer's input channels"}
        if self.rounding is not None:
            self._reach(target, [lay.low for lay in layers])
            cost = self.cost
        if res == "latency":
            lat = self.latency_model()
            cost_fn, layer_cost_fn, full = lat.predict, lat.layer_costs, lat.full
            meta["latency"] = dict(lat.meta)
        else:
            cost_fn = functools.partial(cost.cost, resource=res)
            layer_cost_fn = functools.partial(cost.layer_costs, resource=res)
            full = cost.cost([1.0] * len(layers), res)
        budget = Budget(cost_fn=cost_fn, full=full, target=target, lows=[lay.low for lay in layers],
                        highs=[lay.high for lay in layers], layer_cost_fn=layer_cost_fn, fill=fill, unit=res)
        return SearchSpace(layers, budget, meta=meta)

    def _reach(self, target: float, lows: list[float]) -> None:
        """``--channel-round auto``: coarse granules raise the narrowest model the search can make; where that
        puts ``target`` out of reach, cap every granule (16, 8, 4, 2, then 1) until it is reachable again."""
        assert self.rounding is not None and self.info is not None
        plan, full_policy = self.rounding, [1.0] * len(lows)
        lat = self.latency_model() if self.resource == "latency" else self._latency
        for cap in (None, 16, 8, 4, 2, 1):
            granules = [g if cap is None else min(g, cap) for g in plan.granules]
            cost = CostModel(self.info, round_to=granules)
            if lat is not None:
                lat = LatencyModel(cost, lat.entries, lat.rest, measured_full=lat.measured_full, meta=lat.meta)
            if self.resource == "latency":
                floor = lat.predict(lows) / lat.full
            else:
                floor = cost.cost(lows, self.resource) / cost.cost(full_policy, self.resource)
            if floor <= target * (1 + 1e-9):
                break
        self.cost, self._latency = cost, lat
        plan.meta["capped_at"], plan.meta["used"] = cap, granules

    def frozen_layers(self, names: list[str]) -> set[str]:
        """The layers ``--cp-skip`` leaves alone (each pattern must match at least one prunable layer)."""
        import re

        frozen: set[str] = set()
        for pattern in self.config.skip or []:
            hit = {n for n in names if re.fullmatch(pattern, n)}
            if not hit:
                shown = ", ".join(names[:12]) + (" ..." if len(names) > 12 else "")
                raise UserError(f"--cp-skip {pattern!r} matches no prunable layer (full match); they are: {shown}")
            frozen |= hit
        return frozen

    def layer_report(self) -> dict[str, Any]:
        """Which layers the search decided, which were frozen by --cp-skip, and which cannot be pruned and why."""
        names = [g.name for g in self.info.groups] if self.info else []
        frozen = self.frozen_layers(names)
        return {"searched": [n for n in names if n not in frozen], "frozen": {n: "--cp-skip" for n in sorted(frozen)},
                "not_prunable": dict(self.info.skipped) if self.info else {}}

    def _rounding_plan(self, model: nn.Module, example: Tensor) -> RoundingPlan:
        """``--channel-round auto``: each group's granule, measured here once (or read from the cache)."""
        assert self.info is not None
        c = self.config
        plain = CostModel(self.info)
        names = [g.name for g in self.info.groups]
        key = plan_key(model, list(example.shape), plain, batch=c.round_batch, low=c.low, device=str(self.device),
                       dtype=str(example.dtype), coupled=c.coupled)

        def probe() -> RoundingPlan:
            with progress(total=len(names), desc="channel-round auto: timing widths", quiet=self.quiet) as bar:
                return probe_rounding(model, example, plain, low=c.low, batch=c.round_batch, device=self.device,
                                      progress=lambda i, n: bar.update(1))

        plan = load_or_probe(cache_root() / f"round-{key}.json" if names else None, names, probe)
        if not self.quiet and names:
            where = f"read from {plan.meta['loaded_from']}" if "loaded_from" in plan.meta else \
                f"timed in {plan.meta.get('seconds', 0):.1f}s"
            shown = ", ".join(f"{g}" for g in plan.granules)
            print(f"chn-pruned: --channel-round auto ({where}): granules per layer {shown}", flush=True)
        return plan

    # -- latency ----------------------------------------------------------------------------------
    def latency_model(self) -> LatencyModel:
        """The per-layer latency lookup table of the prepared model, timed on this machine on first use."""
        if self._latency is None:
            if self.cost is None or self._model is None or self._example is None:
                raise RuntimeError("chn-pruned: call prepare(model, data) before asking for latencies")
            c = self.config
            path = Path(c.lut_cache) / f"lut-{self._lut_key()}.json" if c.lut_cache else None
            if path is not None and path.is_file():
                try:
                    self._latency = LatencyModel.from_dict(self.cost, json.loads(path.read_text()))
                except (ValueError, KeyError, TypeError) as e:
                    warnings.warn(f"ignoring the latency table {path}: {e}", stacklevel=2)
                else:
                    if not self.quiet:
                        print(f"chn-pruned: latency lookup table loaded from {path}", flush=True)
                    self._latency.meta["loaded_from"] = str(path)
                    return self._latency
            low = [c.low] * self.cost.n_groups
            narrow = None if self.latency_runtime == "eager" else self.cut_to_widths(self._model, low)
            self._latency = build_latency_model(
                self._model, self._example, self.cost, low_policy=low, batch=c.latency_batch, repeats=c.lut_repeats,
                points=c.lut_points, device=self.device, runtime=self.latency_runtime, narrow=narrow)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, json.dumps(self._latency.to_dict()))
            m = self._latency.meta
            if not self.quiet:
                print(f"chn-pruned: {m['runtime']} latency lookup table of {m['layers']} layers ({m['timings']} "
                      f"timings, batch {m['batch']}, {m['threads']} threads) built in {m['build_seconds']:.1f}s; "
                      f"predicted {1e3 * self._latency.full:.3f} ms, measured "
                      f"{1e3 * self._latency.measured_full:.3f} ms",
                      flush=True)
        return self._latency

    def _lut_key(self) -> str:
        """What the latency table depends on: network, input, machine (threads included), grid and table options."""
        assert self.info is not None and self.cost is not None
        c = self.config
        key = {"model": str(self._model), "input": self._input_shape[1:], "batch": c.latency_batch,
               "machine": machine_description(), "device": str(self.device), "repeats": c.lut_repeats,
               "runtime": self.latency_runtime,
               "points": c.lut_points, "low": c.low, "round": self.cost.round_to, "dtype": str(self._example.dtype),
               "groups": [[g.name, g.units, [len(k) for k in g.classes]] for g in self.info.groups]}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]

    def predicted_latency(self, policy: Policy) -> float:
        """Seconds per forward pass (of ``--latency-batch`` samples) of the model pruned by ``policy``,
        predicted from the lookup table (built on first use, also when ``--resource`` is not latency)."""
        return self.latency_model().predict(policy)

    def latency_summary(self, policy: Policy) -> dict[str, Any]:
        """Predicted latency of ``policy`` and of the full model, with how the table was built (for summary.json)."""
        lat = self.latency_model()
        pred = lat.predict(policy)
        return {"predicted_ms": 1e3 * pred, "predicted_full_ms": 1e3 * lat.full,
                "predicted_ratio": pred / lat.full if lat.full > 0 else float("nan"),
                "measured_full_ms_at_build": 1e3 * lat.measured_full, "batch": lat.meta["batch"],
                "threads": lat.meta["threads"], "device": lat.meta["device"],
                "runtime": lat.meta.get("runtime", "eager"), "lut_layers": lat.meta["layers"],
                "lut_timings": lat.meta["timings"], "lut_build_seconds": lat.meta["build_seconds"],
                "lut_loaded_from": lat.meta.get("loaded_from")}


    def summary_fields(self, policy: Policy, summary: dict[str, Any]) -> dict[str, Any]:
        """The layers searched / frozen / not prunable; with ``--resource latency``, the lookup table's prediction
        beside the final model's measured latency."""
        out: dict[str, Any] = {"layers": self.layer_report(), "channel_round": self.rounding_summary()}
        if self.resource != "latency":
            return out
        pred = self.latency_summary(policy)  # HAQ-style lookup table vs what the final model measures
        if pred["runtime"] == "onnxruntime":  # the shipped model.onnx, timed in ONNX Runtime (None: not exported)
            pred["measured_ms_b1"] = summary.get("onnx", {}).get("latency_ms_b1")
        elif pred["runtime"] == INT8_RUNTIME:  # a composite's model.int8.onnx
            pred["measured_ms_b1"] = summary.get("int8", {}).get("latency_ms_b1")
        else:
            pred["measured_ms_b1"] = summary["compressed"]["latency_ms_b1"]
        if pred["measured_ms_b1"] and pred["batch"] == 1:
            pred["prediction_error"] = pred["predicted_ms"] / pred["measured_ms_b1"] - 1
        print(f"latency: predicted {json.dumps(pred)}", flush=True)
        return {**out, "latency_prediction": pred}

    def measured_options(self) -> dict[str, Any]:
        """The channel granules ``--channel-round auto`` measured and the search uses."""
        return {"channel_round": self.cost.round_to} if self.rounding is not None and self.cost is not None else {}

    def rounding_summary(self) -> dict[str, Any]:
        """How channel counts were rounded: the setting, each layer's granule, the measurement behind auto."""
        if self.rounding is not None:
            return self.rounding.summary()
        names = [g.name for g in self.info.groups] if self.info else []
        return {"setting": str(self.channel_round), "per_layer": {n: self.channel_round for n in names}}

    def module_sizes(self, model: nn.Module, policy: Policy) -> tuple[dict[str, tuple[float, ...]], float]:
        """Multiply-adds and weights of every Conv2d / Linear the cost model counts, and all parameters, after
        ``policy`` (exact: the same widths the cut leaves)."""
        _, cost = self._prepared(model)
        counts = cost.counts(policy)
        cin, cout = cost.widths(counts)
        flops, _ = cost._per_module(counts)
        sizes = {name: (float(flops[i]) / 2, float(cost.pa[i] * cin[i] * cout[i]))
                 for i, (name, kind) in enumerate(zip(cost.names, cost.types))
                 if kind in ("conv", "dwconv", "gconv", "linear")}
        return sizes, cost.cost(policy, "params")

    def compress(self, model: nn.Module, policy: Policy) -> nn.Module:
        """A pruned copy of ``model``: selection, reconstruction, then the cut (``model`` is untouched)."""
        new = copy.deepcopy(model)
        mods = dict(new.named_modules())
        removed_by_group: dict[int, list[int]] = {}
        for i, g, per_class in self._plan(model, policy):
            keep = set(self._keep(i, per_class))
            removed = [u for u in range(g.units) if u not in keep]
            if self.config.reconstruct:
                for name in g.consumers:
                    if name in self._calib:
                        self._reconstruct(mods[name], g, name, removed)
            removed_by_group[i] = removed
        return self._cut(new, removed_by_group)

    def _plan(self, model: nn.Module, policy: Policy) -> list[tuple[int, ChannelGroup, list[int]]]:
        """``(group index, group, units kept per class)`` of every group ``policy`` prunes (keeps fewer than all)."""
        info, cost = self._prepared(model)
        counts = cost.counts(policy)
        out = []
        q = 0
        for i, g in enumerate(info.groups):
            per_class = [int(v) for v in counts[q : q + len(g.classes)]]
            q += len(g.classes)
            if sum(per_class) < g.units:
                out.append((i, g, per_class))
        return out

    def cut_to_widths(self, model: nn.Module, policy: Policy) -> nn.Module:
        """A copy of ``model`` with the widths ``policy`` leaves and no selection or reconstruction (the first
        units of each class kept): the shape of a candidate, for timing it."""
        removed = {}
        for i, g, per_class in self._plan(model, policy):
            keep = {u for units, k in zip(g.classes, per_class) for u in units[:k]}
            removed[i] = [u for u in range(g.units) if u not in keep]
        return self._cut(copy.deepcopy(model), removed)

    def _cut(self, new: nn.Module, removed_by_group: dict[int, list[int]]) -> nn.Module:
        """Physically remove each group's ``removed`` units from ``new`` (in place) and attach the record."""
        assert self.info is not None
        ops: list[list[Any]] = []
        for i, g in enumerate(self.info.groups):
            ops += [[n, h, idx] for n, h, idx in g.ops(removed_by_group.get(i, []))]
        apply_ops(new, ops)
        setattr(new, ARCH_ATTR, {"version": 1, "input_shape": list(self._input_shape), "ops": ops})
        return new

    def _reconstruct(self, module: nn.Module, g: ChannelGroup, name: str, removed: list[int]) -> None:
        """Least squares: the consumer's weights on its kept inputs that best reproduce its original output."""
        cal = self._calib[name]
        gone = {ch for u in removed for ch in g.consumer_member(name).unit_idxs[u]}
        n_in = cal.gram.shape[0] // cal.kk
        kept_ch = torch.tensor([ch for ch in range(n_in) if ch not in gone], dtype=torch.long)
        cols = (kept_ch[:, None] * cal.kk + torch.arange(cal.kk)).reshape(-1)
        dtype = torch.float64 if len(cols) <= _DOUBLE_DIM else torch.float32
        a = cal.gram[cols][:, cols].to(dtype)
        lam = _RIDGE * float(a.diagonal().mean()) + 1e-12
        a.diagonal().add_(lam)
        rhs = cal.gw[cols].to(dtype) + lam * cal.weight[:, cols].T.to(dtype)
        chol, info = torch.linalg.cholesky_ex(a)
        sol = torch.cholesky_solve(rhs, chol) if int(info) == 0 else torch.linalg.lstsq(a, rhs).solution
        w = cal.weight.clone()
        w[:, cols] = sol.T.float()
        with torch.no_grad():
            module.weight.copy_(w.reshape(module.weight.shape).to(module.weight))

    def arch_state(self, model: nn.Module) -> dict[str, Any]:
        """The cuts as plain data: ``{"version", "input_shape", "ops": [[module, function, removed], ...]}``."""
        arch = getattr(model, ARCH_ATTR, None)
        if arch is None:
            return {"version": 1, "input_shape": list(self._input_shape), "ops": []}
        return copy.deepcopy(arch)

    @classmethod
    def rebuild(cls, model: nn.Module, arch: dict[str, Any]) -> nn.Module:
        """Replay the recorded cuts on a freshly built, uncompressed ``model`` (same architecture as pruned)."""
        if not arch:
            return model
        if arch.get("version") != 1:
            raise UserError(f"unsupported chn-pruned record version {arch.get('version')!r} (expected 1)")
        apply_ops(model, arch.get("ops", []))
        shape = arch.get("input_shape")
        if shape and arch.get("ops"):
            was = model.training
            model.eval()
            try:
                with torch.no_grad():
                    p = next(model.parameters(), None)
                    model(torch.zeros([1, *shape[1:]], device=p.device if p is not None else "cpu"))
            except RuntimeError as e:
                raise UserError(f"the recorded channel pruning does not fit this network: {str(e)[:200]}") from None
            finally:
                model.train(was)
        setattr(model, ARCH_ATTR, copy.deepcopy(arch))
        return model


# -- numerics -------------------------------------------------------------------------------------


def sample_rows(mod: nn.Module, x: Tensor, out: Tensor, *, points: int, gen: torch.Generator) -> Tensor:
    """The layer's input at ``points`` random output positions per sample, as rows matching ``weight.flatten(1)``.

    Conv2d: the receptive-field patch (channels x kernel, padding included) behind each
    sampled output position. Linear: sampled tokens (one row per sample for 2-D input).
    """
    b = x.shape[0]
    if isinstance(mod, nn.Linear):
        x2 = x.reshape(b, -1, x.shape[-1])
        t = x2.shape[1]
        if t <= points:
            return x2.reshape(-1, x.shape[-1])
        idx = torch.rand(b, t, generator=gen).argsort(1)[:, :points].to(x.device)
        return x2[torch.arange(b, device=x.device)[:, None], idx].reshape(-1, x.shape[-1])
    assert isinstance(mod, nn.Conv2d)
    ho, wo = out.shape[-2:]
    n_pos = ho * wo
    p = min(points, n_pos)
    pos = torch.rand(b, n_pos, generator=gen).argsort(1)[:, :p].to(x.device)
    (sh, sw), (dh, dw), (kh, kw) = mod.stride, mod.dilation, mod.kernel_size
    h, w = pos // wo * sh, pos % wo * sw
    mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
    xp = F.pad(x, mod._reversed_padding_repeated_twice, mode=mode)
    bi = torch.arange(b, device=x.device)[:, None]
    cols = [xp[bi, :, h + i * dh, w + j * dw] for i in range(kh) for j in range(kw)]  # each B x P x C
    return torch.stack(cols, -1).reshape(b * p, -1)
