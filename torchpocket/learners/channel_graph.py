"""Channel groups from Torch-Pruning's dependency graph, their exact cost, and the surgery that removes them.

Shared by the channel pruners (``chn-pruned`` and the discrimination-aware one):
nothing here selects channels; it only answers *which channels must go together*,
*what a model costs when each group keeps k of its channels* (FLOPs and parameters
exactly, latency from a lookup table timed on this machine) and *how to cut them*.

A :class:`ChannelGroup` is rooted at a **consumer**, a Conv2d (``groups=1``) or
Linear layer whose *input* channels are pruned (AMC's convention: the policy
value of a layer is the preserve ratio of its input channels). Torch-Pruning's
``DependencyGraph.get_pruning_group`` lists everything coupled to those channels:
the producers' output channels, batch norms, depthwise convs in between, other
consumers of the same tensor, concatenations and flattening. The group's **units**
are the smallest sets of consumer input indices that must go together (one per
channel, or one per channel's block of flattened features before a Linear).

Surgery is a list of plain ``(module name, pruning function name, removed indices)``
operations in the modules' original index spaces; :func:`apply_ops` replays it with
Torch-Pruning's pruning functions, on a candidate or on a freshly built network.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from torchpocket.errors import UserError
from torchpocket.utils import time_round_robin

#: the Torch-Pruning functions a recorded operation may name (anything else is refused on replay)
HANDLER_NAMES = (
    "prune_conv_out_channels",
    "prune_conv_in_channels",
    "prune_depthwise_conv_out_channels",
    "prune_batchnorm_out_channels",
    "prune_linear_out_channels",
    "prune_linear_in_channels",
)


@functools.lru_cache(maxsize=1)
def handlers() -> dict[str, Callable[[nn.Module, Sequence[int]], nn.Module]]:
    """Torch-Pruning's pruning functions by name (imported on first use: ``--help`` need not load it)."""
    from torch_pruning.pruner import function as tpf

    return {n: getattr(tpf, n) for n in HANDLER_NAMES}

_IN_HANDLERS = ("prune_conv_in_channels", "prune_linear_in_channels")
_PRODUCER_HANDLERS = ("prune_conv_out_channels", "prune_linear_out_channels")

def _pass_through() -> set[Any]:
    """Dependency-graph node types that carry channels through unchanged."""
    import torch_pruning as tp

    t = tp.ops.OPTYPE
    return {t.ELEMENTWISE, t.CONCAT, t.SPLIT, t.RESHAPE, t.SLICE, t.UNBIND, t.EXPAND}

Op = tuple[str, str, list[int]]  # (module name, handler name, removed indices)


def handler_name(fn: Callable) -> str | None:
    """The public Torch-Pruning name of a dependency's pruning function (None: not one we replay)."""
    for name, h in handlers().items():
        if fn == h:
            return name
    return None


@dataclass
class Member:
    """One coupled tensor dimension of a group: which indices of ``module`` go with each unit."""

    module: str
    handler: str
    unit_idxs: list[list[int]]


@dataclass
class ChannelGroup:
    """Channels pruned together; the policy value is the fraction of ``units`` kept."""

    name: str  # the root consumer (first in module order)
    consumers: list[str]  # every Conv2d / Linear whose input channels this group prunes
    members: list[Member]
    units: int
    classes: list[list[int]]  # units that cost the same; each keeps its own share (concat segments)
    coupled: bool  # tied by an element-wise op with several inputs (residual addition, gating)
    depthwise: bool  # the channels flow through a depthwise conv
    kind: str = "conv"  # LayerSpec kind: linear (a Linear consumer), dwconv (through a depthwise conv), conv

    def consumer_member(self, consumer: str) -> Member:
        return next(m for m in self.members if m.module == consumer and m.handler in _IN_HANDLERS)

    def ops(self, removed_units: Sequence[int]) -> list[Op]:
        """The surgery removing ``removed_units`` (indices in each module's original numbering)."""
        if not len(removed_units):
            return []
        out: list[Op] = []
        for m in self.members:
            idxs = sorted(i for u in removed_units for i in m.unit_idxs[u])
            if idxs:
                out.append((m.module, m.handler, idxs))
        return out


@dataclass
class LayerGeom:
    """What the cost model needs of one Conv2d / Linear / BatchNorm layer of the original model."""

    name: str
    type: str  # conv | dwconv | gconv | linear | bn
    in0: int
    out0: int
    kernel: tuple[int, ...] = (1, 1)
    stride: int = 1
    groups: int = 1
    bias: bool = False
    positions: int = 0  # output positions per sample, summed over calls (conv: H*W, linear: tokens)

    @property
    def kk(self) -> int:
        return int(math.prod(self.kernel))


@dataclass
class GraphInfo:
    """Result of :func:`find_channel_groups`."""

    groups: list[ChannelGroup]
    skipped: dict[str, str]  # consumer -> why its input channels are not prunable
    layers: dict[str, LayerGeom]
    input_shape: list[int]
    total_flops: float  # torch.utils.flop_counter count of one sample (2 x MACs)
    total_params: int


# -- analysis -------------------------------------------------------------------------------------


def _layer_geometry(model: nn.Module, example: Tensor) -> tuple[dict[str, LayerGeom], float]:
    layers: dict[str, LayerGeom] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.groups == 1:
                kind = "conv"
            elif m.groups == m.in_channels == m.out_channels:
                kind = "dwconv"
            else:
                kind = "gconv"
            layers[name] = LayerGeom(name, kind, m.in_channels, m.out_channels, tuple(m.kernel_size), m.stride[0],
                                     m.groups, m.bias is not None)
        elif isinstance(m, nn.Linear):
            layers[name] = LayerGeom(name, "linear", m.in_features, m.out_features, bias=m.bias is not None)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            layers[name] = LayerGeom(name, "bn", m.num_features, m.num_features, bias=m.affine)
    handles = []
    mods = dict(model.named_modules())

    def hook(name: str) -> Callable[..., None]:
        def fn(mod: nn.Module, inp: Any, out: Tensor) -> None:
            lay = layers[name]
            if lay.type == "linear":
                lay.positions += out.numel() // max(1, out.shape[-1]) // out.shape[0]
            elif lay.type != "bn":
                lay.positions += out.shape[-1] * out.shape[-2]
        return fn

    for name, lay in layers.items():
        if lay.type != "bn":
            handles.append(mods[name].register_forward_hook(hook(name)))
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    return layers, float(counter.get_total_flops())


def _union_find(n: int) -> tuple[list[int], Callable[[int], int], Callable[[int, int], None]]:
    parent = list(range(n))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    return parent, find, union


def _analyse_group(graph: Any, module: nn.Module, names: dict[nn.Module, str],
                   layers: dict[str, LayerGeom]) -> ChannelGroup | str:
    """The group rooted at ``module``'s input channels, or the reason it cannot be pruned."""
    import torch_pruning as tp

    root = names[module]
    in_fn = tp.prune_conv_in_channels if isinstance(module, nn.Conv2d) else tp.prune_linear_in_channels
    n_in = layers[root].in0
    group = graph.get_pruning_group(module, in_fn, list(range(n_in)))
    _, find, union = _union_find(n_in)
    coupled = depthwise = False
    items: list[tuple[str, str, list[int], list[int]]] = []
    for item in group.items:
        node = item.dep.target
        idxs, roots = list(item.idxs), list(item.root_idxs)
        first: dict[int, int] = {}
        for i, r in zip(idxs, roots):
            if i in first:
                union(first[i], r)
            else:
                first[i] = r
        if node.type == tp.ops.OPTYPE.OUTPUT:
            return "its channels reach the model's output"
        if node.type in _pass_through():
            if node.type == tp.ops.OPTYPE.ELEMENTWISE and len(node.inputs) >= 2:
                coupled = True
            continue
        mod = node.module
        name = names.get(mod) if isinstance(mod, nn.Module) else None
        hname = handler_name(item.dep.handler)
        if name is None or hname is None or name not in layers:
            what = type(mod).__name__ if isinstance(mod, nn.Module) else "an unwrapped parameter"
            return f"the channels are coupled to {what} ({name or '?'}), which this pruner does not handle"
        lay = layers[name]
        if lay.type == "gconv":
            return f"the channels are coupled to the grouped conv {name}"
        if lay.type == "dwconv":
            depthwise = True
        if hname in _PRODUCER_HANDLERS and not node.outputs:
            return f"the channels are the model's output ({name})"
        items.append((name, hname, idxs, roots))
    # units: consumer input indices tied by sharing an index somewhere in the group
    comp: dict[int, int] = {}
    unit_of_root = [comp.setdefault(find(r), len(comp)) for r in range(n_in)]
    units = len(comp)
    if units < 2:
        return "fewer than two prunable units"
    members: list[Member] = []
    for name, hname, idxs, roots in items:
        per: list[set[int]] = [set() for _ in range(units)]
        for i, r in zip(idxs, roots):
            per[unit_of_root[r]].add(i)
        members.append(Member(name, hname, [sorted(s) for s in per]))
    covered = np.zeros(units, bool)
    for m in members:
        if m.handler in _PRODUCER_HANDLERS:
            covered |= np.array([len(ix) > 0 for ix in m.unit_idxs])
    if not covered.all():
        return "some of its input channels come from no prunable layer (the network input)"
    sig: dict[tuple[int, ...], list[int]] = {}
    for u in range(units):
        sig.setdefault(tuple(len(m.unit_idxs[u]) for m in members), []).append(u)
    consumers = [m.module for m in members if m.handler in _IN_HANDLERS]
    kind = "linear" if layers[root].type == "linear" else ("dwconv" if depthwise else "conv")
    g = ChannelGroup(root, consumers, members, units, list(sig.values()), coupled, depthwise, kind)
    # cross-check the unit mapping against the graph on a partial selection
    test_units = [u for u in range(units) if u % 3 == 0][: units - 1]
    chosen = set(test_units)
    roots_sel = [r for r in range(n_in) if unit_of_root[r] in chosen]
    check = graph.get_pruning_group(module, in_fn, roots_sel)
    got: dict[tuple[str, str], set[int]] = {}
    for item in check.items:
        mod = item.dep.target.module
        hname = handler_name(item.dep.handler)
        if isinstance(mod, nn.Module) and mod in names and hname is not None:
            got.setdefault((names[mod], hname), set()).update(int(i) for i in item.idxs)
    want = {(op[0], op[1]): set(op[2]) for op in g.ops(test_units)}
    if got != want:
        return "the dependency graph's index mapping is not a partition of channels (unsupported layout)"
    return g


def find_channel_groups(model: nn.Module, example: Tensor, *, coupled: str = "skip") -> GraphInfo:
    """Every prunable channel group of ``model`` (traced on a copy, in eval mode; ``model`` is untouched).

    ``coupled='skip'`` leaves channels tied by an element-wise op (residual additions)
    alone; ``'prune'`` keeps those groups (their channels are then pruned together).
    The first conv's input (the image) and the final classifier's outputs never appear.
    """
    if coupled not in ("skip", "prune"):
        raise UserError(f"coupled must be 'skip' or 'prune', got {coupled!r}")
    net = copy.deepcopy(model).cpu().eval()
    example = example[:1].detach().cpu()
    layers, total_flops = _layer_geometry(net, example)
    names = {m: n for n, m in net.named_modules()}
    import torch_pruning as tp

    try:
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(net, example_inputs=example, verbose=False)
    except Exception as e:  # noqa: BLE001 - any tracing failure means: no channel pruning for this model
        raise UserError(f"Torch-Pruning cannot trace the channel dependencies of this model "
                        f"({type(e).__name__}: {str(e)[:160]}); channel pruning does not support it") from None
    groups: list[ChannelGroup] = []
    skipped: dict[str, str] = {}
    owner: dict[tuple[str, str], str] = {}
    seen: set[str] = set()
    for name, m in net.named_modules():
        lay = layers.get(name)
        if lay is None or lay.type not in ("conv", "linear") or name in seen or m not in graph.module2node:
            continue
        if isinstance(m, nn.Conv2d) and m.transposed:
            continue
        res = _analyse_group(graph, m, names, layers)
        if isinstance(res, str):
            skipped[name] = res
            seen.add(name)
            continue
        seen.update(res.consumers)
        if res.coupled and coupled == "skip":
            for c in res.consumers:
                skipped[c] = "channels tied by an element-wise op (residual add); --cp-coupled prune prunes them"
            continue
        clash = [owner[(mm.module, mm.handler)] for mm in res.members if (mm.module, mm.handler) in owner]
        if clash:
            for c in res.consumers:
                skipped.setdefault(c, f"its channels overlap group {clash[0]}")
            continue
        for mm in res.members:
            owner[(mm.module, mm.handler)] = res.name
        groups.append(res)
    total_params = sum(p.numel() for p in model.parameters())
    return GraphInfo(groups, skipped, layers, list(example.shape), total_flops, total_params)


# -- cost ---------------------------------------------------------------------------------------


def keep_counts(ratios: np.ndarray, sizes: np.ndarray, round_to: int = 1) -> np.ndarray:
    """Channels kept for preserve ratios: nearest of {multiples of round_to} U {size}, >= 1, <= size.

    Non-decreasing in every ratio, and a ratio of 1 keeps everything.
    """
    n = max(1, int(round_to))
    r = np.clip(np.asarray(ratios, float), 0.0, 1.0)
    want = r * sizes
    lo = n * np.floor(want / n + 1e-9)
    hi = np.minimum(lo + n, sizes)
    k = np.where(want - lo < hi - want - 1e-12, lo, hi)
    k = np.maximum(k, np.minimum(n, sizes))
    return np.clip(k, 1, sizes).astype(np.int64)


class CostModel:
    """Exact FLOPs / parameter count of the model as a function of each group's preserve ratio.

    Per-class keep counts go through :func:`keep_counts` (channel rounding included),
    so the Budget's projection lands on models that really have the projected cost.
    FLOPs follow ``torch.utils.flop_counter`` (2 x multiply-adds of convs and matmuls);
    everything not modelled per layer is a constant measured once.
    """

    def __init__(self, info: GraphInfo, *, round_to: int = 1) -> None:
        self.info, self.round_to = info, round_to
        groups = info.groups
        cls_group, cls_size, cls_units = [], [], []
        for gi, g in enumerate(groups):
            for c in g.classes:
                cls_group.append(gi)
                cls_size.append(len(c))
                cls_units.append(c)
        self.class_group = np.asarray(cls_group, np.int64)
        self.class_size = np.asarray(cls_size, np.int64)
        self.class_units = cls_units
        # kept indices of member i = cnt[i] @ kept units per class
        item_index: dict[tuple[str, str], int] = {}
        rows = []
        item_group = []
        for gi, g in enumerate(groups):
            for m in g.members:
                item_index[(m.module, m.handler)] = len(rows)
                row = np.zeros(len(cls_group))
                for q, (qg, units) in enumerate(zip(cls_group, cls_units)):
                    if qg == gi:
                        row[q] = len(m.unit_idxs[units[0]])
                rows.append(row)
                item_group.append(gi)
        self.cnt = np.asarray(rows).reshape(len(rows), len(cls_group))
        mods = [lay for lay in info.layers.values() if lay.type != "gconv"]
        in_item, out_item, in0, out0, fa, pa, pb, own = [], [], [], [], [], [], [], []
        for lay in mods:
            t = lay.type
            if t == "conv":
                ii = item_index.get((lay.name, "prune_conv_in_channels"), -1)
                oi = item_index.get((lay.name, "prune_conv_out_channels"), -1)
                a_f, a_p = 2.0 * lay.positions * lay.kk, float(lay.kk)
                i0 = lay.in0
            elif t == "linear":
                ii = item_index.get((lay.name, "prune_linear_in_channels"), -1)
                oi = item_index.get((lay.name, "prune_linear_out_channels"), -1)
                a_f, a_p = 2.0 * lay.positions, 1.0
                i0 = lay.in0
            elif t == "dwconv":
                ii, oi = -1, item_index.get((lay.name, "prune_depthwise_conv_out_channels"), -1)
                a_f, a_p, i0 = 2.0 * lay.positions * lay.kk, float(lay.kk), 1
            else:  # bn
                ii, oi = -1, item_index.get((lay.name, "prune_batchnorm_out_channels"), -1)
                a_f, a_p, i0 = 0.0, 2.0 if lay.bias else 0.0, 1
            in_item.append(ii)
            out_item.append(oi)
            in0.append(i0)
            out0.append(lay.out0)
            fa.append(a_f)
            pa.append(a_p)
            pb.append(1.0 if (lay.bias and t != "bn") else 0.0)
            g_own = item_group[ii] if ii >= 0 else (item_group[oi] if (oi >= 0 and t in ("dwconv", "bn")) else -1)
            own.append(g_own)
        self.in_item, self.out_item = np.asarray(in_item, np.int64), np.asarray(out_item, np.int64)
        self.in0, self.out0 = np.asarray(in0, float), np.asarray(out0, float)
        self.fa, self.pa, self.pb = np.asarray(fa), np.asarray(pa), np.asarray(pb)
        self.owner = np.asarray(own, np.int64)
        self.names = [lay.name for lay in mods]  # the modules of the per-module arrays, in order
        self.types = [lay.type for lay in mods]
        full_counts = self.class_size.copy()
        f_mod, p_mod = self._per_module(full_counts)
        self.flops_const = max(0.0, info.total_flops - float(f_mod.sum()))
        self.params_const = max(0.0, float(info.total_params) - float(p_mod.sum()))

    @property
    def n_groups(self) -> int:
        return len(self.info.groups)

    def counts(self, policy: Sequence[float]) -> np.ndarray:
        """Units kept per class for a policy (one preserve ratio per group).

        Ratios are read at 1e-6 resolution: the Budget's projection settles right under a
        rounding boundary, and a policy written with six decimals (trial logs, policy.yaml)
        must still give the same architecture.
        """
        p = np.array([round(float(v), 6) for v in policy])  # Python's correctly rounded decimals, as when logged
        if p.shape != (self.n_groups,):
            raise ValueError(f"policy has {p.size} values, this model has {self.n_groups} prunable groups")
        return keep_counts(p[self.class_group], self.class_size, self.round_to)

    def kept_units(self, policy: Sequence[float]) -> list[int]:
        k = self.counts(policy)
        out = [0] * self.n_groups
        for q, g in enumerate(self.class_group):
            out[g] += int(k[q])
        return out

    def widths(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Input and output width of every module of :attr:`names` for per-class keep counts.

        Linear layers count input *features*; depthwise convs and norms have an input width of 1 here.
        """
        kept = self.cnt @ counts.astype(float) if self.cnt.size else np.zeros(0)
        cin = np.where(self.in_item >= 0, kept[np.maximum(self.in_item, 0)] if kept.size else 0.0, self.in0)
        cout = np.where(self.out_item >= 0, kept[np.maximum(self.out_item, 0)] if kept.size else 0.0, self.out0)
        return cin, cout

    def _per_module(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cin, cout = self.widths(counts)
        flops = self.fa * cin * cout
        params = self.pa * cin * cout + self.pb * cout
        return flops, params

    def cost(self, policy: Sequence[float], resource: str = "flops") -> float:
        f, p = self._per_module(self.counts(policy))
        return float(f.sum() + self.flops_const) if resource == "flops" else float(p.sum() + self.params_const)

    def layer_costs(self, policy: Sequence[float], resource: str = "flops") -> np.ndarray:
        """Per-group share of the cost: the group's consumers and the depthwise convs / norms it owns."""
        f, p = self._per_module(self.counts(policy))
        v = f if resource == "flops" else p
        mask = self.owner >= 0
        return np.bincount(self.owner[mask], weights=v[mask], minlength=self.n_groups)


# -- latency ------------------------------------------------------------------------------------

#: activation modules timed together with the conv / norm they directly follow
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Hardtanh, nn.LeakyReLU,
                nn.Sigmoid, nn.Tanh, nn.Mish)


@dataclass
class LatencyEntry:
    """One timed layer: seconds per call over a grid of input x output widths."""

    name: str
    index: int  # position in CostModel.names
    calls: int  # times the layer runs in one forward pass
    cin: np.ndarray  # input widths timed (one point when the input width never changes)
    cout: np.ndarray  # output widths timed
    table: np.ndarray  # len(cin) x len(cout) seconds, non-decreasing along both axes
    extras: list[str]  # the norm / activation modules timed with the layer

    def at(self, cin: float, cout: float) -> float:
        """Bilinear interpolation in the table (flat outside the grid), times the number of calls."""
        i0, i1, s = _bracket(self.cin, cin)
        j0, j1, t = _bracket(self.cout, cout)
        tab = self.table
        v = (1 - s) * ((1 - t) * tab[i0, j0] + t * tab[i0, j1]) + s * ((1 - t) * tab[i1, j0] + t * tab[i1, j1])
        return self.calls * float(v)


def _bracket(grid: np.ndarray, x: float) -> tuple[int, int, float]:
    n = len(grid)
    if n == 1 or x <= grid[0]:
        return 0, 0, 0.0
    if x >= grid[-1]:
        return n - 1, n - 1, 0.0
    i = int(np.searchsorted(grid, x, side="right")) - 1
    return i, i + 1, float((x - grid[i]) / (grid[i + 1] - grid[i]))


class LatencyModel:
    """Predicted latency of a pruned model from per-layer lookup tables timed on this machine (HAQ's idea).

    Every Conv2d / Linear layer is timed alone -- a fresh layer of the same geometry, with the
    norm and activation modules that directly follow it, in eval mode under ``inference_mode``,
    on an input of its real spatial size -- at a grid of input x output widths between the
    narrowest the search can ask for and the full width (layers of fixed width: once). Tables
    are made non-decreasing along both axes (isotonic regression), so the bilinear interpolation
    is non-decreasing in every preserve ratio and the Budget's bisection stays valid. The rest
    of the forward pass (pooling, additions, functional ops, Python overhead) is a constant:
    the whole model's measured time minus the timed layers' sum at full width (at least 0).
    """

    def __init__(self, cost: CostModel, entries: list[LatencyEntry], rest: float, *, measured_full: float,
                 meta: dict[str, Any]) -> None:
        self.cost, self.entries, self.rest = cost, entries, float(rest)
        self.measured_full, self.meta = float(measured_full), meta
        self._varying = [e for e in entries if e.table.size > 1]
        self.fixed = self.rest + sum(e.calls * float(e.table[0, 0]) for e in entries if e.table.size == 1)
        self._owner = [int(cost.owner[e.index]) for e in entries]

    @property
    def full(self) -> float:
        """Predicted seconds of the unpruned model: every table at full width, plus the rest."""
        return self.rest + sum(e.calls * float(e.table[-1, -1]) for e in self.entries)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON) for an on-disk cache; :meth:`from_dict` needs the same cost model."""
        return {"version": 1, "rest": self.rest, "measured_full": self.measured_full, "meta": dict(self.meta),
                "entries": [{"name": e.name, "index": e.index, "calls": e.calls, "cin": e.cin.tolist(),
                             "cout": e.cout.tolist(), "table": e.table.tolist(), "extras": list(e.extras)}
                            for e in self.entries]}

    @classmethod
    def from_dict(cls, cost: CostModel, d: dict[str, Any]) -> LatencyModel:
        """Rebuild from :meth:`to_dict`; ValueError when it does not describe ``cost``'s layers."""
        if d.get("version") != 1:
            raise ValueError(f"unsupported latency table version {d.get('version')!r}")
        entries = []
        for r in d["entries"]:
            k, cin, cout = int(r["index"]), np.asarray(r["cin"], float), np.asarray(r["cout"], float)
            table = np.asarray(r["table"], float).reshape(len(cin), len(cout))
            if not 0 <= k < len(cost.names) or cost.names[k] != r["name"]:
                raise ValueError(f"latency table layer {r['name']!r} is not layer {k} of this model")
            if (np.diff(table, axis=0) < 0).any() or (np.diff(table, axis=1) < 0).any():
                raise ValueError(f"latency table of {r['name']!r} is not monotone")
            entries.append(LatencyEntry(r["name"], k, int(r["calls"]), cin, cout, table, list(r["extras"])))
        return cls(cost, entries, float(d["rest"]), measured_full=float(d["measured_full"]), meta=dict(d["meta"]))

    def _layer_seconds(self, policy: Sequence[float], entries: list[LatencyEntry]) -> list[float]:
        cin, cout = self.cost.widths(self.cost.counts(policy))
        return [e.at(float(cin[e.index]), float(cout[e.index])) for e in entries]

    def predict(self, policy: Sequence[float]) -> float:
        """Predicted seconds per forward pass (of the table's batch size) of the model pruned by ``policy``."""
        return self.fixed + sum(self._layer_seconds(policy, self._varying))

    def layer_costs(self, policy: Sequence[float]) -> np.ndarray:
        """Per-group share of the predicted latency (the layers each group owns, as for FLOPs)."""
        secs = self._layer_seconds(policy, self.entries)
        out = np.zeros(self.cost.n_groups)
        for o, v in zip(self._owner, secs):
            if o >= 0:
                out[o] += v
        return out


def _trace_layers(net: nn.Module, x: Tensor) -> dict[str, tuple[tuple[int, ...], int, list[nn.Module]]]:
    """Per Conv2d / Linear: input shape of one sample, calls per forward, the norm / activation right after it."""
    names = {m: n for n, m in net.named_modules()}
    info: dict[str, list[Any]] = {}
    after: dict[int, tuple[str, Tensor, int]] = {}  # id(output) -> (layer, output, 0 conv | 1 norm | 2 activation)

    def hook(mod: nn.Module, inputs: tuple[Any, ...], out: Any) -> None:
        if not inputs or not isinstance(inputs[0], Tensor) or not isinstance(out, Tensor):
            return
        name = names[mod]
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            rec = info.setdefault(name, [tuple(inputs[0].shape[1:]), 0, []])
            rec[1] += 1
            if rec[1] == 1:
                after[id(out)] = (name, out, 0)
            return
        src = after.get(id(inputs[0]))
        if src is None or src[1] is not inputs[0]:
            return
        owner, _, stage = src
        norm = isinstance(mod, nn.modules.batchnorm._BatchNorm)
        if (norm and stage == 0) or (not norm and stage < 2):
            info[owner][2].append(mod)
            after[id(out)] = (owner, out, 1 if norm else 2)

    handles = [m.register_forward_hook(hook) for m in net.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm, *_ACTIVATIONS))]
    try:
        with torch.inference_mode():
            net(x)
    finally:
        for h in handles:
            h.remove()
    return {k: (v[0], v[1], v[2]) for k, v in info.items()}


def _fresh_layer(src: nn.Module, kind: str, cin: int, cout: int, extras: list[nn.Module]) -> nn.Module:
    """A new layer with ``src``'s geometry at the given widths, followed by fresh copies of ``extras``."""
    layer: nn.Module
    if isinstance(src, nn.Conv2d):
        depthwise = kind == "dwconv"
        layer = nn.Conv2d(cout if depthwise else cin, cout, src.kernel_size, src.stride, src.padding, src.dilation,
                          cout if depthwise else src.groups, src.bias is not None, src.padding_mode)
    else:
        layer = nn.Linear(cin, cout, bias=src.bias is not None)
    parts = [layer]
    for m in extras:
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            parts.append(type(m)(cout, eps=m.eps, affine=m.affine, track_running_stats=m.track_running_stats))
        else:
            parts.append(copy.deepcopy(m))
    p = src.weight
    return nn.Sequential(*parts).to(device=p.device, dtype=p.dtype).eval()


def time_cases(cases: Sequence[tuple[nn.Module, Tensor]], *, warmup: int, repeats: int) -> list[float]:
    """Median seconds per call of each (module, input), timed round-robin (``utils.time_round_robin``)."""
    sync = (lambda: torch.cuda.synchronize()) if any(x.device.type == "cuda" for _, x in cases) else None
    with torch.inference_mode():
        times = time_round_robin({i: functools.partial(m, x) for i, (m, x) in enumerate(cases)}, warmup=warmup,
                                 repeats=repeats, sync=sync)
    return [times[i] for i in range(len(cases))]


def isotonic(y: np.ndarray) -> np.ndarray:
    """The non-decreasing sequence closest to ``y`` in least squares (``max_{j<=i} min_{k>=i} mean(y[j..k])``).

    Unlike a running maximum, one slow outlier at a narrow width does not flatten the rest.
    """
    y = np.asarray(y, float)
    n = len(y)
    c = np.concatenate([[0.0], np.cumsum(y)])
    mean = np.full((n, n), np.inf)  # mean[j, k] = mean(y[j..k]) for j <= k
    for j in range(n):
        mean[j, j:] = (c[j + 1 :] - c[j]) / np.arange(1, n - j + 1)
    out = np.array([max(float(mean[j, i:].min()) for j in range(i + 1)) for i in range(n)])
    return np.maximum.accumulate(out)  # equal block means computed two ways may differ in the last bit


def monotone_table(table: np.ndarray) -> np.ndarray:
    """Isotonic along the input-width axis, then along the output-width axis: non-decreasing along both.

    (Isotonic regression preserves order between sequences, so the second pass keeps the first's.)
    """
    t = np.apply_along_axis(isotonic, 0, np.asarray(table, float))
    return np.apply_along_axis(isotonic, 1, t)


def width_grid(low: float, full: float, points: int, reachable: np.ndarray | None = None) -> np.ndarray:
    """At most ``points`` integer widths from ``low`` to ``full``, both included.

    When the widths a policy can produce (``reachable``, e.g. multiples of the channel
    rounding) are that few, exactly those: the table is then exact, not interpolated.
    """
    lo, hi = max(1, int(round(low))), max(1, int(round(full)))
    if reachable is not None:
        r = np.unique(np.round(np.asarray(reachable, float)).astype(np.int64))
        r = r[(r >= min(lo, hi)) & (r <= hi)]
        if len(np.union1d(r, [lo, hi])) <= max(2, points):
            return np.union1d(r, [min(lo, hi), hi])
    return np.unique(np.round(np.linspace(min(lo, hi), hi, max(2, points))).astype(np.int64))


def build_latency_model(model: nn.Module, example: Tensor, cost: CostModel, *, low_policy: Sequence[float],
                        batch: int = 1, repeats: int = 10, warmup: int = 3, points: int = 6,
                        device: torch.device | str = "cpu") -> LatencyModel:
    """Time every Conv2d / Linear of ``model`` (a copy, on ``device``) at its candidate widths: the lookup table.

    Widths range from those of ``low_policy`` (the narrowest the search allows) to full, at
    most ``points`` per dimension; ``batch`` samples of ``example``'s shape per call.
    """
    start = time.perf_counter()
    net = copy.deepcopy(model).to(device).eval()
    p = next(net.parameters(), None)
    dtype = p.dtype if p is not None else torch.float32
    x1 = example[:1].to(device=device, dtype=dtype)
    trace = _trace_layers(net, x1)
    mods = dict(net.named_modules())
    low = np.asarray(low_policy, float)
    lo_in, lo_out = cost.widths(cost.counts(low))
    full_in, full_out = cost.widths(cost.counts([1.0] * cost.n_groups))
    sweep = [cost.widths(cost.counts(low + t * (1 - low))) for t in np.linspace(0, 1, 257)]  # uniform policies
    reach_in, reach_out = np.array([w[0] for w in sweep]), np.array([w[1] for w in sweep])
    gen = torch.Generator().manual_seed(0)
    entries: list[LatencyEntry] = []
    timings = 0
    for k, name in enumerate(cost.names):
        kind = cost.types[k]
        if kind not in ("conv", "dwconv", "linear") or name not in trace:
            continue
        in_shape, calls, extras = trace[name]
        if cost.out_item[k] >= 0:
            cout = width_grid(lo_out[k], full_out[k], points, reach_out[:, k])
        else:
            cout = np.array([int(full_out[k])])
        if kind == "dwconv":
            cin = np.array([1])
        elif cost.in_item[k] >= 0:
            cin = width_grid(lo_in[k], full_in[k], points, reach_in[:, k])
        else:
            cin = np.array([int(full_in[k])])
        table = np.zeros((len(cin), len(cout)))
        for i, ci in enumerate(cin):
            cases = []
            for co in cout:
                layer = _fresh_layer(mods[name], kind, int(ci), int(co), extras)
                if kind == "linear":
                    shape = (batch, *in_shape[:-1], int(ci))
                else:
                    shape = (batch, int(co) if kind == "dwconv" else int(ci), *in_shape[1:])
                cases.append((layer, torch.randn(shape, generator=gen).to(device=device, dtype=dtype)))
            table[i] = time_cases(cases, warmup=warmup, repeats=repeats)
            timings += len(cases)
        table = monotone_table(table)
        entries.append(LatencyEntry(name, k, calls, cin.astype(float), cout.astype(float), table,
                                    [n for n, m in net.named_modules() if any(m is e for e in extras)]))
    xb = torch.randn((batch, *example.shape[1:]), generator=gen).to(device=device, dtype=dtype)
    (measured,) = time_cases([(net, xb)], warmup=warmup, repeats=repeats)
    timed = sum(e.calls * float(e.table[-1, -1]) for e in entries)
    meta = {"batch": batch, "threads": torch.get_num_threads(), "device": str(torch.device(device)),
            "repeats": repeats, "points": points, "layers": len(entries), "timings": timings,
            "build_seconds": time.perf_counter() - start}
    return LatencyModel(cost, entries, max(0.0, measured - timed), measured_full=measured, meta=meta)


# -- surgery ------------------------------------------------------------------------------------


def apply_ops(model: nn.Module, ops: Sequence[Sequence[Any]]) -> nn.Module:
    """Replay recorded pruning operations on ``model`` in place (Torch-Pruning's pruning functions)."""
    for op in ops:
        if len(op) != 3:
            raise UserError(f"malformed channel-pruning operation {op!r}: expected (module, function, indices)")
        name, hname, idxs = op
        if hname not in HANDLER_NAMES:
            raise UserError(f"unknown pruning function {hname!r} in a checkpoint; expected one of "
                            f"{', '.join(HANDLER_NAMES)}")
        try:
            module = model.get_submodule(str(name))
        except AttributeError:
            raise UserError(f"the recorded pruning refers to a layer {name!r} this network does not have") from None
        idxs = [int(i) for i in idxs]
        size = _dim_size(module, hname)
        if size is None or any(not 0 <= i < size for i in idxs) or len(set(idxs)) >= size:
            raise UserError(f"the recorded pruning of {name!r} ({hname}, {len(idxs)} indices) does not fit its "
                            f"{type(module).__name__} layer of {size} channels")
        handlers()[hname](module, idxs)
    return model


def _dim_size(module: nn.Module, hname: str) -> int | None:
    if hname.startswith("prune_conv") and isinstance(module, nn.Conv2d):
        return module.out_channels if "out" in hname else module.in_channels
    if hname.startswith("prune_depthwise") and isinstance(module, nn.Conv2d):
        return module.out_channels
    if hname.startswith("prune_linear") and isinstance(module, nn.Linear):
        return module.out_features if "out" in hname else module.in_features
    if hname.startswith("prune_batchnorm") and isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features
    return None
