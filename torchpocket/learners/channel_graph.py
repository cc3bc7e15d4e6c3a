"""Channel groups from Torch-Pruning's dependency graph, and the surgery that removes them.

Shared by the channel pruners (``chn-pruned`` and the discrimination-aware one):
nothing here selects channels; it only answers *which channels must go together*
and *how to cut them*. What a model costs when each group keeps k of its channels
is :mod:`~torchpocket.learners._channel_cost` (FLOPs and parameters, exactly) and
:mod:`~torchpocket.learners._channel_latency` (a lookup table timed on this machine).

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

import contextlib
import copy
import functools
import math
import os
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from torchpocket.errors import UserError

#: the Torch-Pruning functions a recorded operation may name (anything else is refused on replay)
HANDLER_NAMES = (
    "prune_conv_out_channels",
    "prune_conv_in_channels",
    "prune_depthwise_conv_out_channels",
    "prune_batchnorm_out_channels",
    "prune_linear_out_channels",
    "prune_linear_in_channels",
    "prune_grouped_conv_groups",
)
#: ours, not Torch-Pruning's: removes whole groups of a grouped conv (its output channels of those groups)
GCONV_HANDLER = "prune_grouped_conv_groups"


def prune_grouped_conv_groups(layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
    """Remove whole groups of a grouped Conv2d: ``idxs`` are the output channels of the groups removed.

    Each group keeps its own width, so the layer stays a valid grouped conv with fewer groups; the
    input channels of the removed groups go with them (the producers lose those channels too).
    """
    assert isinstance(layer, nn.Conv2d)
    g, cout_g, cin_g = layer.groups, layer.out_channels // layer.groups, layer.in_channels // layer.groups
    gone = sorted({int(i) // cout_g for i in idxs})
    if sorted(int(i) for i in idxs) != [j * cout_g + t for j in gone for t in range(cout_g)] or len(gone) >= g:
        raise UserError(f"the recorded pruning of a grouped conv ({len(idxs)} channels of {layer.out_channels}, "
                        f"{g} groups of {cout_g}) does not remove whole groups")
    keep = torch.tensor([o for o in range(layer.out_channels) if o // cout_g not in gone], dtype=torch.long)
    layer.weight = nn.Parameter(layer.weight.detach().index_select(0, keep.to(layer.weight.device)))
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.detach().index_select(0, keep.to(layer.bias.device)))
    layer.groups = g - len(gone)
    layer.out_channels = layer.groups * cout_g
    layer.in_channels = layer.groups * cin_g
    return layer


@functools.lru_cache(maxsize=1)
def handlers() -> dict[str, Callable[[nn.Module, Sequence[int]], nn.Module]]:
    """Torch-Pruning's pruning functions by name, and ours (imported on first use: ``--help`` need not load it)."""
    from torch_pruning.pruner import function as tpf

    out = {n: getattr(tpf, n) for n in HANDLER_NAMES if n != GCONV_HANDLER}
    out[GCONV_HANDLER] = prune_grouped_conv_groups
    return out

_IN_HANDLERS = ("prune_conv_in_channels", "prune_linear_in_channels")
_PRODUCER_HANDLERS = ("prune_conv_out_channels", "prune_linear_out_channels", GCONV_HANDLER)

def _pass_through() -> set[Any]:
    """Dependency-graph node types that carry channels through unchanged."""
    import torch_pruning as tp

    t = tp.ops.OPTYPE
    return {t.ELEMENTWISE, t.CONCAT, t.SPLIT, t.RESHAPE, t.SLICE, t.UNBIND, t.EXPAND}

Op = tuple[str, str, list[int]]  # (module name, handler name, removed indices)


def handler_name(fn: Callable) -> str | None:
    """The public Torch-Pruning name of a dependency's pruning function (None: not one we replay)."""
    for name, h in handlers().items():
        if fn == h and name != GCONV_HANDLER:
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


def _is_gate(node: Any) -> bool:
    """A two-input op that ties channels inside one block, unlike a residual add: an element-wise product
    (squeeze-and-excitation, gating, layer scale), or a Linear's own bias + matmul on a >2-D input."""
    fn = str(getattr(node.module, "_grad_fn", ""))
    return fn.startswith(("MulBackward", "AddmmBackward"))


def _analyse_group(graph: Any, module: nn.Module, names: dict[nn.Module, str],
                   layers: dict[str, LayerGeom]) -> ChannelGroup | str:
    """The group rooted at ``module``'s input channels, or the reason it cannot be pruned.

    A grouped conv among the producers extends the group through it: its units become the
    conv's groups, removed whole, with the channels that feed each group (ResNeXt, RegNet).
    """
    import torch_pruning as tp

    root = names[module]
    in_fn = tp.prune_conv_in_channels if isinstance(module, nn.Conv2d) else tp.prune_linear_in_channels
    n_in = layers[root].in0
    group = graph.get_pruning_group(module, in_fn, list(range(n_in)))
    _, find, union = _union_find(n_in)
    flags = {"coupled": False, "depthwise": False}
    items: list[tuple[str, str, list[int], list[int]]] = []
    gconvs: list[tuple[str, list[int], list[int]]] = []

    def visit(found: Any, root_of: Callable[[int], int], inside: str | None) -> str | None:
        for item in found.items:
            node = item.dep.target
            idxs, roots = list(item.idxs), [root_of(int(r)) for r in item.root_idxs]
            first: dict[int, int] = {}
            for i, r in zip(idxs, roots):
                if i in first:
                    union(first[i], r)
                else:
                    first[i] = r
            if node.type == tp.ops.OPTYPE.OUTPUT:
                return "its channels reach the model's output"
            if node.type in _pass_through():
                if node.type == tp.ops.OPTYPE.ELEMENTWISE and len(node.inputs) >= 2 and not _is_gate(node):
                    flags["coupled"] = True
                continue
            mod = node.module
            name = names.get(mod) if isinstance(mod, nn.Module) else None
            hname = handler_name(item.dep.handler)
            if name is None or hname is None or name not in layers:
                what = type(mod).__name__ if isinstance(mod, nn.Module) else "an unwrapped parameter"
                return f"the channels are coupled to {what} ({name or '?'}), which this pruner does not handle"
            lay = layers[name]
            if lay.type == "gconv":
                if name == inside and hname == "prune_conv_in_channels":
                    continue  # the grouped conv's own input: its groups go whole
                if inside is not None or hname != "prune_conv_out_channels":
                    return f"the channels are coupled to the grouped conv {name} in a way only whole-group pruning " \
                           f"of its outputs handles"
                gconvs.append((name, idxs, roots))
                continue
            if lay.type == "dwconv":
                flags["depthwise"] = True
            if hname in _PRODUCER_HANDLERS and not node.outputs:
                return f"the channels are the model's output ({name})"
            items.append((name, hname, idxs, roots))
        return None

    why = visit(group, lambda r: r, None)
    if why:
        return why
    mods = {n: m for m, n in names.items()}
    gconv_groups: dict[str, dict[int, int]] = {}
    for name, idxs, roots in gconvs:
        lay = layers[name]
        cout_g, cin_g = lay.out0 // lay.groups, lay.in0 // lay.groups
        rep: dict[int, int] = {}
        for i, r in zip(idxs, roots):
            if i // cout_g in rep:
                union(rep[i // cout_g], r)
            else:
                rep[i // cout_g] = r
        if len(rep) != lay.groups or len(idxs) != lay.out0:
            return f"only some output channels of the grouped conv {name} are coupled to these channels"
        gconv_groups[name] = rep
        items.append((name, GCONV_HANDLER, idxs, roots))
        side = graph.get_pruning_group(mods[name], tp.prune_conv_in_channels, list(range(lay.in0)))
        why = visit(side, lambda r, rep=rep, cin_g=cin_g: rep[r // cin_g], name)
        if why:
            return why
    if len({(n, h) for n, h, _, _ in items}) != len(items):
        return "a layer is coupled to these channels twice (through a grouped conv's input and output)"
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
    # the group is named after its first consumer, one that sees feature maps if any does (not an SE squeeze)
    spatial = [c for c in consumers if layers[c].positions > 1]
    name0 = (spatial or consumers)[0]
    kind = "linear" if layers[name0].type == "linear" else ("dwconv" if flags["depthwise"] else "conv")
    g = ChannelGroup(name0, consumers, members, units, list(sig.values()), flags["coupled"], flags["depthwise"], kind)
    # cross-check the unit mapping against the graph on a partial selection
    test_units = [u for u in range(units) if u % 3 == 0][: units - 1]
    chosen = set(test_units)
    roots_sel = [r for r in range(n_in) if unit_of_root[r] in chosen]
    got: dict[tuple[str, str], set[int]] = {}

    def collect(found: Any, inside: str | None) -> None:
        for item in found.items:
            mod = item.dep.target.module
            hname = handler_name(item.dep.handler)
            if isinstance(mod, nn.Module) and mod in names and hname is not None:
                name = names[mod]
                if name in gconv_groups:
                    if name == inside:
                        continue
                    hname = GCONV_HANDLER
                got.setdefault((name, hname), set()).update(int(i) for i in item.idxs)

    collect(graph.get_pruning_group(module, in_fn, roots_sel), None)
    for name in gconv_groups:
        lay = layers[name]
        cout_g, cin_g = lay.out0 // lay.groups, lay.in0 // lay.groups
        sel = sorted({i // cout_g for i in got.get((name, GCONV_HANDLER), set())})
        if sel:
            collect(graph.get_pruning_group(mods[name], tp.prune_conv_in_channels,
                                            [j * cin_g + t for j in sel for t in range(cin_g)]), name)
    want = {(op[0], op[1]): set(op[2]) for op in g.ops(test_units)}
    if got != want:
        return "the dependency graph's index mapping is not a partition of channels (unsupported layout)"
    return g


class _GraphTimeout(BaseException):  # not an Exception: no "except Exception" on the way may swallow it
    """The graph analysis ran past its time bound."""


def _graph_seconds() -> float:
    raw = os.environ.get("TORCHPOCKET_GRAPH_SECONDS", "")
    try:
        return float(raw) if raw else 900.0
    except ValueError:
        raise UserError(f"TORCHPOCKET_GRAPH_SECONDS must be a number of seconds, got {raw!r}") from None


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`_GraphTimeout` in the block after ``seconds`` (SIGALRM: the main thread on POSIX only).

    A timer already running (pytest-timeout, a caller's alarm) is put back afterwards with its remaining
    time; if it would fire first, it is left alone and no limit of ours is set.
    """
    import time

    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread() and seconds > 0
    outer = signal.getitimer(signal.ITIMER_REAL)[0] if usable else 0.0
    if not usable or (outer and outer <= seconds):
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise _GraphTimeout

    start = time.monotonic()
    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(1e-3, outer - (time.monotonic() - start)))


def _find_groups(model: nn.Module, example: Tensor, coupled: str
                 ) -> tuple[list[ChannelGroup], dict[str, str], dict[str, LayerGeom], float, Tensor]:
    net = copy.deepcopy(model).cpu().eval()
    example = example[:1].detach().cpu()
    layers, total_flops = _layer_geometry(net, example)
    names = {m: n for n, m in net.named_modules()}
    import torch_pruning as tp

    try:
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(net, example_inputs=example, verbose=False)
    except (MemoryError, RecursionError):
        raise
    except Exception as e:  # noqa: BLE001 - any tracing failure means: no channel pruning for this model
        import traceback

        if any(f.name == "update_reshape_index_mapping" for f in traceback.extract_tb(e.__traceback__)):
            raise UserError("Torch-Pruning cannot map channels through a reshape of the channel dimension (a "
                            "channel shuffle, as in ShuffleNet); chn-pruned does not support this model") from None
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
    return groups, skipped, layers, total_flops, example


def find_channel_groups(model: nn.Module, example: Tensor, *, coupled: str = "skip") -> GraphInfo:
    """Every prunable channel group of ``model`` (traced on a copy, in eval mode; ``model`` is untouched).

    ``coupled='skip'`` leaves channels tied by an element-wise op (residual additions)
    alone; ``'prune'`` keeps those groups (their channels are then pruned together).
    The first conv's input (the image) and the final classifier's outputs never appear.
    """
    if coupled not in ("skip", "prune"):
        raise UserError(f"coupled must be 'skip' or 'prune', got {coupled!r}")
    from torchpocket.utils import MemoryCap, memory_headroom_bytes

    extra = memory_headroom_bytes()
    cap = MemoryCap(extra)
    seconds = _graph_seconds()
    try:
        with cap, _time_limit(seconds):
            groups, skipped, layers, total_flops, example = _find_groups(model, example, coupled)
    except _GraphTimeout:
        raise UserError(f"tracing the channel dependencies of {type(model).__name__} took more than {seconds:g} s "
                        f"(Torch-Pruning's dependency graph); chn-pruned refuses it. Set TORCHPOCKET_GRAPH_SECONDS "
                        f"to allow more, or use a learner that needs no graph (weight-sparse, uniform-quant)") from None
    except (MemoryError, RuntimeError):
        if not cap.hit:
            raise
        gib = f"{extra / 2**30:.2f} GiB" if extra else "the memory available"
        raise UserError(f"tracing the channel dependencies of {type(model).__name__} needed more than {gib} "
                        f"(Torch-Pruning's dependency graph); chn-pruned refuses it. Set "
                        f"TORCHPOCKET_GRAPH_MEMORY_GIB to allow more, or use a learner that needs no graph "
                        f"(weight-sparse, uniform-quant)") from None
    except RecursionError:
        raise UserError(f"tracing the channel dependencies of {type(model).__name__} recursed too deep "
                        f"(Torch-Pruning's dependency graph); chn-pruned does not support this model") from None
    total_params = sum(p.numel() for p in model.parameters())
    return GraphInfo(groups, skipped, layers, list(example.shape), total_flops, total_params)


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
    if hname in ("prune_depthwise_conv_out_channels", GCONV_HANDLER) and isinstance(module, nn.Conv2d):
        return module.out_channels
    if hname.startswith("prune_linear") and isinstance(module, nn.Linear):
        return module.out_features if "out" in hname else module.in_features
    if hname.startswith("prune_batchnorm") and isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features
    return None
