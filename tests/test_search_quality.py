"""What makes a search worth running, end to end: the uniform first trial, uniform scored once, the
sensitivity optimizer's probes (logged, cached, drawn, never chosen)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import torchpocket
from tests.conftest import run_ok
from tests.test_pipeline import TINY, trials
from torchpocket.errors import UserError

pytestmark = pytest.mark.usefixtures("shared_cache")


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize("hpo", ["random", "tpe", "ddpg"])
def test_a_learned_search_starts_from_uniform_and_never_ends_below_it(capsys: pytest.CaptureFixture[str],
                                                                       tmp_path: Path, hpo: str) -> None:
    run_dir = run_ok(capsys, *TINY, "--hpo", hpo, "--episodes", "4", "--out-dir", str(tmp_path))
    rows = trials(run_dir)
    assert [r["kind"] for r in rows] == ["uniform", "search", "search", "search"]
    uniform = run_ok(capsys, *TINY, "--hpo", "uniform", "--out-dir", str(tmp_path / "u"))
    assert rows[0]["policy"] == pytest.approx(trials(uniform)[0]["policy"])
    with open(run_dir / "trials.csv") as f:
        assert [r["kind"] for r in csv.DictReader(f)][0] == "uniform"
    s = summary(run_dir)["search"]
    assert s["uniform_trial"] == 0 and s["uniform_val_acc"] == rows[0]["val_acc"]
    assert s["best_minus_uniform_val_acc"] >= 0 and s["best_val_acc"] == max(r["val_acc"] for r in rows)
    assert "**Uniform policy (trial 0):**" in (run_dir / "report.md").read_text()


def test_uniform_scores_its_one_policy_once_whatever_episodes_says(capsys: pytest.CaptureFixture[str],
                                                                    tmp_path: Path) -> None:
    run_dir = run_ok(capsys, *TINY, "--hpo", "uniform", "--episodes", "7", "--out-dir", str(tmp_path))
    assert len(trials(run_dir)) == 1 and summary(run_dir)["trials"] == 1
    x = torch.randn(64, 1, 8, 8)
    data = DataLoader(TensorDataset(x, torch.randint(0, 3, (64,))), batch_size=32)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(8, 3))
    _, result = torchpocket.compress(net, data, data, learner="chn-pruned", hpo="uniform", target=0.6,
                                     episodes=60, retrain_epochs=0, calib_batches=1)
    assert len(result.trials) == 1


def test_sensitivity_probes_are_logged_cached_drawn_and_never_chosen(capsys: pytest.CaptureFixture[str],
                                                                      tmp_path: Path) -> None:
    argv = [*TINY, "--hpo", "sensitivity", "--target", "0.4", "--episodes", "16", "--sens-points", "1"]
    run_dir = run_ok(capsys, *argv, "--out-dir", str(tmp_path / "a"))
    rows = trials(run_dir)
    kinds = [r["kind"] for r in rows]
    n_layers = len(rows[0]["policy"])
    assert kinds[0] == "uniform" and kinds[1:2 + n_layers] == ["probe"] * (1 + n_layers)
    assert set(kinds[2 + n_layers:]) == {"search"}
    probes = [r for r in rows if r["kind"] == "probe"]
    assert all(r["resource"] > 0.4 for r in probes)  # outside the budget...
    s = summary(run_dir)
    assert s["search"]["probes"] == len(probes) and s["flops_ratio"] <= 0.4 + 1e-6  # ...and never the result
    best = max((r for r in rows if r["kind"] != "probe"), key=lambda r: r["reward"])
    assert s["search"]["best_trial"] == best["trial"]
    report = (run_dir / "report.md").read_text()
    assert "## Layer sensitivity" in report and (run_dir / "sensitivity.png").stat().st_size > 1000
    assert report.count("| layer") >= 1 and rows[1]["resource"] == pytest.approx(1.0)

    again = run_ok(capsys, *argv, "--target", "0.5", "--out-dir", str(tmp_path / "b"))  # probes ignore the target
    rows2 = trials(again)
    assert summary(again)["search"]["cached_probes"] == len(probes)
    assert [r["val_acc"] for r in rows2 if r["kind"] == "probe"] == [r["val_acc"] for r in probes]


def _tiny_net(out: str = "logits") -> torch.nn.Module:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                            torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
                                            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
            self.fc = torch.nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> object:
            y = self.fc(self.body(x))
            return {"logits": y} if out == "dict" else (y, y) if out == "tuple" else y

    return Net()


def test_compress_on_user_data_records_user_data_and_non_square_inputs(tmp_path: Path) -> None:
    x = torch.randn(64, 1, 6, 10)  # height 6, width 10
    data = DataLoader(TensorDataset(x, torch.randint(0, 3, (64,))), batch_size=32)
    _, result = torchpocket.compress(_tiny_net(), data, data, learner="chn-pruned", hpo="uniform", target=0.6,
                                     retrain_epochs=0, calib_batches=1, export_onnx=True, latency_repeats=2,
                                     out_dir=tmp_path)
    (run_dir,) = tmp_path.iterdir()
    assert run_dir.name.endswith("-user-user")  # net and dataset: the user's, not the registry defaults
    s = summary(run_dir)
    assert s["dataset"] == "user" and s["onnx"].get("path") == "model.onnx"
    import onnx

    dims = [d.dim_value for d in onnx.load(run_dir / "model.onnx").graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [1, 6, 10]


@pytest.mark.parametrize("out", ["tuple", "dict"])
def test_compress_refuses_a_model_that_returns_no_tensor_in_one_line(out: str) -> None:
    data = DataLoader(TensorDataset(torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))), batch_size=4)
    with pytest.raises(UserError, match="forward returns (tuple|dict).*class scores"):
        torchpocket.compress(_tiny_net(out), data, data, hpo="uniform", target=0.6)


def test_compress_without_loaders_is_a_clear_error() -> None:
    with pytest.raises(UserError, match="needs a training and a validation loader"):
        torchpocket.compress(_tiny_net())


@pytest.mark.parametrize("hpo", ["ddpg", "sensitivity"])
def test_every_search_leaves_an_optuna_study_in_the_run_directory(capsys: pytest.CaptureFixture[str],
                                                                   tmp_path: Path, hpo: str) -> None:
    import optuna

    run_dir = run_ok(capsys, *TINY, "--hpo", hpo, "--episodes", "12", "--out-dir", str(tmp_path))
    rows = trials(run_dir)
    study = optuna.load_study(study_name="torchpocket", storage=f"sqlite:///{run_dir / 'study.db'}")
    stored = study.get_trials(deepcopy=False)
    assert [t.user_attrs["trial"] for t in stored] == [r["trial"] for r in rows]
    assert [t.value for t in stored] == pytest.approx([r["reward"] for r in rows])
    assert [t.user_attrs["kind"] for t in stored] == [r["kind"] for r in rows]
    assert list(stored[0].params.values()) == pytest.approx(rows[0]["policy"])


def test_dashboard_without_a_study_or_without_the_package_is_one_line(capsys: pytest.CaptureFixture[str],
                                                                      tmp_path: Path) -> None:
    from torchpocket.cli import main

    assert main(["--dashboard", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no study.db" in err and len(err.strip().splitlines()) == 1


@pytest.mark.timeout(120)
def test_dashboard_serves_the_runs_study(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """``run.py --dashboard RUN_DIR`` serves study.db with optuna-dashboard; its API reads back every trial."""
    pytest.importorskip("optuna_dashboard")
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    run_dir = run_ok(capsys, *TINY, "--hpo", "random", "--episodes", "5", "--out-dir", str(tmp_path))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, str(root / "run.py"), "--dashboard", str(run_dir), "--dashboard-port",
                             str(port)], env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/1", timeout=5) as r:
                    study = json.loads(r.read())
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
                time.sleep(0.3)
    finally:
        proc.kill()  # a server: stopping it is all that is left to test
        proc.wait(timeout=30)
    assert study["name"] == "torchpocket" and len(study["trials"]) == 5


def test_summary_has_one_speed_block(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    run_dir = run_ok(capsys, *TINY, "--hpo", "uniform", "--export-onnx", "--out-dir", str(tmp_path))
    speed = summary(run_dir)["speedup"]
    for runtime in ("eager", "onnxruntime"):
        assert set(speed[runtime]) == {"b1", "b64"} and all(v > 0 for v in speed[runtime].values())
    assert set(speed["cpu_flags"]) >= {"avx2", "avx512f", "avx512_vnni"} and speed["threads"] >= 1
    assert "int8" not in speed  # no integer model for a pruned fp32 network
