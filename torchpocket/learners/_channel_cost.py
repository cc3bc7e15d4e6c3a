"""The exact cost (FLOPs, parameters) of a channel-pruned model as a function of each group's preserve ratio."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from torchpocket.learners.channel_graph import GraphInfo


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


