"""The command line: every user error is one line on stderr with exit code 2; runs write their directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchpocket.api import load, save_model
from torchpocket.cli import main
from torchpocket.config import default_config
from torchpocket.nets import create_net

QUICK = ["--dataset", "digits", "--net", "lenet5", "--device", "cpu", "--quiet"]


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse's own errors
        rc = int(e.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(capsys: pytest.CaptureFixture[str], *argv: str, expect: str) -> str:
    rc, _, err = run_cli(capsys, *argv)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert expect.lower() in lines[0].lower(), lines[0]
    return lines[0]


@pytest.fixture
def lenet_ckpt(tmp_path: Path) -> Path:
    model = create_net("lenet5", in_channels=1, num_classes=10)
    path = tmp_path / "lenet.pt"
    save_model(path, model, config=default_config(), net="lenet5", in_channels=1, num_classes=10, image_size=8)
    return path


def test_help_lists_every_option_with_default(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(capsys, "--help")
    assert rc == 0
    for flag in ("--learner", "--hpo", "--target", "--epochs", "--episodes", "--ft-steps", "--reward", "--resume",
                 "--device", "--quiet", "--config", "--list", "--retrain-epochs", "--seed"):
        assert flag in out
    assert "(default: 0.1)" in out  # --lr


def test_list_names_every_registry(capsys: pytest.CaptureFixture[str]) -> None:
    from torchpocket.datasets import DATASETS
    from torchpocket.hpo import HPOS
    from torchpocket.learners import LEARNERS
    from torchpocket.nets import NETS

    rc, out, _ = run_cli(capsys, "--list")
    assert rc == 0
    for reg in (LEARNERS, HPOS, NETS, DATASETS):
        for name in reg.names():
            assert f"  {name} " in out
    assert "tv:<name>" in out


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (["--learner", "full-prex"], "unknown learner 'full-prex' (did you mean 'full-prec'?)"),
        (["--hpo", "ddgp"], "did you mean 'ddpg'"),
        (["--net", "resnet2"], "unknown net"),
        (["--net", "tv:resnet1"], "tv:resnet18"),
        (["--dataset", "fashion"], "unknown dataset"),
        (["--target", "0"], "--target must be in (0, 1]"),
        (["--target", "1.5"], "--target must be in (0, 1]"),
        (["--target", "abc"], "invalid float value"),
        (["--epochs", "-1"], "must not be negative"),
        (["--schedule", "linear"], "invalid choice"),
        (["--config", "/nonexistent/preset.yaml"], "does not exist"),
        (["--init", "/nonexistent/model.pt"], "does not exist"),
        (["--episodes", "0", "--learner", "full-prec"], "--episodes must be at least 1"),
        (["--resume", "/nonexistent/run"], "--resume"),
    ],
)
def test_user_errors_are_one_line_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str], expect: str) -> None:
    assert_user_error(capsys, *QUICK, *argv, expect=expect)


def test_yaml_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: [1,\n")
    assert_user_error(capsys, *QUICK, "--config", str(bad), expect="does not parse")
    bad.write_text("train:\n  epoch: 3\n")
    assert_user_error(capsys, *QUICK, "--config", str(bad), expect="unknown key train.epoch")
    bad.write_text("train:\n  epochs: ten\n")
    assert_user_error(capsys, *QUICK, "--config", str(bad), expect="expected int")
    bad.write_text("trainer:\n  epochs: 3\n")
    assert_user_error(capsys, *QUICK, "--config", str(bad), expect="unknown section 'trainer'")


def test_bad_checkpoints(capsys: pytest.CaptureFixture[str], tmp_path: Path, lenet_ckpt: Path) -> None:
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert_user_error(capsys, *QUICK, "--init", str(empty), expect="is empty")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(lenet_ckpt.read_bytes()[:1000])
    assert_user_error(capsys, *QUICK, "--init", str(truncated), expect="cannot be read")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)  # a state_dict, of no net we have (issue 19: state_dicts load)
    assert_user_error(capsys, *QUICK, "--init", str(other), expect="is not a state_dict of --net")
    foreign = tmp_path / "foreign.pt"
    torch.save({"format": "someone-else", "epoch": 3}, foreign)
    assert_user_error(capsys, *QUICK, "--init", str(foreign),
                      expect="neither a torchpocket checkpoint nor a state_dict")
    assert_user_error(capsys, *QUICK[:2], "--net", "resnet20", "--init", str(lenet_ckpt), "--quiet",
                      expect="is a lenet5 checkpoint")


def test_arbitrary_code_pickle_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple:
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "torchpocket-checkpoint", "x": Evil()}, path)
    line = assert_user_error(capsys, *QUICK, "--init", str(path), expect="cannot be read")
    assert "pwned" not in line


def test_missing_data_dir_and_cuda(capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                   ) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert_user_error(capsys, "--dataset", "digits", "--net", "lenet5", "--device", "cuda", expect="no CUDA")
    assert_user_error(capsys, "--dataset", "cifar10", "--data-dir", str(tmp_path), "--device", "cpu",
                      "--out-dir", str(tmp_path / "runs"), expect="cifar10 not found")


def test_full_prec_run_writes_its_directory(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    argv = [*QUICK, "--learner", "full-prec", "--epochs", "3", "--batch-size", "32", "--lr", "0.05",
            "--out-dir", str(runs)]
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 0, err
    (run_dir,) = runs.iterdir()
    assert run_dir.name.endswith("-full-prec-none-lenet5-digits")
    for name in ("config.yaml", "log.txt", "metrics.json", "model.pt", "summary.json"):
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test_acc"] > 50  # lenet5 learns digits in three short epochs
    ckpt = torch.load(run_dir / "model.pt", weights_only=True)
    assert ckpt["config"]["train"]["epochs"] == 3
    model = load(run_dir / "model.pt")
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in create_net("lenet5", in_channels=1, num_classes=10).parameters())
    assert "test acc" in (run_dir / "log.txt").read_text()
    # a second run never overwrites the first
    rc, _, err = run_cli(capsys, *argv[:-2], "--epochs", "0", "--out-dir", str(runs))
    assert rc == 0, err
    assert len(list(runs.iterdir())) == 2


def test_console_entry_point_has_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "run.py"), "--learner", "chn-prune"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "unknown learner" in proc.stderr
