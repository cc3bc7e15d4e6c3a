"""The latency lookup table of a channel-pruned model: each layer timed on this machine at a grid of widths."""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from torchpocket.learners._channel_cost import CostModel
from torchpocket.utils import time_round_robin

#: activation modules timed together with the conv / norm they directly follow
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Hardtanh, nn.LeakyReLU,
                nn.Sigmoid, nn.Tanh, nn.Mish)


@dataclass
class LatencyEntry:
    """One timed layer: seconds per call over a grid of input x output widths."""

    name: str
    index: int  # position in CostModel.names
    calls: int  # times the layer runs in one forward pass
    cin: np.ndarray  # input widths timed (one point when the input width never changes)
    cout: np.ndarray  # output widths timed
    table: np.ndarray  # len(cin) x len(cout) seconds, non-decreasing along both axes
    extras: list[str]  # the norm / activation modules timed with the layer

    def at(self, cin: float, cout: float) -> float:
        """Bilinear interpolation in the table (flat outside the grid), times the number of calls."""
        i0, i1, s = _bracket(self.cin, cin)
        j0, j1, t = _bracket(self.cout, cout)
        tab = self.table
        v = (1 - s) * ((1 - t) * tab[i0, j0] + t * tab[i0, j1]) + s * ((1 - t) * tab[i1, j0] + t * tab[i1, j1])
        return self.calls * float(v)


def _bracket(grid: np.ndarray, x: float) -> tuple[int, int, float]:
    n = len(grid)
    if n == 1 or x <= grid[0]:
        return 0, 0, 0.0
    if x >= grid[-1]:
        return n - 1, n - 1, 0.0
    i = int(np.searchsorted(grid, x, side="right")) - 1
    return i, i + 1, float((x - grid[i]) / (grid[i + 1] - grid[i]))


class LatencyModel:
    """Predicted latency of a pruned model from per-layer lookup tables timed on this machine (HAQ's idea).

    Every Conv2d / Linear layer is timed alone -- a fresh layer of the same geometry, with the
    norm and activation modules that directly follow it, in eval mode under ``inference_mode``,
    on an input of its real spatial size -- at a grid of input x output widths between the
    narrowest the search can ask for and the full width (layers of fixed width: once). Tables
    are made non-decreasing along both axes (isotonic regression), so the bilinear interpolation
    is non-decreasing in every preserve ratio and the Budget's bisection stays valid. The rest
    of the forward pass (pooling, additions, functional ops, Python overhead) is a constant:
    the whole model's measured time minus the timed layers' sum at full width. Where the layers
    alone sum to more than the whole model (ONNX Runtime fuses and overlaps), every table is scaled
    down by the same factor instead (``meta["layer_scale"]``) and the rest is 0.
    """

    def __init__(self, cost: CostModel, entries: list[LatencyEntry], rest: float, *, measured_full: float,
                 meta: dict[str, Any]) -> None:
        self.cost, self.entries, self.rest = cost, entries, float(rest)
        self.measured_full, self.meta = float(measured_full), meta
        self._varying = [e for e in entries if e.table.size > 1]
        self.fixed = self.rest + sum(e.calls * float(e.table[0, 0]) for e in entries if e.table.size == 1)
        self._share = cost.share[[e.index for e in entries]] if entries else np.zeros((0, cost.n_groups))

    @property
    def full(self) -> float:
        """Predicted seconds of the unpruned model: every table at full width, plus the rest."""
        return self.rest + sum(e.calls * float(e.table[-1, -1]) for e in self.entries)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON) for an on-disk cache; :meth:`from_dict` needs the same cost model."""
        return {"version": 1, "rest": self.rest, "measured_full": self.measured_full, "meta": dict(self.meta),
                "entries": [{"name": e.name, "index": e.index, "calls": e.calls, "cin": e.cin.tolist(),
                             "cout": e.cout.tolist(), "table": e.table.tolist(), "extras": list(e.extras)}
                            for e in self.entries]}

    @classmethod
    def from_dict(cls, cost: CostModel, d: dict[str, Any]) -> LatencyModel:
        """Rebuild from :meth:`to_dict`; ValueError when it does not describe ``cost``'s layers."""
        if d.get("version") != 1:
            raise ValueError(f"unsupported latency table version {d.get('version')!r}")
        entries = []
        for r in d["entries"]:
            k, cin, cout = int(r["index"]), np.asarray(r["cin"], float), np.asarray(r["cout"], float)
            table = np.asarray(r["table"], float).reshape(len(cin), len(cout))
            if not 0 <= k < len(cost.names) or cost.names[k] != r["name"]:
                raise ValueError(f"latency table layer {r['name']!r} is not layer {k} of this model")
            if (np.diff(table, axis=0) < 0).any() or (np.diff(table, axis=1) < 0).any():
                raise ValueError(f"latency table of {r['name']!r} is not monotone")
            entries.append(LatencyEntry(r["name"], k, int(r["calls"]), cin, cout, table, list(r["extras"])))
        return cls(cost, entries, float(d["rest"]), measured_full=float(d["measured_full"]), meta=dict(d["meta"]))

    def _layer_seconds(self, policy: Sequence[float], entries: list[LatencyEntry]) -> list[float]:
        cin, cout = self.cost.widths(self.cost.counts(policy))
        return [e.at(float(cin[e.index]), float(cout[e.index])) for e in entries]

    def predict(self, policy: Sequence[float]) -> float:
        """Predicted seconds per forward pass (of the table's batch size) of the model pruned by ``policy``."""
        return self.fixed + sum(self._layer_seconds(policy, self._varying))

    def layer_costs(self, policy: Sequence[float]) -> np.ndarray:
        """Per-group share of the predicted latency (the layers each group owns, as for FLOPs)."""
        secs = np.asarray(self._layer_seconds(policy, self.entries), float)
        return secs @ self._share if len(secs) else np.zeros(self.cost.n_groups)


def _trace_layers(net: nn.Module, x: Tensor) -> dict[str, tuple[tuple[int, ...], int, list[nn.Module]]]:
    """Per Conv2d / Linear: input shape of one sample, calls per forward, the norm / activation right after it."""
    names = {m: n for n, m in net.named_modules()}
    info: dict[str, list[Any]] = {}
    after: dict[int, tuple[str, Tensor, int]] = {}  # id(output) -> (layer, output, 0 conv | 1 norm | 2 activation)

    def hook(mod: nn.Module, inputs: tuple[Any, ...], out: Any) -> None:
        if not inputs or not isinstance(inputs[0], Tensor) or not isinstance(out, Tensor):
            return
        name = names[mod]
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            rec = info.setdefault(name, [tuple(inputs[0].shape[1:]), 0, []])
            rec[1] += 1
            if rec[1] == 1:
                after[id(out)] = (name, out, 0)
            return
        src = after.get(id(inputs[0]))
        if src is None or src[1] is not inputs[0]:
            return
        owner, _, stage = src
        norm = isinstance(mod, nn.modules.batchnorm._BatchNorm)
        if (norm and stage == 0) or (not norm and stage < 2):
            info[owner][2].append(mod)
            after[id(out)] = (owner, out, 1 if norm else 2)

    handles = [m.register_forward_hook(hook) for m in net.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm, *_ACTIVATIONS))]
    try:
        with torch.inference_mode():
            net(x)
    finally:
        for h in handles:
            h.remove()
    return {k: (v[0], v[1], v[2]) for k, v in info.items()}


def _fresh_layer(src: nn.Module, kind: str, cin: int, cout: int, extras: list[nn.Module]) -> nn.Module:
    """A new layer with ``src``'s geometry at the given widths, followed by fresh copies of ``extras``."""
    layer: nn.Module
    if isinstance(src, nn.Conv2d):
        depthwise = kind == "dwconv"
        layer = nn.Conv2d(cout if depthwise else cin, cout, src.kernel_size, src.stride, src.padding, src.dilation,
                          cout if depthwise else src.groups, src.bias is not None, src.padding_mode)
    else:
        layer = nn.Linear(cin, cout, bias=src.bias is not None)
    parts = [layer]
    for m in extras:
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            parts.append(type(m)(cout, eps=m.eps, affine=m.affine, track_running_stats=m.track_running_stats))
        else:
            parts.append(copy.deepcopy(m))
    p = src.weight
    return nn.Sequential(*parts).to(device=p.device, dtype=p.dtype).eval()


RUNTIMES = ("onnxruntime", "eager")  # what --latency-runtime offers
INT8_RUNTIME = "onnxruntime-int8"  # a composite whose second part ships model.int8.onnx times its layers so


def _int8_bytes(fp32: bytes, x: Tensor) -> bytes:
    """``fp32`` (an ONNX graph of one input) quantized as ``model.int8.onnx`` is laid out: QDQ, uint8 activations
    per tensor, int8 weights per channel (ONNX Runtime's static quantizer, ranges calibrated on ``x``), the form
    ONNX Runtime fuses into QLinearConv / QGemm kernels."""
    import tempfile

    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from torchpocket.export import INPUT_NAME

    class _One(CalibrationDataReader):
        def __init__(self) -> None:
            self.left = [{INPUT_NAME: x.numpy()}]

        def get_next(self) -> dict[str, Any] | None:
            return self.left.pop() if self.left else None

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(fp32)
        prev = logging.root.manager.disable  # the quantizer logs a pre-processing hint on the root logger
        logging.disable(logging.WARNING)
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                quantize_static(src, dst, _One(), quant_format=QuantFormat.QDQ, per_channel=True,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        finally:
            logging.disable(prev)
        return dst.read_bytes()


def time_cases_onnxruntime(cases: Sequence[tuple[nn.Module, Tensor]], *, warmup: int, repeats: int,
                           threads: int | None = None, int8: bool | Sequence[bool] = False) -> list[float]:
    """Median seconds per call of each (module, input) in ONNX Runtime: each case exported as ``model.onnx`` is
    (the TorchScript exporter, opset 17, fp32, CPU), or, where ``int8`` says so (one flag, or one per case),
    quantized as ``model.int8.onnx`` is (:func:`_int8_bytes`), and run in a session of ``threads`` intra-op
    threads, timed round-robin like :func:`time_cases`."""
    import onnxruntime as ort

    from torchpocket.export import INPUT_NAME, _quiet_legacy_exporter

    flags = [bool(int8)] * len(cases) if isinstance(int8, bool) else [bool(f) for f in int8]
    if len(flags) != len(cases):
        raise ValueError(f"int8: one flag per case, got {len(flags)} for {len(cases)} cases")
    runs = {}
    # a session call costs the same small overhead at any width: timed on an identity graph and taken off each
    # case, so the table holds what the layer costs (the whole model's one overhead stays in the rest)
    cases, flags = [(nn.Identity(), torch.zeros(1)), *cases], [False, *flags]
    for i, ((m, x), q) in enumerate(zip(cases, flags)):
        buf = io.BytesIO()
        mod, xc = m.cpu().float().eval(), x.detach().cpu().float()
        with torch.no_grad(), _quiet_legacy_exporter():
            torch.onnx.export(mod, (xc,), buf, dynamo=False, opset_version=17, input_names=[INPUT_NAME])
        graph = _int8_bytes(buf.getvalue(), xc) if q else buf.getvalue()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(graph, sess_options=opts, providers=["CPUExecutionProvider"])
        runs[i] = functools.partial(sess.run, None, {INPUT_NAME: xc.numpy()})
    times = time_round_robin(runs, warmup=warmup, repeats=repeats)
    return [max(times[i] - times[0], 1e-9) for i in range(1, len(cases))]


def time_cases(cases: Sequence[tuple[nn.Module, Tensor]], *, warmup: int, repeats: int) -> list[float]:
    """Median seconds per call of each (module, input), timed round-robin (``utils.time_round_robin``)."""
    sync = (lambda: torch.cuda.synchronize()) if any(x.device.type == "cuda" for _, x in cases) else None
    with torch.inference_mode():
        times = time_round_robin({i: functools.partial(m, x) for i, (m, x) in enumerate(cases)}, warmup=warmup,
                                 repeats=repeats, sync=sync)
    return [times[i] for i in range(len(cases))]


def isotonic(y: np.ndarray) -> np.ndarray:
    """The non-decreasing sequence closest to ``y`` in least squares (``max_{j<=i} min_{k>=i} mean(y[j..k])``).

    Unlike a running maximum, one slow outlier at a narrow width does not flatten the rest.
    """
    y = np.asarray(y, float)
    n = len(y)
    c = np.concatenate([[0.0], np.cumsum(y)])
    mean = np.full((n, n), np.inf)  # mean[j, k] = mean(y[j..k]) for j <= k
    for j in range(n):
        mean[j, j:] = (c[j + 1 :] - c[j]) / np.arange(1, n - j + 1)
    out = np.array([max(float(mean[j, i:].min()) for j in range(i + 1)) for i in range(n)])
    return np.maximum.accumulate(out)  # equal block means computed two ways may differ in the last bit


def monotone_table(table: np.ndarray) -> np.ndarray:
    """Isotonic along the input-width axis, then along the output-width axis: non-decreasing along both.

    (Isotonic regression preserves order between sequences, so the second pass keeps the first's.)
    """
    t = np.apply_along_axis(isotonic, 0, np.asarray(table, float))
    return np.apply_along_axis(isotonic, 1, t)


def width_grid(low: float, full: float, points: int, reachable: np.ndarray | None = None) -> np.ndarray:
    """At most ``points`` integer widths from ``low`` to ``full``, both included.

    When the widths a policy can produce (``reachable``, e.g. multiples of the channel
    rounding) are that few, exactly those: the table is then exact, not interpolated.
    """
    lo, hi = max(1, int(round(low))), max(1, int(round(full)))
    if reachable is not None:
        r = np.unique(np.round(np.asarray(reachable, float)).astype(np.int64))
        r = r[(r >= min(lo, hi)) & (r <= hi)]
        if len(np.union1d(r, [lo, hi])) <= max(2, points):
            return np.union1d(r, [min(lo, hi), hi])
    return np.unique(np.round(np.linspace(min(lo, hi), hi, max(2, points))).astype(np.int64))


def build_latency_model(model: nn.Module, example: Tensor, cost: CostModel, *, low_policy: Sequence[float],
                        batch: int = 1, repeats: int = 10, warmup: int = 3, points: int = 6,
                        device: torch.device | str = "cpu", runtime: str = "eager",
                        narrow: nn.Module | None = None) -> LatencyModel:
    """Time every Conv2d / Linear of ``model`` (a copy, on ``device``) at its candidate widths: the lookup table.

    Widths range from those of ``low_policy`` (the narrowest the search allows) to full, at
    most ``points`` per dimension; ``batch`` samples of ``example``'s shape per call. ``runtime``:
    eager PyTorch, or ONNX Runtime on the CPU (each layer and the whole model exported as
    ``model.onnx`` is), the runtime a shipped ``model.onnx`` runs in, or ONNX Runtime int8 (``INT8_RUNTIME``:
    each layer quantized as ``model.int8.onnx`` is; ``meta["fp32_full"]`` then holds the whole fp32 model's
    time, measured in the same rounds as the int8 one).

    In ONNX Runtime the layers timed alone do not add up to the whole model (it fuses and overlaps them, and
    one session call's overhead is shared). With ``narrow`` (the model cut to ``low_policy``'s widths), the
    whole model is also timed at those widths, and the tables are scaled by the ``a`` and the rest set to the
    ``b`` of ``measured = a * sum(layers) + b`` through both whole-model measurements, so the table predicts
    the narrowest and the full model as measured (``meta["fit"]``); a fit with ``a <= 0`` or ``b < 0`` is
    dropped for the single-measurement rule below.
    """
    if runtime not in (*RUNTIMES, INT8_RUNTIME):
        raise ValueError(f"runtime must be one of {(*RUNTIMES, INT8_RUNTIME)}, got {runtime!r}")
    if runtime in ("onnxruntime", INT8_RUNTIME):
        device = "cpu"
        timer = functools.partial(time_cases_onnxruntime, warmup=warmup, repeats=repeats,
                                  int8=runtime == INT8_RUNTIME)
    else:
        timer = functools.partial(time_cases, warmup=warmup, repeats=repeats)
    start = time.perf_counter()
    net = copy.deepcopy(model).to(device).eval()
    p = next(net.parameters(), None)
    dtype = p.dtype if p is not None else torch.float32
    x1 = example[:1].to(device=device, dtype=dtype)
    trace = _trace_layers(net, x1)
    mods = dict(net.named_modules())
    low = np.asarray(low_policy, float)
    lo_in, lo_out = cost.widths(cost.counts(low))
    full_in, full_out = cost.widths(cost.counts([1.0] * cost.n_groups))
    sweep = [cost.widths(cost.counts(low + t * (1 - low))) for t in np.linspace(0, 1, 257)]  # uniform policies
    reach_in, reach_out = np.array([w[0] for w in sweep]), np.array([w[1] for w in sweep])
    gen = torch.Generator().manual_seed(0)
    entries: list[LatencyEntry] = []
    timings = 0
    for k, name in enumerate(cost.names):
        kind = cost.types[k]
        if kind not in ("conv", "dwconv", "linear") or name not in trace:
            continue
        in_shape, calls, extras = trace[name]
        if cost.m_out[k].any():
            cout = width_grid(lo_out[k], full_out[k], points, reach_out[:, k])
        else:
            cout = np.array([int(full_out[k])])
        if kind == "dwconv":
            cin = np.array([1])
        elif cost.m_in[k].any():
            cin = width_grid(lo_in[k], full_in[k], points, reach_in[:, k])
        else:
            cin = np.array([int(full_in[k])])
        table = np.zeros((len(cin), len(cout)))
        for i, ci in enumerate(cin):
            cases = []
            for co in cout:
                layer = _fresh_layer(mods[name], kind, int(ci), int(co), extras)
                if kind == "linear":
                    shape = (batch, *in_shape[:-1], int(ci))
                else:
                    shape = (batch, int(co) if kind == "dwconv" else int(ci), *in_shape[1:])
                cases.append((layer, torch.randn(shape, generator=gen).to(device=device, dtype=dtype)))
            table[i] = timer(cases)
            timings += len(cases)
        table = monotone_table(table)
        entries.append(LatencyEntry(name, k, calls, cin.astype(float), cout.astype(float), table,
                                    [n for n, m in net.named_modules() if any(m is e for e in extras)]))
    xb = torch.randn((batch, *example.shape[1:]), generator=gen).to(device=device, dtype=dtype)
    fp32_full = narrow_s = None
    cut = None if narrow is None or runtime == "eager" else copy.deepcopy(narrow).to(device).eval()
    extra = [] if cut is None else [(cut, xb)]
    if runtime == INT8_RUNTIME:  # the whole model in int8 and, in the same rounds, in fp32 (what a target is of)
        times = timer([(net, xb), (net, xb), *extra], int8=[True, False, *([True] * len(extra))])
        measured, fp32_full = times[0], times[1]
        narrow_s = times[2] if extra else None
    else:
        times = timer([(net, xb), *extra])
        measured, narrow_s = times[0], (times[1] if extra else None)
    timed = sum(e.calls * float(e.table[-1, -1]) for e in entries)
    scale, rest, fit = 1.0, max(0.0, measured - timed), None
    if narrow_s is not None:  # two whole-model measurements: measured = a * sum(layers) + b through both
        s_low = LatencyModel(cost, entries, 0.0, measured_full=measured, meta={}).predict(list(low))
        a = (measured - narrow_s) / (timed - s_low) if timed > s_low else 0.0
        b = measured - a * timed
        fit = {"narrow_measured": narrow_s, "a": a, "b": b, "used": bool(a > 0 and b >= 0)}
        if fit["used"]:
            scale, rest = a, b
    if (fit is None or not fit["used"]) and timed > measured > 0:
        # layers alone cost more than inside the model (ONNX Runtime fuses, overlaps copies): scale them down so
        # the table's full width is what the whole model measures
        scale, rest = measured / timed, 0.0
    if scale != 1.0:
        for e in entries:
            e.table = e.table * scale
    meta = {"layer_scale": scale, "batch": batch, "threads": torch.get_num_threads(),
            "device": str(torch.device(device)), "runtime": runtime,
            "repeats": repeats, "points": points, "layers": len(entries), "timings": timings,
            "build_seconds": time.perf_counter() - start}
    if fp32_full is not None:
        meta["fp32_full"] = fp32_full
    if fit is not None:
        meta["fit"] = fit
    return LatencyModel(cost, entries, rest, measured_full=measured, meta=meta)


