"""Python API: ``torchpocket.load`` (rebuild a compressed model from its file) and ``torchpocket.compress``."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from torchpocket.datasets import DataBundle
from torchpocket.errors import UserError
from torchpocket.learners.training import load_checkpoint, save_checkpoint
from torchpocket.utils import resolve_device

if TYPE_CHECKING:
    from torchpocket.pipeline import SearchResult


def save_model(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    config: dict[str, Any],
    net: str | None,
    in_channels: int,
    num_classes: int,
    image_size: int,
    learner: str = "full-prec",
    arch: dict[str, Any] | None = None,
    policy: dict[str, float] | None = None,
    metrics: dict[str, Any] | None = None,
    base_arch: list[dict[str, Any]] | None = None,
) -> None:
    """Write a model checkpoint: config, what the learner changed and the weights (weights_only-loadable).

    ``base_arch`` chains compressions: the (learner, arch) steps that turned the
    registry net into the model this learner started from (prune, then quantize).
    """
    from torchpocket.config import redacted

    sd = model.state_dict()
    state = {k: v.contiguous() for k, v in sd.items()}
    # module versions (``_metadata``), which a versioned ``_load_from_state_dict`` reads (torchvision's MNASNet)
    meta = {str(k): {str(a): b for a, b in v.items() if isinstance(b, (int, float, str, bool))}
            for k, v in getattr(sd, "_metadata", {}).items()}
    save_checkpoint(path, {
        "config": redacted(config), "net": net, "in_channels": in_channels, "num_classes": num_classes,
        "image_size": image_size, "learner": learner, "arch": arch or {}, "policy": policy,
        "metrics": metrics or {}, "base_arch": base_arch or [], "state_dict": state, "state_metadata": meta,
    })


def with_metadata(state: dict[str, Any], meta: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    """``state`` as an OrderedDict carrying the module versions it was saved with (``state_dict()._metadata``)."""
    from collections import OrderedDict

    out: Any = OrderedDict(state)
    if meta:
        out._metadata = OrderedDict((k, dict(v)) for k, v in meta.items())
    return out


def arch_chain(ckpt: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (learner, arch) step recorded in a checkpoint, oldest first."""
    steps = list(ckpt.get("base_arch") or [])
    if ckpt.get("learner") and ckpt["learner"] != "full-prec":
        steps.append({"learner": ckpt["learner"], "arch": ckpt.get("arch") or {}})
    return steps


def rebuild_architecture(model: nn.Module, steps: list[dict[str, Any]]) -> nn.Module:
    from torchpocket.learners import LEARNERS

    for step in steps:
        model = LEARNERS.get(step["learner"]).rebuild(model, step["arch"])
    return model


def load(path: str | os.PathLike, model: nn.Module | None = None, *, expect_net: str | None = None) -> nn.Module:
    """Rebuild the (compressed) model stored at ``path`` and load its weights with ``weights_only=True``.

    The architecture comes from the checkpoint: the registry net it names (or
    ``model``, for a network the user defined), then every learner's recorded
    changes (kept channels, masks, quantizers).
    """
    ckpt = load_checkpoint(path)
    if model is None:
        from torchpocket.nets import create_net

        if not ckpt.get("net"):
            raise UserError(f"{path} holds a user-defined model: pass it, torchpocket.load(path, model=MyNet())")
        model = create_net(ckpt["net"], in_channels=ckpt["in_channels"], num_classes=ckpt["num_classes"])
    elif expect_net and ckpt.get("net") and ckpt["net"] != expect_net:
        raise UserError(f"checkpoint {path} is for net {ckpt['net']!r}, not {expect_net!r}")
    model = rebuild_architecture(model, arch_chain(ckpt))
    try:
        model.load_state_dict(with_metadata(ckpt["state_dict"], ckpt.get("state_metadata")))
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UserError(
            f"checkpoint {path} does not fit this architecture (saved for net {ckpt.get('net')!r}): "
            f"{' '.join(first[1:2] or first[:1])[:200]}"
        ) from None
    model.eval()
    return model


def compress(
    model: nn.Module,
    train_loader: Iterable[Any] | None = None,
    val_loader: Iterable[Any] | None = None,
    *,
    learner: str = "chn-pruned",
    hpo: str = "ddpg",
    target: float = 0.5,
    test_loader: Iterable[Any] | None = None,
    out_dir: str | os.PathLike | None = None,
    device: str = "cpu",
    pareto: tuple[float, float] | None = None,
    **options: Any,
) -> tuple[nn.Module, SearchResult] | Front:
    """Compress a model the user defined, with their own loaders (no registry entry needed).

    ``learner`` / ``hpo`` are the ``--learner`` / ``--hpo`` names, ``target`` the resource to keep.
    ``options`` are config fields by name, as in a YAML preset (``episodes=20, ft_steps=100,
    retrain_epochs=0, calib_batches=2, ...``). The search is scored on ``val_loader``; ``test_loader``
    (default: ``val_loader``) is read once, at the end. Returns the compressed model and the search
    result; with ``out_dir`` a run directory is written too (``model.pt``, ``summary.json``, report).

    ``pareto=(lo, hi)`` searches the whole accuracy-resource front instead (``--pareto``; ``target`` is
    ignored) and returns it as a :class:`Front`; :func:`pick` then gives the model at any resource.
    """
    from torchpocket.config import default_config, iter_fields, merge, validate
    from torchpocket.pipeline import RunDir, finalize, make_learner, search

    cfg = default_config()
    cfg["run"].update(learner=learner, hpo=hpo, target=target, device=device, quiet=True)
    if pareto is not None:
        try:
            lo, hi = (float(v) for v in pareto)
        except (TypeError, ValueError):
            raise UserError(f"pareto must be a pair (lo, hi) of resource fractions, got {pareto!r}") from None
        options["pareto"] = f"{lo}:{hi}"
    by_name = {f.name: section for section, f, _ in iter_fields()}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in options.items():
        if key not in by_name:
            raise UserError(f"unknown option {key!r} for compress()")
        nested.setdefault(by_name[key], {})[key] = value
    cfg = merge(cfg, nested, "compress()")
    validate(cfg)  # checks a registry net and dataset name: the defaults stand in for the user's
    if train_loader is None or val_loader is None:
        raise UserError("compress(model, train_loader, val_loader, ...) needs a training and a validation loader "
                        "(iterables of (images, labels) batches); the search is scored on the validation one")
    cfg["run"].update(net=None, dataset="user")
    dev = resolve_device(device)
    data = LoaderBundle(train_loader, val_loader, test_loader)
    teacher = copy.deepcopy(model).to(dev).eval()
    with torch.no_grad():
        out = teacher(next(iter(val_loader))[0][:1].to(dev))
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        what = type(out).__name__ if not isinstance(out, torch.Tensor) else f"a tensor of shape {tuple(out.shape)}"
        raise UserError(f"the model's forward returns {what}; torchpocket needs a (batch, classes) tensor of "
                        "class scores: wrap the model so that forward returns its logits")
    data.num_classes = int(out.shape[1])
    learner_obj = make_learner(cfg, dev)
    rd = None
    if out_dir:
        cfg["run"]["out_dir"], cfg["run"]["net"] = str(out_dir), "user"
        rd = RunDir.create(cfg)
    result = search(learner_obj, teacher, data, cfg, run_dir=rd, device=dev)
    if pareto is not None:
        if rd is not None:
            from torchpocket.pipeline.front import finish_front

            finish_front(learner_obj, teacher, result, data, cfg, run_dir=rd, device=dev, base_arch=[], net=None)
        return Front(result, (lo, hi), learner_obj, teacher, cfg)
    if rd is not None:
        finalize(learner_obj, teacher, result, data, cfg, run_dir=rd, device=dev, base_arch=[], net=None)
        return load(rd.path / "model.pt", model=copy.deepcopy(model)), result
    return _compress_retrained(learner_obj, teacher, result.best_policy, cfg), result


def _compress_retrained(learner: Any, teacher: nn.Module, policy: list[float], cfg: dict[str, Any]) -> nn.Module:
    """``policy`` applied to ``teacher`` and re-trained (``retrain_epochs``, distilled from it), in eval mode."""
    final = learner.compress(teacher, policy)
    sc = cfg["search"]
    if sc["retrain_epochs"]:
        learner.retrain(final, teacher=teacher, epochs=sc["retrain_epochs"], lr=sc["retrain_lr"])
    return final.eval()


@dataclass
class Front:
    """What ``compress(..., pareto=(lo, hi))`` returns: every trial of the search and its non-dominated ones."""

    result: SearchResult
    window: tuple[float, float]
    learner: Any = field(repr=False)
    teacher: nn.Module = field(repr=False)
    cfg: dict[str, Any] = field(repr=False)

    @property
    def trials(self) -> list[dict[str, Any]]:
        return self.result.trials

    @property
    def points(self) -> list[dict[str, Any]]:
        """The non-dominated trials by resource: ``trial``, ``resource``, ``val_acc``, ``policy``, ..."""
        from torchpocket import pareto

        return pareto.front(self.result.trials)

    @property
    def hypervolume(self) -> float:
        from torchpocket import pareto

        return pareto.hypervolume(self.result.trials, *self.window)


def pick(front: Front, resource: float) -> nn.Module:
    """The front's best point at resource <= ``resource``, compressed and re-trained (``retrain_epochs``, distilled
    from the original model) as ``compress`` does for one target."""
    from torchpocket import pareto

    best = pareto.best_at(front.result.trials, float(resource))
    if best is None:
        raise UserError(f"pick({resource:g}): no scored trial of this front keeps the resource at or under that")
    return _compress_retrained(front.learner, front.teacher, best["policy"], front.cfg)


class LoaderBundle(DataBundle):
    """A DataBundle over loaders the user already has (Python API): the loaders are used as given."""

    def __init__(self, train_loader: Any, val_loader: Any, test_loader: Any = None) -> None:
        x, y = next(iter(train_loader))
        super().__init__("user", _LoaderSplit(train_loader), _LoaderSplit(val_loader),
                         _LoaderSplit(test_loader or val_loader), in_channels=int(x.shape[1]),
                         num_classes=0, image_size=int(x.shape[-1]), image_height=int(x.shape[-2]))
        self._loaders = {"train": train_loader, "val": val_loader, "test": test_loader or val_loader}

    def loader(self, split: str, **_: Any) -> Any:
        return self._loaders[split]


class _LoaderSplit:
    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __len__(self) -> int:
        ds = getattr(self.loader, "dataset", None)
        return len(ds) if ds is not None else len(self.loader) * getattr(self.loader, "batch_size", 1)

    def __getitem__(self, i: int) -> Any:
        ds = getattr(self.loader, "dataset", None)
        if ds is not None:
            return ds[i]
        x, y = next(iter(self.loader))
        return x[i], y[i]


__all__ = ["compress", "load", "save_model"]
