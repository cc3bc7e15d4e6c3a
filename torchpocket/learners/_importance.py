"""How ``chn-pruned`` ranks the units of a channel group (Torch-Pruning's style: small importance objects).

- ``lasso`` (He et al. 2017): a LASSO regression of the consumers' outputs on each unit's contribution,
  from calibration statistics; the LARS path is built lazily and cached. Groups tied by residual
  additions, and layers without statistics, fall back to L1.
- ``l1`` (AMC): the consumers' input-weight L1 norm per unit (every coupled layer's, for tied groups).
- ``random``: a fixed random order per group.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from torchpocket.learners.channel_graph import ChannelGroup


@dataclass
class Calib:
    """Calibration statistics of one consumer layer (from the original model)."""

    gram: Tensor  # D x D, E[x x^T] of sampled input patches
    gw: Tensor  # D x O, E[x y^T] = gram @ W0^T
    weight: Tensor  # O x D, original weights, flattened (all float32: D can be thousands)
    kk: int  # features per input channel (kernel area; 1 for Linear)
    rows: int


class LassoPath:
    """He et al.'s LASSO for one group, ``y = sum_u beta_u Z_u`` with ``y = Z 1``, from ``Z^T Z`` alone.

    The LARS path is computed lazily and only as far as a request needs (its prefix
    does not depend on how far it is run), then cached for later candidates.
    """

    def __init__(self, zz: np.ndarray, n_samples: int) -> None:
        scale = float(np.trace(zz)) / len(zz) or 1.0
        self.zz = zz / scale
        self.xy = self.zz.sum(1)
        self.n_samples = n_samples
        self.coefs = np.zeros((len(zz), 1))
        self.done = False

    def prefix(self, k: int) -> np.ndarray:
        """The path (units x knots) up to the first knot with at least ``k`` non-zero coefficients."""
        while not self.done and (self.coefs != 0).sum(0).max() < k:
            self._extend(max(2 * self.coefs.shape[1], k + 8))
        nnz = (self.coefs != 0).sum(0)
        hit = np.flatnonzero(nnz >= k)
        return self.coefs[:, : (hit[0] + 1 if hit.size else self.coefs.shape[1])]

    def _extend(self, max_iter: int) -> None:
        from sklearn.linear_model import lars_path_gram

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, _, coefs, n_iter = lars_path_gram(Xy=self.xy, Gram=self.zz, n_samples=self.n_samples,
                                                 method="lasso", max_iter=max_iter, return_n_iter=True)
        self.coefs = np.asarray(coefs)
        self.done = n_iter < max_iter

    def keep(self, classes: list[list[int]], per_class: list[int]) -> list[int]:
        """Exactly ``per_class`` units of each class.

        One class: the support at the largest penalty where exactly k coefficients are
        non-zero (what bisecting the penalty converges to). Otherwise, or when no knot
        has exactly k, units in the order they enter the path; units still outside it
        follow by their correlation with the residual (the next ones LARS would add).
        """
        k = sum(per_class)
        path = self.prefix(k)
        nz = path != 0
        if len(classes) == 1:
            exact = np.flatnonzero(nz.sum(0) == k)
            if exact.size:
                return sorted(np.flatnonzero(nz[:, exact[0]]).tolist())
        entered = nz.any(1)
        entry = np.where(entered, np.argmax(nz, axis=1), path.shape[1]).astype(float)
        corr = np.abs(self.xy - self.zz @ path[:, -1])
        order = np.lexsort((-corr, entry))
        return take(order, classes, per_class)


def take(order: np.ndarray, classes: list[list[int]], per_class: list[int]) -> list[int]:
    """The first ``per_class[i]`` units of ``order`` inside each class ``classes[i]``."""
    keep: list[int] = []
    for units, kc in zip(classes, per_class):
        inside = set(units)
        keep += [int(u) for u in order if u in inside][:kc]
    return sorted(keep)


def contribution_gram(cal: Calib, g: ChannelGroup, consumer: str) -> np.ndarray:
    """Z^T Z of the per-unit output contributions Z_u = W_u x_u (He et al.'s LASSO design), from E[x x^T]."""
    unit_of = torch.full((cal.gram.shape[0],), -1, dtype=torch.long)
    for u, chans in enumerate(g.consumer_member(consumer).unit_idxs):
        for ch in chans:
            unit_of[ch * cal.kk : (ch + 1) * cal.kk] = u
    m = cal.weight.T @ cal.weight
    m.mul_(cal.gram)  # sum_o (W_o x)(W_o x)^T per feature pair
    valid = unit_of >= 0
    if not bool(valid.all()):
        m = m[valid][:, valid]
    uv = unit_of[valid]
    r = torch.zeros(m.shape[0], g.units).index_add_(1, uv, m)
    return torch.zeros(g.units, g.units, dtype=torch.float64).index_add_(0, uv, r.double()).numpy()


def l1_scores(model: nn.Module, g: ChannelGroup, *, everything: bool) -> np.ndarray:
    """Consumers' input-weight L1 per unit (AMC); with ``everything``, every coupled layer's (group L1)."""
    mods = dict(model.named_modules())
    score = np.zeros(g.units)
    for m in g.members:
        consumer = m.handler in ("prune_conv_in_channels", "prune_linear_in_channels")
        if not (consumer or everything) or m.handler == "prune_batchnorm_out_channels":
            continue
        w = mods[m.module].weight.detach().abs().cpu().double()
        per = (w.sum(dim=[d for d in range(w.dim()) if d != (1 if consumer else 0)]))
        s = np.array([float(per[ix].sum()) if ix else 0.0 for ix in m.unit_idxs])
        score += s / max(s[s > 0].mean() if (s > 0).any() else 1.0, 1e-30)
    return score


class Ranking(Protocol):
    def keep(self, classes: list[list[int]], per_class: list[int]) -> list[int]: ...


@dataclass
class FixedOrder:
    """Units kept in one fixed order of importance."""

    order: np.ndarray

    def keep(self, classes: list[list[int]], per_class: list[int]) -> list[int]:
        return take(self.order, classes, per_class)


class LazyLasso:
    """He et al.'s LASSO ranking of one group, its Gram matrix and LARS path built on the first request."""

    def __init__(self, g: ChannelGroup, calib: dict[str, Calib]) -> None:
        self.group, self.calib = g, calib
        self.path: LassoPath | None = None

    def keep(self, classes: list[list[int]], per_class: list[int]) -> list[int]:
        if self.path is None:
            g = self.group
            zz = np.zeros((g.units, g.units))
            rows = 0
            for name in g.consumers:  # every consumer's output counts equally
                z = contribution_gram(self.calib[name], g, name)
                zz += z / max(float(z.sum()), 1e-30)
                rows += self.calib[name].rows * self.calib[name].weight.shape[0]
            self.path = LassoPath(zz, max(rows, 1))
        return self.path.keep(classes, per_class)


class Importance(ABC):
    """A channel-selection criterion: which units of a group to keep."""

    name: ClassVar[str]

    def needs_calibration(self, g: ChannelGroup) -> bool:
        """Whether ranking ``g`` needs the consumers' calibration statistics."""
        return False

    @abstractmethod
    def ranking(self, model: nn.Module, g: ChannelGroup, index: int, calib: dict[str, Calib], seed: int) -> Ranking:
        """The ranking of group ``index`` of ``model`` (the original, uncompressed one)."""


class L1Importance(Importance):
    name = "l1"

    def ranking(self, model: nn.Module, g: ChannelGroup, index: int, calib: dict[str, Calib], seed: int) -> Ranking:
        return FixedOrder(np.argsort(-l1_scores(model, g, everything=g.coupled), kind="stable"))


class LassoImportance(L1Importance):
    name = "lasso"

    def needs_calibration(self, g: ChannelGroup) -> bool:
        return not g.coupled

    def ranking(self, model: nn.Module, g: ChannelGroup, index: int, calib: dict[str, Calib], seed: int) -> Ranking:
        if g.coupled or not all(n in calib for n in g.consumers):
            return super().ranking(model, g, index, calib, seed)
        return LazyLasso(g, calib)


class RandomImportance(Importance):
    name = "random"

    def ranking(self, model: nn.Module, g: ChannelGroup, index: int, calib: dict[str, Calib], seed: int) -> Ranking:
        return FixedOrder(np.random.default_rng([seed, index]).permutation(g.units))


IMPORTANCE: dict[str, Importance] = {c.name: c for c in (LassoImportance(), L1Importance(), RandomImportance())}
