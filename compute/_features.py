"""Symmetric monomial features built degree by degree (theory §1.1).

Monomials ``x^alpha`` with ``|alpha| <= g`` are ordered by degree. Each monomial of degree
``m >= 1`` has one parent of degree ``m - 1`` (drop one factor of its largest variable), so a
degree block is one gather and one multiply: ``feat_m = feat_{m-1}[parent] * x[var]``. Features
are built *transposed*, ``[r, n]``, so every gather copies whole contiguous rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

__all__ = ["MonomialTables", "feature_count", "monomial_features_t", "monomial_tables"]


def feature_count(d: int, g: int) -> int:
    """``r = C(d + g, g)``: the number of monomials of degree at most g in d variables."""
    return math.comb(d + g, g)


@dataclass(frozen=True)
class MonomialTables:
    d: int
    g: int
    offsets: tuple[int, ...]  # offsets[m]: first row of degree m; offsets[g+1] == r
    parent: tuple[np.ndarray, ...]  # parent[m-1]: index (within degree m-1 block) per monomial
    var: tuple[np.ndarray, ...]  # var[m-1]: variable multiplied in, per monomial of degree m
    multinomial: np.ndarray  # [r] float64: |alpha|! / prod(alpha_l!)
    degree: np.ndarray  # [r] int64: |alpha|

    @property
    def r(self) -> int:
        return self.offsets[-1]


@lru_cache(maxsize=64)
def monomial_tables(d: int, g: int) -> MonomialTables:
    """Parent/variable tables for all monomials of degree <= g in d variables (cached)."""
    offsets = [0, 1]
    parents: list[np.ndarray] = []
    variables: list[np.ndarray] = []
    # per monomial of the previous degree: its largest variable and multinomial coefficient
    prev_last = np.array([0], dtype=np.int64)
    prev_coef = np.array([1.0])
    # alpha! bookkeeping: for the child x^(alpha + e_v), alpha_v! grows by a factor (alpha_v+1),
    # so multinomial(child) = multinomial(parent) * m / (alpha_v + 1). Track alpha_v of the
    # largest variable as a run length: since v >= last(parent), alpha_v + 1 is
    # run(parent) + 1 when v == last(parent), else 1.
    prev_run = np.array([0], dtype=np.int64)
    coefs = [np.array([1.0])]
    degrees = [np.array([0], dtype=np.int64)]
    for m in range(1, g + 1):
        # children of parent p: variables v in [last(p), d); degree-0 parent has last = 0
        counts = d - prev_last
        parent = np.repeat(np.arange(len(prev_last), dtype=np.int64), counts)
        starts = np.repeat(prev_last, counts)
        within = np.arange(len(parent), dtype=np.int64) - np.repeat(
            np.cumsum(counts) - counts, counts
        )
        var = starts + within
        same = (var == prev_last[parent]) & (m > 1)
        run = np.where(same, prev_run[parent] + 1, 1)
        coef = prev_coef[parent] * m / run
        parents.append(parent)
        variables.append(var)
        coefs.append(coef)
        degrees.append(np.full(len(parent), m, dtype=np.int64))
        offsets.append(offsets[-1] + len(parent))
        prev_last, prev_coef, prev_run = var, coef, run
    return MonomialTables(
        d=d,
        g=g,
        offsets=tuple(offsets),
        parent=tuple(parents),
        var=tuple(variables),
        multinomial=np.concatenate(coefs),
        degree=np.concatenate(degrees),
    )


_DEVICE_TABLES: dict[tuple[int, int, str], tuple[tuple[torch.Tensor, torch.Tensor], ...]] = {}


def _device_tables(
    tables: MonomialTables, device: torch.device
) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    key = (tables.d, tables.g, str(device))
    cached = _DEVICE_TABLES.get(key)
    if cached is None:
        cached = tuple(
            (torch.from_numpy(p).to(device), torch.from_numpy(v).to(device))
            for p, v in zip(tables.parent, tables.var, strict=True)
        )
        _DEVICE_TABLES[key] = cached
    return cached


def monomial_features_t(
    x_t: torch.Tensor, tables: MonomialTables, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Monomials of ``x`` transposed: ``x_t`` is ``[d, n]``, the result ``[r, n]``.

    Row ``a`` holds ``x^alpha_a`` for every column; row 0 is all ones. No weights applied.
    """
    d, n = x_t.shape
    if d != tables.d:
        raise ValueError(f"features: x has {d} variables, tables were built for {tables.d}")
    if out is None:
        out = torch.empty((tables.r, n), dtype=x_t.dtype, device=x_t.device)
    out[0].fill_(1.0)
    offs = tables.offsets
    for m, (parent, var) in enumerate(_device_tables(tables, x_t.device), start=1):
        prev = out[offs[m - 1] : offs[m]]
        torch.mul(
            prev.index_select(0, parent),
            x_t.index_select(0, var),
            out=out[offs[m] : offs[m + 1]],
        )
    return out
