"""The learner contract.

A learner turns an uncompressed model and a per-layer policy into a candidate
compressed model. It never imports an optimizer: it only describes its search
space (layers, bounds, a cost function for the Budget).

Life cycle used by the pipeline::

    learner = create_learner(name, config=cfg[section], train_cfg=..., device=..., quiet=...)
    learner.prepare(model, data)            # once: calibration features, val tensors (AMC's env init)
    space = learner.search_space(model, target)
    candidate = learner.compress(model, policy)       # a NEW module; `model` stays untouched (teacher)
    learner.finetune(candidate, teacher=model, steps=K)
    arch = learner.arch_state(candidate)               # saved in the checkpoint
    rebuilt = type(learner).rebuild(fresh_model, arch) # same architecture as `candidate`
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from torchpocket.datasets import DataBundle
from torchpocket.distributed import per_rank_batch, world_size
from torchpocket.distributed import rank as dist_rank
from torchpocket.errors import UserError
from torchpocket.learners.training import TrainConfig, finetune, fit
from torchpocket.space import Policy, SearchSpace


class Learner(ABC):
    """Base class of every compression algorithm (``--learner``).

    Subclasses set ``Config`` (a dataclass registered as config section
    ``section``) when they have options, and implement :meth:`search_space` and
    :meth:`compress`. Hooks with defaults: :meth:`prepare`, :meth:`after_step`
    (enforce masks / ranges after each optimizer step), :meth:`arch_state` /
    :meth:`rebuild` (for learners that change the architecture), :meth:`export`,
    :meth:`onnx_float_model`, :meth:`deploy` (files built from ``model.onnx``),
    :meth:`summary_fields` and :meth:`quick_options` (options for tests and smoke runs);
    its own option checks live on its ``Config`` (a ``check(cfg)`` classmethod, run by
    ``config.validate``).
    """

    Config: ClassVar[type | None] = None
    section: ClassVar[str | None] = None
    searchable: ClassVar[bool] = True  # False: the learner takes no policy (full-prec)
    policy_name: ClassVar[str] = "ratio"  # what a policy value means, for reports
    # other sections whose options this learner reads: constructor keyword -> section (dis-chn-pruned: chn's)
    extra_sections: ClassVar[dict[str, str]] = {}
    # what ``--target`` may constrain (``--resource``), the default first; () for a learner with no Budget
    resources: ClassVar[tuple[str, ...]] = ()
    # what it does to a model, for composites A+B: "structure" (A: pruning, sparsity) or "quantize" (B)
    stage: ClassVar[str | None] = None
    sparse: ClassVar[bool] = False  # its models carry weight masks (``_layers.weight_masks``)
    keeps_masks: ClassVar[bool] = False  # a quantizer that keeps a sparse model's zeros through training
    cli_name: ClassVar[str | None] = None  # the registered ``--learner`` name (set by ``register_learner``)

    def __init__(self, *, config: Any = None, train_cfg: TrainConfig | None = None,
                 device: torch.device | str = "cpu", quiet: bool = True, seed: int = 0,
                 resource: str = "auto") -> None:
        self.resource = self.resolve_resource(resource)
        self.config = config if config is not None else (self.Config() if self.Config else None)
        self.train_cfg = train_cfg or TrainConfig()
        self.device = torch.device(device)
        self.quiet, self.seed = quiet, seed
        self.data: DataBundle | None = None

    @classmethod
    def resolve_resource(cls, resource: str) -> str:
        """``--resource`` as this learner reads it: ``auto`` is its first; one it cannot count is refused."""
        if resource == "auto":
            return cls.resources[0] if cls.resources else "auto"
        if resource not in cls.resources:
            name = getattr(cls, "cli_name", None) or cls.__name__
            choices = ", ".join(cls.resources) or "none (it searches nothing)"
            raise UserError(f"--resource {resource} is not one {name} can constrain; choose one of: {choices}")
        return resource

    # -- the contract --------------------------------------------------------------------------
    def prepare(self, model: nn.Module, data: DataBundle) -> None:
        """Extract once what every candidate needs (calibration data, feature maps)."""
        self.data = data

    @abstractmethod
    def search_space(self, model: nn.Module, target: float, *, fill: bool = True) -> SearchSpace:
        """The compressible layers of ``model`` and a Budget at ``target``.

        ``fill=True``: resource-constrained protocol (projections rise to just under the target);
        ``fill=False``: accuracy-guaranteed rewards (policies may stay below it).
        """

    @abstractmethod
    def compress(self, model: nn.Module, policy: Policy) -> nn.Module:
        """A new compressed module following ``policy``; ``model`` is not modified."""

    # -- hooks -------------------------------------------------------------------------------
    @classmethod
    def quick_options(cls) -> dict[str, Any]:
        """Overrides of ``Config`` fields that make this learner fast on tiny data (tests, smoke runs).

        Short calibration, few optimisation steps: the contract stays the same, only the
        quality of each candidate drops. ``dataclasses.replace(cls.Config(), **cls.quick_options())``.
        """
        return {}

    def after_step(self, model: nn.Module) -> None:
        """Called after every optimizer step during fine-tuning / re-training (masks, clamps)."""

    def _after_step_hook(self) -> Any:
        return self.after_step if type(self).after_step is not Learner.after_step else None

    def arch_state(self, model: nn.Module) -> dict[str, Any]:
        """What this learner changed, as plain data (saved beside the state_dict)."""
        return {}

    @classmethod
    def rebuild(cls, model: nn.Module, arch: dict[str, Any]) -> nn.Module:
        """Turn a freshly built uncompressed ``model`` into the compressed architecture ``arch``."""
        return model

    def module_sizes(self, model: nn.Module, policy: Policy
                     ) -> tuple[dict[str, tuple[float, ...]], float] | None:
        """What ``policy`` leaves of ``model`` (the prepared one), for a composite's joint Budget: per Conv2d /
        Linear module it changes, (multiply-adds per sample, weights stored[, position bits stored: a sparse
        layer's bitmask]), and the parameters stored in all.
        ``None`` (the default): this learner cannot be the first part of a composite ``A+B``."""
        return None

    def activation_bits(self) -> int:
        """Bits of the activations a quantizer's model computes with (a composite's BitOps; 32: float)."""
        return 32

    def int8_deploy(self) -> bool:
        """Whether :meth:`deploy` ships ``model.int8.onnx`` with these options (a composite's latency table is then
        timed in ONNX Runtime int8)."""
        return False

    def export(self, model: nn.Module, run_dir: Any, example: torch.Tensor) -> dict[str, Any]:
        """Learner-specific deployment files; returns figures for summary.json (key ``export``)."""
        return {}

    def onnx_float_model(self, model: nn.Module) -> nn.Module:
        """The fp32 network written as ``model.onnx`` (a quantizer: its quantized weights as floats)."""
        return model

    def deploy(self, model: nn.Module, fp32_onnx: Any, data: DataBundle, run_dir: Any, *,
               repeats: int = 20) -> dict[str, Any]:
        """Deployment files built from ``model.onnx`` (an int8 model, say); top-level keys for summary.json."""
        return {}

    def measured_options(self) -> dict[str, Any]:
        """What this machine's measurements decided about the search space (``--channel-round auto``'s granules);
        part of the key of cached probe scores. Nothing by default."""
        return {}

    def summary_fields(self, policy: Policy, summary: dict[str, Any]) -> dict[str, Any]:
        """Extra top-level fields of summary.json for the final ``policy`` (``summary`` holds the measurements)."""
        return {}

    # -- shared training ---------------------------------------------------------------------
    def _loader(self, split: str, train: bool = False) -> Any:
        """A loader over ``split``; under torchrun each rank gets its shard and ``--batch-size`` stays the
        global batch (``batch_size / world_size`` per rank), so N ranks take the same steps as one process."""
        assert self.data is not None, "call prepare() first"
        return self.data.loader(split, batch_size=per_rank_batch(self.train_cfg.batch_size), train=train,
                                seed=self.seed, rank=dist_rank(), world_size=world_size())

    def finetune(self, model: nn.Module, *, teacher: nn.Module | None, steps: int) -> dict[str, float]:
        """Fast fine-tuning of a candidate with distillation from ``teacher``."""
        return finetune(model, self._loader("train", train=True), steps=steps, cfg=self.train_cfg,
                        device=self.device, teacher=teacher, after_step=self._after_step_hook(), quiet=True)

    def retrain(self, model: nn.Module, *, teacher: nn.Module | None, epochs: int, lr: float | None = None,
                on_epoch: Any = None) -> list[dict[str, float]]:
        """Full re-training of the chosen candidate (distillation from ``teacher``), peak learning rate ``lr``."""
        cfg = dataclasses.replace(self.train_cfg, lr=lr) if lr else self.train_cfg
        return fit(model, self._loader("train", train=True), self._loader("val"), cfg=cfg,
                   device=self.device, epochs=epochs, teacher=teacher, after_step=self._after_step_hook(),
                   on_epoch=on_epoch, quiet=self.quiet, desc="re-train")
