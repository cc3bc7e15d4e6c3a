"""Tests run on tiny nets and data; one torch thread each keeps the 2-core machine responsive."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def shared_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """One baseline cache per test session: the first ``run.py`` run trains it, the others reuse it."""
    monkeypatch.setenv("TORCHPOCKET_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def run_ok(capsys: pytest.CaptureFixture[str], *argv: str) -> Path:
    """``run.py argv`` in this process; asserts exit 0 and returns the run directory it printed."""
    from torchpocket.cli import main

    rc = main(list(argv))
    out, err = capsys.readouterr()
    assert rc == 0, err
    line = next(ln for ln in out.splitlines() if ln.startswith("run directory: "))
    return Path(line.split(": ", 1)[1])
