#!/usr/bin/env python
"""Prune what users bring: one torchvision classification model per family at FLOPs target 0.5.

Each model (random init, 10 classes, synthetic images at ``--size``, or the size the model needs) goes
through ``torchpocket.compress(model, train, val, learner="chn-pruned", hpo="uniform", target=0.5,
episodes=1, retrain_epochs=0, out_dir=...)`` in a subprocess of its own, under an address-space cap
(``--mem-gib``) and a timeout, so one model cannot take the machine down. A row records:

- ``result``: pruned, refused (torchpocket's one-line error) or failed (anything else: crash, limit, timeout);
- FLOPs kept as measured (``summary.json``, FlopCounterMode) beside what the Budget promised (the trial's
  resource), and params kept;
- save -> ``torchpocket.load`` -> the same outputs as the compressed model (max abs difference);
- ONNX exported (``model.onnx`` checked in ONNX Runtime) and the measured eager speed-up at batch 1;
- seconds.

Rows are JSON files under ``--cells`` (skipped when present), so the table can be built across sessions:

    python benchmarks/zoo.py --cells benchmarks/zoo-cells --out benchmarks/zoo.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

#: one model per torchvision classification family, and the input size it needs (None: --size)
FAMILIES: dict[str, int | None] = {
    "alexnet": None, "vgg11_bn": None, "resnet18": None, "resnet50": None, "resnext50_32x4d": None,
    "wide_resnet50_2": None, "squeezenet1_1": None, "densenet121": None, "googlenet": None, "inception_v3": 299,
    "mobilenet_v2": None, "mobilenet_v3_small": None, "mnasnet0_5": None, "shufflenet_v2_x0_5": None,
    "efficientnet_b0": None, "efficientnet_v2_s": None, "regnet_x_400mf": None, "regnet_y_400mf": None,
    "convnext_tiny": None, "vit_b_16": 224, "swin_t": 224, "maxvit_t": 224,
}

CHILD = r'''
import json, resource, sys, tempfile, time
from pathlib import Path
cap = int(sys.argv[4]) << 30
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
import torch, torchvision
from torch.utils.data import DataLoader, TensorDataset
import torchpocket
from torchpocket.errors import UserError
name, size, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[5]))
row = {"model": name, "size": size}
t0 = time.perf_counter()
def build():
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    if hasattr(model, "aux_logits"):  # the auxiliary heads only train; the reloaded model is built the same way
        model.aux_logits, model.AuxLogits = False, None
    return model
try:
    model = build()
    x = torch.randn(32, 3, size, size)
    data = DataLoader(TensorDataset(x, torch.randint(0, 10, (32,))), batch_size=16)
    comp, result = torchpocket.compress(model, data, data, learner="chn-pruned", hpo="uniform", target=0.5,
                                        episodes=1, retrain_epochs=0, calib_batches=1, latency_repeats=3,
                                        out_dir=str(out))
    (run,) = out.iterdir()
    s = json.loads((run / "summary.json").read_text())
    back = torchpocket.load(run / "model.pt", model=build()).eval()
    with torch.no_grad():
        diff = (back(x[:2]) - comp.eval()(x[:2])).abs().max().item()
    row.update(result="pruned", flops_kept=s["compressed"]["flops"] / s["baseline"]["flops"],
               promised=result.trials[0]["resource"], params_kept=s["compressed"]["params"] / s["baseline"]["params"],
               reload_diff=diff, onnx="onnx" in s, speedup_b1=s.get("speedup", {}).get("eager", {}).get("b1"))
except UserError as e:
    row.update(result="refused", reason=" ".join(str(e).split())[:300])
except BaseException as e:
    row.update(result="failed", reason=f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
row["seconds"] = round(time.perf_counter() - t0, 1)
print("ROW " + json.dumps(row), flush=True)
'''


def run_model(name: str, size: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, name, str(size), str(tmp / name), str(args.mem_gib),
                               str(args.threads)], env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "size": size, "result": "failed", "reason": f"timeout after {args.timeout} s",
                "seconds": round(time.perf_counter() - t0, 1)}
    rows = [ln[4:] for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
    if rows:
        return json.loads(rows[-1])
    tail = " ".join((proc.stderr or "").split())[-300:]
    return {"model": name, "size": size, "result": "failed", "reason": f"exit {proc.returncode}: {tail}",
            "seconds": round(time.perf_counter() - t0, 1)}


def table(rows: list[dict[str, Any]]) -> str:
    def f(v: Any, fmt: str) -> str:
        return "" if v is None else format(v, fmt)

    pruned = [r for r in rows if r["result"] == "pruned"]
    ok = [r for r in pruned if 0.45 <= r["flops_kept"] <= 0.51 and r["reload_diff"] < 1e-4 and r["onnx"]]
    lines = [f"{len(ok)} of {len(rows)} families pruned to [0.45, 0.51] of their FLOPs, reloaded to the same "
             f"outputs and exported to ONNX; {sum(r['result'] == 'refused' for r in rows)} refused in one line, "
             f"{sum(r['result'] == 'failed' for r in rows)} failed.", "",
             "| model | input | result | FLOPs kept | promised | params kept | reload max diff | ONNX | "
             "eager speed-up b1 | s | reason |", "|---|---:|---|---:|---:|---:|---:|---|---:|---:|---|"]
    for r in rows:
        onnx = "yes" if r.get("onnx") else ("no" if "onnx" in r else "")
        lines.append(f"| `{r['model']}` | {r['size']} | {r['result']} | {f(r.get('flops_kept'), '.3f')} | "
                     f"{f(r.get('promised'), '.3f')} | {f(r.get('params_kept'), '.3f')} | "
                     f"{f(r.get('reload_diff'), '.1e')} | {onnx} | "
                     f"{f(r.get('speedup_b1'), '.2f')} | {r['seconds']} | {r.get('reason', '')[:160]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(FAMILIES), help="torchvision names (default: every family)")
    ap.add_argument("--size", type=int, default=64, help="input size for models that accept any (default: 64)")
    ap.add_argument("--mem-gib", type=int, default=20, help="address-space cap per model (default: 20 GiB)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per model (default: 1800)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    ap.add_argument("--cells", default="benchmarks/zoo-cells", help="one JSON file per model")
    ap.add_argument("--out", default=None, help="markdown file for the table (it is printed too)")
    args = ap.parse_args()
    import tempfile

    from _common import flag_line

    from torchpocket.utils import atomic_write_text, machine_description

    cells = Path(args.cells)
    cells.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="torchpocket-zoo") as tmp:
        for name in args.models:
            cell = cells / f"{name}.json"
            if cell.exists():
                continue
            size = FAMILIES.get(name) or args.size
            row = run_model(name, size, args, Path(tmp))
            atomic_write_text(cell, json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    rows = [json.loads((cells / f"{n}.json").read_text()) for n in args.models if (cells / f"{n}.json").exists()]
    text = (f"## torchvision zoo at FLOPs 0.5 (`chn-pruned`, uniform)\n\n- machine: {machine_description()}; "
            f"CPU flags: {flag_line()}; "
            f"command: `python benchmarks/zoo.py {' '.join(sys.argv[1:])}`\n\n" + table(rows))
    print(text)
    if args.out:
        atomic_write_text(args.out, text)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
