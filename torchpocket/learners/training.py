"""Shared training functions every learner reuses (torchvision ``references/classification`` style).

``train_one_epoch`` and ``evaluate`` are plain functions; ``fit`` runs whole epochs
with SGD + momentum and a cosine / one-cycle / step schedule; ``finetune`` runs a
fixed number of steps (fast fine-tuning of search candidates). Both take an
optional teacher for distillation and an ``after_step`` hook (masks, quantizer
ranges) so learners add behaviour without copying the loop.
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchpocket import faults
from torchpocket.distributed import wrap_ddp
from torchpocket.errors import UserError
from torchpocket.options import opt
from torchpocket.utils import atomic_write_bytes, progress


@dataclass
class TrainConfig:
    """The trainer's own slice of the config (section ``train``)."""

    epochs: int = opt(30, "training epochs (baseline training with --learner full-prec)")
    batch_size: int = opt(128, "mini-batch size for training and fine-tuning", positive=True)
    lr: float = opt(0.1, "peak learning rate (SGD)")
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(5e-4, "L2 weight decay (not applied to biases and norm layers)")
    nesterov: bool = opt(True, "Nesterov momentum")
    schedule: str = opt("cosine", "learning-rate schedule", choices=("cosine", "onecycle", "step"))
    warmup_epochs: float = opt(0.0, "linear warm-up epochs (cosine / step schedules)")
    label_smoothing: float = opt(0.0, "label smoothing of the hard-label loss")
    distill_temperature: float = opt(4.0, "distillation temperature T (teacher = the uncompressed model)")
    distill_alpha: float = opt(0.9, "weight of the soft-target loss; 1 - alpha goes to the hard labels (0 = off)")
    max_steps_per_epoch: int = opt(0, "cap on steps per epoch (0 = the whole split; for quick runs)")
    channels_last: bool = opt(True, "NHWC memory format for conv nets (faster conv kernels on CPU)")
    sync_bn: bool = opt(False, "under torchrun: batch-norm statistics over the global batch (SyncBatchNorm)",
                        flag="--sync-bn")




def get_default_config() -> TrainConfig:
    return TrainConfig()


class NonFiniteLoss(RuntimeError):
    """Training diverged (NaN or inf loss)."""


def distill_loss(
    student: Tensor, teacher: Tensor, labels: Tensor, *, temperature: float, alpha: float, label_smoothing: float = 0.0
) -> Tensor:
    """Hinton et al. (2015): alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels)."""
    hard = F.cross_entropy(student, labels, label_smoothing=label_smoothing)
    if alpha <= 0:
        return hard
    t = temperature
    soft = F.kl_div(
        F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True, reduction="batchmean"
    ) * (t * t)
    return alpha * soft + (1 - alpha) * hard


def make_optimizer(model: nn.Module, cfg: TrainConfig, lr: float | None = None) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr or cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)


def make_scheduler(
    opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int, steps_per_epoch: int = 0
) -> torch.optim.lr_scheduler.LRScheduler:
    total_steps = max(1, total_steps)
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=total_steps, pct_start=0.25
        )
    warm = int(cfg.warmup_epochs * steps_per_epoch) if steps_per_epoch else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        frac = (step - warm) / max(1, total_steps - warm)
        if cfg.schedule == "step":
            return 0.1 ** sum(frac >= m for m in (0.5, 0.75))
        return 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _forward_loss(
    model: nn.Module, x: Tensor, y: Tensor, teacher: nn.Module | None, cfg: TrainConfig
) -> tuple[Tensor, Tensor]:
    out = model(x)
    if teacher is not None:
        with torch.no_grad():
            t_out = teacher(x)
        loss = distill_loss(
            out,
            t_out,
            y,
            temperature=cfg.distill_temperature,
            alpha=cfg.distill_alpha,
            label_smoothing=cfg.label_smoothing,
        )
    else:
        loss = F.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)
    return loss, out


def train_one_epoch(
    model: nn.Module,
    loader: Iterable[tuple[Tensor, Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    cfg: TrainConfig,
    device: torch.device,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    teacher: nn.Module | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
    max_steps: int = 0,
    desc: str = "train",
    quiet: bool = False,
    ddp: nn.Module | None = None,
) -> dict[str, float]:
    """One pass over ``loader``; returns mean loss, accuracy and images/s. Raises :class:`NonFiniteLoss`.

    ``ddp``: ``model`` wrapped in DistributedDataParallel (forward and backward go through it, so
    gradients are averaged across ranks); hooks and the caller keep working on ``model`` itself.
    """
    model.train()
    if teacher is not None:
        teacher.eval()
    total = len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    if max_steps and total:
        total = min(total, max_steps)
    loss_sum, correct, seen, start = 0.0, 0, 0, time.perf_counter()
    bar = progress(total=total, desc=desc, quiet=quiet, leave=False)
    for step, (x, y) in enumerate(loader):
        if max_steps and step >= max_steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if cfg.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        loss, out = _forward_loss(ddp if ddp is not None else model, x, y, teacher, cfg)
        if not torch.isfinite(loss):
            bar.close()
            raise NonFiniteLoss(f"loss became {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if after_step is not None:
            after_step(model)
        faults.point("train-step")
        n = y.numel()
        loss_sum += loss.item() * n
        correct += (out.argmax(1) == y).sum().item()
        seen += n
        bar.update(1)
        elapsed = time.perf_counter() - start
        bar.set_postfix_str(f"loss {loss_sum / seen:.3f} acc {100 * correct / seen:.2f}% {seen / elapsed:.0f} img/s")
    bar.close()
    elapsed = time.perf_counter() - start
    stats = torch.tensor([loss_sum, correct, seen], dtype=torch.float64)
    _all_reduce(stats)
    loss_sum, correct, seen = stats.tolist()
    return {
        "loss": loss_sum / max(seen, 1),
        "acc": 100 * correct / max(seen, 1),
        "images_per_s": seen / elapsed,
        "seconds": elapsed,
    }


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable[tuple[Tensor, Tensor]], *, device: torch.device, max_batches: int = 0
) -> float:
    """Top-1 accuracy in percent (reduced across ranks when distributed)."""
    model.eval()
    correct = torch.zeros(2, dtype=torch.float64)
    for i, (x, y) in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        out = model(x.to(device))
        correct[0] += (out.argmax(1).cpu() == y).sum().item()
        correct[1] += y.numel()
    _all_reduce(correct)
    return float(100 * correct[0] / max(correct[1].item(), 1))


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, *, device: torch.device, batch_size: int = 512) -> Tensor:
    """Logits for a tensor of inputs, in batches."""
    model.eval()
    return torch.cat([model(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)])


def _all_reduce(t: Tensor) -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)


def fit(
    model: nn.Module,
    train_loader: Any,
    val_loader: Any,
    *,
    cfg: TrainConfig,
    device: torch.device,
    epochs: int | None = None,
    teacher: nn.Module | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    quiet: bool = False,
    desc: str = "epoch",
) -> list[dict[str, float]]:
    """Train for ``epochs`` (default ``cfg.epochs``), evaluating on the validation split after each epoch."""
    epochs = cfg.epochs if epochs is None else epochs
    steps_per_epoch = len(train_loader)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    ddp = wrap_ddp(model, sync_bn=cfg.sync_bn)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg, epochs * steps_per_epoch, steps_per_epoch)
    history = []
    for epoch in range(epochs):
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        stats = train_one_epoch(
            model,
            train_loader,
            opt,
            cfg=cfg,
            device=device,
            scheduler=sched,
            teacher=teacher,
            after_step=after_step,
            max_steps=steps_per_epoch,
            quiet=quiet,
            desc=f"{desc} {epoch + 1}/{epochs}",
            ddp=ddp,
        )
        stats["val_acc"] = evaluate(model, val_loader, device=device) if val_loader is not None else float("nan")
        stats["epoch"] = epoch + 1
        history.append(stats)
        if not quiet:
            from torchpocket.utils import is_main_process

            if is_main_process():
                print(
                    f"{desc} {epoch + 1}/{epochs}: loss {stats['loss']:.4f} train acc {stats['acc']:.2f}% "
                    f"val acc {stats['val_acc']:.2f}% {stats['images_per_s']:.0f} img/s {stats['seconds']:.1f}s",
                    flush=True,
                )
        if on_epoch is not None:
            on_epoch(epoch, stats)
    return history


def finetune(
    model: nn.Module,
    train_loader: Any,
    *,
    steps: int,
    cfg: TrainConfig,
    device: torch.device,
    teacher: nn.Module | None = None,
    lr: float | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
    quiet: bool = True,
) -> dict[str, float]:
    """Fast fine-tuning: ``steps`` SGD steps at a small cosine-decayed learning rate, distilling from ``teacher``."""
    if steps <= 0:
        return {}
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    ddp = wrap_ddp(model, sync_bn=cfg.sync_bn)
    opt = make_optimizer(model, cfg, lr=lr or cfg.lr * 0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    stats: dict[str, float] = {}
    done, epoch = 0, 0
    while done < steps:
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(10_000 + epoch)
        n = min(steps - done, len(train_loader))
        stats = train_one_epoch(
            model,
            train_loader,
            opt,
            cfg=cfg,
            device=device,
            scheduler=sched,
            teacher=teacher,
            after_step=after_step,
            max_steps=n,
            quiet=quiet,
            desc="fine-tune",
            ddp=ddp,
        )
        done += n
        epoch += 1
    return stats


# ----------------------------------------------------------------------------- checkpoints

CHECKPOINT_FORMAT = "torchpocket-checkpoint"


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Atomically write a checkpoint that ``torch.load(..., weights_only=True)`` can read."""
    buf = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, "version": 1, **payload}, buf)
    atomic_write_bytes(path, buf.getvalue())


def existing_file(path: str | os.PathLike) -> Path:
    """``path`` as a Path, or one line saying it is missing or empty."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    if p.stat().st_size == 0:
        raise UserError(f"checkpoint {path} is empty")
    return p


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; any unreadable file is a :class:`UserError`."""
    p = existing_file(path)
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated zip, pickle error, arbitrary-code pickle: all user errors
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"checkpoint {path} cannot be read (truncated or not a torchpocket checkpoint): {msg[:200]}"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a torchpocket checkpoint (no '{CHECKPOINT_FORMAT}' header)")
    return ckpt


def _tensor_dict(obj: Any) -> dict[str, torch.Tensor] | None:
    """``obj`` as a plain state_dict: a mapping of names to tensors, or one under a usual key."""
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        return dict(obj)
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict", "net"):
            inner = _tensor_dict(obj.get(key))
            if inner is not None:
                return inner
    return None


def read_model_file(path: str | os.PathLike, *, trust: bool = False) -> tuple[str, Any]:
    """What ``--init`` points at: ``("torchpocket", checkpoint)``, ``("state_dict", tensors)`` (a plain
    ``torch.save(model.state_dict())``), or, only with ``trust``, ``("module", model)`` (a whole pickled
    ``nn.Module``, which runs code from the file when it is read)."""
    p = existing_file(path)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a pickled module, a truncated file, not a torch file
        if not trust:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise UserError(f"{path} cannot be read as weights only ({first}); if it is a whole model saved with "
                            "torch.save(model) and you trust the file, pass --trust-checkpoint (loading it runs "
                            "code from the file)") from None
        try:
            obj = torch.load(p, map_location="cpu", weights_only=False)
        except Exception as e2:  # noqa: BLE001
            raise UserError(f"checkpoint {path} cannot be read: {type(e2).__name__}: {str(e2)[:160]}") from None
        if not isinstance(obj, nn.Module):
            raise UserError(f"{path} holds a {type(obj).__name__}, not an nn.Module, a state_dict or a torchpocket "
                            "checkpoint") from None
        return "module", obj
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        return "torchpocket", obj
    sd = _tensor_dict(obj)
    if sd is None:
        raise UserError(f"{path} is neither a torchpocket checkpoint nor a state_dict (a mapping of names to tensors)")
    return "state_dict", sd
