"""``dis-chn-pruned``: discrimination-aware channel pruning (Zhuang et al., NeurIPS 2018; PocketFlow's DCP).

Same policy, search space, Budget, dependency-graph surgery and architecture record as
:mod:`chn_pruned` (this learner subclasses it); only *which* channels survive, and the
weights they keep, differ:

* **stages** (:func:`find_stages`): ``stages`` auxiliary heads go at points every path
  through the network crosses (a module output whose detachment cuts the input off the
  logits -- a residual block's output, never the inside of one), spaced evenly in
  Conv2d / Linear layers as PocketFlow does; layers after the last head use the network's
  own classifier. Each group belongs to the first stage ending after its last consumer;
* **heads** (:meth:`prepare`, once): BatchNorm + ReLU + global average pooling + Linear on
  each stage output, trained with the baseline frozen (cross-entropy, Adam);
* **per candidate** (:meth:`compress`), stage by stage on a fixed pool of training images
  (the baseline's outputs on it cached once): for every pruned group, starting from no input
  channel, repeatedly compute the gradient of the joint loss -- relative reconstruction error
  of each consumer's output against the baseline's plus ``loss_weight`` x the stage head's
  cross-entropy -- with respect to the consumers' masked weights, and add the units (channels)
  with the largest squared Frobenius gradient norm until the group's keep count is reached
  (``select_steps`` gradient evaluations per layer; one channel per evaluation, the paper's
  greedy, when that is at least the keep count). The kept weights are then warm-started by
  least squares on the reconstruction term (the pruned network's inputs against the
  baseline's outputs: the term's exact minimiser, where PocketFlow spends 500 Adam steps per
  added channel), optimised on the joint loss (``layer_steps``, Adam), and once every group of
  the stage is chosen the whole stage and its head are fine-tuned (``block_steps``) on the
  stage output's reconstruction error plus the head's cross-entropy. Masked consumer columns
  are exactly the removed channels, so the final physical cut (chn-pruned's operations)
  changes no output; the heads are dropped (they never enter the returned module).

Defaults are set for a 2-core CPU (a ResNet-20 candidate in tens of seconds); on the
ResNet-20 / Fashion-MNIST baseline, Adam steps on the layer after the least-squares warm start
lowered the accuracy before fine-tuning at every learning rate tried, hence ``layer_steps=0``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from torchpocket.datasets import DataBundle
from torchpocket.errors import UnsupportedModel, UserError
from torchpocket.learners import register_learner
from torchpocket.learners._importance import Calib
from torchpocket.learners.channel_graph import ChannelGroup
from torchpocket.learners.chn_pruned import _MAX_GRAM_DIM, ChnConfig, ChnPrunedLearner
from torchpocket.options import opt
from torchpocket.space import Policy


@dataclass
class DcpConfig:
    """Options of ``dis-chn-pruned`` (config section ``dcp``).

    The channel-graph options (``--resource``, ``--channel-round``, ``--cp-coupled``,
    ``--cp-low`` / ``--cp-high``) are ``chn-pruned``'s, passed as ``chn_config``.
    """

    stages: int = opt(3, "auxiliary discrimination-aware heads on intermediate stage outputs (PocketFlow: 3); "
                      "layers after the last one use the network's own classifier", flag="--dcp-stages")
    head_steps: int = opt(150, "Adam steps training the auxiliary heads on the frozen baseline (once, in prepare)",
                          flag="--dcp-head-steps")
    layer_steps: int = opt(0, "Adam steps optimising a pruned layer's kept weights on the joint loss after the "
                           "least-squares warm start (PocketFlow: 500 per added channel, without it)",
                           flag="--dcp-layer-steps")
    block_steps: int = opt(20, "Adam steps fine-tuning a stage (and its head) after its layers are pruned",
                           flag="--dcp-block-steps")
    select_steps: int = opt(8, "gradient evaluations per pruned layer: each adds the next ceil(kept / this) "
                            "channels by gradient norm (kept or more: one channel at a time, as in the paper)",
                            flag="--dcp-select-steps")
    lr: float = opt(1e-4, "Adam learning rate of the layer and block steps (PocketFlow: 1e-3)", flag="--dcp-lr")
    head_lr: float = opt(1e-2, "Adam learning rate of the auxiliary heads' training", flag="--dcp-head-lr")
    loss_weight: float = opt(1.0, "weight of the head's cross-entropy against the relative reconstruction error",
                             flag="--dcp-loss-weight")
    batch: int = opt(64, "images per DCP step (channel-selection gradient, layer and block steps)",
                     flag="--dcp-batch")
    lsq_batches: int = opt(4, "pool batches whose (pruned-network) inputs warm-start each pruned layer's kept "
                           "weights by least squares on the reconstruction term before the Adam steps (0 = Adam "
                           "only, as PocketFlow)", flag="--dcp-lsq-batches")
    samples: int = opt(1024, "training images held for DCP (sampled once, seeded)", flag="--dcp-samples")



_TEACHER_CACHE_BYTES = 512 * 2**20  # the baseline's outputs on the pool are kept when they fit in this
_MAX_PROBES = 64  # cut-point tests per stage boundary (one forward pass of a single image each)


class _Stop(Exception):  # noqa: N818 - control flow, not an error
    """Raised by a forward hook to end a forward pass at a stage output."""


class AuxHead(nn.Module):
    """Discrimination-aware head: BatchNorm + ReLU + global average pooling + Linear."""

    def __init__(self, channels: int, classes: int, *, spatial: bool) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels) if spatial else nn.BatchNorm1d(channels)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.norm(x))
        return self.fc(x.mean((2, 3)) if x.dim() == 4 else x)


@dataclass
class StagePlan:
    """Where the heads go and which groups / parameters each stage owns (result of :func:`find_stages`)."""

    cuts: list[str]  # module whose output a head reads, per stage; the last stage (network output) has none
    shapes: list[tuple[int, ...]]  # that output's shape without the batch dimension
    stage_of: list[int]  # per channel group: its stage (len(cuts) = the network's own output)
    modules: list[list[str]]  # per stage (len(cuts) + 1): modules with parameters that run in it


def _trace(net: nn.Module, x: Tensor) -> tuple[list[tuple[str, Any]], dict[str, int], Tensor]:
    """Module completions in order (name, output), calls per module, and the model's output."""
    order: list[tuple[str, Any]] = []
    calls: dict[str, int] = {}

    def hook(name: str) -> Any:
        def fn(mod: nn.Module, inp: Any, out: Any) -> None:
            calls[name] = calls.get(name, 0) + 1
            order.append((name, out))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in net.named_modules() if n]
    try:
        with torch.no_grad():
            out = net(x)
    finally:
        for h in handles:
            h.remove()
    return order, calls, out


def _is_cut(net: nn.Module, x: Tensor, name: str) -> bool:
    """Whether every path from the input to the output crosses ``name``'s output (detaching it cuts the graph)."""
    h = net.get_submodule(name).register_forward_hook(lambda m, i, o: o.detach())
    try:
        with torch.enable_grad():
            out = net(x.detach().clone().requires_grad_(True))
    finally:
        h.remove()
    return not (isinstance(out, Tensor) and out.requires_grad)


def find_stages(model: nn.Module, example: Tensor, groups: Sequence[ChannelGroup], n_stages: int) -> StagePlan:
    """Stage outputs for ``n_stages`` heads, spaced evenly in Conv2d / Linear layers, and each group's stage.

    Raises :class:`UnsupportedModel` when the model's output is not ``(batch, classes)`` logits or a
    pruned layer runs more than once per forward pass (its reconstruction target would be ambiguous).
    Fewer heads when fewer stage outputs exist; a head whose stage prunes nothing is dropped.
    """
    net = copy.deepcopy(model).cpu().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    x = example[:2].detach().cpu().float() if len(example) >= 2 else example.detach().cpu().float()
    order, calls, out = _trace(net, x)
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise UnsupportedModel(f"dis-chn-pruned needs a classifier whose output is (batch, classes) logits, for its "
                               f"cross-entropy losses; this model returns {got}")
    for g in groups:
        for c in g.consumers:
            if calls.get(c, 0) != 1:
                raise UnsupportedModel(f"dis-chn-pruned: layer {c!r} runs {calls.get(c, 0)} times per forward pass "
                                       "(shared weights); its reconstruction target is ambiguous")
    mods = dict(net.named_modules())
    done_at: dict[str, int] = {}  # first completion index of each module
    layers_before: list[int] = []  # Conv2d / Linear completions up to each completion
    n = 0
    for i, (name, _) in enumerate(order):
        if isinstance(mods[name], (nn.Conv2d, nn.Linear)):
            n += 1
        layers_before.append(n)
        done_at.setdefault(name, i)
    total = n
    seen: set[int] = set()
    cands: list[int] = []  # completion indices of possible stage outputs
    for i, (name, o) in enumerate(order):
        if (calls[name] != 1 or not isinstance(o, Tensor) or not o.is_floating_point() or o.dim() not in (2, 4)
                or o.shape[0] != x.shape[0] or id(o) in seen or not 1 <= layers_before[i] < total):
            continue
        seen.add(id(o))
        cands.append(i)
    probed: dict[int, bool] = {}
    bounds: list[int] = []
    for p in range(1, max(0, n_stages) + 1):
        want = p * total / (n_stages + 1)
        later = [i for i in cands if not bounds or (i > bounds[-1] and layers_before[i] > layers_before[bounds[-1]])]
        for i in sorted(later, key=lambda i: (abs(layers_before[i] - want), -i))[:_MAX_PROBES]:
            if i not in probed:
                probed[i] = _is_cut(net, x, order[i][0])
            if probed[i]:
                bounds.append(i)
                break
    stage_of = []
    for g in groups:
        last = max(done_at[c] for c in g.consumers)
        stage_of.append(next((s for s, b in enumerate(bounds) if b >= last), len(bounds)))
    used = sorted(set(stage_of) - {len(bounds)})
    bounds = [bounds[s] for s in used]
    stage_of = [used.index(s) if s in used else len(bounds) for s in stage_of]
    stages: list[list[str]] = [[] for _ in range(len(bounds) + 1)]
    owners = {name for name, m in mods.items() if name and any(True for _ in m.parameters(recurse=False))}
    for name in owners:
        if name in done_at:
            stages[next((s for s, b in enumerate(bounds) if b >= done_at[name]), len(bounds))].append(name)
    return StagePlan([order[b][0] for b in bounds], [tuple(order[b][1].shape[1:]) for b in bounds], stage_of, stages)


def _forward(net: nn.Module, x: Tensor, taps: Sequence[str], stop: str | None) -> tuple[dict[str, Tensor], Tensor]:
    """Outputs of the ``taps`` modules (copies) and the output of ``stop`` -- where the pass ends -- or the model's."""
    got: dict[str, Tensor] = {}
    handles = []

    def hook(name: str) -> Any:
        def fn(mod: nn.Module, inp: Any, out: Tensor) -> None:
            got[name] = out.clone()  # later in-place ops (ReLU(inplace=True)) must not change it
            if name == stop:
                raise _Stop
        return fn

    for name in dict.fromkeys([*taps, *([stop] if stop else [])]):
        handles.append(net.get_submodule(name).register_forward_hook(hook(name)))
    try:
        out = net(x)
    except _Stop:
        out = got[stop]  # type: ignore[index]
    finally:
        for h in handles:
            h.remove()
    return got, out


def _input_of(net: nn.Module, x: Tensor, name: str) -> Tensor:
    """The input of module ``name`` on ``x`` (the forward pass ends there)."""
    got: list[Tensor] = []

    def pre(mod: nn.Module, inp: tuple[Tensor, ...]) -> None:
        got.append(inp[0].detach())
        raise _Stop

    h = net.get_submodule(name).register_forward_pre_hook(pre)
    try:
        with torch.no_grad():
            net(x)
    except _Stop:
        pass
    finally:
        h.remove()
    return got[0]


def _rel_err(a: Tensor, b: Tensor) -> Tensor:
    """||a - b||^2 / ||b||^2: scale-free reconstruction error (layers of any magnitude weigh alike)."""
    return (a - b).pow(2).sum() / b.pow(2).sum().clamp_min(1e-12)


@register_learner("dis-chn-pruned")
class DisChnPrunedLearner(ChnPrunedLearner):
    """Discrimination-aware channel pruning (Zhuang et al. 2018): auxiliary heads, gradient-norm channel selection"""

    Config = DcpConfig
    section = "dcp"
    #: other config sections this learner reads, as constructor keyword -> section
    extra_sections: ClassVar[dict[str, str]] = {"chn_config": "chn"}

    def __init__(self, *, config: DcpConfig | None = None, chn_config: ChnConfig | None = None,
                 **kwargs: Any) -> None:
        """``config``: the DCP options; ``chn_config``: the channel-graph options shared with ``chn-pruned``
        (its selection / reconstruction options are not used: DCP selects and re-fits by itself)."""
        chn = dataclasses.replace(chn_config or ChnConfig(), select="l1", reconstruct=False)
        super().__init__(config=chn, **kwargs)
        self.dcp = config if config is not None else DcpConfig()
        d = self.dcp
        if d.stages < 0 or d.head_steps < 0 or d.layer_steps < 0 or d.block_steps < 0:
            raise UserError(f"--dcp-stages and the --dcp-*-steps must not be negative, got {d.stages}, "
                            f"{d.head_steps}, {d.layer_steps}, {d.block_steps}")
        if d.batch < 1 or d.samples < 1 or d.select_steps < 1:
            raise UserError(f"--dcp-batch, --dcp-samples and --dcp-select-steps must be at least 1, got {d.batch}, "
                            f"{d.samples} and {d.select_steps}")
        if not (d.lr > 0 and d.head_lr > 0 and math.isfinite(d.lr + d.head_lr)) or d.loss_weight < 0:
            raise UserError(f"need --dcp-lr > 0, --dcp-head-lr > 0 and --dcp-loss-weight >= 0, got {d.lr}, "
                            f"{d.head_lr} and {d.loss_weight}")
        self.plan: StagePlan | None = None
        self.heads: nn.ModuleList | None = None
        self._pool: tuple[Tensor, Tensor] | None = None
        self._cache: dict[str, Tensor] | None = None
        self.head_history: list[float] = []  # head training loss per step (diagnostics, tests)
        self.last_stats: dict[str, Any] = {}  # of the latest compress(): per group, the joint loss per layer step

    @classmethod
    def quick_options(cls) -> dict[str, Any]:
        """A small image pool and a few head, selection and block steps (its ``Config`` is ``DcpConfig``)."""
        return {"head_steps": 10, "block_steps": 2, "select_steps": 2, "samples": 96, "batch": 32, "lsq_batches": 1}

    # -- prepare: graph, stages, pool of images, heads ------------------------------------------
    def prepare(self, model: nn.Module, data: DataBundle) -> None:
        """Channel groups and cost model (as chn-pruned), stage outputs, the image pool, and the trained heads.

        The baseline's outputs at every tapped layer on the pool are computed here once (when they
        fit in ``_TEACHER_CACHE_BYTES``) and serve every candidate's reconstruction targets.
        """
        self._prepare_graph(model, data)
        assert self.info is not None
        self.plan = find_stages(model, data.example(), self.info.groups, self.dcp.stages)
        self._pool = self._sample_pool()
        self._cache = self._teacher_cache(model)
        self.heads = self._train_heads(model)

    def _sample_pool(self) -> tuple[Tensor, Tensor]:
        assert self.data is not None
        n, train = self.dcp.samples, self.data.train
        if hasattr(train, "x") and hasattr(train, "y"):
            idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed + 777))[:n]
            return train.x[idx].float(), train.y[idx].long()
        xs, ys, got = [], [], 0
        for x, y in self.data.loader("train", batch_size=min(n, 256), train=False, seed=self.seed):
            xs.append(x)
            ys.append(y)
            got += len(x)
            if got >= n:
                break
        return torch.cat(xs)[:n].float(), torch.cat(ys)[:n].long()

    def _slices(self) -> list[slice]:
        """The pool's fixed mini-batches (the last partial one dropped unless it is the only one)."""
        assert self._pool is not None
        n = len(self._pool[0])
        b = min(self.dcp.batch, n)
        return [slice(i, i + b) for i in range(0, n - b + 1, b)]

    def _batches(self, seed: int) -> Iterator[int]:
        """Endless indices into :meth:`_slices`, in seeded random order."""
        k = len(self._slices())
        gen = torch.Generator().manual_seed(seed)
        while True:
            yield from torch.randperm(k, generator=gen).tolist()

    def _taps(self) -> list[str]:
        assert self.plan is not None and self.info is not None
        return list(dict.fromkeys([c for g in self.info.groups for c in g.consumers] + self.plan.cuts))

    def _teacher_cache(self, model: nn.Module) -> dict[str, Tensor] | None:
        """The baseline's tapped outputs (and logits, under ``""``) on the whole pool, or None when too large."""
        assert self._pool is not None
        net = self._frozen_copy(model)
        x = self._pool[0]
        taps = self._taps()
        with torch.no_grad():
            got, out = _forward(net, x[:1].to(self.device), taps, None)
        per_image = sum(t.numel() for t in got.values()) + out.numel()
        if per_image * 4 * len(x) > _TEACHER_CACHE_BYTES:
            return None
        cache: dict[str, list[Tensor]] = {}
        with torch.no_grad():
            for i in range(0, len(x), 256):
                got, out = _forward(net, x[i : i + 256].to(self.device), taps, None)
                for k, v in [*got.items(), ("", out)]:
                    cache.setdefault(k, []).append(v)
        return {k: torch.cat(v) for k, v in cache.items()}

    def _teacher(self, teacher: nn.Module, j: int, taps: Sequence[str], stop: str | None,
                 ) -> tuple[dict[str, Tensor], Tensor]:
        """The baseline's ``taps`` outputs and stage output (``stop``, or the logits) on pool batch ``j``."""
        sl = self._slices()[j]
        if self._cache is not None:
            return {t: self._cache[t][sl] for t in taps}, self._cache[stop or ""][sl]
        assert self._pool is not None
        with torch.no_grad():
            return _forward(teacher, self._pool[0][sl].to(self.device), taps, stop)

    def _batch(self, j: int) -> tuple[Tensor, Tensor]:
        assert self._pool is not None
        sl = self._slices()[j]
        return self._pool[0][sl].to(self.device), self._pool[1][sl].to(self.device)

    def _train_heads(self, model: nn.Module) -> nn.ModuleList:
        """One head per stage output, trained on the frozen baseline's features (cross-entropy, Adam)."""
        assert self.plan is not None and self.data is not None and self._pool is not None
        plan = self.plan
        teacher = self._frozen_copy(model)
        with torch.no_grad():
            classes = int(teacher(self._pool[0][:1].to(self.device)).shape[1])
        with torch.random.fork_rng(devices=[]):  # seeded initialisation, the global generator left alone
            torch.manual_seed(self.seed + 31)
            heads = nn.ModuleList([AuxHead(s[0] if len(s) == 3 else s[-1], classes, spatial=len(s) == 3)
                                   for s in plan.shapes]).to(self.device)
        self.head_history = []
        if not plan.cuts:
            return heads
        heads.train()
        opt = torch.optim.Adam(heads.parameters(), lr=self.dcp.head_lr)
        batches = self._batches(self.seed + 1)
        for _ in range(self.dcp.head_steps):
            j = next(batches)
            feats, _ = self._teacher(teacher, j, plan.cuts, plan.cuts[-1])
            y = self._batch(j)[1]
            loss = sum(F.cross_entropy(h(feats[c]), y) for h, c in zip(heads, plan.cuts))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            self.head_history.append(loss.item() / len(plan.cuts))
        return heads.eval()

    def _frozen_copy(self, model: nn.Module) -> nn.Module:
        net = copy.deepcopy(model).to(self.device).eval()
        for p in net.parameters():
            p.requires_grad_(False)
        return net

    # -- compress ---------------------------------------------------------------------------------
    def compress(self, model: nn.Module, policy: Policy) -> nn.Module:
        """A pruned copy of ``model`` (untouched): DCP stage by stage on masked weights, then chn-pruned's cut."""
        plan_groups = self._plan(model, policy)
        if self.plan is None or self.heads is None:
            raise RuntimeError("dis-chn-pruned: call prepare(model, data) before compress()")
        student = self._frozen_copy(model)
        teacher = self._frozen_copy(model)
        heads = copy.deepcopy(self.heads).eval()
        for p in heads.parameters():
            p.requires_grad_(False)
        batches = self._batches(self.seed + 2)
        removed: dict[int, list[int]] = {}
        self.last_stats = {"layer_loss": {}, "selection_loss": {}, "block_loss": {}}
        for s in range(len(self.plan.cuts) + 1):
            todo = [(i, g, k) for i, g, k in plan_groups if self.plan.stage_of[i] == s]
            if not todo:
                continue
            for i, g, per_class in todo:
                removed[i] = self._prune_group(student, teacher, heads, s, g, per_class, batches, i)
            self._finetune_stage(student, teacher, heads, s, removed, batches)
        new = copy.deepcopy(model)
        new.load_state_dict(student.state_dict())  # masked columns are zero: the cut changes no output
        return self._cut(new, removed)

    def _joint_loss(self, student: nn.Module, teacher: nn.Module, heads: nn.ModuleList, s: int,
                    consumers: Sequence[str], j: int, *, stage_out: bool = False) -> Tensor:
        """Reconstruction of ``consumers``' outputs (or of the stage output) + loss_weight x the stage's CE."""
        assert self.plan is not None
        stop = self.plan.cuts[s] if s < len(self.plan.cuts) else None
        t_feats, t_out = self._teacher(teacher, j, consumers, stop)
        x, y = self._batch(j)
        feats, out = _forward(student, x, consumers, stop)
        rec = _rel_err(out, t_out) if stage_out else sum(_rel_err(feats[c], t_feats[c]) for c in consumers)
        logits = heads[s](out) if stop is not None else out
        return rec + self.dcp.loss_weight * F.cross_entropy(logits, y)

    def _prune_group(self, student: nn.Module, teacher: nn.Module, heads: nn.ModuleList, s: int, g: ChannelGroup,
                     per_class: list[int], batches: Iterator[int], index: int) -> list[int]:
        """Greedy gradient-norm selection of ``g``'s units, then Adam on the kept weights; returns the removed units."""
        mods = dict(student.named_modules())
        weights = {c: mods[c].weight for c in g.consumers}
        orig = {c: w.detach().clone() for c, w in weights.items()}
        units = {c: g.consumer_member(c).unit_idxs for c in g.consumers}
        masks = {c: torch.zeros(w.shape[1], device=w.device, dtype=w.dtype) for c, w in weights.items()}

        def apply_masks() -> None:
            with torch.no_grad():
                for c, w in weights.items():
                    shape = [1, -1] + [1] * (w.dim() - 2)
                    w.copy_(orig[c] * masks[c].view(shape))

        class_of = {u: q for q, cls in enumerate(g.classes) for u in cls}
        left = list(per_class)
        chosen: list[int] = []
        sel_loss: list[float] = []
        for w in weights.values():
            w.requires_grad_(True)
        try:
            apply_masks()
            while sum(left) > 0:
                loss = self._joint_loss(student, teacher, heads, s, g.consumers, next(batches))
                grads = torch.autograd.grad(loss, list(weights.values()))
                sel_loss.append(loss.item())
                score = torch.zeros(g.units, dtype=torch.float64)
                for (c, _), gr in zip(weights.items(), grads):
                    per_ch = gr.detach().pow(2).flatten(2).sum((0, 2)) if gr.dim() > 2 else gr.detach().pow(2).sum(0)
                    per_ch = per_ch.double().cpu()
                    for u, chans in enumerate(units[c]):
                        if chans:
                            score[u] += float(per_ch[chans].sum())
                for u in chosen:
                    score[u] = -1.0
                step = math.ceil(sum(per_class) / self.dcp.select_steps)
                for u in torch.argsort(score, descending=True, stable=True).tolist():
                    if step == 0 or score[u] < 0:
                        break
                    if left[class_of[u]] > 0:
                        chosen.append(u)
                        left[class_of[u]] -= 1
                        step -= 1
                        for c in g.consumers:
                            masks[c][units[c][u]] = 1.0
                apply_masks()
            if self.dcp.lsq_batches > 0:
                self._least_squares(student, teacher, g, [u for u in range(g.units) if u not in set(chosen)],
                                    batches)
                with torch.no_grad():
                    for c, w in weights.items():
                        orig[c] = w.detach().clone()
                apply_masks()
            layer_loss = self._optimise(student, teacher, heads, s, g.consumers, list(weights.values()), masks,
                                        batches, self.dcp.layer_steps, stage_out=False)
        finally:
            for w in weights.values():
                w.requires_grad_(False)
        self.last_stats["selection_loss"][g.name] = sel_loss
        self.last_stats["layer_loss"][g.name] = layer_loss
        keep = set(chosen)
        return [u for u in range(g.units) if u not in keep]

    def _least_squares(self, student: nn.Module, teacher: nn.Module, g: ChannelGroup, removed: list[int],
                       batches: Iterator[int]) -> None:
        """Each consumer's kept weights that best map the pruned network's input to the baseline's output.

        He et al.'s reconstruction with the *pruned* upstream (DCP's L_M), solved in closed form by
        chn-pruned's ridge least squares; the statistics come from ``lsq_batches`` pool batches.
        """
        mods = dict(student.named_modules())
        for c in g.consumers:
            m = mods[c]
            conv = isinstance(m, nn.Conv2d)
            if conv and m.padding_mode != "zeros":
                continue
            kk = int(math.prod(m.kernel_size)) if conv else 1
            dim = m.weight[0].numel()
            if dim > _MAX_GRAM_DIM:
                continue
            gram = torch.zeros(dim, dim, dtype=torch.float64)
            cross = torch.zeros(dim, m.weight.shape[0], dtype=torch.float64)
            rows = 0
            for _ in range(self.dcp.lsq_batches):
                j = next(batches)
                x = _input_of(student, self._batch(j)[0], c)
                _, y = self._teacher(teacher, j, [c], c)
                if m.bias is not None:
                    y = y - m.bias.view([1, -1] + [1] * (y.dim() - 2))
                if conv:
                    xs = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)  # B x D x L
                    xs = xs.transpose(1, 2).reshape(-1, dim)
                    ys = y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])
                else:
                    xs, ys = x.reshape(-1, dim), y.reshape(-1, y.shape[-1])
                gram += (xs.T @ xs).double().cpu()
                cross += (xs.T @ ys).double().cpu()
                rows += len(xs)
            if rows:
                w0 = m.weight.detach().float().cpu().flatten(1)
                self._calib[c] = Calib((gram / rows).float(), (cross / rows).float(), w0, kk, rows)
                try:
                    self._reconstruct(m, g, c, removed)
                finally:
                    del self._calib[c]

    def _optimise(self, student: nn.Module, teacher: nn.Module, heads: nn.ModuleList, s: int,
                  consumers: Sequence[str], params: list[nn.Parameter], masks: dict[str, Tensor],
                  batches: Iterator[int], steps: int, *, stage_out: bool) -> list[float]:
        """Adam on ``params`` for ``steps`` (masked consumer columns kept at zero); the joint loss per step."""
        if steps <= 0 or not params:
            return []
        mods = dict(student.named_modules())
        opt = torch.optim.Adam(params, lr=self.dcp.lr)
        history = []
        for _ in range(steps):
            loss = self._joint_loss(student, teacher, heads, s, consumers, next(batches), stage_out=stage_out)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for c, m in masks.items():
                    w = mods[c].weight
                    w.mul_(m.view([1, -1] + [1] * (w.dim() - 2)))
            history.append(loss.item())
        return history

    def _finetune_stage(self, student: nn.Module, teacher: nn.Module, heads: nn.ModuleList, s: int,
                        removed: dict[int, list[int]], batches: Iterator[int]) -> None:
        """Fine-tune every parameter of stage ``s`` and its head on the stage output's reconstruction + CE."""
        assert self.plan is not None and self.info is not None
        if self.dcp.block_steps <= 0:
            return
        mods = dict(student.named_modules())
        params = [p for name in self.plan.modules[s] for p in mods[name].parameters(recurse=False)]
        if s < len(self.plan.cuts):
            params += list(heads[s].parameters())
        masks: dict[str, Tensor] = {}  # every pruned consumer's columns stay zero, earlier stages' included
        for i, rem in removed.items():
            g = self.info.groups[i]
            for c in g.consumers:
                w = mods[c].weight
                m = masks.setdefault(c, torch.ones(w.shape[1], device=w.device, dtype=w.dtype))
                for u in rem:
                    m[g.consumer_member(c).unit_idxs[u]] = 0.0
        for p in params:
            p.requires_grad_(True)
        try:
            hist = self._optimise(student, teacher, heads, s, [], params, masks, batches, self.dcp.block_steps,
                                  stage_out=True)
        finally:
            for p in params:
                p.requires_grad_(False)
        self.last_stats["block_loss"][s] = hist

