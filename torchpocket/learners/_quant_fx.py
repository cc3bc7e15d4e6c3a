"""Placement of the activation quantizers with ``torch.fx``, at the points an integer runtime needs them: the
input of every quantized layer, the end of every ``conv -> [bn] -> [relu]`` unit and of every residual
``add -> [relu]``, so that each convolution reads and writes 8-bit tensors; and, in eval mode, the int32
grid (``input scale x weight scale``) of every folded bias (:class:`BiasGrid`), so the fake-quant model
computes what the integer model computes."""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from torchpocket.errors import UnsupportedModel
from torchpocket.learners._quant import ActQuant, QConv2d, QLinear

_RELU_FUNCS = (F.relu, torch.relu, torch.relu_)
_ADD_FUNCS = (operator.add, operator.iadd, torch.add)


def _is_relu(node: fx.Node, mods: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(mods.get(str(node.target)), (nn.ReLU, nn.ReLU6))
    if node.op == "call_function":
        return node.target in _RELU_FUNCS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _is_bn(node: fx.Node, mods: dict[str, nn.Module]) -> bool:
    return node.op == "call_module" and isinstance(mods.get(str(node.target)), nn.BatchNorm2d)


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD_FUNCS:
        return sum(isinstance(a, fx.Node) for a in node.args) == 2
    return node.op == "call_method" and node.target in ("add", "add_")


def _unit_end(node: fx.Node, mods: dict[str, nn.Module], *, through_bn: bool) -> fx.Node:
    """Follow ``node`` through a single-user batch-norm (conv units) and then a ReLU."""
    end = node
    if through_bn and len(end.users) == 1:
        (u,) = end.users
        if _is_bn(u, mods):
            end = u
    if len(end.users) == 1:
        (u,) = end.users
        if _is_relu(u, mods):
            end = u
    return end


def trace(model: nn.Module) -> fx.GraphModule:
    """``torch.fx`` graph of ``model``; a model fx cannot trace is an :class:`UnsupportedModel`."""
    try:
        return fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure: data-dependent control flow, etc.
        msg = " ".join(str(e).split())[:200]
        raise UnsupportedModel(f"uniform-quant places activation quantizers with torch.fx, which cannot trace "
                               f"this model ({type(e).__name__}: {msg})") from None


def insert_act_quant(gm: fx.GraphModule, layers: Iterable[str], *, bits: int, ema: float) -> list[str]:
    """Add an :class:`ActQuant` after every tensor an integer runtime would hold in 8 bits; returns their names.

    Quantized: the input of each layer in ``layers``, the end of each ``layer -> [bn] -> [relu]`` unit and
    of each ``add -> [relu]``; never a graph output (the logits stay float). Deterministic in the graph order.
    """
    mods = dict(gm.named_modules())
    wanted = set(layers)
    points: dict[fx.Node, None] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and str(node.target) in wanted:
            src = node.args[0]
            if isinstance(src, fx.Node):
                points[src] = None
            points[_unit_end(node, mods, through_bn=True)] = None
        elif _is_add(node):
            points[_unit_end(node, mods, through_bn=False)] = None
    names = []
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in sorted(points, key=order.__getitem__):
        if any(u.op == "output" for u in node.users):
            continue
        names.append(_insert_after(gm, node, f"act_quant_{len(names)}", ActQuant(bits, ema=ema)))
    gm.graph.lint()
    gm.recompile()
    return names


def _insert_after(gm: fx.GraphModule, node: fx.Node, name: str, module: nn.Module) -> str:
    """Add ``module`` as ``name`` and route every use of ``node``'s output through it; returns ``name``."""
    gm.add_submodule(name, module)
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(name, (node,))
    node.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
    return name


class BiasGrid(nn.Module):
    """In eval mode, puts a quantized layer's (batch-norm-folded) bias on the int32 grid of the integer model.

    An integer runtime adds each output channel's bias as an int32 on the grid ``input scale x weight scale``
    (times ``|gamma / sigma|`` once batch-norm is folded). The QAT graph keeps batch-norm unfolded, so this
    module adds the rounding error of that bias after the layer (or its batch-norm) at evaluation; training
    is untouched. It holds its layer, batch-norm and input quantizer by reference (not as submodules).
    """

    def __init__(self, layer: nn.Module, bn: nn.BatchNorm2d | None, quant: ActQuant) -> None:
        super().__init__()
        object.__setattr__(self, "_refs", (layer, bn, quant))
        self.enabled = True

    def offset(self) -> Tensor:
        layer, bn, quant = self._refs
        w = layer.weight
        out = w.shape[0]
        b = layer.bias.detach().float() if layer.bias is not None else torch.zeros(out, device=w.device)
        grid = layer.quant_scale().to(w.device) * quant.qparams()[0]
        if bn is not None:
            f = (bn.weight.detach() if bn.affine else torch.ones(out, device=w.device)) / torch.sqrt(
                bn.running_var + bn.eps)
            b = (b - bn.running_mean) * f + (bn.bias.detach() if bn.affine else 0.0)
            grid = grid * f.abs()
        grid = grid.clamp_min(1e-30)
        return torch.round(b / grid) * grid - b

    def forward(self, x: Tensor) -> Tensor:
        if self.training or not self.enabled or int(self._refs[2].seen) == 0:
            return x
        d = self.offset().to(x.dtype)
        return x + (d.reshape(1, -1, *([1] * (x.dim() - 2))) if x.dim() > 2 else d)


def insert_bias_grids(gm: fx.GraphModule) -> list[str]:
    """Add a :class:`BiasGrid` after every fake-quant layer whose input is quantized (after its batch-norm)."""
    mods = dict(gm.named_modules())
    names = []
    for node in list(gm.graph.nodes):
        layer = mods.get(str(node.target)) if node.op == "call_module" else None
        if not isinstance(layer, (QConv2d, QLinear)):
            continue
        src = node.args[0]
        quant = mods.get(str(src.target)) if isinstance(src, fx.Node) and src.op == "call_module" else None
        if not isinstance(quant, ActQuant):
            continue
        end, bn = node, None
        users = list(node.users)
        if isinstance(layer, QConv2d) and len(users) == 1 and _is_bn(users[0], mods):
            end, bn = users[0], mods[str(users[0].target)]
            if not (bn.track_running_stats and bn.running_var is not None):
                continue
        names.append(_insert_after(gm, end, f"bias_grid_{len(names)}", BiasGrid(layer, bn, quant)))
    gm.graph.lint()
    gm.recompile()
    return names


