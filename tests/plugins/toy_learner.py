"""toy-magnitude: per-layer magnitude pruning, the smallest complete learner (one file, one decorator).

A policy value is the density (fraction of weights kept) of one ``Conv2d`` / ``Linear``
layer. :meth:`compress` zeroes the smallest weights of a copy of the model and keeps a
boolean mask beside each pruned weight (a buffer, so it travels in the ``state_dict``);
:meth:`after_step` re-applies the masks, so pruned weights stay zero through fine-tuning
and re-training. The architecture record names the pruned layers, and :meth:`rebuild`
gives a freshly built network the mask buffers its ``state_dict`` then fills.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from torchpocket.datasets import DataBundle
from torchpocket.learners import register_learner
from torchpocket.learners.base import Learner
from torchpocket.space import Budget, LayerSpec, Policy, SearchSpace

MASK = "toy_mask"  # name of the mask buffer on each pruned layer
LOW = 0.2  # the smallest density of a layer


def prunable(model: nn.Module) -> list[tuple[str, nn.Conv2d | nn.Linear]]:
    """Every Conv2d / Linear layer, in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def kept(density: float, numel: int) -> int:
    """Weights a layer of ``numel`` keeps at ``density`` (at least one)."""
    return max(1, min(numel, math.floor(density * numel + 1e-9)))


def layer_spec(name: str, m: nn.Conv2d | nn.Linear, flops: int) -> LayerSpec:
    """The static features of one layer and the bounds of its density."""
    if isinstance(m, nn.Linear):
        return LayerSpec(name=name, kind="linear", in_channels=m.in_features, out_channels=m.out_features,
                         stride=1, kernel=1, params=m.weight.numel(), flops=flops, low=LOW, high=1.0)
    kind = "dwconv" if m.groups > 1 and m.groups == m.in_channels else "conv"
    return LayerSpec(name=name, kind=kind, in_channels=m.in_channels, out_channels=m.out_channels,
                     stride=m.stride[0], kernel=m.kernel_size[0], params=m.weight.numel(), flops=flops,
                     low=LOW, high=1.0)


@register_learner("toy-magnitude")
class ToyMagnitudeLearner(Learner):
    """Toy magnitude pruning: zero each layer's smallest weights, masks enforced while training"""

    policy_name = "density"

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.macs: dict[str, int] = {}

    def prepare(self, model: nn.Module, data: DataBundle) -> None:
        """Count each layer's multiply-adds on one image (a static feature of the search space)."""
        super().prepare(model, data)

        def count(name: str) -> Any:
            def hook(mod: nn.Module, inputs: Any, out: Tensor) -> None:
                self.macs[name] = mod.weight.numel() * (out.shape[-2] * out.shape[-1] if out.dim() == 4 else 1)
            return hook

        x, _ = next(iter(data.loader("val", batch_size=1)))
        hooks = [m.register_forward_hook(count(n)) for n, m in prunable(model)]
        was = model.training
        try:
            with torch.no_grad():
                model.eval()(x.to(next(model.parameters()).device))
        finally:
            model.train(was)
            for h in hooks:
                h.remove()

    def search_space(self, model: nn.Module, target: float, *, fill: bool = True) -> SearchSpace:
        """One density in [LOW, 1] per layer; the Budget counts kept weights over all of them."""
        layers = prunable(model)
        sizes = [m.weight.numel() for _, m in layers]
        specs = [layer_spec(n, m, self.macs.get(n, 0)) for n, m in layers]

        def layer_costs(p: Policy) -> list[float]:
            return [float(kept(d, size)) for d, size in zip(p, sizes)]

        budget = Budget(cost_fn=lambda p: sum(layer_costs(p)), full=float(sum(sizes)), target=target,
                        lows=[s.low for s in specs], highs=[s.high for s in specs], layer_cost_fn=layer_costs,
                        fill=fill, unit="params")
        return SearchSpace(specs, budget, meta={"measure": "nonzero-weights"})

    def compress(self, model: nn.Module, policy: Policy) -> nn.Module:
        """A copy of ``model`` keeping each layer's largest-magnitude weights at its density."""
        new = copy.deepcopy(model)
        with torch.no_grad():
            for (_, m), d in zip(prunable(new), policy, strict=True):
                w, k = m.weight, kept(d, m.weight.numel())
                if k < w.numel():
                    mask = torch.zeros(w.numel(), dtype=torch.bool, device=w.device)
                    mask[w.abs().flatten().topk(k).indices] = True
                    m.register_buffer(MASK, mask.reshape(w.shape))
                    w.mul_(mask.reshape(w.shape))
        return new

    def after_step(self, model: nn.Module) -> None:
        """Zero the pruned weights again after every optimizer step."""
        with torch.no_grad():
            for m in model.modules():
                if hasattr(m, MASK):
                    m.weight.mul_(getattr(m, MASK))

    def arch_state(self, model: nn.Module) -> dict[str, Any]:
        """The masked layers (the masks themselves are buffers in the state_dict)."""
        return {"masked": [n for n, m in model.named_modules() if hasattr(m, MASK)]}

    @classmethod
    def rebuild(cls, model: nn.Module, arch: dict[str, Any]) -> nn.Module:
        """Give the recorded layers of a fresh ``model`` mask buffers (``load_state_dict`` fills them)."""
        mods = dict(model.named_modules())
        for name in arch.get("masked", []):
            mods[name].register_buffer(MASK, torch.ones_like(mods[name].weight, dtype=torch.bool))
        return model
