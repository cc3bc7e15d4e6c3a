"""DistributedDataParallel on CPU: 2 Gloo ranks must train exactly like one process with the same global batch."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from torchpocket import distributed
from torchpocket.datasets import DATASETS
from torchpocket.errors import UserError
from torchpocket.learners import create_learner
from torchpocket.learners.training import TrainConfig

GLOBAL_BATCH = 16


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(16, 10))


def train(out: Path | None = None) -> dict[str, torch.Tensor]:
    """Two epochs of the full-prec learner's re-train (shuffled, sharded under torchrun) on synthetic data."""
    torch.set_num_threads(1)
    data = DATASETS.get("synthetic")(shape=(1, 8, 8), train_size=96, val_size=32, test_size=8)
    cfg = TrainConfig(batch_size=GLOBAL_BATCH, lr=0.05, channels_last=False, distill_alpha=0.0)
    learner = create_learner("full-prec", train_cfg=cfg, quiet=True, seed=3)
    model = tiny_net()
    learner.prepare(model, data)
    history = learner.retrain(model, teacher=None, epochs=2)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["val_acc"] = torch.tensor(history[-1]["val_acc"])
    if out is not None:
        torch.save(state, out / f"rank{distributed.rank()}.pt")
    return state


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    assert distributed.init_from_env("cpu")
    try:
        train(Path(out))
    finally:
        distributed.destroy()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(240)
def test_two_gloo_ranks_match_one_process(tmp_path: Any) -> None:
    single = train()
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for k, v in single.items():
        assert torch.equal(ranks[0][k], ranks[1][k]), f"ranks disagree on {k}"  # DDP keeps replicas identical
        torch.testing.assert_close(ranks[0][k], v, rtol=1e-4, atol=1e-5, msg=f"DDP differs from one process: {k}")
    assert not torch.equal(single["4.weight"], tiny_net().state_dict()["4.weight"])  # it did train


def test_single_process_is_a_no_op() -> None:
    assert not distributed.is_initialized() and distributed.world_size() == 1 and distributed.is_main()
    assert distributed.wrap_ddp(tiny_net()) is None
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.per_rank_batch(10) == 10
    assert not distributed.init_from_env("cpu")  # no torchrun variables: nothing to join


def test_global_batch_must_split_across_ranks(monkeypatch: Any) -> None:
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    assert distributed.per_rank_batch(12) == 4
    with pytest.raises(UserError, match="does not split evenly across 3 ranks"):
        distributed.per_rank_batch(16)


@pytest.mark.timeout(300)
def test_torchrun_run_py_matches_single_process_and_writes_one_run_dir(tmp_path: Any) -> None:
    """``torchrun --nproc_per_node=2 run.py ...`` (Gloo) trains like ``run.py ...`` with the same global batch."""
    import subprocess
    import sys

    import torchpocket
    from torchpocket.cli import main

    argv = ["--learner", "full-prec", "--net", "lenet5", "--dataset", "synthetic", "--epochs", "2", "--threads", "1",
            "--lr", "0.02", "--batch-size", "32", "--device", "cpu", "--quiet", "--no-channels-last"]
    assert main([*argv, "--out-dir", str(tmp_path / "single")]) == 0
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(root / "run.py"), *argv, "--out-dir", str(tmp_path / "ddp")],
                          capture_output=True, text=True, timeout=280, env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (single,) = (tmp_path / "single").iterdir()
    dirs = list((tmp_path / "ddp").iterdir())
    assert len(dirs) == 1, f"one run directory, written by rank 0: {dirs}"
    assert proc.stdout.count("run directory: ") == 1  # rank 1 prints nothing
    a = torchpocket.load(single / "model.pt").state_dict()
    b = torchpocket.load(dirs[0] / "model.pt").state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, k=k: f"torchrun vs one process, {k}: {m}")
