#!/usr/bin/env python
"""Data-parallel training throughput: 1 process vs N DistributedDataParallel processes, same global batch.

Each configuration trains the benchmark net with torchpocket's own trainer (``train_one_epoch`` through
``DistributedDataParallel``, the path ``torchrun run.py ...`` takes) for a fixed number of steps on
in-memory data of the benchmark dataset's shape, after warm-up steps, and reports images per second
summed over ranks (median over repeats) and the ratio to one process. CPU: Gloo, the machine's cores
split evenly between the ranks. GPU (``--device cuda``): NCCL, one GPU per rank.

    python benchmarks/ddp.py --out benchmarks/ddp.md                    # 1 vs 2 Gloo processes, CPU
    python benchmarks/ddp.py --device cuda --procs 1 2 4 8 --batch-size 512   # on a GPU machine
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shlex
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from torchpocket import distributed
from torchpocket.learners.training import TrainConfig, make_optimizer, train_one_epoch
from torchpocket.nets import create_net
from torchpocket.utils import machine_description


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, (args.threads or cores) // world))
    distributed.init_from_env(args.device)
    device = distributed.local_device(args.device)
    torch.manual_seed(0)
    model = create_net(args.net, num_classes=10, in_channels=args.channels).to(device)
    cfg = TrainConfig(batch_size=args.batch_size, lr=0.05, channels_last=device.type == "cpu")
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    per_rank = distributed.per_rank_batch(args.batch_size)
    g = torch.Generator().manual_seed(rank)
    n = per_rank * (args.steps + args.warmup)
    x = torch.randn(n, args.channels, args.image_size, args.image_size, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    batches = [(x[i : i + per_rank], y[i : i + per_rank]) for i in range(0, n, per_rank)]
    ddp = distributed.wrap_ddp(model)
    opt = make_optimizer(model, cfg)
    rates = []
    for _ in range(args.repeats):
        train_one_epoch(model, batches[: args.warmup], opt, cfg=cfg, device=device, quiet=True, ddp=ddp)
        distributed.barrier()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_one_epoch(model, batches[args.warmup :], opt, cfg=cfg, device=device, quiet=True, ddp=ddp)
        if device.type == "cuda":
            torch.cuda.synchronize()
        distributed.barrier()
        rates.append(args.batch_size * args.steps / (time.perf_counter() - t0))  # global images / s
    if distributed.is_main():
        Path(out).write_text(repr(statistics.median(rates)))
    distributed.destroy()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--net", default="resnet20")
    ap.add_argument("--channels", type=int, default=1, help="input channels (Fashion-MNIST: 1)")
    ap.add_argument("--image-size", type=int, default=28)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts to compare")
    ap.add_argument("--batch-size", type=int, default=128, help="global batch (split across the ranks)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per repeat")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads in all (0: every core), split over ranks")
    ap.add_argument("--device", default="cpu", help="cpu (Gloo) or cuda (NCCL, one GPU per rank)")
    ap.add_argument("--out", default=None, help="markdown file for the table (it is printed too)")
    args = ap.parse_args()
    if args.device.startswith("cuda") and torch.cuda.device_count() < max(args.procs):
        sys.exit(f"error: --procs {max(args.procs)} needs that many GPUs, found {torch.cuda.device_count()}")
    rows = []
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.procs:
            out = str(Path(tmp) / f"p{n}.txt")
            mp.spawn(_worker, args=(n, free_port(), args, out), nprocs=n, join=True)
            rate = float(Path(out).read_text())
            base = base or rate
            rows.append(f"| {n} | {args.batch_size // n} | {rate:.0f} | {rate / base:.2f}x |")
            print(rows[-1], flush=True)
    backend = "NCCL" if args.device.startswith("cuda") else "Gloo"
    text = "\n".join([
        f"## Data-parallel training throughput ({args.net}, {backend})", "",
        f"- machine: {machine_description()}; device {args.device}; {_dt.date.today().isoformat()}",
        f"- command: `{shlex.join(['python', *sys.argv])}`", "",
        "| processes | batch per rank | images/s (all ranks, median) | vs 1 process |", "|---:|---:|---:|---:|",
        *rows, "",
        f"Global batch {args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up steps, median of "
        f"{args.repeats} repeats; torchpocket's train_one_epoch through DistributedDataParallel; on CPU the "
        f"{args.threads or os.cpu_count()} threads are split evenly between the processes.", ""])
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
