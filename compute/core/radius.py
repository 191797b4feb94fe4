"""Certified score radii in O(n d) (docs/attention.md step 2, docs/tensor_attention.md "Radius").

All radii bound ``|scale| * sum_l |q_l| |k_l|`` (and so ``|s|``), which is also what the
floating-point rounding analysis needs. They are computed in float64 and inflated by a few ulps
so that they stay upper bounds of the exact quantities, also for float64 inputs at the ends of
the exponent range: a row's 2-norm whose squares may underflow (largest entry below 2^-480) is
replaced by ``sqrt(d)`` times its largest entry, a Hölder sum gets ``d`` times the smallest
subnormal (what its underflowing products may lose), and products of norms and the scale are
formed from mantissas and exponents (``mul_up``), so that a positive radius never rounds to 0
and an overflowing one is inf. For float32 data none of this changes a bit.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "INFLATE",
    "centre",
    "column_midrange",
    "guard_norms",
    "matrix_radius",
    "midrange",
    "mul_up",
    "radius_from",
    "tensor_radius",
    "tensor_radius_from",
]

INFLATE = _INFLATE = 1.0 + 1e-12  # (the compiled statistics repeat radius_from's usual case)
_TINY_NORM = 2.0**-480  # float64 rows below this may lose squares to underflow
_SUBNORMAL = 5e-324  # 2^-1074


def mul_up(*xs: np.ndarray) -> np.ndarray:
    """Elementwise product of non-negative float64 arrays of one shape without intermediate
    under- or overflow: the mantissas are multiplied (the same roundings as the plain product)
    and the exponents added; a positive product below the subnormal range becomes 2^-1074 instead of
    0, one beyond float64 inf. Equal bit for bit to the plain product wherever that neither
    under- nor overflows."""
    mant, expo = np.frexp(np.stack(xs))  # [k, ...] (the factors have one shape)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):  # inf * 0: handled below
        m = np.multiply.reduce(mant, axis=0)  # in order, as the plain product
        e = expo.sum(axis=0)
        if e.size and e.min() > -1000 and e.max() < 1000 and np.isfinite(m).all():
            return np.ldexp(m, e)  # the usual case: no range trouble
        out = np.ldexp(m, np.clip(e, -4000, 4000))
        out = np.where((out == 0.0) & (m > 0.0), _SUBNORMAL, out)
        # a zero factor makes the product 0 even against an overflowed (inf) one: the inf
        # stands for a finite number beyond float64
        return np.where((mant == 0.0).any(axis=0), 0.0, out)


def guard_norms(norm: np.ndarray, top: np.ndarray, d: int) -> np.ndarray:
    """Largest row 2-norm per slice, or ``sqrt(d)`` times the largest entry (an upper bound of
    every row's norm) where float64 squares may have underflowed (entries below 2^-480)."""
    with np.errstate(over="ignore"):  # (only tiny entries use the product)
        return np.where(top < _TINY_NORM, np.sqrt(d) * top * (1.0 + 2.0**-50), norm)


def radius_from(
    qn: np.ndarray,
    kn: np.ndarray,
    holder: np.ndarray,
    q_top: np.ndarray,
    k_top: np.ndarray,
    d: int,
    scale: float,
) -> float:
    """``|scale| min(Cauchy–Schwarz, Hölder)`` per slice, max over slices, inflated: from the
    largest row 2-norms ``qn, kn``, Hölder sums and largest entries ``q_top, k_top`` (``[L]``
    float64 each), with the guards of the module docstring."""
    if qn.size == 0:
        return 0.0
    hs = holder + d * _SUBNORMAL  # each product below the subnormal range loses < 2^-1075
    lo = min(float(q_top.min()), float(k_top.min()))
    hi = max(float(qn.max()), float(kn.max()), float(hs.max()))
    if lo > 2.0**-200 and hi < 2.0**200 and 2.0**-300 < abs(scale) < 2.0**300:
        r = np.minimum(qn * kn, hs) * abs(scale)  # the usual case: the same numbers, directly
    else:
        qn, kn = guard_norms(qn, q_top, d), guard_norms(kn, k_top, d)
        r = mul_up(np.minimum(mul_up(qn, kn), hs), np.full(hs.shape, abs(scale)))
    return float(r.max()) * _INFLATE


def midrange(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """``(hi + lo) / 2`` as ``hi / 2 + lo / 2``: the same number bit for bit (halving is exact
    and commutes with the one rounding of the sum), but the sum cannot overflow for entries
    near the largest finite number."""
    return hi * 0.5 + lo * 0.5


def column_midrange(x: torch.Tensor) -> torch.Tensor:
    """Per-column midrange over the sequence axis (dim -2), keepdim: ``[..., 1, d]``."""
    hi = x.max(dim=-2, keepdim=True).values  # (max/min .values: several times faster than
    lo = x.min(dim=-2, keepdim=True).values  # amax/amin over a strided axis on CPU)
    return midrange(hi, lo)


def centre(x: torch.Tensor) -> torch.Tensor:
    """``x - xbar`` with ``xbar`` the per-column midrange over the sequence axis (dim -2).

    Softmax is invariant to ``k -> k - kbar`` (docs/attention.md, step 1); the midrange
    minimises the largest entry, which is what the Hölder radius sees.
    """
    return x - column_midrange(x)


def matrix_radius(q: torch.Tensor, k: torch.Tensor, scale: float) -> float:
    """``min(Cauchy–Schwarz, Hölder)`` radius, per leading slice, then the max over slices.

    ``q: [..., n, d]``, ``k: [..., m, d]`` (already centred if wanted). Returns a float >= 0.
    """
    q64, k64 = q.double().abs(), k.double().abs()
    d = q.shape[-1]
    qn = q64.norm(dim=-1).amax(dim=-1)  # [...]
    kn = k64.norm(dim=-1).amax(dim=-1)
    m = k64.max(dim=-2).values  # [..., d]
    holder = (q64 * m.unsqueeze(-2)).sum(dim=-1).amax(dim=-1)  # [...]
    tops = [x.amax(dim=(-2, -1)) for x in (q64, k64)]
    qn_, kn_, hs_, qt_, kt_ = (t.reshape(-1).cpu().numpy() for t in (qn, kn, holder, *tops))
    return radius_from(qn_, kn_, hs_, qt_, kt_, d, scale)


def tensor_radius_from(two: np.ndarray, top: np.ndarray, d: int, scale: float) -> float:
    """R3 from per-slice largest row 2-norms ``two`` and largest entries ``top`` of q, k1, k2
    (``[L, 3]`` float64 each): the best of the three Hölder splittings (the inf-norm on one
    factor, 2-norms on the other two) per slice, the max over slices, inflated; with the guards
    of the module docstring where a product could under- or overflow."""
    if top.size == 0:
        return 0.0
    L = top.shape[0]
    if top.min() > 2.0**-200 and top.max() < 2.0**200 and 2.0**-300 < abs(scale) < 2.0**300:
        # the usual case: no product below can under- or overflow (the same numbers as mul_up)
        options = np.stack(
            [
                two[:, 0] * two[:, 1] * top[:, 2] * abs(scale),
                two[:, 0] * top[:, 1] * two[:, 2] * abs(scale),
                top[:, 0] * two[:, 1] * two[:, 2] * abs(scale),
            ]
        )  # [3, L]
    else:  # guarded norms, products formed from mantissas and exponents
        two = guard_norms(two, top, d)
        options = mul_up(
            np.stack([two[:, 0], two[:, 0], top[:, 0]]),
            np.stack([two[:, 1], top[:, 1], two[:, 1]]),
            np.stack([top[:, 2], two[:, 2], two[:, 2]]),
            np.full((3, L), abs(scale)),
        )
    return float(options.min(axis=0).max()) * _INFLATE


def tensor_radius(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, scale: float) -> float:
    """R3 (docs/tensor_attention.md, "Radius and rho"), per slice, max over slices.

    Bounds ``|scale| * sum_l |q_l k1_l k2_l|`` for every triple (i, j1, j2).
    """
    xs = [x.double().abs() for x in (q, k1, k2)]
    tops = [x.amax(dim=(-2, -1)).reshape(-1) for x in xs]  # [L] each
    twos = [x.norm(dim=-1).amax(dim=-1).reshape(-1) for x in xs]  # [L] each
    top = torch.stack(tops, dim=1).cpu().numpy()  # [L, 3]
    two = torch.stack(twos, dim=1).cpu().numpy()  # [L, 3]
    return tensor_radius_from(two, top, q.shape[-1], scale)
