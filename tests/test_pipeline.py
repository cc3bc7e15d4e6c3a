"""The search pipeline end to end on tiny data: trials, resume, failures, policy re-use, Python API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchpocket
from tests.conftest import run_ok
from torchpocket.cli import main
from torchpocket.errors import CandidateError

TINY = ["--dataset", "synthetic", "--net", "resnet20", "--learner", "chn-pruned", "--target", "0.5", "--device", "cpu",
        "--quiet", "--epochs", "1", "--retrain-epochs", "0", "--no-export-onnx", "--reward-val-size", "64",
        "--latency-repeats", "2", "--calib-batches", "2"]


pytestmark = pytest.mark.usefixtures("shared_cache")  # one baseline, trained by the first run


def trials(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "trials.jsonl").read_text().splitlines()]


def test_search_writes_trials_summary_and_report(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    run_dir = run_ok(capsys, *TINY, "--hpo", "random", "--episodes", "4", "--out-dir", str(tmp_path))
    rows = trials(run_dir)
    assert [r["trial"] for r in rows] == [0, 1, 2, 3]
    assert all(r["status"] == "ok" and r["resource"] <= 0.5 + 1e-9 for r in rows)
    csv_lines = (run_dir / "trials.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and "val_acc" in csv_lines[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["flops_ratio"] <= 0.5 + 1e-6 and summary["flops_ratio"] > 0.45
    assert summary["compressed"]["params"] < summary["baseline"]["params"]
    assert summary["trials"] == 4
    for name in ("report.md", "policy.yaml", "metrics.json", "config.yaml", "log.txt", "model.pt"):
        assert (run_dir / name).is_file(), name
    best = max(rows, key=lambda r: r["reward"])
    policy = yaml.safe_load((run_dir / "policy.yaml").read_text())["layers"]
    assert list(policy.values()) == pytest.approx(best["policy"])
    model = torchpocket.load(run_dir / "model.pt")
    assert sum(p.numel() for p in model.parameters()) == summary["compressed"]["params"]


def test_resume_after_kill_matches_uninterrupted_run(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    argv = [*TINY, "--hpo", "ddpg", "--episodes", "6", "--ddpg-warmup", "2"]
    full = run_ok(capsys, *argv, "--out-dir", str(tmp_path / "a"))

    from torchpocket.hpo.ddpg import DDPG

    original_tell = DDPG.tell
    calls = {"n": 0}

    def dying_tell(self: DDPG, policy: list[float], reward: float) -> None:
        calls["n"] += 1
        if calls["n"] == 4:  # killed while the 4th trial is in flight
            raise KeyboardInterrupt
        original_tell(self, policy, reward)

    monkeypatch.setattr(DDPG, "tell", dying_tell)
    assert main([*argv, "--out-dir", str(tmp_path / "b")]) == 130
    capsys.readouterr()
    (killed,) = (tmp_path / "b").iterdir()
    assert len(trials(killed)) == 3
    monkeypatch.setattr(DDPG, "tell", original_tell)
    resumed = run_ok(capsys, "--resume", str(killed), "--quiet")
    assert resumed == killed
    a, b = trials(full), trials(resumed)
    assert [r["trial"] for r in b] == list(range(6))
    import optuna

    stored = optuna.load_study(study_name="torchpocket", storage=f"sqlite:///{resumed / 'study.db'}").trials
    assert [t.user_attrs["trial"] for t in stored] == list(range(6))  # study.db rebuilt: no trial twice
    for ra, rb in zip(a, b):
        assert rb["policy"] == pytest.approx(ra["policy"], abs=1e-9)
        assert rb["reward"] == pytest.approx(ra["reward"], abs=1e-9)


def test_failed_candidate_is_recorded_and_search_goes_on(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from torchpocket.learners.chn_pruned import ChnPrunedLearner

    original = ChnPrunedLearner.compress
    calls = {"n": 0}

    def flaky(self: ChnPrunedLearner, model: nn.Module, policy: list[float]) -> nn.Module:
        calls["n"] += 1
        if calls["n"] == 2:
            raise CandidateError("simulated failure to build")
        return original(self, model, policy)

    monkeypatch.setattr(ChnPrunedLearner, "compress", flaky)
    run_dir = run_ok(capsys, *TINY, "--hpo", "random", "--episodes", "3", "--out-dir", str(tmp_path))
    rows = trials(run_dir)
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert "simulated failure" in rows[1]["reason"]


@pytest.mark.parametrize("error", [RuntimeError("a bug"), MemoryError()])
def test_a_bug_or_out_of_memory_stops_the_run_in_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    from torchpocket.learners.chn_pruned import ChnPrunedLearner

    original = ChnPrunedLearner.compress
    calls = {"n": 0}

    def buggy(self: ChnPrunedLearner, model: nn.Module, policy: list[float]) -> nn.Module:
        calls["n"] += 1
        if calls["n"] == 2:
            raise error
        return original(self, model, policy)

    monkeypatch.setattr(ChnPrunedLearner, "compress", buggy)
    rc = main([*TINY, "--hpo", "random", "--episodes", "3", "--out-dir", str(tmp_path)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "%|" not in ln]
    (run_dir,) = tmp_path.iterdir()
    assert len(trials(run_dir)) == 1  # the finished trial is kept: --resume continues from it
    if isinstance(error, MemoryError):
        assert rc == 2 and err == [err[-1]] and "out of memory" in err[-1] and "--reward-val-size" in err[-1]
    else:
        assert rc == 1 and len(err) == 1 and "unexpected RuntimeError: a bug" in err[0] and "log.txt" in err[0]
        log = (run_dir / "log.txt").read_text()
        assert "Traceback (most recent call last)" in log and "in buggy" in log


def test_policy_file_reapplies_a_found_policy(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    first = run_ok(capsys, *TINY, "--hpo", "random", "--episodes", "2", "--out-dir", str(tmp_path / "a"))
    again = run_ok(capsys, *TINY, "--hpo", "none", "--policy", str(first / "policy.yaml"),
                   "--out-dir", str(tmp_path / "b"))
    s1 = json.loads((first / "summary.json").read_text())
    s2 = json.loads((again / "summary.json").read_text())
    assert s2["compressed"]["flops"] == s1["compressed"]["flops"]
    assert s2["compressed"]["params"] == s1["compressed"]["params"]


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (["--hpo", "tpe", "--storage", "notadb://nowhere/x"], "storage"),
        (["--hpo", "ddpg", "--storage", "sqlite:///x.db"], "--storage needs an Optuna-backed optimizer"),
        (["--hpo", "random", "--episodes", "0"], "--episodes must be at least 1"),
        (["--hpo", "random", "--policy", "p.yaml"], "use it with --hpo none"),
        (["--hpo", "none", "--policy", "/nonexistent/policy.yaml"], "does not exist"),
    ],
)
def test_search_user_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], expect: str) -> None:
    rc = main([*TINY, *argv, "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and expect in lines[0], err


class UserNet(nn.Module):
    """A network torchpocket has never seen: residual add, depthwise conv and a concat."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(16, 24, 1), nn.BatchNorm2d(24), nn.ReLU(),
                               nn.Conv2d(24, 24, 3, padding=1, groups=24), nn.BatchNorm2d(24), nn.ReLU(),
                               nn.Conv2d(24, 16, 1), nn.BatchNorm2d(16))
        self.b = nn.Sequential(nn.Conv2d(16, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(28, 32, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten(), nn.Linear(32, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.a(x))
        return self.head(torch.cat([x, self.b(x)], 1))


def test_python_api_compresses_a_user_model(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 3, 16, 16, generator=g), torch.randint(0, 5, (96,), generator=g)
    train = DataLoader(TensorDataset(x[:64], y[:64]), batch_size=16, shuffle=True)
    val = DataLoader(TensorDataset(x[64:], y[64:]), batch_size=16)
    model = UserNet().eval()
    before = [p.clone() for p in model.parameters()]
    small, result = torchpocket.compress(model, train, val, learner="chn-pruned", hpo="random", target=0.6,
                                         episodes=3, retrain_epochs=0, calib_batches=2, out_dir=str(tmp_path))
    assert len(result.trials) == 3
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the user's model is untouched
    n_small = sum(p.numel() for p in small.parameters())
    assert n_small < sum(p.numel() for p in model.parameters())
    assert small(x[:2]).shape == (2, 5)
    (run_dir,) = tmp_path.iterdir()
    assert json.loads((run_dir / "summary.json").read_text())["flops_ratio"] <= 0.6 + 1e-6
    rebuilt = torchpocket.load(run_dir / "model.pt", model=UserNet())
    torch.testing.assert_close(rebuilt(x[:4]), small.eval()(x[:4]))


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_a_damaged_search_state_is_one_line_naming_the_file(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                            damage: str) -> None:
    run_dir = run_ok(capsys, *TINY, "--hpo", "random", "--episodes", "2", "--out-dir", str(tmp_path))
    state = run_dir / "search_state.pt"
    state.write_bytes(state.read_bytes()[:40] if damage == "truncated" else b"not a torch file\n")
    rc = main(["--resume", str(run_dir), "--quiet"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and str(state) in err[0] and "cannot be resumed" in err[0]


def test_resume_of_a_run_stopped_before_its_config_or_of_another_folder_is_one_line(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    early = tmp_path / "early"
    early.mkdir()
    (early / ".config.yaml.tmp4242").write_text("run:\n")  # killed between the config's temporary file and rename
    assert main(["--resume", str(early)]) == 2
    assert "stopped before it saved its config.yaml, so nothing of it ran" in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("hello")
    assert main(["--resume", str(other)]) == 2
    assert "not a torchpocket run directory" in capsys.readouterr().err
