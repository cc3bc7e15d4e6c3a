"""``weight-sparse``: fine-grained (unstructured) weight sparsity with per-layer densities from the search.

AMC's fine-grained pruning (He et al. 2018) searched by any optimizer, re-trained with
Zhu & Gupta's gradual magnitude pruning (2017) as in PocketFlow's WeightSparseLearner:

* a policy value is the **density** (fraction of weights kept) of one prunable layer
  (``Conv2d``, depthwise included, and ``Linear``); the Budget counts kept weights over
  every prunable layer (unit ``params``), so ``--target 0.25`` keeps 25% of them. Bounds
  follow AMC: at least 0.2 of a conv layer and 0.02 of a fully-connected one; the first
  and the last layer stay dense by default (PocketFlow on CIFAR) and are then no policy
  entries, but their weights count in the budget;
* :meth:`compress` keeps, in a copy, each layer's ``floor(density * numel)`` largest-magnitude
  weights and zeroes the rest; the masks ride on the module (attribute ``MASK_ATTR``, so
  they survive ``deepcopy`` and stay out of the ``state_dict``) and :meth:`after_step`
  re-applies them after every optimizer step, so pruned weights stay zero through
  fine-tuning and re-training;
* :meth:`retrain` **starts dense**, as Zhu & Gupta do: the prunable layers get their original
  weights back from the teacher (the model :meth:`compress` was given) and are pruned
  gradually, ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3`` from ``s_i = 0`` to each
  layer's final sparsity between fractions ``begin`` and ``end`` of the steps, masks
  recomputed by magnitude every ``update_every`` steps and enforced in between, with
  distillation from the teacher. A candidate that no longer holds the teacher's weights on
  its kept positions (fine-tuned elsewhere) keeps its own weights, masks released: pruned
  weights restart from zero. At the end every layer is exactly at its density;
* the checkpoint's architecture record holds each layer's density and bit-packed mask
  (base64 text, plain data); :func:`save_sparse` / :func:`load_sparse` write and read a
  compact deployment file (kept values + bitmask per sparse layer, dense the rest).
  Unstructured sparsity saves size, not time: dense kernels run at the same speed.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from torchpocket.datasets import DataBundle
from torchpocket.errors import UserError
from torchpocket.learners import register_learner
from torchpocket.learners._layers import MASK_ATTR, layer_macs
from torchpocket.learners._layers import weight_layers as prunable_layers
from torchpocket.learners.base import Learner
from torchpocket.learners.training import fit
from torchpocket.options import opt
from torchpocket.space import Budget, LayerSpec, Policy, SearchSpace

SPARSE_FORMAT = "torchpocket-sparse"
ARCH_VERSION = 1


@dataclass
class WsConfig:
    """Options of ``weight-sparse`` (config section ``ws``)."""

    conv_min_density: float = opt(0.2, "smallest density (fraction of weights kept) of a conv layer "
                                  "(AMC fine-grained: 0.2)", flag="--ws-conv-min-density")
    fc_min_density: float = opt(0.02, "smallest density of a fully-connected layer (AMC fine-grained: 0.02)",
                                flag="--ws-fc-min-density")
    skip_first: bool = opt(True, "keep the first prunable layer dense (PocketFlow on CIFAR)", flag="--ws-skip-first")
    skip_last: bool = opt(True, "keep the last prunable layer dense (PocketFlow on CIFAR)", flag="--ws-skip-last")
    begin: float = opt(0.1, "re-training: gradual pruning starts at this fraction of the steps (Zhu & Gupta)",
                       flag="--ws-begin")
    end: float = opt(0.5, "re-training: every layer reaches its density at this fraction of the steps",
                     flag="--ws-end")
    update_every: int = opt(-1, "re-training: steps between mask updates (-1 = a 20th of the steps; "
                            "PocketFlow: 500)", flag="--ws-update-every")
    exponent: float = opt(3.0, "re-training: exponent of the gradual pruning schedule (Zhu & Gupta: 3)",
                          flag="--ws-exponent")




# -- numerics -------------------------------------------------------------------------------------


def gradual_sparsity(step: float, *, final: float, initial: float = 0.0, begin_step: float, end_step: float,
                     exponent: float = 3.0) -> float:
    """Zhu & Gupta (2017): ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^e`` for ``t0 <= t <= t0 + n dt``.

    ``initial`` before ``begin_step`` (t0), ``final`` from ``end_step`` (t0 + n dt) on.
    """
    if step < begin_step:
        return float(initial)
    if step >= end_step or end_step <= begin_step:
        return float(final)
    frac = (step - begin_step) / (end_step - begin_step)
    return float(final + (initial - final) * (1.0 - frac) ** exponent)


def kept_count(density: float, numel: int) -> int:
    """Weights a layer of ``numel`` keeps at ``density``: ``floor(density * numel)``, at least one."""
    return int(min(numel, max(1, math.floor(float(density) * numel + 1e-9))))


def magnitude_mask(weight: Tensor, k: int) -> Tensor:
    """Boolean mask (shape of ``weight``) of its ``k`` largest-magnitude entries, exactly ``k``."""
    flat = weight.detach().reshape(-1)
    if k >= flat.numel():
        return torch.ones_like(weight, dtype=torch.bool)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[flat.abs().topk(k, sorted=False).indices] = True
    return mask.reshape(weight.shape)


def pack_mask(mask: Tensor) -> np.ndarray:
    """A boolean mask as bits (``numpy.packbits``, row-major order)."""
    return np.packbits(mask.detach().reshape(-1).cpu().numpy().astype(np.uint8))


def unpack_mask(bits: np.ndarray, shape: list[int] | tuple[int, ...]) -> Tensor:
    n = int(np.prod(shape)) if len(shape) else 1
    return torch.from_numpy(np.unpackbits(np.asarray(bits, np.uint8), count=n).astype(bool)).reshape(*shape)






def _masks_of(model: nn.Module) -> dict[str, Tensor]:
    return (getattr(model, MASK_ATTR, None) or {}).get("masks", {})


def _set_state(model: nn.Module, density: dict[str, float], masks: dict[str, Tensor]) -> None:
    setattr(model, MASK_ATTR, {"density": dict(density), "masks": dict(masks)})


@torch.no_grad()
def apply_masks(model: nn.Module) -> None:
    """Zero every masked weight of ``model`` (masks move to the weight's device once)."""
    masks = _masks_of(model)
    if not masks:
        return
    mods = dict(model.named_modules())
    for name, mask in masks.items():
        w = mods[name].weight
        if mask.device != w.device:
            mask = masks[name] = mask.to(w.device)
        w.mul_(mask)


# -- the sparse deployment file -------------------------------------------------------------------


def _sparse_layers(model: nn.Module) -> dict[str, Tensor]:
    """Masks of the layers stored sparse: the learner's masks, else every prunable layer with zeros."""
    masks = _masks_of(model)
    if masks:
        return {n: m.cpu() for n, m in masks.items()}
    return {n: (m.weight.detach() != 0).cpu() for n, m in prunable_layers(model)
            if bool((m.weight.detach() == 0).any())}


def save_sparse(model: nn.Module, path: str | os.PathLike) -> int:
    """Write ``model`` as kept values + packed bitmask per sparse layer and dense tensors for the rest.

    The file is ``torch.load(weights_only=True)``-readable; returns its size in bytes.
    """
    from torchpocket.utils import atomic_write_bytes

    masks = _sparse_layers(model)
    state = model.state_dict()
    layers: dict[str, Any] = {}
    for name, mask in masks.items():
        w = state[f"{name}.weight" if name else "weight"].detach().cpu().contiguous()
        m = mask.reshape(-1)
        layers[name] = {"shape": list(w.shape), "values": w.reshape(-1)[m].clone(),
                        "bitmask": torch.from_numpy(pack_mask(m))}
    skip = {f"{n}.weight" if n else "weight" for n in layers}
    dense = {k: v.detach().cpu().contiguous() for k, v in state.items() if k not in skip}
    buf = io.BytesIO()
    torch.save({"format": SPARSE_FORMAT, "version": 1, "layers": layers, "dense": dense}, buf)
    atomic_write_bytes(path, buf.getvalue())
    return len(buf.getvalue())


def load_sparse(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Load a file from :func:`save_sparse` into ``model`` (the same architecture); returns it in eval mode.

    The masks are attached too, so fine-tuning the loaded model with the weight-sparse
    learner's ``after_step`` keeps it sparse.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"sparse model {path} does not exist")
    try:
        blob = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's
        raise UserError(f"sparse model {path} cannot be read: {str(e).strip()[:200]}") from None
    if not isinstance(blob, dict) or blob.get("format") != SPARSE_FORMAT:
        raise UserError(f"{path} is not a torchpocket sparse model (no '{SPARSE_FORMAT}' header)")
    state = dict(blob["dense"])
    masks, density = {}, {}
    for name, layer in blob["layers"].items():
        shape = [int(s) for s in layer["shape"]]
        mask = unpack_mask(layer["bitmask"].numpy(), shape)
        values = layer["values"]
        w = torch.zeros(mask.numel(), dtype=values.dtype)
        w[mask.reshape(-1)] = values
        state[f"{name}.weight" if name else "weight"] = w.reshape(shape)
        masks[name], density[name] = mask, float(mask.sum()) / max(mask.numel(), 1)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UserError(f"sparse model {path} does not fit this architecture: "
                        f"{' '.join(first[1:2] or first[:1])[:200]}") from None
    _set_state(model, density, masks)
    return model.eval()


def _dense_bytes(model: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, buf)
    return len(buf.getvalue())


# -- the learner ----------------------------------------------------------------------------------


@register_learner("weight-sparse")
class WeightSparseLearner(Learner):
    """Fine-grained weight sparsity (AMC / Zhu & Gupta): per-layer magnitude pruning, gradual re-training"""

    Config = WsConfig
    section = "ws"
    policy_name = "density"
    resources = ("params",)
    stage = "structure"
    sparse = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        c = self.config
        for flag, v in (("--ws-conv-min-density", c.conv_min_density), ("--ws-fc-min-density", c.fc_min_density)):
            if not 0 < v <= 1:
                raise UserError(f"{flag} must be in (0, 1], got {v}")
        if not 0 <= c.begin <= c.end <= 1:
            raise UserError(f"need 0 <= --ws-begin <= --ws-end <= 1, got {c.begin} and {c.end}")
        if c.update_every == 0 or c.update_every < -1:
            raise UserError(f"--ws-update-every must be positive (or -1 = auto), got {c.update_every}")
        if not c.exponent > 0:
            raise UserError(f"--ws-exponent must be positive, got {c.exponent}")
        self._order: list[str] = []  # prunable layers in execution order (from prepare)
        self._macs: dict[str, int] = {}
        self._stride: dict[str, int] = {}

    # -- prepare: execution order and per-layer FLOPs, once --------------------------------------
    def prepare(self, model: nn.Module, data: DataBundle) -> None:
        """Trace one sample to order the prunable layers as they run and count their multiply-adds."""

        super().prepare(model, data)
        layers = dict(prunable_layers(model))
        macs = layer_macs(model, data.example())  # keyed in execution order
        self._order = list(macs) + [n for n in layers if n not in macs]  # unused layers last, registration order
        self._macs = macs

    # -- the search space ----------------------------------------------------------------------
    def _layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Prunable layers in execution order when prepare() traced this model, else registration order."""
        layers = dict(prunable_layers(model))
        if self._order and set(self._order) == set(layers):
            return [(n, layers[n]) for n in self._order]
        return list(layers.items())

    def _split(self, model: nn.Module) -> tuple[list[tuple[str, nn.Module]], list[tuple[str, nn.Module]]]:
        """(searched layers, layers kept dense) per --ws-skip-first / --ws-skip-last."""
        layers = self._layers(model)
        fixed = set()
        if layers and self.config.skip_first:
            fixed.add(layers[0][0])
        if layers and self.config.skip_last:
            fixed.add(layers[-1][0])
        searched = [(n, m) for n, m in layers if n not in fixed]
        return searched, [(n, m) for n, m in layers if n in fixed]

    def search_space(self, model: nn.Module, target: float, *, fill: bool = True) -> SearchSpace:
        """One entry per prunable layer (its density); the Budget counts kept weights of all prunable layers."""
        searched, fixed = self._split(model)
        if not searched:
            raise UserError("weight-sparse found no prunable layers (Conv2d / Linear) to search in this model"
                            + (" besides the first and last, kept dense: try --no-ws-skip-first / "
                               "--no-ws-skip-last" if fixed else ""))
        c = self.config
        sizes = [int(m.weight.numel()) for _, m in searched]
        dense = float(sum(int(m.weight.numel()) for _, m in fixed))
        lows = [c.fc_min_density if isinstance(m, nn.Linear) else c.conv_min_density for _, m in searched]
        layers = [LayerSpec.from_module(name, m, flops=self._macs.get(name, 0), low=low, high=1.0)
                  for (name, m), low in zip(searched, lows)]

        def layer_costs(p: Policy) -> list[float]:
            return [float(kept_count(d, n)) for d, n in zip(p, sizes)]

        budget = Budget.from_layers(layers, layer_costs, fixed=dense, full=dense + sum(sizes), target=target,
                                    fill=fill, unit="params")
        return SearchSpace(layers, budget, meta={
            "resource": "params", "measure": "nonzero-weights", "dense_layers": [n for n, _ in fixed],
            "policy": "density (fraction of weights kept) of each prunable layer"})

    def module_sizes(self, model: nn.Module, policy: Policy
                     ) -> tuple[dict[str, tuple[float, float, float]], float]:
        """Per searched layer: its multiply-adds (dense: the kernels run dense), the weights it keeps, and one
        position bit per weight where it keeps fewer than all (the bitmask); the parameters it stores in all."""
        searched, _ = self._split(model)
        sizes: dict[str, tuple[float, float, float]] = {}
        cut = 0
        for (name, m), d in zip(searched, policy):
            n = int(m.weight.numel())
            k = kept_count(d, n)
            sizes[name] = (float(self._macs.get(name, 0)), float(k), float(n) if k < n else 0.0)
            cut += n - k
        return sizes, float(sum(p.numel() for p in model.parameters()) - cut)

    # -- compress ---------------------------------------------------------------------------------
    def compress(self, model: nn.Module, policy: Policy) -> nn.Module:
        """A copy of ``model`` keeping each searched layer's largest-magnitude weights at its density."""
        searched, _ = self._split(model)
        if len(policy) != len(searched):
            raise UserError(f"weight-sparse expects one density per prunable layer ({len(searched)}), "
                            f"got {len(policy)} values")
        new = copy.deepcopy(model)
        mods = dict(new.named_modules())
        density, masks = {}, {}
        with torch.no_grad():
            for (name, m), d in zip(searched, policy):
                n = m.weight.numel()
                k = kept_count(d, n)
                density[name] = float(d)
                if k < n:
                    w = mods[name].weight
                    masks[name] = magnitude_mask(w, k)
                    w.mul_(masks[name])
        _set_state(new, density, masks)
        return new

    def after_step(self, model: nn.Module) -> None:
        """Re-apply the masks: pruned weights stay zero through fine-tuning and re-training."""
        apply_masks(model)

    # -- gradual re-training ------------------------------------------------------------------------
    def _restore_dense(self, model: nn.Module, teacher: nn.Module | None, masks: dict[str, Tensor]) -> bool:
        """Give the masked layers their original weights back if ``model`` still holds them where kept."""
        if teacher is None or not masks:
            return False
        tm, mm = dict(teacher.named_modules()), dict(model.named_modules())
        for name, mask in masks.items():
            t = tm.get(name)
            if t is None or not isinstance(getattr(t, "weight", None), Tensor) or t.weight.shape != mask.shape:
                return False
            w, tw = mm[name].weight.detach(), t.weight.detach().to(mm[name].weight.device)
            if not torch.equal(w * mask.to(w.device), tw * mask.to(w.device)):
                return False
        with torch.no_grad():
            for name in masks:
                mm[name].weight.copy_(tm[name].weight)
        return True

    def schedule_steps(self, total: int) -> tuple[int, int, int]:
        """(begin step t0, end step t0 + n dt, steps between mask updates) for ``total`` training steps."""
        c = self.config
        begin = int(round(c.begin * total))
        end = max(begin, int(round(c.end * total)))
        every = c.update_every if c.update_every > 0 else max(1, total // 20)
        return begin, end, every

    def retrain(self, model: nn.Module, *, teacher: nn.Module | None, epochs: int, lr: float | None = None,
                on_epoch: Any = None) -> list[dict[str, float]]:
        """Zhu & Gupta gradual pruning from dense to each layer's density, with distillation from ``teacher``."""
        state = getattr(model, MASK_ATTR, None)
        if not state or not state["masks"]:
            return super().retrain(model, teacher=teacher, epochs=epochs, lr=lr, on_epoch=on_epoch)
        cfg = dataclasses.replace(self.train_cfg, lr=lr) if lr else self.train_cfg
        train_loader = self._loader("train", train=True)
        per_epoch = len(train_loader)
        if cfg.max_steps_per_epoch:
            per_epoch = min(per_epoch, cfg.max_steps_per_epoch)
        total = max(0, epochs * per_epoch)
        begin, end, every = self.schedule_steps(total)
        mods = dict(model.named_modules())
        final_k = {n: int(m.sum()) for n, m in state["masks"].items()}
        self._restore_dense(model, teacher, state["masks"])
        state["masks"] = {}  # dense until t0
        step = 0

        def prune_to(t: int) -> None:
            masks = {}
            for name, kf in final_k.items():
                w = mods[name].weight
                n = w.numel()
                s_t = gradual_sparsity(t, final=1.0 - kf / n, initial=0.0, begin_step=begin, end_step=end,
                                       exponent=self.config.exponent)
                k = min(n, max(kf, int(round(n * (1.0 - s_t)))))  # exactly kf from the end step on
                if k < n:
                    masks[name] = magnitude_mask(w, k)
            state["masks"] = masks
            apply_masks(model)

        def hook(m: nn.Module) -> None:
            nonlocal step
            step += 1
            if begin <= step <= end and ((step - begin) % every == 0 or step == end):
                prune_to(step)
            else:
                apply_masks(m)

        if begin == 0:
            prune_to(0)
        try:
            history = fit(model, train_loader, self._loader("val"), cfg=cfg, device=self.device, epochs=epochs,
                          teacher=teacher, after_step=hook, on_epoch=on_epoch, quiet=self.quiet, desc="re-train")
        finally:
            prune_to(max(end, step, total))  # exactly each layer's density, whatever happened
        return history

    # -- checkpoint record ---------------------------------------------------------------------
    def arch_state(self, model: nn.Module) -> dict[str, Any]:
        """Per layer: density, weight shape and the mask as base64 of its packed bits (plain data)."""
        state = getattr(model, MASK_ATTR, None) or {"density": {}, "masks": {}}
        mods = dict(model.named_modules())
        layers = {}
        for name, d in state["density"].items():
            mask = state["masks"].get(name)
            layers[name] = {"density": float(d), "shape": list(mods[name].weight.shape),
                            "mask": None if mask is None else base64.b64encode(pack_mask(mask).tobytes()).decode()}
        return {"version": ARCH_VERSION, "layers": layers}

    @classmethod
    def rebuild(cls, model: nn.Module, arch: dict[str, Any]) -> nn.Module:
        """Attach the recorded masks to a freshly built ``model`` (and zero its pruned weights)."""
        if not arch:
            return model
        if arch.get("version") != ARCH_VERSION:
            raise UserError(f"unsupported weight-sparse record version {arch.get('version')!r} "
                            f"(expected {ARCH_VERSION})")
        mods = dict(model.named_modules())
        density, masks = {}, {}
        for name, layer in arch.get("layers", {}).items():
            m = mods.get(name)
            shape = [int(s) for s in layer["shape"]]
            w = getattr(m, "weight", None)
            if not isinstance(w, Tensor) or list(w.shape) != shape:
                got = "no such layer" if m is None else "no weight" if w is None else f"weight {list(w.shape)}"
                raise UserError(f"the recorded weight sparsity does not fit this network: layer {name!r} "
                                f"expects weight {shape}, found {got}")
            density[name] = float(layer["density"])
            if layer.get("mask") is not None:
                bits = np.frombuffer(base64.b64decode(layer["mask"]), dtype=np.uint8)
                masks[name] = unpack_mask(bits, shape)
        _set_state(model, density, masks)
        apply_masks(model)
        return model

    # -- deployment --------------------------------------------------------------------------------
    def export(self, model: nn.Module, run_dir: Any, example: torch.Tensor) -> dict[str, Any]:
        """``model.sparse.pt`` (see :func:`load_sparse`), checked against the model's outputs; sizes for summary."""
        path = Path(run_dir) / "model.sparse.pt"
        sparse_bytes = save_sparse(model, path)
        masks = _masks_of(model)
        layers = prunable_layers(model)
        total = sum(m.weight.numel() for _, m in layers)
        kept = sum(int(masks[n].sum()) if n in masks else m.weight.numel() for n, m in layers)
        p = next(model.parameters(), None)
        x = example.to(p.device if p is not None else "cpu")
        was = model.training
        model.eval()
        with torch.no_grad():
            ref = model(x)
            diff = float((load_sparse(path, copy.deepcopy(model))(x) - ref).abs().max())
        model.train(was)
        return {"path": path.name, "sparse_bytes": sparse_bytes, "dense_bytes": _dense_bytes(model),
                "density": kept / max(total, 1), "max_abs_diff": diff}
