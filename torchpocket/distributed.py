"""torch.distributed plumbing: ``torchrun`` start-up, rank queries, DDP wrapping, rank-0 decisions.

torchpocket never schedules processes itself: ``torchrun --nproc_per_node=N run.py ...`` (or a
multi-node ``--nnodes`` / ``--rdzv-endpoint`` launch) starts the ranks and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR`` / ``MASTER_PORT``; :func:`init_from_env`
joins the group (NCCL on CUDA, Gloo on CPU). Without those variables everything here is a no-op,
so single-process code paths stay exactly as they are.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and when not distributed): the only rank that writes files and prints progress."""
    return rank() == 0


def per_rank_batch(global_batch: int) -> int:
    """Each rank's share of a global batch; the global batch must split evenly across the ranks."""
    n = world_size()
    if global_batch % n:
        from torchpocket.errors import UserError

        raise UserError(f"--batch-size {global_batch} does not split evenly across {n} ranks; use a multiple of {n}")
    return global_batch // n


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_from_env(device: str | torch.device = "cpu", *, timeout_s: float = 1800.0) -> bool:
    """Join the process group ``torchrun`` describes in the environment; False when not launched by it.

    Backend: NCCL when ``device`` is CUDA, Gloo otherwise. Each CUDA rank takes GPU ``LOCAL_RANK``.
    """
    if is_initialized():
        return True
    if not launched_by_torchrun():
        return False
    dev = torch.device(device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return True


def local_device(device: str | torch.device) -> torch.device:
    """``device`` for this rank: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (a search decision, a policy, a file name)."""
    if not is_initialized():
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_module(model: nn.Module, src: int = 0) -> None:
    """Make every rank's parameters and buffers equal to rank ``src``'s, in place."""
    if not is_initialized():
        return
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src=src)


def all_reduce_(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (a no-op when not distributed)."""
    if is_initialized():
        dist.all_reduce(t)
    return t


def wrap_ddp(model: nn.Module, *, sync_bn: bool = False) -> nn.Module | None:
    """``DistributedDataParallel(model)`` when more than one rank trains, else None.

    The caller keeps the raw ``model`` for hooks (masks, quantizer ranges) and checkpoints; the
    wrapper shares its parameters and averages gradients across ranks in ``backward``.
    ``sync_bn``: batch-norm statistics over the global batch (converted in place).
    """
    if world_size() <= 1 or not any(p.requires_grad for p in model.parameters()):
        return None
    if sync_bn:
        _convert_sync_bn(model)
    p = next(model.parameters())
    ids = [p.device.index] if p.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=not sync_bn)


def _convert_sync_bn(model: nn.Module) -> None:
    """Replace BatchNorm layers by SyncBatchNorm *inside* ``model`` (the object callers hold stays valid)."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
            setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
        else:
            _convert_sync_bn(child)


def destroy() -> None:
    if is_initialized():
        dist.destroy_process_group()
