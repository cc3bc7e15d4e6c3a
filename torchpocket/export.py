"""Deployment files (ONNX), each checked against the PyTorch model it came from.

Exporter choice: the TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``). In torch 2.9+
the ``torch.export``-based exporter is the default, but it needs ``onnxscript`` (not a dependency of
torchpocket), takes 10-40 s per CIFAR CNN on a loaded CPU against about 1-2 s here, and cannot produce
opset 17 (it emits opset 18 and its down-conversion fails on ``Reduce*`` nodes). The TorchScript exporter
folds eval-mode BatchNorm into constants, honours ``opset`` and marks the batch axis dynamic with
``dynamic_axes``. ``dynamo=True`` stays available for models it cannot trace.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from torchpocket.profile import _eval_mode, example_input
from torchpocket.utils import time_round_robin

INPUT_NAME = "input"
OUTPUT_NAME = "output"


class ExportMismatch(AssertionError):
    """An exported model's outputs differ from the PyTorch model's beyond the tolerance."""


@contextmanager
def _quiet_legacy_exporter() -> Iterator[None]:
    with warnings.catch_warnings():
        # "You are using the legacy TorchScript-based ONNX export" / "The feature will be removed": chosen knowingly
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def export_onnx(model: nn.Module, path: str | os.PathLike, input_shape: tuple[int, ...], *, opset: int = 17,
                dynamic_batch: bool = True, dynamo: bool = False) -> Path:
    """Export ``model`` (in eval mode) to ONNX at ``path`` for inputs of ``input_shape`` (C, H, W) per sample.

    The graph has one input ``input`` and output ``output``; with ``dynamic_batch`` their first axis is
    symbolic. The file is written to a temporary name beside ``path`` and renamed, so a crash never leaves
    a truncated model. The model's train/eval flags are restored afterwards. ``dynamo=True`` uses the
    ``torch.export``-based exporter instead (needs the ``onnxscript`` package; opset 18 at least).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    x = example_input(model, input_shape, batch_size=2 if dynamic_batch else 1)
    try:
        with _eval_mode(model), torch.no_grad():
            if dynamo:
                _export_dynamo(model, x, tmp, opset=opset, dynamic_batch=dynamic_batch)
            else:
                axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
                with _quiet_legacy_exporter():
                    torch.onnx.export(model, (x,), str(tmp), dynamo=False, opset_version=opset,
                                      input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=axes,
                                      do_constant_folding=True)
        import onnx

        onnx.checker.check_model(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _export_dynamo(model: nn.Module, x: Tensor, path: Path, *, opset: int, dynamic_batch: bool) -> None:
    try:
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise RuntimeError("export_onnx(dynamo=True) needs the 'onnxscript' package (pip install onnxscript); "
                           "the default dynamo=False exporter does not") from e
    shapes: Any = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    # this exporter has no implementations below opset 18 and its down-conversion fails on CNNs
    torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=max(opset, 18), input_names=[INPUT_NAME],
                      output_names=[OUTPUT_NAME], dynamic_shapes=shapes, external_data=False, verbose=False)


def _session(path: str | os.PathLike, threads: int | None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _flat_outputs(out: Any) -> list[np.ndarray]:
    if isinstance(out, Tensor):
        return [out.detach().float().cpu().numpy()]
    if isinstance(out, (list, tuple)):
        return [a for o in out for a in _flat_outputs(o)]
    if isinstance(out, dict):
        return _flat_outputs(list(out.values()))
    return []


def check_onnx(model: nn.Module, path: str | os.PathLike, input_shape: tuple[int, ...], *, batch_size: int = 4,
               atol: float = 1e-4, rtol: float = 1e-3) -> float:
    """Run ONNX Runtime (CPU) and the PyTorch model (eval mode) on one random batch; return the max abs diff.

    Raises :class:`ExportMismatch` when an output's shape differs or some element is off by more than
    ``atol + rtol * |torch value|``. The random input comes from a private generator (global RNG untouched).
    """
    gen = torch.Generator().manual_seed(0)
    x = example_input(model, input_shape, batch_size=batch_size, generator=gen)
    with _eval_mode(model), torch.inference_mode():
        expected = _flat_outputs(model(x))
    sess = _session(path, threads=torch.get_num_threads())
    got = sess.run(None, {sess.get_inputs()[0].name: x.detach().cpu().numpy()})
    if len(got) != len(expected):
        raise ExportMismatch(f"{path}: ONNX model has {len(got)} outputs, the PyTorch model {len(expected)}")
    worst = 0.0
    for i, (g, e) in enumerate(zip(got, expected)):
        if g.shape != e.shape:
            raise ExportMismatch(f"{path}: output {i} has shape {g.shape} in ONNX Runtime, {e.shape} in PyTorch "
                                 f"(batch {batch_size})")
        diff = np.abs(g.astype(np.float64) - e.astype(np.float64))
        worst = max(worst, float(diff.max(initial=0.0)))
        excess = diff - (atol + rtol * np.abs(e))
        if not np.all(np.isfinite(diff)) or (excess > 0).any():
            raise ExportMismatch(f"{path}: output {i} differs from PyTorch by up to {diff.max():.3g} "
                                 f"(allowed atol={atol:g} + rtol={rtol:g} * |value|, batch {batch_size})")
    return worst


def onnx_latency(path: str | os.PathLike, input_shape: tuple[int, ...], *, batch_size: int = 1,
                 threads: int | None = None, warmup: int = 5, repeats: int = 20) -> float:
    """Median seconds per ONNX Runtime (CPU) run of a ``batch_size`` batch; ``threads`` = intra-op threads."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    sess = _session(path, threads=threads)
    inp = sess.get_inputs()[0]
    dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
    feed = {inp.name: np.random.default_rng(0).standard_normal((batch_size, *input_shape)).astype(dtype)}
    return time_round_robin({0: lambda: sess.run(None, feed)}, warmup=warmup, repeats=repeats)[0]


def file_size(path: str | os.PathLike) -> int:
    """Size of a file in bytes."""
    return Path(path).stat().st_size


# ----------------------------------------------------------------------------- int8 (QDQ) deployment


def export_int8_onnx(model: nn.Module, path: str | os.PathLike, input_shape: tuple[int, ...], *,
                     opset: int = 17) -> Path:
    """Write a ``uniform-quant`` model as an 8-bit ONNX QDQ graph that carries the scales it was trained with.

    The fake-quant model becomes :func:`torchpocket.learners._quant_deploy.deploy_module` (batch-norm folded into
    the per-channel weight scales), is exported with the TorchScript exporter (its fake-quant ops become
    QuantizeLinear / DequantizeLinear pairs), and :func:`finalize_qdq` stores every weight as an int8
    initializer and every bias as int32 (scale = input scale x weight scale), the form ONNX Runtime fuses
    into QLinearConv / QGemm / QLinearAdd kernels. No re-calibration: the deployed model is the trained one.
    """
    from torchpocket.learners._quant_deploy import deploy_module

    path = Path(path)
    dep = deploy_module(model)
    export_onnx(dep, path, input_shape, opset=opset)
    finalize_qdq(path)
    return path


def _np_round_half_even(x: np.ndarray) -> np.ndarray:
    return np.rint(x)  # numpy rounds half to even, as ONNX QuantizeLinear does


def finalize_qdq(path: str | os.PathLike) -> None:
    """Rewrite a QDQ ONNX file in place: constant weights through QuantizeLinear become int8 initializers
    feeding their DequantizeLinear directly, and the float bias of a Conv / Gemm whose input and weight are
    dequantized becomes an int32 initializer (scale = input scale x weight scale, zero point 0) behind its own
    DequantizeLinear. Constant-only Identity nodes are resolved first."""
    import onnx
    from onnx import helper, numpy_helper

    path = Path(path)
    m = onnx.load(str(path))
    g = m.graph
    consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    keep_nodes = []
    for node in g.node:  # Constant nodes -> initializers
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        else:
            keep_nodes.append(node)
    rename: dict[str, str] = {}
    nodes = []
    for node in keep_nodes:
        if node.op_type == "Identity" and node.input[0] in consts:
            rename[node.output[0]] = node.input[0]
            continue
        nodes.append(node)

    def src(name: str) -> str:
        while name in rename:
            name = rename[name]
        return name

    for node in nodes:
        for i, name in enumerate(node.input):
            node.input[i] = src(name)
    out_nodes = []
    for node in nodes:  # QuantizeLinear of a constant -> int8 / uint8 initializer
        if node.op_type == "QuantizeLinear" and node.input[0] in consts and node.input[1] in consts:
            x, scale = consts[node.input[0]].astype(np.float64), consts[node.input[1]].astype(np.float64)
            zp = consts[node.input[2]] if len(node.input) > 2 and node.input[2] in consts else np.zeros((), np.uint8)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * x.ndim
            if scale.ndim == 1 and x.ndim > 0:
                shape[axis] = -1
            info = np.iinfo(zp.dtype)
            q = np.clip(_np_round_half_even(x / scale.reshape(shape)) + zp.astype(np.int64).reshape(shape),
                        info.min, info.max).astype(zp.dtype)
            name = node.output[0] + "_quantized"
            consts[name] = q
            rename[node.output[0]] = name
            continue
        out_nodes.append(node)
    for node in out_nodes:
        for i, name in enumerate(node.input):
            node.input[i] = src(name)
    producer = {o: n for n in out_nodes for o in n.output}
    final_nodes = []
    for node in out_nodes:  # float bias of a quantized Conv / Gemm -> int32 behind a DequantizeLinear
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2] in consts:
            dq_x, dq_w = producer.get(node.input[0]), producer.get(node.input[1])
            if dq_x is not None and dq_w is not None and dq_x.op_type == dq_w.op_type == "DequantizeLinear" \
                    and dq_x.input[1] in consts and dq_w.input[1] in consts:
                b = consts[node.input[2]].astype(np.float64)
                bscale = (consts[dq_x.input[1]].astype(np.float64) * consts[dq_w.input[1]].astype(np.float64))
                bscale = np.broadcast_to(bscale, b.shape).astype(np.float32)
                qb = np.clip(_np_round_half_even(b / bscale.astype(np.float64)), -2**31, 2**31 - 1).astype(np.int32)
                base = node.input[2]
                consts[base + "_int32"], consts[base + "_int32_scale"] = qb, bscale
                consts[base + "_int32_zp"] = np.zeros(b.shape, np.int32)
                out = base + "_dequantized_" + (node.name or node.output[0]).replace("/", "_")
                final_nodes.append(helper.make_node("DequantizeLinear", [base + "_int32", base + "_int32_scale",
                                                                        base + "_int32_zp"], [out], axis=0))
                node.input[2] = out
        final_nodes.append(node)
    used = {i for n in final_nodes for i in n.input} | {o.name for o in g.output}
    del g.node[:]
    g.node.extend(final_nodes)
    del g.initializer[:]
    g.initializer.extend(numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items() if k in used)
    onnx.checker.check_model(m)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        onnx.save(m, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _dequantized(node: Any, consts: dict[str, np.ndarray]) -> np.ndarray | None:
    """The float value of a DequantizeLinear of constants (per-tensor or per-axis), else None."""
    if node is None or node.op_type != "DequantizeLinear" or not all(i in consts for i in node.input if i):
        return None
    x = consts[node.input[0]].astype(np.float64)
    scale = consts[node.input[1]].astype(np.float64)
    zp = consts[node.input[2]].astype(np.float64) if len(node.input) > 2 and node.input[2] else np.zeros(())
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    shape = [1] * x.ndim
    if scale.ndim == 1 and x.ndim > 0:
        shape[axis % x.ndim] = -1
    return ((x - zp.reshape(shape if zp.ndim == 1 else zp.shape)) * scale.reshape(shape)).astype(np.float32)


def float_first_conv(src: str | os.PathLike, dst: str | os.PathLike) -> str | None:
    """Write ``src`` (a QDQ graph from :func:`export_int8_onnx`) to ``dst`` with its first convolution in fp32.

    The first convolution is the one that reads the network input through its QuantizeLinear /
    DequantizeLinear pair. It becomes a float Conv on the raw input, with its weights and bias the dequantized
    int8 / int32 values (the trained codes, exactly), so ONNX Runtime runs it with its fp32 kernel; its output
    is quantized by the same QuantizeLinear as before. Returns that node's name, or None (``dst`` not written)
    when the graph does not start that way.
    """
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(src))
    g = m.graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    users: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    x = g.input[0].name
    q = users.get(x, [])
    if len(q) != 1 or q[0].op_type != "QuantizeLinear":
        return None
    dq = users.get(q[0].output[0], [])
    if len(dq) != 1 or dq[0].op_type != "DequantizeLinear":
        return None
    conv = users.get(dq[0].output[0], [])
    if len(conv) != 1 or conv[0].op_type != "Conv":
        return None
    conv = conv[0]
    w = _dequantized(producer.get(conv.input[1]), consts)
    b = _dequantized(producer.get(conv.input[2]), consts) if len(conv.input) > 2 and conv.input[2] else None
    if w is None or (len(conv.input) > 2 and conv.input[2] and b is None):
        return None
    name = (conv.name or conv.output[0]).replace("/", "_")
    g.initializer.append(numpy_helper.from_array(w, f"{name}_fp32_weight"))
    new_inputs = [x, f"{name}_fp32_weight"]
    if b is not None:
        g.initializer.append(numpy_helper.from_array(b, f"{name}_fp32_bias"))
        new_inputs.append(f"{name}_fp32_bias")
    del conv.input[:]
    conv.input.extend(new_inputs)
    while True:  # drop what nothing reads any more (the input pair, the weight and bias DequantizeLinear)
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        dead = [n for n in g.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    onnx.checker.check_model(m)
    onnx.save(m, str(dst))
    return conv.name or conv.output[0]


def onnx_session(path: str | os.PathLike, *, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session (``threads`` intra-op threads), to reuse across :func:`onnx_predict` calls."""
    return _session(path, threads=threads)


def onnx_predict(model: str | os.PathLike | Any, x: Tensor | np.ndarray, *, batch_size: int = 500,
                 threads: int | None = None) -> np.ndarray:
    """Outputs of an ONNX model (a path, or a session from :func:`onnx_session`; first output), in batches."""
    sess = model if hasattr(model, "run") else _session(model, threads=threads)
    name = sess.get_inputs()[0].name
    arr = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
    arr = arr.astype(np.float32)
    return np.concatenate([sess.run(None, {name: arr[i:i + batch_size]})[0] for i in range(0, len(arr), batch_size)])


def compare_onnx_latency(paths: dict[str, str | os.PathLike], input_shape: tuple[int, ...], *, batch_size: int,
                         threads: int | None = None, warmup: int = 3, repeats: int = 20) -> dict[str, float]:
    """Median seconds per run of each ONNX model, measured round-robin in one process (fair on a busy CPU)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    sessions = {k: _session(p, threads=threads) for k, p in paths.items()}
    feed = np.random.default_rng(0).standard_normal((batch_size, *input_shape)).astype(np.float32)
    calls = {k: functools.partial(s.run, None, {s.get_inputs()[0].name: feed}) for k, s in sessions.items()}
    return time_round_robin(calls, warmup=warmup, repeats=repeats)


INT8_MIN_AGREEMENT = 0.99  # top-1 agreement of the exported integer model with the fake-quant model


def choose_first_layer(p8: Path, fp32_onnx: Path, shape: tuple[int, ...], setting: str, *, threads: int,
                        repeats: int) -> tuple[dict[str, Any], dict[str, float] | None]:
    """Apply ``--int8-first-layer`` to ``p8`` in place. ``auto``: time fp32, int8 and int8 with an fp32 first
    convolution round-robin at batch 64 and keep the faster int8 file. Returns the record for summary.json and
    the batch-64 timings (``fp32`` / ``int8``, of the file kept) when it measured them."""
    if setting == "int8":
        return {"setting": setting, "chosen": "int8"}, None
    alt = p8.with_name(f".{p8.name}.fp32first{os.getpid()}")
    try:
        node = float_first_conv(p8, alt)
        if node is None:
            return {"setting": setting, "chosen": "int8",
                    "why": "the graph does not start with a quantized convolution on the input"}, None
        if setting == "fp32":
            os.replace(alt, p8)
            return {"setting": setting, "chosen": "fp32", "layer": node}, None
        lat = compare_onnx_latency({"fp32": fp32_onnx, "int8": p8, "fp32_first": alt}, shape, batch_size=64,
                                   threads=threads, repeats=max(3, repeats // 4))
        faster = lat["fp32_first"] < lat["int8"]
        rec = {"setting": setting, "chosen": "fp32" if faster else "int8", "layer": node,
               "measured_speedup_b64": {"int8": lat["fp32"] / lat["int8"],
                                        "fp32": lat["fp32"] / lat["fp32_first"]}}
        if faster:
            os.replace(alt, p8)
        return rec, {"fp32": lat["fp32"], "int8": lat["fp32_first" if faster else "int8"]}
    finally:
        alt.unlink(missing_ok=True)


def int8_summary(model: nn.Module, fp32_onnx: Path, data: Any, out_dir: Path, *,
                 repeats: int = 20, first_layer: str = "auto") -> dict[str, Any]:
    """Write ``model.int8.onnx`` (QDQ, the model's own scales) and put it beside the fp32 ONNX model.

    ``data`` is the run's :class:`~torchpocket.datasets.DataBundle` (its test split is read).
    ``first_layer`` (``--int8-first-layer``): the first convolution in ``int8``, in ``fp32``
    (:func:`float_first_conv`), or ``auto``: whichever runs faster at batch 64 here (:func:`choose_first_layer`).

    Test accuracy of both in ONNX Runtime, top-1 agreement of the int8 model with the PyTorch
    fake-quant model on the test split (warned below 99%), file sizes, and latency at batch 1 and 64
    measured round-robin in this process. A model that cannot be exported is reported, not fatal.
    """
    shape = data.input_shape
    threads = torch.get_num_threads()
    try:
        p8 = export_int8_onnx(model, out_dir / "model.int8.onnx", shape)
    except Exception as e:  # noqa: BLE001 - an unexportable op must not lose the finished run
        reason = " ".join(str(e).split())[:300]
        print(f"warning: int8 ONNX export skipped: {type(e).__name__}: {reason}", file=sys.stderr, flush=True)
        return {"skipped": f"{type(e).__name__}: {reason}"}
    try:
        first, lat64 = choose_first_layer(p8, fp32_onnx, shape, first_layer, threads=threads, repeats=repeats)
    except Exception as e:  # noqa: BLE001 - the rewrite is optional: the all-int8 file stands
        first, lat64 = {"setting": first_layer, "chosen": "int8", "why": f"{type(e).__name__}: {str(e)[:200]}"}, None
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    s8, s32 = onnx_session(p8, threads=threads), onnx_session(fp32_onnx, threads=threads)
    n = agree = ok8 = ok32 = 0
    for x, y in data.loader("test", batch_size=500):
        with torch.no_grad():
            ref = model(x.to(dev)).argmax(1).cpu().numpy()
        got8 = onnx_predict(s8, x).argmax(1)
        got32 = onnx_predict(s32, x).argmax(1)
        yy = y.numpy()
        n += len(yy)
        agree += int((got8 == ref).sum())
        ok8 += int((got8 == yy).sum())
        ok32 += int((got32 == yy).sum())
    lat1 = compare_onnx_latency({"fp32": fp32_onnx, "int8": p8}, shape, batch_size=1, threads=threads,
                                repeats=repeats)
    if lat64 is None:
        lat64 = compare_onnx_latency({"fp32": fp32_onnx, "int8": p8}, shape, batch_size=64, threads=threads,
                                     repeats=max(3, repeats // 4))
    out = {"path": p8.name, "format": "QDQ, uint8 activations (per tensor), int8 weights (per channel)",
           "test_acc": 100 * ok8 / max(n, 1), "fp32_onnx_test_acc": 100 * ok32 / max(n, 1),
           "agreement_with_pytorch": agree / max(n, 1), "size_bytes": file_size(p8),
           "fp32_size_bytes": file_size(fp32_onnx),
           "latency_ms_b1": 1e3 * lat1["int8"], "fp32_latency_ms_b1": 1e3 * lat1["fp32"],
           "latency_ms_b64": 1e3 * lat64["int8"], "fp32_latency_ms_b64": 1e3 * lat64["fp32"],
           "speedup_b1": lat1["fp32"] / lat1["int8"], "speedup_b64": lat64["fp32"] / lat64["int8"],
           "first_layer": first, "runtime": "onnxruntime CPU", "threads": threads}
    print(f"int8 ONNX: test acc {out['test_acc']:.2f}% (fp32 ONNX {out['fp32_onnx_test_acc']:.2f}%), top-1 "
          f"agreement with PyTorch {100 * out['agreement_with_pytorch']:.2f}%, {out['size_bytes']} bytes vs "
          f"{out['fp32_size_bytes']}, batch 64 {out['latency_ms_b64']:.2f} ms vs {out['fp32_latency_ms_b64']:.2f} "
          f"ms ({out['speedup_b64']:.2f}x; first convolution in {first['chosen']})", flush=True)
    if out["agreement_with_pytorch"] < INT8_MIN_AGREEMENT:
        print(f"warning: the int8 ONNX model agrees with the fake-quant model on only "
              f"{100 * out['agreement_with_pytorch']:.2f}% of the test images", file=sys.stderr, flush=True)
    return out
