"""The certified a-priori output bound of theory §1.4, with floating-point rounding added.

Model of the factored computation (what ``attention`` and ``tensor_attention`` do):

1. Keys are centred in the compute dtype (or in ``centring_dtype`` when the caller centred them
   in a narrower dtype and cast exactly): the scores the polynomial sees differ from the exact
   (centred) scores by at most ``Delta = u_c * R`` (one rounding per entry of ``k - kbar``),
   which multiplies every softmax weight by a factor in ``[e^-Delta, e^Delta]``. It is folded
   into the polynomial's relative error range: ``(1 + d) e^{+-Delta} - 1``.
2. Every product ``U1[i,a] U2[j,a]`` carries relative error ``gamma_{2g+2}`` (at most g
   multiplications per monomial on each side plus the weight).
3. ``M = sum_blocks U2_b^T V_b``: inner length ``block`` in the compute dtype, then float64
   across blocks, then one rounding to the compute dtype: ``gamma_{block+1}`` (+ float64 terms).
4. ``U1 @ M`` and ``U1 @ z``: inner length ``r``: ``gamma_r``.
   So ``|num~ - num| <= gamma_K S |V|`` and ``|den~ - den| <= gamma_K S`` with
   ``K = 2g + 2 + block + 1 + r`` and ``S = sum_j sum_a |U1[i,a] U2[j,a]| <= n_i sum_m |c_m| R^m``.
   ``den >= n_i e^{-R} (1 + dmin)``, so ``S / den <= rho := kappa / (1 + dmin)``.
5. V is centred per column (midrange ``c``), so ``|V - c| <= range / 2`` and ``|T - c| <= range/2``:
   ``|T~ - T| <= gamma_K rho range / (1 - gamma_K rho)``.
6. Adding ``c`` back, the division, and the cast to the output dtype: ``(2 u_c + u_out) max|V|``
   (``u_out = 0`` when the output dtype is the compute dtype).

Chunked float32 variant (what ``attention`` does when float32 certifies): the products of steps
3 and 4 are split into chunks along their inner dimension (``block`` = key chunk length,
``features`` = feature chunk length) whose partial results are summed in float64; the weights
``w_alpha`` may be folded into ``M`` in float64. Every term then passes through at most
``float64_terms`` float64 roundings as well (block sums, chunk sums, weights), covered by
``gamma_{K + float64_terms}(u_64)``. Gradual underflow (subnormal monomials of tiny inputs) is
outside the relative-error model: each underflowed product errs by at most the subnormal spacing
(2^-149 in float32) in absolute terms, against a denominator of at least
``n e^-R (1 + dmin) |w_0|``; callers keep inputs balanced (attention rescales q and k by powers
of two) so that this is far below ``1e-9`` of any bound and the final factor absorbs it.

Total: ``range * (t(dmin', dmax') + gamma_K rho / (1 - gamma_K rho)) + (2 u_c + u_out) max|V|``,
times ``1 + 1e-9`` for the float64 arithmetic of the bound itself. ``range`` is the largest
column range of V (of ``V1 ⊘ V2`` for tensor attention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._poly import Approximation, tv_factor

__all__ = ["BoundParts", "certified_bound", "gamma", "unit_roundoff"]

_U64 = 2.0**-53


def unit_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff u of a floating dtype (half the machine epsilon)."""
    return float(torch.finfo(dtype).eps) / 2.0


def gamma(k: int, u: float) -> float:
    """Higham's ``gamma_k = k u / (1 - k u)``; inf when ``k u >= 1``."""
    ku = k * u
    return math.inf if ku >= 1.0 else ku / (1.0 - ku)


@dataclass(frozen=True)
class BoundParts:
    polynomial: float  # t(dmin', dmax') * range: the approximation itself
    rounding: float  # everything floating point adds
    total: float

    def to_dict(self) -> dict[str, float]:
        return {"polynomial": self.polynomial, "rounding": self.rounding, "total": self.total}


def certified_bound(
    approx: Approximation,
    *,
    features: int,
    block: int,
    compute_dtype: torch.dtype,
    out_dtype: torch.dtype,
    value_range: float,
    value_absmax: float,
    float64_terms: int = 0,
    centring_dtype: torch.dtype | None = None,
) -> BoundParts:
    """Certified bound on ``max |output - exact attention|`` for the factored path (see module)."""
    u_c = unit_roundoff(compute_dtype)
    u_out = 0.0 if out_dtype == compute_dtype else unit_roundoff(out_dtype)
    if out_dtype == torch.float64 and compute_dtype == torch.float32:
        u_out = 0.0
    # keys centred in centring_dtype (default: the compute dtype), see step 1
    u_k = unit_roundoff(centring_dtype) if centring_dtype is not None else u_c
    delta_s = max(u_k, u_c) * approx.radius * 1.0001
    dmin = (1.0 + approx.dmin) * math.exp(-delta_s) - 1.0
    dmax = (1.0 + approx.dmax) * math.exp(delta_s) - 1.0
    poly = tv_factor(dmin, dmax) * value_range
    if dmin <= -1.0:
        return BoundParts(math.inf, math.inf, math.inf)
    k = 2 * approx.degree + 2 + block + 1 + features
    # float64 accumulation across blocks / chunks adds at most this
    g = gamma(k, u_c) + gamma(k + max(0, int(float64_terms)), _U64)
    rho = approx.kappa / (1.0 + dmin)
    if g * rho >= 1.0:
        return BoundParts(poly, math.inf, math.inf)
    rounding = value_range * g * rho / (1.0 - g * rho) + (2.0 * u_c + u_out) * value_absmax
    total = (poly + rounding) * (1.0 + 1e-9)
    return BoundParts(poly, rounding, total)
