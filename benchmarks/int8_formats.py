#!/usr/bin/env python
"""ONNX Runtime int8 formats against fp32 on this CPU: accuracy, latency, size (post-training, no QAT).

One process: the data and the baseline (default: the shipped ``benchmarks/resnet20-fashion-mnist.pt``) are
loaded once, the baseline is exported to fp32 ONNX (``torchpocket.export.export_onnx``), and each int8
format is made from that file by ONNX Runtime's static post-training quantizer (``quant_pre_process``, then
``quantize_static``: MinMax ranges on the same ``--calib-images`` training images, weights per channel):

* ``qdq-u8s8``: QDQ graph, uint8 activations, int8 weights (ORT's recommended CPU default);
* ``qdq-u8s8-reduce``: the same with ``reduce_range`` (7-bit weights, so that the u8s8 kernels of AVX2 CPUs
  without VNNI cannot overflow their 16-bit intermediate sums);
* ``qdq-s8s8``: int8 activations and weights; ``qdq-u8u8``: uint8 activations and weights;
* ``qop-u8s8``, ``qop-u8s8-reduce``: the QOperator form (QLinearConv etc. written out, no QDQ pairs);
* ``tp-qdq-u8s8-reduce``, ``tp-qdq-u8s8``: torchpocket's own path, no QAT: ``uniform-quant --bits 8``
  prepared and compressed on the baseline (activation ranges calibrated on the same training images),
  written by ``torchpocket.export.export_int8_onnx`` (QDQ carrying torchpocket's scales, batch-norm folded
  into per-channel weight scales), with ``--reduce-range on`` (7-bit weights) and ``off`` (full 8-bit);
* ``tp-qdq-u8s8-reduce-fp32first``, ``tp-qdq-u8s8-fp32first``: the same two with the first convolution in fp32
  (``torchpocket.export.float_first_conv``, what ``--int8-first-layer fp32`` ships).

For each: test accuracy through ONNX Runtime (first ``--test-images`` test images, 0 = the whole split),
latency at each ``--batch-sizes`` (all sessions open at once; ``--rounds`` rounds, each timing every model in
turn with the order rotating by one per round; a timing is the mean of ``--runs`` runs at batch 1 and of
``max(3, ceil(runs / batch))`` runs at larger batches; the median over rounds is reported), speed-up against
fp32 at the same batch, and file size. Then ``--profile`` (default ``tp-qdq-u8s8-reduce``) against fp32,
convolution by convolution: ONNX Runtime's own profiler, kernel time per node at the largest batch size,
summed per convolution shape; this shows which layers the int8 kernels speed up and by how much.

Regenerates the table (about 2-4 min on the idle 2-core development machine, several times that under load):

    python benchmarks/int8_formats.py --threads 2 --out benchmarks/int8_formats.md

Smoke test (well under a minute): ``python benchmarks/int8_formats.py --threads 1 --rounds 2 --test-images 500
--calib-images 128``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from _common import command_line, emit, flag_line, main_guard, md_table, short_path
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process, quantize_static
from torch import nn

from torchpocket.config import default_config, validate
from torchpocket.datasets import DataBundle
from torchpocket.errors import UserError
from torchpocket.export import (
    INPUT_NAME,
    export_int8_onnx,
    export_onnx,
    file_size,
    float_first_conv,
    onnx_predict,
    onnx_session,
)
from torchpocket.learners._quant import quant_layers
from torchpocket.pipeline import load_data, make_learner, resolve_baseline
from torchpocket.utils import machine_description, seed_everything

FP32 = "fp32"
U8, S8 = QuantType.QUInt8, QuantType.QInt8
QDQ, QOP = QuantFormat.QDQ, QuantFormat.QOperator

# name -> quantize_static options (ONNX Runtime's quantizer, on the fp32 export)
ORT_FORMATS: dict[str, dict[str, Any]] = {
    "qdq-u8s8": {"quant_format": QDQ, "activation_type": U8, "weight_type": S8},
    "qdq-u8s8-reduce": {"quant_format": QDQ, "activation_type": U8, "weight_type": S8, "reduce_range": True},
    "qdq-s8s8": {"quant_format": QDQ, "activation_type": S8, "weight_type": S8},
    "qdq-u8u8": {"quant_format": QDQ, "activation_type": U8, "weight_type": U8},
    "qop-u8s8": {"quant_format": QOP, "activation_type": U8, "weight_type": S8},
    "qop-u8s8-reduce": {"quant_format": QOP, "activation_type": U8, "weight_type": S8, "reduce_range": True},
}
# name -> (uniform-quant's --reduce-range, the first convolution in fp32?): torchpocket's own export of the
# calibrated 8-bit model, with --int8-first-layer int8 or fp32
TP_FORMATS: dict[str, tuple[str, bool]] = {"tp-qdq-u8s8-reduce": ("on", False), "tp-qdq-u8s8": ("off", False),
                                           "tp-qdq-u8s8-reduce-fp32first": ("on", True),
                                           "tp-qdq-u8s8-fp32first": ("off", True)}
FORMATS = (*ORT_FORMATS, *TP_FORMATS)

LABELS = {
    FP32: "fp32 (`export_onnx`)",
    "qdq-u8s8": "ORT QDQ, u8 act / s8 weights",
    "qdq-u8s8-reduce": "ORT QDQ, u8 / s8, 7-bit weights",
    "qdq-s8s8": "ORT QDQ, s8 act / s8 weights",
    "qdq-u8u8": "ORT QDQ, u8 act / u8 weights",
    "qop-u8s8": "ORT QOperator, u8 / s8",
    "qop-u8s8-reduce": "ORT QOperator, u8 / s8, 7-bit weights",
    "tp-qdq-u8s8-reduce": "torchpocket `uniform-quant --bits 8 --reduce-range on --int8-first-layer int8`",
    "tp-qdq-u8s8": "torchpocket `uniform-quant --bits 8 --reduce-range off --int8-first-layer int8`",
    "tp-qdq-u8s8-reduce-fp32first": "torchpocket `--reduce-range on --int8-first-layer fp32`",
    "tp-qdq-u8s8-fp32first": "torchpocket `--reduce-range off --int8-first-layer fp32`",
}


# ----------------------------------------------------------------------------- data


def calibration_batches(data: DataBundle, images: int, batch: int) -> list[torch.Tensor]:
    """The first ``images`` training images (no augmentation, in order) in batches of ``batch``, exactly the
    batches ``uniform-quant``'s ``prepare`` keeps with ``--batch-size batch --quant-calib-batches images / batch``."""
    out: list[torch.Tensor] = []
    for x, _ in data.loader("train", batch_size=batch):
        if len(out) * batch >= images:
            break
        out.append(x)
    return out


def test_arrays(data: DataBundle, images: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``images`` test images (0 = all) as float32 / int64 arrays."""
    xs, ys, n = [], [], 0
    for x, y in data.loader("test", batch_size=500):
        xs.append(x.numpy().astype(np.float32))
        ys.append(y.numpy())
        n += len(y)
        if images and n >= images:
            break
    x, y = np.concatenate(xs), np.concatenate(ys)
    return (x[:images], y[:images]) if images else (x, y)


def torch_top1(model: nn.Module, x: np.ndarray, batch: int = 500) -> np.ndarray:
    """Top-1 classes of a PyTorch model (eval mode, CPU) on ``x``, in batches."""
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(x[i:i + batch])).argmax(1).numpy()
                               for i in range(0, len(x), batch)])


class _Reader(CalibrationDataReader):
    """Feeds the calibration batches to ``quantize_static`` (restartable: a fresh reader per format)."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self._it = iter([{INPUT_NAME: b.numpy().astype(np.float32)} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


# ----------------------------------------------------------------------------- models


def ort_int8(pre: Path, path: Path, batches: list[torch.Tensor], options: dict[str, Any]) -> Path:
    quantize_static(str(pre), str(path), _Reader(batches), per_channel=True, **options)
    return path


def tp_int8(base: nn.Module, data: DataBundle, args: argparse.Namespace, *, reduce_range: str, first_fp32: bool,
            n_batches: int, path: Path, shape: tuple[int, int, int]) -> tuple[Path, nn.Module]:
    """``uniform-quant --bits 8`` on the baseline: prepare (keeps the calibration batches), compress (fake-quant
    copy, activation ranges calibrated), then the int8 QDQ export (``first_fp32``: its first convolution in fp32,
    :func:`~torchpocket.export.float_first_conv`). Returns the file and the fake-quant model."""
    cfg = default_config()
    cfg["run"].update(learner="uniform-quant", hpo="none", net=args.net, dataset=args.dataset, init=args.init,
                      device="cpu", quiet=True, threads=args.threads, seed=0)
    cfg["data"]["data_dir"] = args.data_dir
    cfg["train"]["batch_size"] = args.calib_batch
    cfg["quant"].update(bits=8, reduce_range=reduce_range, calib_batches=n_batches)
    validate(cfg)
    learner = make_learner(cfg, torch.device("cpu"))
    learner.prepare(base, data)
    seed_everything(0)
    q = learner.compress(base, [8.0] * len(quant_layers(base))).eval()
    export_int8_onnx(q, path, shape)
    if first_fp32 and float_first_conv(path, path) is None:
        raise UserError(f"{args.net}: the int8 graph does not start with a quantized convolution on the input")
    return path, q


# ----------------------------------------------------------------------------- latency


def runs_at(batch: int, runs: int) -> int:
    return runs if batch == 1 else max(3, math.ceil(runs / batch))


def latencies(sessions: dict[str, Any], x: np.ndarray, *, rounds: int, runs: int, warmup: int = 5) -> dict[str, float]:
    """Median over ``rounds`` of the mean seconds per run; every round times each model once, in an order that
    rotates by one model per round (so no model always runs first, or right after the same neighbour)."""
    feed = {INPUT_NAME: x}
    names = list(sessions)
    for name in names:
        for _ in range(warmup):
            sessions[name].run(None, feed)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            s = sessions[name]
            t0 = time.perf_counter()
            for _ in range(runs):
                s.run(None, feed)
            times[name].append((time.perf_counter() - t0) / runs)
    return {n: statistics.median(t) for n, t in times.items()}


# ----------------------------------------------------------------------------- per-layer profile


def _conv_events(path: Path, x: np.ndarray, runs: int, threads: int, prefix: Path) -> list[tuple[tuple, float]]:
    """ONNX Runtime's own profile of one model: per convolution kernel, in execution order, ``(key, median
    seconds)`` with ``key = (in C, H, W, out C, H, W, kernel)`` read from the kernel's tensor shapes (fp32
    kernels run NCHW / NCHWc, integer ones NHWC: both are mapped to C, H, W) and, for integer kernels whose
    weights are pre-packed, from the optimized graph's weight initializer."""
    import onnx
    from onnx import numpy_helper

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
    opts.enable_profiling, opts.profile_file_prefix = True, str(prefix)
    opts.optimized_model_filepath = str(prefix) + ".optimized.onnx"
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    graph = onnx.load(opts.optimized_model_filepath).graph
    shapes = {i.name: numpy_helper.to_array(i).shape for i in graph.initializer}
    kernel = {n.name: shapes.get(n.input[3], (0, 0, 0))[-1] for n in graph.node if n.op_type == "QLinearConv"}
    for _ in range(runs + 2):
        sess.run(None, {INPUT_NAME: x})
    events = json.loads(Path(sess.end_profiling()).read_text())
    per: dict[str, list[float]] = {}
    meta: dict[str, tuple] = {}
    for e in events:
        a = e.get("args", {})
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or "Conv" not in a.get("op_name", ""):
            continue
        ins = [next(iter(t.values())) for t in a["input_type_shape"]]
        o = next(iter(a["output_type_shape"][0].values()))
        node = e["name"][: -len("_kernel_time")]
        if a["op_name"] == "QLinearConv":
            key = (ins[0][3], ins[0][1], ins[0][2], o[3], o[1], o[2], kernel.get(node, 0))
        else:
            key = (ins[0][1], ins[0][2], ins[0][3], o[1], o[2], o[3], ins[1][-1])
        per.setdefault(node, []).append(e["dur"] * 1e-6)
        meta[node] = key
    return [(meta[n], statistics.median(t[2:])) for n, t in per.items()]


def layer_profile(paths: dict[str, Path], x: np.ndarray, *, runs: int, threads: int, tmp: Path
                  ) -> list[list[Any]]:
    """fp32 vs int8, convolution by convolution, summed per (input, output, kernel) shape."""
    groups: list[dict[tuple, list[float]]] = []
    for name, path in paths.items():
        g: dict[tuple, list[float]] = {}
        for key, sec in _conv_events(path, x, runs, threads, tmp / f"profile-{name}"):
            g.setdefault(key, []).append(sec)
        groups.append(g)
    fp, q = groups
    rows = []
    for key, t32 in fp.items():
        t8 = q.get(key, [])
        if len(t8) != len(t32):
            continue
        cin, h, w, cout, ho, wo, k = key
        rows.append([f"{cin}x{h}x{w} -> {cout}x{ho}x{wo}, {k}x{k}", f"{len(t32)}", f"{1e3 * sum(t32):.2f}",
                     f"{1e3 * sum(t8):.2f}", f"{sum(t32) / sum(t8):.2f}x"])
    a, b = sum(map(sum, fp.values())), sum(map(sum, q.values()))
    rows.append(["all convolutions", f"{sum(map(len, fp.values()))}", f"{1e3 * a:.2f}", f"{1e3 * b:.2f}",
                 f"{a / b:.2f}x"])
    return rows


# ----------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--net", default="resnet20", help="network (default: %(default)s)")
    ap.add_argument("--dataset", default="fashion-mnist", help="dataset (default: %(default)s)")
    ap.add_argument("--data-dir", default=None, help="folder with the dataset files (default: the usual places)")
    ap.add_argument("--init", default=None,
                    help="fp32 checkpoint (default: the shipped benchmarks/<net>-<dataset>.pt, else a cached or "
                         "newly trained baseline, as run.py does)")
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS, metavar="NAME",
                    help=f"int8 formats, in table order, beside fp32 (default: all: {' '.join(FORMATS)})")
    ap.add_argument("--calib-images", type=int, default=512,
                    help="training images that set the activation ranges, rounded up to whole --calib-batch "
                         "batches (default: %(default)s)")
    ap.add_argument("--calib-batch", type=int, default=128, help="calibration batch size (default: %(default)s)")
    ap.add_argument("--test-images", type=int, default=0,
                    help="first N test images for accuracy (0 = the whole test split; default: %(default)s)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64],
                    help="latency batch sizes (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=20,
                    help="latency rounds; each times every model once, order rotating (default: %(default)s)")
    ap.add_argument("--runs", type=int, default=20,
                    help="runs per timing at batch 1; larger batches max(3, ceil(runs / batch)) (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads and ONNX Runtime intra-op threads (0 = torch's default)")
    ap.add_argument("--profile", default="tp-qdq-u8s8-reduce", metavar="NAME",
                    help="int8 format profiled convolution by convolution against fp32 with ONNX Runtime's "
                         "profiler, at the largest --batch-sizes ('none' = skip; default: %(default)s)")
    ap.add_argument("--profile-runs", type=int, default=20, help="profiled runs per model (default: %(default)s)")
    ap.add_argument("--out", default=None, help="markdown file for the table (it is printed too)")
    args = ap.parse_args()
    if args.profile != "none" and args.profile not in args.formats:
        raise UserError(f"--profile must be one of --formats or none, got {args.profile!r}")
    for flag in ("calib_images", "calib_batch", "rounds", "runs", "profile_runs"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    for flag in ("test_images", "threads"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag.replace('_', '-')} must not be negative, got {getattr(args, flag)}")
    if any(b < 1 for b in args.batch_sizes):
        raise UserError(f"--batch-sizes must be at least 1, got {args.batch_sizes}")
    if len(set(args.formats)) != len(args.formats):
        raise UserError(f"--formats lists a name twice: {' '.join(args.formats)}")
    return args


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    cfg = default_config()
    cfg["run"].update(net=args.net, dataset=args.dataset, init=args.init, device="cpu", quiet=True,
                      threads=args.threads)
    cfg["data"]["data_dir"] = args.data_dir
    validate(cfg)
    seed_everything(0)
    data = load_data(cfg)
    base, info = resolve_baseline(cfg, data, torch.device("cpu"))  # may rename run.net after --init
    args.net = cfg["run"]["net"]
    base = base.cpu().eval().to(memory_format=torch.contiguous_format)
    shape = (data.in_channels, data.image_size, data.image_size)
    calib = calibration_batches(data, args.calib_images, args.calib_batch)
    n_calib = sum(len(b) for b in calib)
    tx, ty = test_arrays(data, args.test_images)
    base_acc = 100.0 * float((torch_top1(base, tx) == ty).mean())

    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="torchpocket-int8-") as d:
        tmp = Path(d)
        paths: dict[str, Path] = {FP32: export_onnx(base, tmp / "fp32.onnx", shape)}
        if any(f in ORT_FORMATS for f in args.formats):
            quant_pre_process(str(paths[FP32]), str(tmp / "fp32.pre.onnx"))
        fake: dict[str, nn.Module] = {}
        for name in args.formats:
            t0 = time.perf_counter()
            if name in ORT_FORMATS:
                paths[name] = ort_int8(tmp / "fp32.pre.onnx", tmp / f"{name}.onnx", calib, ORT_FORMATS[name])
            else:
                paths[name], fake[name] = tp_int8(base, data, args, reduce_range=TP_FORMATS[name][0],
                                                  first_fp32=TP_FORMATS[name][1],
                                                  n_batches=len(calib), path=tmp / f"{name}.onnx", shape=shape)
            print(f"  {name}: quantized in {time.perf_counter() - t0:.1f}s", flush=True)

        sessions = {k: onnx_session(p, threads=threads) for k, p in paths.items()}
        acc: dict[str, float] = {}
        for name, s in sessions.items():
            pred = onnx_predict(s, tx).argmax(1)
            acc[name] = 100.0 * float((pred == ty).mean())
            if name in fake:
                ref = torch_top1(fake[name], tx)
                notes.append(f"`{name}`: PyTorch fake-quant model {100.0 * float((ref == ty).mean()):.2f}%, top-1 "
                             f"agreement of the int8 ONNX model with it {100.0 * float((ref == pred).mean()):.2f}%")
            print(f"  {name}: test acc {acc[name]:.2f}%", flush=True)

        lat: dict[int, dict[str, float]] = {}
        for b in args.batch_sizes:
            x = np.ascontiguousarray(np.resize(tx, (b, *tx.shape[1:])))  # real images (repeated if b > test)
            lat[b] = latencies(sessions, x, rounds=args.rounds, runs=runs_at(b, args.runs))
            print(f"  latency batch {b}: done", flush=True)
        sizes = {k: file_size(p) for k, p in paths.items()}
        profile: list[list[Any]] = []
        if args.profile != "none":
            pb = max(args.batch_sizes)
            x = np.ascontiguousarray(np.resize(tx, (pb, *tx.shape[1:])))
            profile = layer_profile({FP32: paths[FP32], args.profile: paths[args.profile]}, x,
                                    runs=args.profile_runs, threads=threads, tmp=tmp)
            print("  layer profile: done", flush=True)

    head = ["format", "what", "test acc (%)", "vs fp32 (points)"]
    for b in args.batch_sizes:
        head += [f"b{b} ms", f"b{b} speed-up"]
    head += ["ONNX KB"]
    rows = []
    for name in paths:
        row: list[Any] = [f"`{name}`", LABELS[name], f"{acc[name]:.2f}",
                          "" if name == FP32 else f"{acc[name] - acc[FP32]:+.2f}"]
        for b in args.batch_sizes:
            row += [f"{1e3 * lat[b][name]:.3f}" if b == 1 else f"{1e3 * lat[b][name]:.2f}",
                    f"{lat[b][FP32] / lat[b][name]:.2f}x"]
        row.append(f"{sizes[name] / 1024:.0f}")
        rows.append(row)

    n_test = len(ty)
    split = f"the whole test split ({n_test} images)" if not args.test_images or n_test < args.test_images \
        else f"the first {n_test} test images"
    out = args.out
    emit("\n".join([
        "## int8 formats in ONNX Runtime vs fp32 (post-training quantization, no QAT)",
        "",
        f"- machine: {machine_description()}; {_dt.date.today().isoformat()}",
        f"- CPU flags: {flag_line()}",
        f"- command: `{command_line()}`",
        f"- ONNX Runtime {ort.__version__} (CPUExecutionProvider, intra-op threads {threads}, inter-op 1)",
        f"- baseline: {short_path(info['source'])} ({args.net} on {data.name}), PyTorch test acc {base_acc:.2f}% on "
        f"the same images; fp32 ONNX: `torchpocket.export.export_onnx` (opset 17, batch-norm folded)",
        f"- calibration: first {n_calib} training images (no augmentation), batches of {args.calib_batch}; "
        f"accuracy: {split}",
        "",
        "",
    ]), out, first=True)
    emit(md_table(head, rows, right=[False, False] + [True] * (len(head) - 2)), out, first=False)
    runs = ", ".join(f"{runs_at(b, args.runs)} at batch {b}" for b in args.batch_sizes)
    notes = [
        "ORT formats: `quant_pre_process` on the fp32 file, then `quantize_static` (MinMax, weights per channel, "
        "activations per tensor) on the calibration images; 7-bit weights = `reduce_range=True`.",
        "torchpocket formats: `uniform-quant --bits 8` prepared and compressed on the baseline with the same "
        "calibration images (per-channel symmetric weights, per-tensor uint8 activations), exported with "
        "`export_int8_onnx`; no training of any kind.",
        *notes,
        f"Latency: every session open at once, {args.rounds} rounds, each timing every model once (runs per timing: "
        f"{runs}; mean per run) with the model order rotating by one per round, after 5 warm-up runs each; "
        "median over rounds. Speed-up: fp32 ms / this format's ms at the same batch. Inputs are real test images.",
    ]
    emit("\n".join(f"- {n}" for n in notes) + "\n", out, first=False)
    if profile:
        emit(f"### Where the time goes: fp32 vs `{args.profile}`, convolution by convolution (batch "
             f"{max(args.batch_sizes)})\n", out, first=False)
        emit(md_table(["convolution (C x H x W)", "count", "fp32 ms", "int8 ms", "int8 speed-up"], profile,
                      right=[False] + [True] * 4), out, first=False)
        emit(f"- ONNX Runtime's profiler (`enable_profiling`), kernel time per node, median of {args.profile_runs} "
             "runs, summed per shape; one model profiled after the other (not interleaved). fp32 kernels run after "
             "ORT's NCHWc layout transform, with the residual add and ReLU fused in; int8 ones are QLinearConv in "
             "NHWC, residual adds are separate QLinearAdd kernels, not in these sums.\n", out, first=False)
    emit(f"- Whole benchmark: {time.perf_counter() - start:.0f}s wall.", out, first=False)


if __name__ == "__main__":
    main_guard(main)
