"""The network for ONNX export as a QDQ graph that carries the learned scales: batch-norm folded into the
per-channel weight scales (exact, because per-channel symmetric quantization commutes with a per-channel
factor), int8 weights, uint8 activations; and the fp32 network with the quantized weights as floats."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from torchpocket.errors import UserError
from torchpocket.learners._quant import ActQuant, QConv2d, QLinear, act_quantizers
from torchpocket.learners._quant_fx import BiasGrid, _is_bn


class _DeployLayer(nn.Module):
    """Folded weight, bias and per-channel scale as buffers; the weight is fake-quantized to int8 in forward."""

    def __init__(self, weight: Tensor, bias: Tensor, scale: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.register_buffer("scale", scale)

    def int8_weight(self) -> Tensor:
        zp = torch.zeros(self.weight.shape[0], dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(self.weight, self.scale, zp, 0, -128, 127)


class _DeployConv(_DeployLayer):
    def __init__(self, conv: nn.Conv2d, weight: Tensor, bias: Tensor, scale: Tensor) -> None:
        super().__init__(weight, bias, scale)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.int8_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


class _DeployLinear(_DeployLayer):
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.int8_weight(), self.bias)


@torch.no_grad()
def deploy_module(model: nn.Module) -> fx.GraphModule:
    """A copy of a ``uniform-quant`` model for int8 ONNX export (CPU, eval mode).

    Each fake-quant Conv2d followed by a BatchNorm2d (its only user) is folded: with ``f = gamma / sqrt(var +
    eps)`` the weight becomes ``W_q * f`` and its per-channel scale ``s * |f|``, so the int8 codes stay the
    trained ones; the bias becomes ``(b - mean) * f + beta``. Weights export as int8 per-channel
    QuantizeLinear / DequantizeLinear, activations as uint8 pairs with the observed scales.
    """
    if not isinstance(model, fx.GraphModule) or not act_quantizers(model):
        raise UserError("the int8 ONNX export needs a uniform-quant model with activation quantizers "
                        "(--act-bits > 0)")
    gm = copy.deepcopy(model).cpu().eval()
    gm.to(memory_format=torch.contiguous_format)
    mods = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        m = mods.get(str(node.target)) if node.op == "call_module" else None
        if isinstance(m, ActQuant):
            m.deploy = True
        if isinstance(m, BiasGrid):  # the exported int32 bias does this rounding
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            continue
        if not isinstance(m, (QConv2d, QLinear)):
            continue
        w = m.quantized_weight().detach().float()
        s = m.quant_scale()
        out = w.shape[0]
        b = m.bias.detach().float() if m.bias is not None else torch.zeros(out)
        if isinstance(m, QConv2d):
            users = list(node.users)
            bn = mods.get(str(users[0].target)) if len(users) == 1 and _is_bn(users[0], mods) else None
            if isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats and bn.running_var is not None:
                f = (bn.weight if bn.affine else torch.ones(out)) / torch.sqrt(bn.running_var + bn.eps)
                beta = bn.bias if bn.affine else torch.zeros(out)
                w = w * f.reshape(-1, 1, 1, 1)
                b = (b - bn.running_mean) * f + beta
                s = s * f.abs()
                users[0].replace_all_uses_with(node)
                gm.graph.erase_node(users[0])
            new: nn.Module = _DeployConv(m, w.contiguous(), b.float(), s.float().clamp_min(1e-12))
        else:
            new = _DeployLinear(w.contiguous(), b.float(), s.float())
        _set_submodule(gm, str(node.target), new)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_name, _, attr = path.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


@torch.no_grad()
def float_model(model: nn.Module) -> nn.Module:
    """The same network in fp32: quantized weights baked in as floats, activation quantizers removed.

    This is what ``model.onnx`` holds for a uniform-quant run: the fp32 reference the int8 model is
    timed against in the same runtime.
    """
    new = copy.deepcopy(model)
    for m in new.modules():
        if isinstance(m, (QConv2d, QLinear)):
            w = m.quantized_weight().detach()
            m.__class__ = nn.Conv2d if isinstance(m, QConv2d) else nn.Linear
            del m.qbits, m.qmax
            m.weight.data.copy_(w)
        elif isinstance(m, ActQuant):
            m.seen.zero_()  # an observer that has seen nothing passes values through
            m.observe = False
        elif isinstance(m, BiasGrid):
            m.enabled = False
    return new.eval()
