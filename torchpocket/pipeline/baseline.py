"""The model a run starts from and the data it runs on: ``--init``, else the shipped checkpoint under
``benchmarks/``, else a cached baseline, else one trained now (and cached); ``--learner full-prec`` trains
(or continues) a model and stops there."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchpocket import distributed
from torchpocket.datasets import DATASETS, DataBundle, load_dataset
from torchpocket.errors import UserError
from torchpocket.learners.training import TrainConfig, evaluate, fit
from torchpocket.pipeline.rundir import RunDir

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_DIR = REPO_ROOT / "benchmarks"


def load_data(cfg: dict[str, Any]) -> DataBundle:
    """The run's dataset (train / val / test), with the data options the dataset's loader accepts."""
    d, run = cfg["data"], cfg["run"]
    kw: dict[str, Any] = {"data_dir": d["data_dir"], "seed": 0}
    if d["val_size"] >= 0:
        kw["val_size"] = d["val_size"]
    accepts = inspect.signature(DATASETS.get(run["dataset"])).parameters
    if "num_workers" in accepts:  # on-disk datasets decode in worker processes
        kw["num_workers"] = d["num_workers"]
    if "image_size" in accepts and d["image_size"] > 0:
        kw["image_size"] = d["image_size"]
    data = load_dataset(run["dataset"], **kw)
    print(data.sizes(), flush=True)
    return data


def train_config(cfg: dict[str, Any]) -> TrainConfig:
    return TrainConfig(**cfg["train"])


def baseline_cache_path(cfg: dict[str, Any]) -> Path:
    run = cfg["run"]
    key = json.dumps({"net": run["net"], "dataset": run["dataset"], "seed": run["seed"], "train": cfg["train"],
                      "val_size": cfg["data"]["val_size"]}, sort_keys=True)
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    root = Path(os.environ.get("TORCHPOCKET_CACHE", Path.home() / ".cache" / "torchpocket")) / "baselines"
    return root / f"{safe_name(run['net'])}-{run['dataset']}-s{run['seed']}-{digest}.pt"


def safe_name(net: str) -> str:
    """A net name as one file-name component (``tv:resnet18`` -> ``tv-resnet18``, ``a/m.py:f`` -> ``a-m.py-f``)."""
    return "".join(c if c.isalnum() or c in "._" else "-" for c in net).strip("-")


def shipped_baseline(net: str, dataset: str) -> Path | None:
    p = SHIPPED_DIR / f"{safe_name(net)}-{dataset}.pt"
    return p if p.is_file() else None


def resolve_baseline(cfg: dict[str, Any], data: DataBundle, device: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """The model a compression run starts from: --init, else the shipped checkpoint, else a cached or new baseline."""
    from torchpocket.api import load, save_model
    from torchpocket.learners.training import load_checkpoint
    from torchpocket.nets import create_net

    run = cfg["run"]
    if run["init"]:
        model, base_arch = init_model(cfg, data)
        return model, {"source": str(run["init"]), "base_arch": base_arch}
    shipped = shipped_baseline(run["net"], run["dataset"])
    if shipped is not None:
        ckpt = load_checkpoint(shipped)
        check_compatible(ckpt, data, str(shipped))
        print(f"starting from the shipped baseline {shipped.relative_to(REPO_ROOT)}", flush=True)
        return load(shipped), {"source": str(shipped), "base_arch": []}
    cache = baseline_cache_path(cfg)
    if cache.is_file():
        print(f"starting from the cached baseline {cache}", flush=True)
        return load(cache), {"source": str(cache), "base_arch": []}
    tc = train_config(cfg)
    print(f"no --init and no shipped baseline for {run['net']} on {run['dataset']}: training one for "
          f"{tc.epochs} epochs (cached at {cache})", flush=True)
    model = create_net(run["net"], in_channels=data.in_channels, num_classes=data.num_classes).to(device)
    fit(model, data.loader("train", batch_size=tc.batch_size, train=True, seed=run["seed"]),
        data.loader("val", batch_size=512), cfg=tc, device=device, quiet=run["quiet"], desc="baseline")
    model.to(memory_format=torch.contiguous_format)
    cache.parent.mkdir(parents=True, exist_ok=True)
    save_model(cache, model, config=cfg, net=run["net"], in_channels=data.in_channels,
               num_classes=data.num_classes, image_size=data.image_size)
    return model, {"source": str(cache), "base_arch": []}


def init_model(cfg: dict[str, Any], data: DataBundle) -> tuple[nn.Module, list[dict[str, Any]]]:
    """The model ``--init`` names and the compression steps it already carries: a torchpocket checkpoint, a plain
    state_dict for ``--net``, or (``--trust-checkpoint``) a whole pickled model."""
    from torchpocket.api import arch_chain, load
    from torchpocket.learners.training import read_model_file
    from torchpocket.nets import create_net

    run = cfg["run"]
    kind, obj = read_model_file(run["init"], trust=run["trust_checkpoint"])
    if kind == "torchpocket":
        check_compatible(obj, data, run["init"])
        run["net"] = obj.get("net") or run["net"]
        print(f"starting from {run['init']} (net {run['net']}, learner {obj.get('learner')})", flush=True)
        return load(run["init"]), arch_chain(obj)
    if kind == "state_dict":
        model = create_net(run["net"], in_channels=data.in_channels, num_classes=data.num_classes)
        try:
            model.load_state_dict(obj)
        except RuntimeError as e:
            first = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            raise UserError(f"--init {run['init']} is not a state_dict of --net {run['net']} with "
                            f"{data.in_channels} input channels and {data.num_classes} classes: "
                            f"{' '.join(first[1:2] or first[:1])[:200]}") from None
        print(f"starting from the state_dict {run['init']} (net {run['net']})", flush=True)
        return model.eval(), []
    run["net"] = None  # a pickled model has no registry name: load its result with torchpocket.load(model=...)
    print(f"starting from the whole model pickled in {run['init']} ({type(obj).__name__})", flush=True)
    return obj.eval(), []


def check_compatible(ckpt: dict[str, Any], data: DataBundle, path: str) -> None:
    if ckpt.get("in_channels") != data.in_channels or ckpt.get("num_classes") != data.num_classes:
        raise UserError(
            f"checkpoint {path} takes {ckpt.get('in_channels')}-channel input with {ckpt.get('num_classes')} classes, "
            f"but {data.name} has {data.in_channels} channels and {data.num_classes} classes"
        )


def train_baseline(learner: Any, cfg: dict[str, Any], data: DataBundle, run_dir: RunDir,
                    device: torch.device) -> dict[str, Any]:
    """``--learner full-prec``: train (or continue from --init) and write model.pt + summary.json."""
    from torchpocket.api import save_model
    from torchpocket.nets import create_net

    run, tc = cfg["run"], train_config(cfg)
    base_arch: list[dict[str, Any]] = []
    if run["init"]:  # continue training any checkpoint, a compressed one included
        model, base_arch = init_model(cfg, data)
    else:
        model = create_net(run["net"], in_channels=data.in_channels, num_classes=data.num_classes)
    model.to(device)
    start = time.perf_counter()
    train_loader = data.loader("train", batch_size=distributed.per_rank_batch(tc.batch_size), train=True,
                               seed=run["seed"], rank=distributed.rank(), world_size=distributed.world_size())
    history = fit(model, train_loader, data.loader("val", batch_size=512), cfg=tc, device=device, quiet=run["quiet"])
    seconds = time.perf_counter() - start
    model.to(memory_format=torch.contiguous_format)
    test_acc = evaluate(model, data.loader("test", batch_size=512), device=device)
    metrics = {"test_acc": test_acc, "val_acc": history[-1]["val_acc"] if history else None,
               "train_seconds": seconds, "history": history}
    save_model(run_dir.path / "model.pt", model.cpu(), config=cfg, net=run["net"], in_channels=data.in_channels,
               num_classes=data.num_classes, image_size=data.image_size, metrics={"test_acc": test_acc},
               base_arch=base_arch)
    run_dir.write_json("metrics.json", metrics)
    summary = {"learner": "full-prec", "net": run["net"], "dataset": run["dataset"], "test_acc": test_acc,
               "epochs": tc.epochs, "train_seconds": seconds}
    run_dir.write_json("summary.json", summary)
    print(f"test acc {test_acc:.2f}%  |  model {run_dir.path / 'model.pt'}", flush=True)
    return summary
