"""``non-uniform-quant``: per-layer k-means weight sharing (Han et al. 2016, Deep Compression).

As PocketFlow's NonUniformQuantLearner:

* a policy value is the **weight bit-width** of one Conv2d / Linear layer (``[--min-bits, --max-bits]``,
  1-8 supported; ``--bits N`` = every layer at N bits, no search); the Budget is the one of
  ``uniform-quant`` (unit ``bits``, fraction of the fp32 weight bits kept);
* :meth:`compress` clusters each layer's weights into ``2^bits`` centroids with 1-D k-means (Lloyd's
  algorithm; ``--kmeans-init linear``: evenly spaced between min and max, Han et al.'s best, or
  ``quantile``: at the weight distribution's quantiles) and replaces every weight by its centroid. The
  layer keeps a ``centroids`` parameter and a fixed ``assign`` buffer (the index of each weight); its
  ``weight`` is ``centroids[assign]``, so back-propagation sums the gradients of all weights of a cluster
  into their centroid (Han et al.'s centroid fine-tuning) and assignments never change. ``--kmeans-grad
  mean`` (default) divides that sum by the cluster size, so a centroid moves like one weight would at
  the shared learning rate (with ``sum`` a cluster of 10,000 weights takes 10,000x larger steps);
* the checkpoint's architecture record holds each layer's bits; centroids and indices ride in the
  state_dict. :func:`save_codebook` / :func:`load_codebook` write and read the deployment file
  ``model.codebook.pt``: per layer a float32 codebook and the indices packed at ``bits`` bits each,
  everything else dense. Activations stay in floating point (weight sharing saves storage, not compute).
"""

from __future__ import annotations

import copy
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from torchpocket.datasets import DataBundle
from torchpocket.errors import UserError
from torchpocket.learners import register_learner
from torchpocket.learners._layers import layer_macs, weight_masks
from torchpocket.learners._quant import (
    NON_UNIFORM_BITS,
    QuantConfig,
    bits_space,
    check_config,
    check_policy,
    quant_layers,
)
from torchpocket.learners.base import Learner
from torchpocket.space import Policy, SearchSpace

ARCH_VERSION = 1
CODEBOOK_FORMAT = "torchpocket-codebook"
XZ_MAGIC = b"\xfd7zXZ\x00"


# -- k-means ------------------------------------------------------------------------------------


def kmeans_1d(w: Tensor, k: int, *, init: str = "linear", iters: int = 20) -> tuple[Tensor, Tensor]:
    """1-D k-means of the values of ``w``: (sorted centroids [k], index of each value's centroid, shape of w).

    Lloyd's algorithm, exact, on the sorted values: each cluster is a run between the midpoints of
    neighbouring centroids (found by binary search), its mean comes from prefix sums, so an iteration
    costs O(k log n); an empty cluster keeps its centroid. Assignment: nearest centroid.
    """
    flat = w.detach().reshape(-1).float().cpu()
    if init == "linear":
        c = torch.linspace(float(flat.min()), float(flat.max()), k)
    elif init == "quantile":
        q = torch.linspace(0, 1, k + 2)[1:-1] if k > 1 else torch.tensor([0.5])
        sample = flat if flat.numel() <= 1_000_000 else flat[torch.randperm(flat.numel())[:1_000_000]]
        c = torch.quantile(sample, q)
    else:
        raise UserError(f"--kmeans-init must be linear or quantile, got {init!r}")
    c = c.sort().values.double()
    vals = flat.double().sort().values
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), vals.cumsum(0)])
    n = vals.numel()
    for _ in range(iters):
        if k == 1:
            c = prefix[-1:] / max(n, 1)
            break
        cuts = torch.searchsorted(vals, (c[1:] + c[:-1]) / 2, right=True)  # values <= midpoint go left
        edges = torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.tensor([n])])
        counts = (edges[1:] - edges[:-1]).double()
        sums = prefix[edges[1:]] - prefix[edges[:-1]]
        new = torch.where(counts > 0, sums / counts.clamp_min(1), c).sort().values
        if torch.allclose(new, c, rtol=0, atol=1e-12):
            c = new
            break
        c = new
    c = c.float()
    return c, _assign(flat, c).reshape(w.shape)


def _assign(flat: Tensor, c: Tensor) -> Tensor:
    if c.numel() == 1:
        return torch.zeros_like(flat, dtype=torch.long)
    mids = (c[1:] + c[:-1]) / 2
    return torch.bucketize(flat, mids)


# -- weight-shared layers -------------------------------------------------------------------------


class _SharedWeightMixin:
    """Conv2d / Linear whose weight is ``centroids[assign]``: a trainable codebook, fixed indices."""

    codebook_bits: int
    grad_mode: str
    centroids: Tensor
    assign: Tensor

    @property
    def weight(self) -> Tensor:
        c, idx = self.centroids, self.assign.long()
        mask = self._buffers.get("mask")
        if getattr(self, "grad_mode", "mean") == "mean" and torch.is_grad_enabled() and c.requires_grad:
            # same values; the per-cluster gradient sum is divided by the cluster size
            kept = idx if mask is None else idx[mask]
            counts = torch.bincount(kept.reshape(-1), minlength=c.numel()).clamp_min(1).to(c.dtype)
            c = c.detach() + (c - c.detach()) / counts
        w = c[idx]
        return w if mask is None else w * mask  # a sparse layer's pruned weights stay exactly zero

    def weight_codes(self) -> tuple[Tensor, int]:
        """The codes of the stored weights (a sparse layer's kept ones only) and their bit-width."""
        mask = self._buffers.get("mask")
        idx = self.assign.long()
        return (idx if mask is None else idx[mask]), self.codebook_bits


class SharedConv2d(_SharedWeightMixin, nn.Conv2d):
    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight, self.bias)


class SharedLinear(_SharedWeightMixin, nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight, self.bias)


def _share_(m: nn.Module, bits: int, centroids: Tensor, assign: Tensor, grad_mode: str = "mean",
            mask: Tensor | None = None) -> None:
    """Turn a Conv2d / Linear into its weight-shared version, in place (the ``weight`` parameter goes); with
    ``mask`` (a sparse layer's kept weights), the others stay exactly zero."""
    dev = m.weight.device
    m._parameters.pop("weight", None)
    m.__class__ = SharedConv2d if isinstance(m, nn.Conv2d) else SharedLinear
    m.codebook_bits, m.grad_mode = int(bits), grad_mode
    m.register_parameter("centroids", nn.Parameter(centroids.float().to(dev)))
    m.register_buffer("assign", assign.to(torch.uint8).to(dev))
    if mask is not None:
        m.register_buffer("mask", mask.to(torch.bool).reshape(assign.shape).to(dev))


def share_weights_(model: nn.Module, bits: dict[str, int], *, init: str, iters: int, grad_mode: str = "mean",
                   masks: dict[str, Tensor] | None = None) -> None:
    """k-means every named layer; a masked one (a sparsifier's) clusters its kept weights only (Deep Compression:
    prune, then share the survivors), and its pruned weights stay zero."""
    mods = dict(model.named_modules())
    for name, b in bits.items():
        m = mods[name]
        mask = (masks or {}).get(name)
        if mask is None:
            c, idx = kmeans_1d(m.weight, 2 ** b, init=init, iters=iters)
        else:
            mask = mask.to(m.weight.device).reshape(m.weight.shape).bool()
            c, kept = kmeans_1d(m.weight.detach()[mask], 2 ** b, init=init, iters=iters)
            idx = torch.zeros(m.weight.shape, dtype=torch.long)
            idx[mask.cpu()] = kept.reshape(-1)
        _share_(m, b, c, idx, grad_mode, mask)


# -- the codebook deployment file ---------------------------------------------------------------


def pack_indices(idx: Tensor, bits: int) -> np.ndarray:
    """Indices (< 2^bits) packed at ``bits`` bits each, most significant bit first."""
    a = idx.detach().reshape(-1).cpu().numpy().astype(np.uint8)
    per = np.unpackbits(a[:, None], axis=1)[:, 8 - bits:]
    return np.packbits(per.reshape(-1))


def unpack_indices(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    per = np.unpackbits(np.asarray(packed, np.uint8), count=count * bits).reshape(count, bits)
    full = np.zeros((count, 8), np.uint8)
    full[:, 8 - bits:] = per
    return np.packbits(full, axis=1).reshape(-1)


def save_codebook(model: nn.Module, path: str | os.PathLike) -> int:
    """Write ``model`` as per-layer codebook + packed indices, dense tensors for the rest; returns bytes."""
    from torchpocket.utils import atomic_write_bytes

    layers: dict[str, Any] = {}
    skip: set[str] = set()
    for name, m in model.named_modules():
        if isinstance(m, _SharedWeightMixin):
            mask = m._buffers.get("mask")
            codes = m.assign if mask is None else m.assign[mask]  # a sparse layer: its kept weights' codes only
            layers[name] = {"bits": int(m.codebook_bits), "shape": list(m.assign.shape),
                            "codebook": m.centroids.detach().float().cpu().clone(),
                            "indices": torch.from_numpy(pack_indices(codes, m.codebook_bits))}
            if mask is not None:  # and which weights those are: one bit each
                layers[name]["mask"] = torch.from_numpy(np.packbits(mask.detach().cpu().reshape(-1).numpy()))
            skip |= {f"{name}.centroids", f"{name}.assign", f"{name}.mask"}
    dense = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k not in skip}
    buf = io.BytesIO()
    torch.save({"format": CODEBOOK_FORMAT, "version": 1, "layers": layers, "dense": dense}, buf)
    atomic_write_bytes(path, buf.getvalue())
    return len(buf.getvalue())


def load_codebook(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Load a :func:`save_codebook` file into ``model`` (the network it came from, before or after weight
    sharing); returns it in eval mode, its layers weight-shared as recorded."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"codebook model {path} does not exist")
    try:
        raw = p.read_bytes()
        if raw.startswith(XZ_MAGIC):  # the entropy-coded copy (model.codebook.pt.xz)
            import lzma

            raw = lzma.decompress(raw)
        blob = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's
        raise UserError(f"codebook model {path} cannot be read: {str(e).strip()[:200]}") from None
    if not isinstance(blob, dict) or blob.get("format") != CODEBOOK_FORMAT:
        raise UserError(f"{path} is not a torchpocket codebook model (no '{CODEBOOK_FORMAT}' header)")
    mods = dict(model.named_modules())
    state = dict(blob["dense"])
    for name, layer in blob["layers"].items():
        m = mods.get(name)
        shape = [int(s) for s in layer["shape"]]
        if not isinstance(m, (nn.Conv2d, nn.Linear)) or list(m.weight.shape) != shape:
            raise UserError(f"codebook model {path} does not fit this network at layer {name!r} "
                            f"(expects a Conv2d / Linear weight {shape})")
        n = int(np.prod(shape))
        mask = None
        if "mask" in layer:
            mask = torch.from_numpy(np.unpackbits(layer["mask"].numpy(), count=n).astype(bool)).reshape(shape)
            kept = unpack_indices(layer["indices"].numpy(), int(layer["bits"]), int(mask.sum()))
            idx = torch.zeros(shape, dtype=torch.long)
            idx[mask] = torch.from_numpy(kept).long()
        else:
            idx = torch.from_numpy(unpack_indices(layer["indices"].numpy(), int(layer["bits"]), n)).reshape(shape)
        if not isinstance(m, _SharedWeightMixin):
            _share_(m, int(layer["bits"]), layer["codebook"], idx, mask=mask)
        state[f"{name}.centroids"], state[f"{name}.assign"] = layer["codebook"], idx.to(torch.uint8)
        if mask is not None:
            state[f"{name}.mask"] = mask
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UserError(f"codebook model {path} does not fit this architecture: "
                        f"{' '.join(first[1:2] or first[:1])[:200]}") from None
    return model.eval()


# -- the learner --------------------------------------------------------------------------------


@register_learner("non-uniform-quant")
class NonUniformQuantLearner(Learner):
    """k-means weight sharing (Han et al. 2016): 2^bits centroids per layer, centroids fine-tuned"""

    Config = QuantConfig
    section = "quant"
    policy_name = "bits"
    resources = ("bits",)
    stage = "quantize"
    keeps_masks = True  # a sparse layer's codebook covers its kept weights; the pruned ones stay zero

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_config(self.config, NON_UNIFORM_BITS, "non-uniform-quant")
        self._macs: dict[str, int] = {}

    def prepare(self, model: nn.Module, data: DataBundle) -> None:

        super().prepare(model, data)
        self._macs = layer_macs(model, data.example())

    def search_space(self, model: nn.Module, target: float, *, fill: bool = True) -> SearchSpace:
        """Weight bits of every Conv2d / Linear layer; Budget on total weight bits (as uniform-quant)."""
        if any(isinstance(m, _SharedWeightMixin) or hasattr(m, "qbits") for m in model.modules()):
            raise UserError("this model is already quantized; start non-uniform-quant from a full-precision "
                            "or pruned checkpoint")
        return bits_space(model, target, cfg=self.config, fill=fill, macs=self._macs)

    def compress(self, model: nn.Module, policy: Policy) -> nn.Module:
        """A copy of ``model`` whose layers share ``2^bits`` k-means centroids each (bits from ``policy``)."""
        layers = quant_layers(model)
        bits = check_policy(policy, layers, NON_UNIFORM_BITS, "non-uniform-quant")
        new = copy.deepcopy(model)
        share_weights_(new, {n: b for (n, _), b in zip(layers, bits)}, init=self.config.kmeans_init,
                       iters=self.config.kmeans_iters, grad_mode=self.config.kmeans_grad, masks=weight_masks(model))
        return new

    def arch_state(self, model: nn.Module) -> dict[str, Any]:
        """Bits of every weight-shared layer (codebooks and indices are in the state_dict)."""
        shared = [(n, m) for n, m in model.named_modules() if isinstance(m, _SharedWeightMixin)]
        return {"version": ARCH_VERSION, "layers": {n: int(m.codebook_bits) for n, m in shared},
                "grad": next((m.grad_mode for _, m in shared), self.config.kmeans_grad),
                "masked": [n for n, m in shared if "mask" in m._buffers]}

    @classmethod
    def rebuild(cls, model: nn.Module, arch: dict[str, Any]) -> nn.Module:
        """Make the recorded layers of a freshly built ``model`` weight-shared (values come from the state_dict)."""
        if not arch:
            return model
        if arch.get("version") != ARCH_VERSION:
            raise UserError(f"unsupported non-uniform-quant record version {arch.get('version')!r} "
                            f"(expected {ARCH_VERSION})")
        mods = dict(model.named_modules())
        for name, b in arch.get("layers", {}).items():
            m = mods.get(name)
            if not isinstance(m, (nn.Conv2d, nn.Linear)):
                raise UserError(f"the recorded weight sharing does not fit this network: no Conv2d / Linear "
                                f"layer {name!r}")
            mask = torch.ones(m.weight.shape, dtype=torch.bool) if name in arch.get("masked", []) else None
            _share_(m, int(b), torch.zeros(2 ** int(b)), torch.zeros(m.weight.shape, dtype=torch.uint8),
                    str(arch.get("grad", "mean")), mask)  # values (and a mask) come from the state_dict
        return model

    def onnx_float_model(self, model: nn.Module) -> nn.Module:
        """``model.onnx``: the shared weights baked into plain layers (so batch-norm folds at export)."""
        new = copy.deepcopy(model)
        with torch.no_grad():
            for m in new.modules():
                if isinstance(m, _SharedWeightMixin):
                    w = m.weight.detach().clone()
                    del m._parameters["centroids"], m._buffers["assign"]
                    m._buffers.pop("mask", None)
                    m.__class__ = nn.Conv2d if isinstance(m, SharedConv2d) else nn.Linear
                    del m.codebook_bits, m.grad_mode
                    m.weight = nn.Parameter(w)
        return new.eval()

    def export(self, model: nn.Module, run_dir: Any, example: Tensor) -> dict[str, Any]:
        """``model.codebook.pt`` (see :func:`load_codebook`) and its xz-compressed copy ``model.codebook.pt.xz``,
        both checked to reload identically; sizes vs fp32."""
        path = Path(run_dir) / "model.codebook.pt"
        nbytes = save_codebook(model, path)
        buf = io.BytesIO()
        torch.save({k: v.detach().cpu().contiguous() for k, v in copy.deepcopy(model).cpu().state_dict().items()
                    if not k.endswith((".centroids", ".assign", ".mask"))} | {
            f"{n}.weight": m.weight.detach().cpu().contiguous() for n, m in model.named_modules()
            if isinstance(m, _SharedWeightMixin)}, buf)
        fp32_bytes = len(buf.getvalue())
        p = next(model.parameters(), None)
        x = example.to(p.device if p is not None else "cpu")
        was = model.training
        model.eval()
        import lzma

        from torchpocket.utils import atomic_write_bytes

        xz = path.with_name(path.name + ".xz")  # the same file entropy-coded (Deep Compression's last stage)
        atomic_write_bytes(xz, lzma.compress(path.read_bytes(), preset=9 | lzma.PRESET_EXTREME))
        with torch.no_grad():
            ref = model(x)
            same = all(bool(torch.equal(load_codebook(f, copy.deepcopy(model))(x), ref)) for f in (path, xz))
        model.train(was)
        shared = [m for m in model.modules() if isinstance(m, _SharedWeightMixin)]
        n = sum(m.assign.numel() for m in shared)
        bits = sum(m.assign.numel() * m.codebook_bits for m in shared)
        xz_bytes = xz.stat().st_size
        return {"path": path.name, "codebook_bytes": nbytes, "fp32_bytes": fp32_bytes,
                "compression": fp32_bytes / max(nbytes, 1), "average_weight_bits": bits / max(n, 1),
                "xz_path": xz.name, "xz_bytes": xz_bytes, "compression_xz": fp32_bytes / max(xz_bytes, 1),
                "weight_bits": {n_: int(m.codebook_bits) for n_, m in model.named_modules()
                                if isinstance(m, _SharedWeightMixin)},
                "reload_identical": same}
