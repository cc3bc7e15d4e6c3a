"""The exact cost (FLOPs, parameters) of a channel-pruned model as a function of each group's preserve ratio."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from torchpocket.learners.channel_graph import GCONV_HANDLER, GraphInfo


def keep_counts(ratios: np.ndarray, sizes: np.ndarray, round_to: int | np.ndarray = 1) -> np.ndarray:
    """Channels kept for preserve ratios: nearest of {multiples of round_to} U {size}, >= 1, <= size.

    ``round_to`` is one number or one per entry. Non-decreasing in every ratio, and a ratio of
    1 keeps everything.
    """
    n = np.maximum(1, np.asarray(round_to, np.int64))
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

    def __init__(self, info: GraphInfo, *, round_to: int | Sequence[int] = 1) -> None:
        """``round_to``: one channel granule for every group, or one per group (``--channel-round auto``)."""
        groups = info.groups
        if not isinstance(round_to, int) and len(round_to) != len(groups):
            raise ValueError(f"{len(round_to)} channel granules for {len(groups)} groups")
        cls_group, cls_size, cls_units = [], [], []
        for gi, g in enumerate(groups):
            for c in g.classes:
                cls_group.append(gi)
                cls_size.append(len(c))
                cls_units.append(c)
        self.class_group = np.asarray(cls_group, np.int64)
        self.class_size = np.asarray(cls_size, np.int64)
        self.class_units = cls_units
        self.info = info
        self.round_to = round_to if isinstance(round_to, int) else [int(v) for v in round_to]
        self.class_round = (np.full(len(cls_group), round_to, np.int64) if isinstance(round_to, int)
                            else np.asarray(self.round_to, np.int64)[self.class_group])
        # kept indices of member i = cnt[i] @ kept units per class. A module's input (or a norm's channels) after a
        # torch.cat is a member of several groups, one slice each, and may hold slices of no group
        item_index: dict[tuple[str, str], list[int]] = {}
        rows = []
        item_group = []
        for gi, g in enumerate(groups):
            for m in g.members:
                item_index.setdefault((m.module, m.handler), []).append(len(rows))
                row = np.zeros(len(cls_group))
                for q, (qg, units) in enumerate(zip(cls_group, cls_units)):
                    if qg == gi:
                        row[q] = len(m.unit_idxs[units[0]])
                rows.append(row)
                item_group.append(gi)
        self.cnt = np.asarray(rows).reshape(len(rows), len(cls_group))
        mods = list(info.layers.values())
        n_items = len(rows)
        self.m_in, self.m_out = np.zeros((len(mods), n_items)), np.zeros((len(mods), n_items))
        in0, out0, fa, pa, pb = [], [], [], [], []
        owner_items: list[list[int]] = []
        for i, lay in enumerate(mods):
            t = lay.type
            if t == "conv":
                ii = item_index.get((lay.name, "prune_conv_in_channels"), [])
                oi = item_index.get((lay.name, "prune_conv_out_channels"), [])
                a_f, a_p = 2.0 * lay.positions * lay.kk, float(lay.kk)
                i0 = lay.in0
            elif t == "linear":
                ii = item_index.get((lay.name, "prune_linear_in_channels"), [])
                oi = item_index.get((lay.name, "prune_linear_out_channels"), [])
                a_f, a_p = 2.0 * lay.positions, 1.0
                i0 = lay.in0
            elif t == "dwconv":
                ii, oi = [], item_index.get((lay.name, "prune_depthwise_conv_out_channels"), [])
                a_f, a_p, i0 = 2.0 * lay.positions * lay.kk, float(lay.kk), 1
            elif t == "gconv":  # whole groups go: each output channel keeps its in0 / groups inputs
                ii, oi = [], item_index.get((lay.name, GCONV_HANDLER), [])
                a_f, a_p, i0 = 2.0 * lay.positions * lay.kk, float(lay.kk), lay.in0 // lay.groups
            else:  # bn
                ii, oi = [], item_index.get((lay.name, "prune_batchnorm_out_channels"), [])
                a_f, a_p, i0 = 0.0, 2.0 if lay.bias else 0.0, 1
            self.m_in[i, ii] = 1.0
            self.m_out[i, oi] = 1.0
            in0.append(i0)
            out0.append(lay.out0)
            fa.append(a_f)
            pa.append(a_p)
            pb.append(1.0 if (lay.bias and t != "bn") else 0.0)
            owner_items.append(list(ii) if ii else (list(oi) if t in ("dwconv", "gconv", "bn") else []))
        self.in0, self.out0 = np.asarray(in0, float), np.asarray(out0, float)
        self.fa, self.pa, self.pb = np.asarray(fa), np.asarray(pa), np.asarray(pb)
        # each module's cost is shared by the groups that own it (a cat consumer: in proportion to each group's
        # slice of its input at full width)
        full_kept = self.cnt @ self.class_size.astype(float) if self.cnt.size else np.zeros(n_items)
        self.full_kept = full_kept
        self.share = np.zeros((len(mods), len(groups)))
        for i, items in enumerate(owner_items):
            total = sum(full_kept[j] for j in items)
            for j in items:
                self.share[i, item_group[j]] += full_kept[j] / total if total else 1.0 / len(items)
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
        return keep_counts(p[self.class_group], self.class_size, self.class_round)

    def kept_units(self, policy: Sequence[float]) -> list[int]:
        k = self.counts(policy)
        out = [0] * self.n_groups
        for q, g in enumerate(self.class_group):
            out[g] += int(k[q])
        return out

    def widths(self, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Input and output width of every module of :attr:`names` for per-class keep counts.

        Linear layers count input *features*; depthwise convs and norms have an input width of 1 here, grouped
        convs their inputs per group.
        """
        kept = self.cnt @ counts.astype(float) if self.cnt.size else np.zeros(self.m_in.shape[1])
        cut = kept - self.full_kept  # <= 0: what each member lost
        # the full width less what its members lost: a slice no group prunes (a torch.cat input from an
        # unprunable producer) stays in the width
        return self.in0 + self.m_in @ cut, self.out0 + self.m_out @ cut

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
        return v @ self.share


