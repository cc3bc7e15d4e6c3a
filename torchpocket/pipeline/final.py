"""The final stage: the chosen policy -> compress -> re-train with distillation -> test once -> the run's files
(``model.pt``, ``policy.yaml``, ``summary.json``, ``metrics.json``, ``model.onnx``, the learner's own exports,
``report.md``)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchpocket import distributed, faults
from torchpocket.config import dump_yaml
from torchpocket.datasets import DataBundle
from torchpocket.learners import Learner
from torchpocket.learners.training import evaluate
from torchpocket.pipeline.rundir import RunDir
from torchpocket.pipeline.search import SearchResult, input_shape, search_summary
from torchpocket.utils import atomic_write_text, cpu_flags, machine_description, seed_everything


def finalize(learner: Learner, base: nn.Module, result: SearchResult | None, data: DataBundle, cfg: dict[str, Any],
             *, run_dir: RunDir, device: torch.device, base_arch: list[dict[str, Any]],
             net: str | None) -> dict[str, Any]:
    """Best policy -> compress -> re-train with distillation -> test once -> model.pt, policy.yaml, summary, report."""
    run, sc = cfg["run"], cfg["search"]
    seed_everything(run["seed"])
    policy = result.best_policy if result else []
    final, val_before, history, retrain_s = retrain(learner, base, policy, data, epochs=sc["retrain_epochs"],
                                                    lr=sc["retrain_lr"], device=device)
    test_loader = data.loader("test", batch_size=500)
    test_final = evaluate(final, test_loader, device=device)
    test_base = evaluate(base, test_loader, device=device)
    if not distributed.is_main():  # rank 0 writes the files and measures latency
        return {"test_acc": test_final}
    metrics = {"test_acc": test_final, "val_acc_before_retrain": val_before,
               "val_acc": history[-1]["val_acc"] if history else val_before}
    names = result.layer_names if result else []
    _save(learner, final, policy, names, data, cfg, run_dir, metrics=metrics, base_arch=base_arch, net=net)
    summary = summarize(learner, base.cpu(), final.cpu(), data, cfg, (test_base, test_final), result, retrain_s,
                        run_dir, policy)
    run_dir.write_json("summary.json", summary)
    run_dir.write_json("metrics.json", {**metrics, "retrain_history": history,
                                        "best_trial_val_acc": result.best_val_acc if result else None})
    if result is not None and result.trials:
        from torchpocket.report import write_report

        write_report(run_dir.path, trials=result.trials, summary=summary, layer_names=names,
                     best_policy=list(policy), uniform_policy=result.uniform_policy,
                     title=f"{run['learner']} / {run['hpo']} / {net} / {run['dataset']} @ {run['target']}")
    print(f"test acc: baseline {test_base:.2f}% -> compressed {test_final:.2f}%  |  FLOPs kept "
          f"{summary['compressed']['flops'] / max(summary['baseline']['flops'], 1):.3f}  |  run directory "
          f"{run_dir.path}", flush=True)
    return summary


def retrain(learner: Learner, base: nn.Module, policy: list[float], data: DataBundle, *, epochs: int,
            lr: float | None, device: torch.device) -> tuple[nn.Module, float, list[dict[str, float]], float]:
    """The chosen policy compressed and re-trained with distillation from ``base`` (the benchmarks reuse this).

    Returns the model, its val acc before re-training (whole validation split), the re-train history and
    its seconds. The test split is not read here."""
    final = learner.compress(base, policy).to(device)
    val_before = evaluate(final, data.loader("val", batch_size=500), device=device)
    print(f"best candidate: val acc {val_before:.2f}% before re-training", flush=True)
    t0 = time.perf_counter()
    history = learner.retrain(final, teacher=base, epochs=epochs, lr=lr) if epochs else []
    final.to(memory_format=torch.contiguous_format)
    return final, val_before, history, time.perf_counter() - t0


def _save(learner: Learner, final: nn.Module, policy: list[float], names: list[str], data: DataBundle,
          cfg: dict[str, Any], run_dir: RunDir, *, metrics: dict[str, Any], base_arch: list[dict[str, Any]],
          net: str | None) -> None:
    """model.pt (architecture record + weights) and policy.yaml."""
    from torchpocket.api import save_model

    run = cfg["run"]
    policy_map = dict(zip(names, policy))
    save_model(run_dir.path / "model.pt", final.cpu(), config=cfg, net=net, in_channels=data.in_channels,
               num_classes=data.num_classes, image_size=data.image_size, learner=run["learner"],
               arch=learner.arch_state(final), policy=policy_map or None, metrics=metrics, base_arch=base_arch)
    atomic_write_text(run_dir.path / "policy.yaml", dump_yaml({
        "learner": run["learner"], "hpo": run["hpo"], "target": run["target"],
        "meaning": learner.policy_name, "layers": policy_map}))


def summarize(learner: Learner, base: nn.Module, final: nn.Module, data: DataBundle, cfg: dict[str, Any],
              test: tuple[float, float], result: SearchResult | None, retrain_s: float, run_dir: RunDir,
              policy: list[float]) -> dict[str, Any]:
    """summary.json: accuracy, size and latency of both models, the search, the exports, the learner's own fields."""
    summary = measure(base, final, data, cfg, test)
    summary.update({
        "search_seconds": result.seconds if result else 0.0, "retrain_seconds": retrain_s,
        "trials": len(result.trials) if result else 0,
        "seconds_per_trial": _mean([t["seconds"] or 0.0 for t in result.trials]) if result else 0.0,
        "machine": machine_description()})
    if result is not None and result.trials:
        summary["search"] = search_summary(result)
    reps = cfg["search"]["latency_repeats"]
    onnx_path = export_onnx(learner, final, data, run_dir, summary, repeats=reps) if cfg["search"]["export_onnx"] \
        else None
    if onnx_path is not None:
        summary.update(learner.deploy(final, onnx_path, data, run_dir.path, repeats=reps))
    if result is not None:  # after the exports: a latency table is checked against model.onnx / model.int8.onnx
        summary.update(learner.summary_fields(policy, summary))
    summary["speedup"] = speed_block(base, summary, data, run_dir, onnx_path, repeats=reps)
    extra = learner.export(final, run_dir.path, torch.zeros(1, *input_shape(data)))
    if extra:
        summary["export"] = extra
    return summary


def measure(base: nn.Module, final: nn.Module, data: DataBundle, cfg: dict[str, Any],
            test: tuple[float, float]) -> dict[str, Any]:
    """FLOPs, parameters, size and eager latency (batch 1 and 64, round-robin) of the baseline and the result."""
    from torchpocket.profile import compare_latency, profile_model

    shape = input_shape(data)
    pb, pf = profile_model(base, shape), profile_model(final, shape)
    reps = cfg["search"]["latency_repeats"]
    lat1 = compare_latency({"baseline": base, "compressed": final}, shape, batch_size=1, repeats=reps)
    lat64 = compare_latency({"baseline": base, "compressed": final}, shape, batch_size=64, repeats=max(3, reps // 4))
    run = cfg["run"]
    return {
        "learner": run["learner"], "hpo": run["hpo"], "net": run["net"], "dataset": run["dataset"],
        "target": run["target"],
        "baseline": {"test_acc": test[0], "flops": pb.flops, "params": pb.params, "size_bytes": pb.bytes,
                     "latency_ms_b1": 1e3 * lat1["baseline"], "latency_ms_b64": 1e3 * lat64["baseline"]},
        "compressed": {"test_acc": test[1], "flops": pf.flops, "params": pf.params, "size_bytes": pf.bytes,
                       "latency_ms_b1": 1e3 * lat1["compressed"], "latency_ms_b64": 1e3 * lat64["compressed"]},
        "flops_ratio": pf.flops / max(pb.flops, 1), "params_ratio": pf.params / max(pb.params, 1),
        "speedup_b1": lat1["baseline"] / lat1["compressed"], "speedup_b64": lat64["baseline"] / lat64["compressed"],
    }


def speed_block(base: nn.Module, summary: dict[str, Any], data: DataBundle, run_dir: RunDir, onnx_path: Path | None,
                *, repeats: int) -> dict[str, Any]:
    """Compressed vs baseline speed-ups measured in this process, medians over repeats: eager PyTorch (from the
    latencies above), ONNX Runtime fp32 and, for an int8 model, ONNX Runtime int8 against the baseline's fp32
    ONNX, the three runtimes' models alternated in the same rounds; plus the CPU flags and the thread count."""
    import tempfile

    b, c = summary["baseline"], summary["compressed"]
    out: dict[str, Any] = {"eager": {"b1": b["latency_ms_b1"] / c["latency_ms_b1"],
                                     "b64": b["latency_ms_b64"] / c["latency_ms_b64"]},
                           "threads": torch.get_num_threads(), "cpu_flags": cpu_flags()}
    if onnx_path is None:
        return out
    from torchpocket.export import compare_onnx_latency
    from torchpocket.export import export_onnx as write_onnx

    int8 = run_dir.path / "model.int8.onnx"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            paths = {"baseline": write_onnx(base, Path(tmp) / "baseline.onnx", input_shape(data)),
                     "compressed": onnx_path, **({"int8": int8} if int8.is_file() else {})}
        except Exception as e:  # noqa: BLE001 - the baseline may not export where the compressed model did
            out["onnxruntime"] = {"skipped": f"baseline ONNX export: {type(e).__name__}"}
            return out
        for bs, key, reps in ((1, "b1", repeats), (64, "b64", max(3, repeats // 4))):
            lat = compare_onnx_latency(paths, input_shape(data), batch_size=bs, repeats=reps)
            out.setdefault("onnxruntime", {})[key] = lat["baseline"] / lat["compressed"]
            if "int8" in lat:
                out.setdefault("int8", {})[key] = lat["baseline"] / lat["int8"]
    return out


def export_onnx(learner: Learner, final: nn.Module, data: DataBundle, run_dir: RunDir, summary: dict[str, Any], *,
                repeats: int) -> Path | None:
    """model.onnx, checked against PyTorch in ONNX Runtime; an unexportable op is reported, not fatal."""
    from torchpocket.export import check_onnx, export_onnx, file_size, onnx_latency

    shape = input_shape(data)
    faults.point("export")
    try:
        fp32 = learner.onnx_float_model(final)  # e.g. a quantized network with its quantized weights as floats
        path = export_onnx(fp32, run_dir.path / "model.onnx", shape)
        diff = check_onnx(fp32, path, shape)
        summary["onnx"] = {"path": "model.onnx", "max_abs_diff": diff, "size_bytes": file_size(path),
                           "latency_ms_b1": 1e3 * onnx_latency(path, shape, batch_size=1, repeats=repeats)}
        return path
    except Exception as e:  # noqa: BLE001 - an unexportable op must not lose the finished run
        reason = " ".join(str(e).split())[:300]
        print(f"warning: ONNX export skipped: {type(e).__name__}: {reason}", file=sys.stderr, flush=True)
        summary["onnx"] = {"skipped": f"{type(e).__name__}: {reason}"}
        return None


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0
