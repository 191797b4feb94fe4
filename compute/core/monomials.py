"""Monomial features: one table, one builder, one weights function (docs/attention.md, step 5).

``P(scale <q, k>) = sum_alpha w_alpha q^alpha k^alpha`` over the monomials ``x^alpha`` of degree
``|alpha| <= g`` in d variables, ``w_alpha = c_|alpha| scale^|alpha| |alpha|! / alpha!`` (the
multinomial theorem). Every operation builds its features with this module.

The monomials are ordered by degree and, within a degree m, by their largest variable v. The
degree-m monomials with largest variable v are then ``x_v`` times a *prefix* of the degree m-1
block (the C(v + m - 1, m - 1) monomials in the variables 0..v), so a degree block is d
broadcast products of contiguous slices: no gathers, no index tables on the device. Features are
built transposed, ``[..., r, N]``, so that every product reads and writes whole rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .polynomials import Approximation

__all__ = [
    "FeatureBuilder",
    "MonomialTable",
    "derivative_table",
    "feature_count",
    "features",
    "monomial_table",
    "weight_max",
    "weights",
]


def feature_count(d: int, g: int) -> int:
    """``r = C(d + g, g)``: the number of monomials of degree at most g in d variables."""
    return math.comb(d + g, g)


@dataclass(frozen=True)
class MonomialTable:
    """How to build the monomials of degree <= g in d variables; ``r = offsets[-1]``.

    Row 0 is the constant. ``steps`` lists, per degree m >= 1 and variable v, the rows
    ``[dst, end)`` that equal ``x_v`` times rows ``[src, src + end - dst)`` (a prefix of the
    degree m - 1 block).
    """

    d: int
    g: int
    offsets: tuple[int, ...]  # offsets[m]: first row of degree m; offsets[g+1] == r
    steps: tuple[tuple[int, int, int, int], ...]  # (dst, end, src, var)
    multinomial: np.ndarray  # [r] float64: |alpha|! / prod(alpha_l!), exact integers
    degree: np.ndarray  # [r] int64: |alpha|

    @property
    def r(self) -> int:
        return self.offsets[-1]

    def exponents(self) -> np.ndarray:
        """``[r, d]`` int64: the exponent vector alpha of every row (O(r d) memory)."""
        e = np.zeros((self.r, self.d), dtype=np.int64)
        for dst, end, src, var in self.steps:
            e[dst:end] = e[src : src + (end - dst)]
            e[dst:end, var] += 1
        return e


@lru_cache(maxsize=64)
def monomial_table(d: int, g: int) -> MonomialTable:
    """The table for all monomials of degree <= g in d variables (cached)."""
    if d < 1 or g < 0:
        raise ValueError(f"monomial_table: need d >= 1 and g >= 0, got d={d}, g={g}")
    offsets = [0, 1]
    steps: list[tuple[int, int, int, int]] = []
    last = [np.array([-1], dtype=np.int64)]  # largest variable per monomial (-1: constant)
    run = [np.array([0], dtype=np.int64)]  # exponent of the largest variable
    coef = [np.array([1.0])]
    # multinomial(x^(alpha + e_v)) = multinomial(x^alpha) * m / (alpha_v + 1); since v is at
    # least the parent's largest variable, alpha_v + 1 is the parent's run + 1 or 1
    for m in range(1, g + 1):
        src = offsets[m - 1]
        p_last, p_run, p_coef = last[m - 1], run[m - 1], coef[m - 1]
        pos = offsets[-1]
        b_last, b_run, b_coef = [], [], []
        for v in range(d):
            cnt = math.comb(v + m - 1, m - 1)  # degree m-1 monomials in variables 0..v
            steps.append((pos, pos + cnt, src, v))
            same = p_last[:cnt] == v
            rn = np.where(same, p_run[:cnt] + 1, 1)
            b_last.append(np.full(cnt, v, dtype=np.int64))
            b_run.append(rn)
            b_coef.append(p_coef[:cnt] * m / rn)
            pos += cnt
        offsets.append(pos)
        last.append(np.concatenate(b_last))
        run.append(np.concatenate(b_run))
        coef.append(np.concatenate(b_coef))
    degree = np.concatenate([np.full(len(c), m, dtype=np.int64) for m, c in enumerate(coef)])
    return MonomialTable(
        d=d,
        g=g,
        offsets=tuple(offsets),
        steps=tuple(steps),
        multinomial=np.concatenate(coef),
        degree=degree,
    )


@lru_cache(maxsize=64)
def derivative_table(d: int, g: int) -> tuple[np.ndarray, np.ndarray]:
    """``(child, factor)``, both ``[r', d]`` with ``r'`` the monomials of degree <= g - 1:
    ``d x^(beta + e_l) / d x_l = factor[beta, l] x^beta`` with ``x^(beta + e_l)`` at row
    ``child[beta, l]`` of the degree-g table (the gradient of a feature is a lower feature)."""
    table = monomial_table(d, g)
    exps = table.exponents()  # [r, d]
    index = {row.tobytes(): i for i, row in enumerate(exps)}
    r_low = table.offsets[g]  # monomials of degree <= g - 1
    child = np.empty((r_low, d), dtype=np.int64)
    factor = np.empty((r_low, d), dtype=np.float64)
    for b in range(r_low):
        for lv in range(d):
            up = exps[b].copy()
            up[lv] += 1
            child[b, lv] = index[up.tobytes()]
            factor[b, lv] = float(up[lv])
    return child, factor


class FeatureBuilder:
    """Builds the monomials of ``x: [..., d, N]`` into ``out: [..., r', N]`` (``r' >= r``).

    ``build()`` fills rows ``[0, r)`` of ``out`` from the current ``x`` (row 0 all ones; a
    monomial of degree m is rounded m - 1 times, degree 1 is exact) and returns ``out``; rows
    ``>= r`` are never written (callers that pad keep them zero). The slice views are made once,
    so a caller that refills ``x`` block after block pays no Python cost for slicing again. Not
    differentiable (it writes in place).
    """

    def __init__(self, table: MonomialTable, x: torch.Tensor, out: torch.Tensor) -> None:
        if x.shape[-2] != table.d or out.shape[-2] < table.r or x.shape[-1] != out.shape[-1]:
            raise ValueError(
                f"FeatureBuilder: x {tuple(x.shape)} / out {tuple(out.shape)} do not fit d = "
                f"{table.d}, r = {table.r}"
            )
        self.table, self.x, self.out = table, x, out
        self._ones = out[..., 0, :]
        self._ops = [
            (out[..., src : src + (end - dst), :], x[..., var : var + 1, :], out[..., dst:end, :])
            for dst, end, src, var in table.steps
        ]

    def build(self) -> torch.Tensor:
        self._ones.fill_(1.0)
        for prev, xv, dst in self._ops:
            torch.mul(prev, xv, out=dst)  # [..., cnt, N] = [..., cnt, N] * [..., 1, N]
        return self.out


def features(
    x_t: torch.Tensor, table: MonomialTable, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The monomials of ``x_t: [..., d, N]`` once: ``[..., r, N]`` (or into ``out``)."""
    if out is None:
        shape = (*x_t.shape[:-2], table.r, x_t.shape[-1])
        out = torch.empty(shape, dtype=x_t.dtype, device=x_t.device)
    return FeatureBuilder(table, x_t, out).build()


def weights(coeffs: np.ndarray, table: MonomialTable, scale: float) -> np.ndarray:
    """``w_alpha = c_|alpha| scale^|alpha| |alpha|! / alpha!`` in float64, ``[r]``, for the
    polynomial's coefficients ``coeffs = c_0..c_g`` (``Approximation.coeffs``).

    All of the weight goes on one side (the queries): no square roots, and negative
    coefficients are fine. A huge unbalanced scale gives inf here, never an exception.
    """
    c = np.asarray(coeffs, dtype=np.float64)  # [g + 1]
    with np.errstate(over="ignore", invalid="ignore"):
        powers = np.power(float(scale), np.arange(len(c), dtype=np.float64))
        return (c * powers)[table.degree] * table.multinomial  # [r]


def weight_max(approx: Approximation, scale: float) -> float:
    """``>= max_alpha |w_alpha|`` without building a table (``|alpha|!/alpha! <= |alpha|!``);
    inf when that is beyond float64 (such a polynomial is never planned)."""
    if 0.125 <= abs(scale) <= 8.0:  # balanced (the usual case): nothing can overflow
        return max(
            abs(float(approx.coeffs[m])) * abs(scale) ** m * math.factorial(m) * (1.0 + 1e-12)
            for m in range(approx.degree + 1)
        )
    out = 0.0
    for m in range(approx.degree + 1):
        c = abs(float(approx.coeffs[m]))
        if c == 0.0 or (m and scale == 0.0):
            continue
        log_w = math.log(c) + math.lgamma(m + 1) + (m * math.log(abs(scale)) if m else 0.0)
        if log_w > 709.0:
            return math.inf
        out = max(out, math.exp(log_w) * (1.0 + 1e-12))
    return out
