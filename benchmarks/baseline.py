#!/usr/bin/env python
"""Train the benchmark baseline (resnet20 on Fashion-MNIST) and print its figures.

Prints: test accuracy, seconds per epoch, and the input-pipeline ratio (a
training epoch's steps through the real loader vs the same number of bare
forward/backward steps on the same, pre-fetched batches; median of repeats).
Writes the checkpoint that the default preset and the other benchmarks use.

    python benchmarks/baseline.py --epochs 12 --out benchmarks/resnet20-fashion-mnist.pt
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch

from torchpocket.api import save_model
from torchpocket.config import default_config
from torchpocket.datasets import load_dataset
from torchpocket.learners.training import TrainConfig, evaluate, fit, make_optimizer, train_one_epoch
from torchpocket.nets import create_net
from torchpocket.utils import machine_description, seed_everything


def pipeline_ratio(model: torch.nn.Module, data: object, cfg: TrainConfig, steps: int = 30, repeats: int = 3) -> float:
    """Median over repeats of (steps through the loader with augmentation) / (bare steps on the same batches)."""
    ratios = []
    for r in range(repeats):
        m = copy.deepcopy(model).to(memory_format=torch.channels_last)
        loader = data.loader("train", batch_size=cfg.batch_size, train=True, seed=100 + r)  # type: ignore[attr-defined]
        opt = make_optimizer(m, cfg, lr=1e-4)
        train_one_epoch(m, loader, opt, cfg=cfg, device=torch.device("cpu"), max_steps=3, quiet=True)  # warm-up
        t0 = time.perf_counter()
        train_one_epoch(m, loader, opt, cfg=cfg, device=torch.device("cpu"), max_steps=steps, quiet=True)
        real = time.perf_counter() - t0
        batches = []
        for i, (x, y) in enumerate(loader):
            if i >= steps:
                break
            batches.append((x.contiguous(memory_format=torch.channels_last), y))
        t0 = time.perf_counter()
        m.train()
        for x, y in batches:
            loss = torch.nn.functional.cross_entropy(m(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss.item()
        bare = time.perf_counter() - t0
        ratios.append(real / bare)
    return statistics.median(ratios)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--net", default="resnet20")
    ap.add_argument("--dataset", default="fashion-mnist")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/resnet20-fashion-mnist.pt")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--ratio-only", action="store_true", help="only measure the input-pipeline ratio")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    # everything the end of the run needs is imported and built now: a 30-minute job must not pick up
    # half-edited modules through a lazy import when it saves
    config = default_config()
    config["run"].update(net=args.net, dataset=args.dataset, seed=args.seed)
    config["train"].update(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
    machine = machine_description()
    seed_everything(args.seed)
    data = load_dataset(args.dataset, seed=0)
    print(data.sizes(), flush=True)
    model = create_net(args.net, in_channels=data.in_channels, num_classes=data.num_classes)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size)
    ratio = pipeline_ratio(model, data, cfg, repeats=3)
    print(f"input-pipeline ratio (loader steps / bare steps, median of 3): {ratio:.3f}", flush=True)
    if args.ratio_only:
        return
    dev = torch.device("cpu")
    start = time.perf_counter()
    history = fit(model, data.loader("train", batch_size=cfg.batch_size, train=True, seed=args.seed),
                  data.loader("val", batch_size=512), cfg=cfg, device=dev, quiet=args.quiet)
    total = time.perf_counter() - start
    test_acc = evaluate(model, data.loader("test", batch_size=512), device=dev)
    sec_epoch = statistics.median(h["seconds"] for h in history)
    metrics = {"test_acc": test_acc, "val_acc": history[-1]["val_acc"], "seconds_per_epoch": sec_epoch,
               "train_seconds": total, "pipeline_ratio": ratio, "machine": machine,
               "threads": torch.get_num_threads()}
    save_model(args.out, model.to(memory_format=torch.contiguous_format), config=config, net=args.net,
               in_channels=data.in_channels, num_classes=data.num_classes, image_size=data.image_size, metrics=metrics)
    print("| net | dataset | epochs | test acc (%) | val acc (%) | s/epoch | input-pipeline ratio | threads |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.net} | {args.dataset} | {args.epochs} | {test_acc:.2f} | {history[-1]['val_acc']:.2f} | "
          f"{sec_epoch:.1f} | {ratio:.3f} | {torch.get_num_threads()} |")
    print(json.dumps(metrics))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
