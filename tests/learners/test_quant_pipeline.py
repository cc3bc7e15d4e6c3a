"""Quantization end to end through ``run.py`` on tiny data: int8 ONNX, prune -> quantize, codebooks, search, errors.

The runs use scikit-learn's 8x8 digits (offline) and a ResNet-20 baseline trained for a few epochs once per
session (cached): top-1 agreement between the fake-quant model and the exported integer model is only
meaningful for a model whose logits have real margins, which random weights on random data do not have.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import yaml
from onnx import numpy_helper

import torchpocket
from tests.conftest import run_ok
from torchpocket.cli import main
from torchpocket.learners._quant import weight_codes
from torchpocket.pipeline import TrialLog

DIGITS = ["--dataset", "digits", "--net", "resnet20", "--device", "cpu", "--quiet", "--epochs", "10",
          "--latency-repeats", "2"]


pytestmark = pytest.mark.usefixtures("shared_cache")  # one baseline, trained by the first run


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_8_bit_run_ships_an_int8_onnx_model_that_agrees(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    run_dir = run_ok(capsys, *DIGITS, "--learner", "uniform-quant", "--bits", "8", "--retrain-epochs", "0",
                     "--out-dir", str(tmp_path))
    s = summary(run_dir)
    assert s["hpo"] == "none" and s["trials"] == 1  # --bits implies no search
    int8 = s["int8"]
    assert int8["agreement_with_pytorch"] >= 0.99  # fake-quant model vs ONNX Runtime integer model, test split
    assert abs(int8["test_acc"] - s["compressed"]["test_acc"]) <= 1.0
    assert int8["size_bytes"] < 0.35 * int8["fp32_size_bytes"]
    for key in ("latency_ms_b1", "latency_ms_b64", "fp32_latency_ms_b1", "fp32_latency_ms_b64"):
        assert int8[key] > 0
    weights = [numpy_helper.to_array(i) for i in onnx.load(str(run_dir / "model.int8.onnx")).graph.initializer]
    first = int8["first_layer"]  # auto: the faster of an int8 and an fp32 first convolution, both timed here
    assert first["setting"] == "auto" and first["chosen"] in ("int8", "fp32") and first["layer"] == "/conv1/Conv"
    assert set(first["measured_speedup_b64"]) == {"int8", "fp32"}
    # every conv weight stored as int8 (but the first one's, when fp32 won there)
    assert sum(w.dtype == np.int8 and w.ndim == 4 for w in weights) == 21 - (first["chosen"] == "fp32")
    assert s["export"]["reduce_range"]["setting"] == "auto"
    assert s["export"]["average_weight_bits"] == 8
    model = torchpocket.load(run_dir / "model.pt")
    assert {b for _, b in weight_codes(model).values()} == {8}
    policy = yaml.safe_load((run_dir / "policy.yaml").read_text())
    assert policy["meaning"] == "bits" and set(policy["layers"].values()) == {8.0}


def test_prune_then_quantize(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pruned = run_ok(capsys, *DIGITS, "--learner", "chn-pruned", "--hpo", "uniform", "--target", "0.5",
                    "--retrain-epochs", "0", "--calib-batches", "2", "--no-export-onnx", "--out-dir", str(tmp_path))
    small = torchpocket.load(pruned / "model.pt")
    # the architecture comes from the checkpoint: no --net on the second command
    argv = [a for a in DIGITS if a not in ("--net", "resnet20")]
    quant = run_ok(capsys, *argv, "--learner", "uniform-quant", "--bits", "8", "--init", str(pruned / "model.pt"),
                   "--retrain-epochs", "1", "--max-steps-per-epoch", "3", "--out-dir", str(tmp_path))
    s = summary(quant)
    n_small = sum(p.numel() for p in small.parameters())
    assert s["baseline"]["params"] == n_small == s["compressed"]["params"]
    assert s["int8"]["size_bytes"] < 0.35 * s["int8"]["fp32_size_bytes"]
    assert s["int8"]["agreement_with_pytorch"] >= 0.97
    assert set(s["speedup"]["int8"]) == {"b1", "b64"} and s["speedup"]["int8"]["b1"] > 0  # int8 vs fp32, one run
    model = torchpocket.load(quant / "model.pt")  # pruned, then quantized: both steps replayed
    assert sum(p.numel() for p in model.parameters()) == n_small
    ckpt = torch.load(quant / "model.pt", weights_only=True)
    assert [st["learner"] for st in ckpt["base_arch"]] == ["chn-pruned"] and ckpt["learner"] == "uniform-quant"
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert model(x).shape == (4, 10)


def test_non_uniform_run_writes_a_codebook(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    run_dir = run_ok(capsys, *DIGITS, "--learner", "non-uniform-quant", "--bits", "2", "--retrain-epochs", "1",
                     "--max-steps-per-epoch", "3", "--no-export-onnx", "--out-dir", str(tmp_path))
    e = summary(run_dir)["export"]
    assert e["reload_identical"] and e["average_weight_bits"] == 2
    assert e["codebook_bytes"] < e["fp32_bytes"] / 8
    model = torchpocket.load(run_dir / "model.pt")
    assert all(m.weight.unique().numel() <= 4 for n, m in model.named_modules() if n in weight_codes(model))


def test_mixed_precision_search_stays_under_the_bit_budget(capsys: pytest.CaptureFixture[str],
                                                           tmp_path: Path) -> None:
    run_dir = run_ok(capsys, *DIGITS, "--learner", "uniform-quant", "--hpo", "random", "--target", "0.125",
                     "--episodes", "3", "--ft-steps", "2", "--retrain-epochs", "0", "--no-export-onnx",
                     "--out-dir", str(tmp_path))
    rows = [json.loads(ln) for ln in (run_dir / "trials.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for r in rows:
        assert r["resource"] <= 0.125 + 1e-9 and r["resource"] > 0.11
        assert all(v == int(v) and 2 <= v <= 8 for v in r["policy"])
    assert len({tuple(r["policy"]) for r in rows}) > 1  # mixed precision: the policies differ


def test_two_bit_average_with_binary_layers_ships_and_reloads(capsys: pytest.CaptureFixture[str],
                                                               tmp_path: Path) -> None:
    run_dir = run_ok(capsys, *DIGITS, "--learner", "uniform-quant", "--hpo", "random", "--target", "0.0625",
                     "--min-bits", "1", "--episodes", "3", "--ft-steps", "2", "--retrain-epochs", "0",
                     "--out-dir", str(tmp_path))
    rows = [json.loads(ln) for ln in (run_dir / "trials.jsonl").read_text().splitlines()]
    assert any(1 in r["policy"] for r in rows) and all(r["resource"] <= 0.0625 + 1e-9 for r in rows)
    # the search may choose its uniform first trial (2 bits everywhere): ship a searched policy with 1-bit layers
    names = (run_dir / "trials.csv").read_text().splitlines()[0].split(",")[len(TrialLog.FIELDS):]
    with_binary = next(r["policy"] for r in rows if 1 in r["policy"])
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"layers": dict(zip(names, with_binary, strict=True))}))
    run_dir = run_ok(capsys, *DIGITS, "--learner", "uniform-quant", "--hpo", "none", "--policy", str(policy),
                     "--target", "0.0625", "--min-bits", "1", "--retrain-epochs", "0", "--out-dir", str(tmp_path))
    s = summary(run_dir)
    codes = weight_codes(torchpocket.load(run_dir / "model.pt"))
    binary = [c for c, b in codes.values() if b == 1]
    assert binary and all(set(c.unique().tolist()) == {-1, 1} for c in binary)
    assert s["int8"]["agreement_with_pytorch"] >= 0.97


@pytest.mark.parametrize(("argv", "expect"), [
    (["--learner", "uniform-quant", "--bits", "0"], "--bits must be between 1 and 8"),
    (["--learner", "uniform-quant", "--bits", "9"], "--bits must be between 1 and 8"),
    (["--learner", "non-uniform-quant", "--bits", "9"], "--bits must be between 1 and 8"),
    (["--learner", "uniform-quant", "--min-bits", "6", "--max-bits", "4", "--hpo", "ddpg", "--target", "0.2"],
     "--min-bits (6) must not exceed --max-bits (4)"),
    (["--learner", "uniform-quant", "--bits", "4", "--hpo", "ddpg"], "nothing to search"),
    (["--learner", "chn-pruned", "--bits", "4"], "--bits applies to the quantization learners"),
])
def test_bad_bits_are_one_line_and_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str],
                                          expect: str) -> None:
    rc = main([*DIGITS, *argv, "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and expect in lines[0], err
    assert not list(tmp_path.iterdir())  # rejected before anything was written
