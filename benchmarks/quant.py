#!/usr/bin/env python
"""Quantization (``uniform-quant``, ``non-uniform-quant``): 8-bit deployment, mixed precision, k-means.

Three tables, all from one process (data and baseline loaded once):

1. **fp32 vs int8** for the baseline and for its channel-pruned model (uniform policy at ``--targets``, the
   FLOPs to keep, re-trained ``--prune-retrain-epochs``): 8-bit QAT (``--bits 8``, the re-training budget,
   distilled from the fp32 model), then test accuracy, ONNX file size and latency, side by side in this
   process: ONNX Runtime fp32 vs the int8 QDQ model (``torchpocket.export.compare_onnx_latency``:
   round-robin, median) and PyTorch eager fp32 (``compare_latency``), at batch 1 and 64; plus the top-1
   agreement of the exported integer model with the PyTorch fake-quant model on the test split;
2. **uniform vs searched mixed precision** at the same average weight bits (``--avg-bits``): the uniform
   policy (every layer at b bits) and the best policy of a ``--optimizers`` search (default ddpg) under
   the Budget ``target = b / 32``, each candidate scored on the reward split after ``--ft-steps`` distilled
   QAT steps, then the same re-training budget and the test split (read once per model);
3. **non-uniform** (k-means weight sharing) at ``--nonuniform-bits``: test accuracy after centroid
   fine-tuning with the same budget, codebook file size against the fp32 weights.

README's tables (about 6 min for the int8 table, about 1 h for the three-seed mixed and k-means tables, on
the 2-core development machine with the other core busy):

    python benchmarks/quant.py --threads 1 --seeds 0 --tables int8 --channel-round 8 --retrain-epochs 1 \
        --retrain-steps 60 --prune-retrain-epochs 1 --reward-val-size 1000 --latency-repeats 30
    python benchmarks/quant.py --threads 1 --seeds 0 1 2 --tables mixed nonuniform --episodes 15 --ft-steps 20 \
        --retrain-epochs 1 --retrain-steps 60 --reward-val-size 1000

Smoke test (a minute or two): ``python benchmarks/quant.py --threads 1 --seeds 0 --episodes 2 --ft-steps 2
--retrain-epochs 1 --retrain-steps 2 --prune-retrain-epochs 0 --reward-val-size 200 --latency-repeats 3``.
"""

from __future__ import annotations

import argparse
import copy
import io
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import Bench, Run, add_common_args, emit, header, main_guard, md_table, pm, progress_line, setup
from torch import nn

from torchpocket.errors import UserError
from torchpocket.export import (
    choose_first_layer,
    compare_onnx_latency,
    export_int8_onnx,
    export_onnx,
    file_size,
    onnx_predict,
    onnx_session,
)
from torchpocket.learners._quant import quant_layers
from torchpocket.learners.non_uniform_quant import save_codebook
from torchpocket.learners.training import evaluate
from torchpocket.pipeline import make_learner
from torchpocket.profile import compare_latency, profile_model
from torchpocket.utils import seed_everything


def _config(bench: Bench, learner: str, seed: int = 0, **quant: Any) -> dict[str, Any]:
    cfg = copy.deepcopy(bench.cfg)
    cfg["run"].update(learner=learner, seed=seed)  # the learner's seed: its loaders' order, its re-training
    cfg["quant"].update(quant)
    return cfg


def _retrain(bench: Bench, learner: Any, model: nn.Module, teacher: nn.Module) -> float:
    t0 = time.perf_counter()
    if bench.args.retrain_epochs:
        learner.retrain(model, teacher=teacher, epochs=bench.args.retrain_epochs,
                        lr=bench.cfg["search"]["retrain_lr"])
    model.to(memory_format=torch.contiguous_format)
    return time.perf_counter() - t0


def _test(bench: Bench, model: nn.Module) -> float:
    return evaluate(model, bench.data.loader("test", batch_size=500), device=bench.device)


def _avg_bits(policy: list[float], sizes: list[int]) -> float:
    return sum(round(b) * n for b, n in zip(policy, sizes)) / sum(sizes)


# ----------------------------------------------------------------------------- table 1: fp32 vs int8


def pruned_model(bench: Bench, target: float, seed: int) -> nn.Module:
    """The baseline, channel-pruned with the uniform policy at ``target`` (FLOPs kept), re-trained."""
    cfg = _config(bench, "chn-pruned", seed)
    learner = make_learner(cfg, bench.device)
    learner.prepare(bench.base, bench.data)
    space = learner.search_space(bench.base, target)
    seed_everything(seed)
    model = learner.compress(bench.base, space.budget.uniform()).to(bench.device)
    if bench.args.prune_retrain_epochs:
        learner.retrain(model, teacher=bench.base, epochs=bench.args.prune_retrain_epochs,
                        lr=bench.cfg["search"]["retrain_lr"])
    model.to(memory_format=torch.contiguous_format)
    return model.eval()


def int8_rows(bench: Bench, name: str, fp: nn.Module, seed: int, tmp: Path, base_onnx: Path | None = None
              ) -> tuple[list[list[Any]], str, Path]:
    """fp32 vs int8 of ``fp``; ``base_onnx`` (the baseline's fp32 file) is timed in the same rounds, for the
    speed-up of this int8 model over the unpruned fp32 network. Returns the rows, a note, the fp32 file."""
    a = bench.args
    shape = bench.input_shape
    learner = make_learner(_config(bench, "uniform-quant", seed, bits=8), bench.device)
    learner.prepare(fp, bench.data)
    seed_everything(seed)
    q = learner.compress(fp, [8.0] * len(quant_layers(fp))).to(bench.device)
    secs = _retrain(bench, learner, q, fp)
    acc_fp, acc_fq = _test(bench, fp), _test(bench, q)
    fp_cpu, q_cpu = copy.deepcopy(fp).cpu().eval(), copy.deepcopy(q).cpu().eval()
    p32 = export_onnx(fp_cpu, tmp / f"{name}.onnx", shape)
    p8 = export_int8_onnx(q_cpu, tmp / f"{name}.int8.onnx", shape)
    first, _ = choose_first_layer(p8, p32, shape, learner.config.int8_first_layer, threads=torch.get_num_threads(),
                                  repeats=a.latency_repeats)  # what the learner's deploy ships
    n = agree = ok8 = 0
    s8 = onnx_session(p8, threads=torch.get_num_threads())
    for x, y in bench.data.loader("test", batch_size=500):
        with torch.no_grad():
            ref = q_cpu(x).argmax(1).numpy()
        got = onnx_predict(s8, x).argmax(1)
        n, agree, ok8 = n + len(y), agree + int((got == ref).sum()), ok8 + int((got == y.numpy()).sum())
    threads = torch.get_num_threads()
    models = {"fp32": p32, "int8": p8}
    if base_onnx is not None:
        models["baseline fp32"] = base_onnx
    ort = {b: compare_onnx_latency(models, shape, batch_size=b, threads=threads,
                                   repeats=a.latency_repeats) for b in (1, 64)}
    vs_base = {b: ort[b].get("baseline fp32", ort[b]["fp32"]) for b in (1, 64)}
    eager = {b: compare_latency({"fp32": fp_cpu}, shape, batch_size=b, threads=threads,
                                repeats=a.latency_repeats)["fp32"] for b in (1, 64)}
    ms = lambda s: f"{1e3 * s:.2f}"  # noqa: E731
    rows = [
        [name, "fp32", f"{acc_fp:.2f}", f"{file_size(p32) / 1024:.0f}", ms(ort[1]["fp32"]), ms(ort[64]["fp32"]),
         ms(eager[1]), ms(eager[64]), "", "", ""],
        [name, "int8 (QDQ, ORT)", f"{100 * ok8 / n:.2f} (fake-quant {acc_fq:.2f})", f"{file_size(p8) / 1024:.0f}",
         ms(ort[1]["int8"]), ms(ort[64]["int8"]), "–", "–",
         f"{ort[64]['fp32'] / ort[64]['int8']:.2f}x", f"{vs_base[1] / ort[1]['int8']:.2f}x / "
         f"{vs_base[64] / ort[64]['int8']:.2f}x", f"{eager[1] / ort[1]['int8']:.2f}x"],
    ]
    note = (f"{name}: top-1 agreement int8 ONNX vs PyTorch fake-quant {100 * agree / n:.2f}% of {n} test images; "
            f"8-bit QAT re-training {secs:.0f}s; accuracy change fp32 -> int8 {100 * ok8 / n - acc_fp:+.2f} points; "
            f"8-bit weights {'7-bit range' if learner.reduce_range else 'full range'} ({learner.reduce_range_why}); "
            f"first convolution in {first['chosen']} (--int8-first-layer {first['setting']}"
            + (", batch-64 speed-ups measured: int8 {int8:.2f}x, fp32 {fp32:.2f}x".format(
                **first["measured_speedup_b64"]) if "measured_speedup_b64" in first else "") + ")")
    return rows, note, p32


# ----------------------------------------------------------------------------- table 2: mixed precision


def mixed_rows(bench: Bench, avg_bits: list[int]) -> tuple[list[list[Any]], list[str]]:
    a = bench.args
    sizes = [int(m.weight.numel()) for _, m in quant_layers(bench.base)]
    rows, notes = [], []
    for b in avg_bits:
        target = b / 32
        # at an average of --min-bits or less the Budget would admit one policy (every layer at b bits):
        # such a row lets layers go one bit lower (1 bit = binary), as PocketFlow's 2-bit search does
        lo = a.min_bits if b > a.min_bits else max(1, b - 1)
        single = b <= lo
        for opt in ["uniform", *a.optimizers]:
            if single and opt != "uniform":
                rows.append([f"{b}", f"`{opt}`", "= uniform", "", "", "", "–"])
                continue
            tests, vals, avgs, spans, secs = [], [], [], [], []
            for seed in a.seeds:
                run: Run = bench.search(opt, seed=seed, target=target, min_bits=lo)
                bench.retrain_and_test(run, min_bits=lo)
                print(progress_line(run), flush=True)
                tests.append(run.test_acc)
                vals.append(run.val_acc)
                avgs.append(_avg_bits(run.result.best_policy, sizes))
                spans.append(f"{min(run.result.best_policy):.0f}-{max(run.result.best_policy):.0f}")
                secs.append(run.result.seconds)
            rows.append([f"{b}", f"`{opt}`", pm(avgs, 3), " / ".join(sorted(set(spans))), pm(vals), pm(tests),
                         f"{np.mean(secs):.0f}"])
        if single:
            notes.append(f"At {b} bits on average with --min-bits {lo} the Budget admits one policy (every layer "
                         f"at {b} bits): there is nothing to search, so the optimizers are not run (`= uniform`).")
        elif lo != a.min_bits:
            notes.append(f"The {b}-bit rows search {lo}-{a.max_bits} bits per layer (`--min-bits {lo}`; 1 bit = "
                         f"binary, `sign(w) * mean|w_c|`): with --min-bits {a.min_bits} a {b}-bit average admits "
                         "one policy only.")
    return rows, notes


# ----------------------------------------------------------------------------- table 3: non-uniform


def nonuniform_rows(bench: Bench, bits_list: list[int], tmp: Path) -> list[list[Any]]:
    rows = []
    buf = io.BytesIO()
    torch.save({k: v.cpu() for k, v in bench.base.state_dict().items()}, buf)
    fp32_bytes = len(buf.getvalue())
    for b in bits_list:
        tests, vals, sizes = [], [], []
        for seed in bench.args.seeds:
            learner = make_learner(_config(bench, "non-uniform-quant", seed, bits=b), bench.device)
            learner.prepare(bench.base, bench.data)
            seed_everything(seed)
            q = learner.compress(bench.base, [float(b)] * len(quant_layers(bench.base))).to(bench.device)
            vals.append(bench.reward_acc(q))
            _retrain(bench, learner, q, bench.base)
            tests.append(_test(bench, q))
            sizes.append(save_codebook(q, tmp / f"nuq{b}.codebook.pt"))
        rows.append([f"{b}", pm(vals), pm(tests), f"{np.mean(sizes) / 1024:.0f}", f"{fp32_bytes / 1024:.0f}",
                     f"{fp32_bytes / np.mean(sizes):.1f}x"])
    return rows


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, optimizers=("ddpg",), targets=(0.5,))
    ap.add_argument("--avg-bits", type=int, nargs="+", default=[4, 2],
                    help="average weight bits compared, uniform vs searched (default: %(default)s)")
    ap.add_argument("--min-bits", type=int, default=2,
                    help="smallest bits of a layer in the searches; a row whose average is at or below it searches "
                         "from one bit lower (default: %(default)s)")
    ap.add_argument("--max-bits", type=int, default=8, help="largest bits of a layer (default: %(default)s)")
    ap.add_argument("--nonuniform-bits", type=int, nargs="+", default=[4, 2],
                    help="k-means bits per layer (default: %(default)s)")
    ap.add_argument("--ft-steps", type=int, default=50,
                    help="distilled QAT steps before scoring each candidate (default: %(default)s)")
    ap.add_argument("--prune-retrain-epochs", type=int, default=1,
                    help="re-training of the pruned model before it is quantized (default: %(default)s)")
    ap.add_argument("--latency-repeats", type=int, default=30, help="timed repeats per latency (default: %(default)s)")
    ap.add_argument("--tables", nargs="+", default=["int8", "mixed", "nonuniform"],
                    choices=["int8", "mixed", "nonuniform"], help="which tables to run (default: all)")
    args = ap.parse_args()
    for b in args.avg_bits:
        if not 1 <= b <= 8:
            raise UserError(f"--avg-bits must be between 1 and 8 (uniform-quant), got {b}")
    if not 1 <= args.min_bits <= args.max_bits <= 8:
        raise UserError("--min-bits and --max-bits must satisfy 1 <= min <= max <= 8")
    for b in args.nonuniform_bits:
        if not 1 <= b <= 8:
            raise UserError(f"--nonuniform-bits must be between 1 and 8, got {b}")
    if args.ft_steps < 0 or args.prune_retrain_epochs < 0 or args.latency_repeats < 1:
        raise UserError("--ft-steps and --prune-retrain-epochs must not be negative, --latency-repeats >= 1")
    if len(args.targets) != 1:
        raise UserError("--targets takes one FLOPs target here (the pruned model of table 1)")
    start = time.perf_counter()
    bench = setup(args, learner="uniform-quant", section="quant")
    bench.cfg["search"]["ft_steps"] = args.ft_steps
    bench.cfg["quant"].update(min_bits=args.min_bits, max_bits=args.max_bits)
    out = args.out
    emit(header("Quantization (`uniform-quant`, `non-uniform-quant`)", bench), out, first=True)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        if "int8" in args.tables:
            seed = args.seeds[0]
            pruned = pruned_model(bench, args.targets[0], seed)
            kept = profile_model(pruned, bench.input_shape).flops / bench.base_flops
            rows, notes = [], []
            r, n, base_onnx = int8_rows(bench, "baseline", bench.base, seed, tmp)
            rows += r
            notes.append(n)
            r, n, _ = int8_rows(bench, f"pruned ({kept:.3f} FLOPs)", pruned, seed, tmp, base_onnx)
            rows += r
            notes.append(n)
            emit("### fp32 vs int8: accuracy, size and CPU latency in one process\n", out, first=False)
            emit(md_table(["model", "format", "test acc (%)", "ONNX KB", "ORT b1 ms", "ORT b64 ms",
                           "PyTorch eager b1 ms", "PyTorch eager b64 ms", "int8 vs ORT fp32, b64",
                           "int8 vs ORT baseline fp32, b1 / b64", "int8 vs PyTorch fp32, b1"], rows,
                          right=[False, False] + [True] * 9), out, first=False)
            emit("\n".join(f"- {n}" for n in notes) + f"\n- seed {seed}; pruned: uniform policy at FLOPs target "
                 f"{args.targets[0]}, {args.prune_retrain_epochs} epoch(s) of distilled re-training; int8: 8-bit "
                 "QAT (weights per channel, range by --reduce-range auto; activations per tensor, EMA ranges) "
                 "with the re-training budget, exported as QDQ with the learned scales (no re-calibration). "
                 "Latency: ONNX Runtime CPU, models alternated per repeat (the pruned rows time the baseline's fp32 "
                 "file in the same rounds: `int8 vs ORT baseline fp32` is prune + quantize against the original), "
                 "median; PyTorch eager fp32 the same "
                 "way; PyTorch has no int8 path here (fake quantization is a simulation, not a kernel).\n",
                 out, first=False)
        if "mixed" in args.tables:
            rows, notes = mixed_rows(bench, args.avg_bits)
            emit("### Uniform vs searched mixed precision at the same average weight bits (baseline)\n", out,
                 first=False)
            emit(md_table(["avg bits", "policy", "avg bits (measured)", "bits per layer", "val acc after ft (%)",
                           "test acc after re-train (%)", "search s"], rows, right=[False, False] + [True] * 5),
                 out, first=False)
            emit("\n".join(f"- {n}" for n in [
                f"val acc: the best candidate on the reward split after {args.ft_steps} distilled QAT steps "
                "(the search's reward); test: after the re-training budget, read once; 8-bit activations.",
                *notes]) + "\n", out, first=False)
        if "nonuniform" in args.tables:
            rows = nonuniform_rows(bench, args.nonuniform_bits, tmp)
            emit("### Non-uniform (k-means weight sharing) on the baseline\n", out, first=False)
            emit(md_table(["bits", "val acc before fine-tuning (%)", "test acc after centroid fine-tuning (%)",
                           "codebook file KB", "fp32 state_dict KB", "compression"], rows), out, first=False)
            emit(f"- {bench.cfg['quant']['kmeans_init']} initialisation, fp32 activations; the codebook file "
                 "holds per-layer float32 centroids and indices packed at `bits` bits, everything else dense.\n",
                 out, first=False)
    emit(f"Whole benchmark: {time.perf_counter() - start:.0f}s wall.", out, first=False)


if __name__ == "__main__":
    main_guard(main)
