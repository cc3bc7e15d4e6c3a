"""Per-layer cost of a model (MACs, FLOPs, parameters, bytes, output shapes) and fair latency measurements.

FLOPs come from PyTorch's own :class:`torch.utils.flop_counter.FlopCounterMode`, which attributes every aten
op to the modules that were running when it ran. It counts matrix products and convolutions (2 FLOPs per
multiply-add) and nothing for element-wise ops, so BatchNorm and activations cost 0 here: at deployment
BatchNorm folds into the preceding convolution. MACs are FLOPs / 2, the convention of the AMC / PocketFlow
papers (ResNet-20 on CIFAR: 40.8 M MACs).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from torchpocket.utils import time_round_robin


@dataclass
class LayerProfile:
    """Cost of one module that owns parameters. ``out_shape`` is per sample (no batch dimension)."""

    name: str
    type: str
    macs: int
    flops: int
    params: int
    bytes: int
    out_shape: tuple[int, ...]


@dataclass
class ModelProfile:
    """Per-layer rows plus whole-model totals.

    Totals cover the whole model: FLOPs of ops outside any parameterised layer (a functional matmul in a
    ``forward``) and parameters owned by no row are included, so the rows may sum to less than the totals.
    """

    layers: list[LayerProfile] = field(default_factory=list)
    macs: int = 0
    flops: int = 0
    params: int = 0
    bytes: int = 0

    def table(self) -> str:
        """A markdown table: one row per layer and a total row."""
        lines = [
            "| layer | type | output | params | MACs | FLOPs | bytes |",
            "|---|---|---|---:|---:|---:|---:|",
        ]
        for lp in self.layers:
            shape = "x".join(str(d) for d in lp.out_shape)
            lines.append(f"| {lp.name} | {lp.type} | {shape} | {lp.params:,} | {lp.macs:,} | {lp.flops:,} "
                         f"| {lp.bytes:,} |")
        lines.append(f"| **total** | | | {self.params:,} | {self.macs:,} | {self.flops:,} | {self.bytes:,} |")
        return "\n".join(lines) + "\n"


def _tensor_bytes(tensors: Iterator[Tensor]) -> tuple[int, int]:
    """(elements, bytes) of distinct tensors, shared ones counted once."""
    seen: set[int] = set()
    numel = nbytes = 0
    for t in tensors:
        if id(t) in seen:
            continue
        seen.add(id(t))
        numel += t.numel()
        nbytes += t.numel() * t.element_size()
    return numel, nbytes


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode and give each its own previous mode back afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


@contextmanager
def _num_threads(threads: int | None) -> Iterator[None]:
    if threads is None:
        yield
        return
    if threads < 1:
        raise ValueError(f"threads must be a positive integer or None, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def example_input(model: nn.Module, input_shape: tuple[int, ...], *, batch_size: int = 1,
                  generator: torch.Generator | None = None) -> Tensor:
    """A random batch on the model's device and dtype, channels-last when the model's conv weights are."""
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None else torch.float32
    x = torch.randn((batch_size, *input_shape), generator=generator).to(device=device, dtype=dtype)
    channels_last = any(t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
                        for t in model.parameters())
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _first_tensor(out: object) -> Tensor | None:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (list, tuple)):
        for o in out:
            t = _first_tensor(o)
            if t is not None:
                return t
    if isinstance(out, dict):
        return _first_tensor(list(out.values()))
    return None


def profile_model(model: nn.Module, input_shape: tuple[int, ...]) -> ModelProfile:
    """Profile one forward pass of ``model`` on a random batch of one ``input_shape`` (C, H, W) sample.

    Every module that owns parameters directly (Conv, Linear, BatchNorm, ...) gets a row, in
    ``named_modules`` order. The model is run in eval mode under ``no_grad`` and comes back unchanged:
    same per-module train/eval flags, no hooks left, BatchNorm statistics untouched.
    """
    rows = [(name, m) for name, m in model.named_modules()
            if any(True for _ in m.parameters(recurse=False))]
    shapes: dict[nn.Module, tuple[int, ...]] = {}

    def hook_for(m: nn.Module) -> Callable[..., None]:
        def hook(_mod: nn.Module, _inp: object, out: object) -> None:
            t = _first_tensor(out)
            if t is not None and m not in shapes:
                shapes[m] = tuple(t.shape[1:])
        return hook

    handles = [m.register_forward_hook(hook_for(m)) for _, m in rows]
    counter = FlopCounterMode(display=False, depth=None)
    try:
        with _eval_mode(model), torch.no_grad():
            x = example_input(model, input_shape)
            with counter:
                model(x)
    finally:
        for h in handles:
            h.remove()

    # FlopCounterMode names a module "<root class>.<qualified name>" and adds each op to all enclosing modules.
    counts = {k: sum(v.values()) for k, v in counter.get_flop_counts().items()}
    root = type(model).__name__

    def module_flops(name: str) -> int:
        return int(counts.get(f"{root}.{name}" if name else root, 0))

    layers = []
    for name, m in rows:
        flops = module_flops(name)
        # a module with parameters *and* children (rare) keeps only the ops of its own forward
        flops -= sum(module_flops(f"{name}.{c}" if name else c) for c, _ in m.named_children())
        n_params, p_bytes = _tensor_bytes(m.parameters(recurse=False))
        _, b_bytes = _tensor_bytes(m.buffers(recurse=False))
        layers.append(LayerProfile(name=name or root, type=type(m).__name__, macs=flops // 2, flops=flops,
                                   params=n_params, bytes=p_bytes + b_bytes, out_shape=shapes.get(m, ())))

    total_flops = int(counter.get_total_flops())
    n_params, p_bytes = _tensor_bytes(model.parameters())
    _, b_bytes = _tensor_bytes(model.buffers())
    return ModelProfile(layers=layers, macs=total_flops // 2, flops=total_flops, params=n_params,
                        bytes=p_bytes + b_bytes)


def _syncer(x: Tensor) -> Callable[[], None] | None:
    """What makes a timing honest on ``x``'s device: CUDA work is asynchronous, CPU work is not."""
    if x.device.type == "cuda":
        return lambda: torch.cuda.synchronize(x.device)
    return None


def measure_latency(model: nn.Module, input_shape: tuple[int, ...], *, batch_size: int = 1,
                    threads: int | None = None, warmup: int = 5, repeats: int = 20) -> float:
    """Median seconds per forward pass of a ``batch_size`` batch, in eval mode under ``inference_mode``.

    ``threads`` sets ``torch.set_num_threads`` for the measurement only. To compare two models, use
    :func:`compare_latency`, which interleaves them so that background load hits both alike.
    """
    return compare_latency({"model": model}, input_shape, batch_size=batch_size, threads=threads, warmup=warmup,
                           repeats=repeats)["model"]


def compare_latency(models: dict[str, nn.Module], input_shape: tuple[int, ...], *, batch_size: int,
                    threads: int | None = None, warmup: int = 5, repeats: int = 20) -> dict[str, float]:
    """Median seconds per forward of each model, measured round-robin in one process.

    Every repeat times each model once (the order rotates from repeat to repeat), so a slow patch on a
    shared machine slows all models alike and the ratio between the medians stays fair.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    if not models:
        return {}
    with _num_threads(threads), torch.inference_mode(), ExitStack() as stack:
        inputs = {n: example_input(m, input_shape, batch_size=batch_size) for n, m in models.items()}
        for m in models.values():
            stack.enter_context(_eval_mode(m))
        calls = {n: functools.partial(models[n], inputs[n]) for n in models}
        return time_round_robin(calls, warmup=warmup, repeats=repeats, sync=_syncer(next(iter(inputs.values()))))

