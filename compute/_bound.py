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
``gamma_{K + float64_terms}(u_64)``.

Gradual underflow (the relative model above holds for normal numbers only; a product or a
down-cast whose result is subnormal errs by up to ``eta``, half the smallest subnormal of its
dtype, in absolute terms). ``attention`` rescales by powers of two so that these absolute errors
stay relative to the data: q and k are balanced per coordinate with the whole power of two of
the scale (``|q'|, |k'| <= E = 2 sqrt(R)``, scale' in [1/2, 1)), and every value column is
normalised to ``max |V - c| in [1/2, 1)`` (scaled back exactly in float64 at the end). Then:

7. Balancing may flush input entries: ``|q'~ - q'| <= 2 eta`` (likewise k'), which moves every
   score by at most ``Delta_b = 2 d sigma (E + sigma)`` (``sigma = 2 eta`` the subnormal spacing);
   folded into ``Delta`` of step 1.
8. A feature of degree m is built by ``m - 1`` products, each adding at most ``eta`` times the
   remaining factors: ``|e_f| <= 1.01 (g - 1) eta E^(g-1)``. Every term ``w_a U1 U2 vn`` then
   gains at most ``|w_a| E^|a| (3 e_f + 6 eta)`` (the two feature errors, the product with the
   normalised value, the normalisation, the weight product and the cast of ``w M``) and every
   feature at most ``eta ((E^g + 1)^2 + 2)`` (causal: the weight cast and product, the diagonal
   products; the cast of the key state and the query-side product). Summed over the keys and
   features, relative to ``den >= n e^-R (1 + dmin)``::

       H' = 1.01 e^R / (1 + dmin) [A (3 e_f + 6 eta) + r eta ((E^g + 1)^2 + 2)],
       A  = sum_m |c_m| (d E)^m  >=  sum_a |w_a| E^|a|   (|scale'| < 1, sum_|a|=m m!/a! = d^m)

   and the quotient moves by at most ``2 H' / (1 - gamma_K rho - H')`` in normalised units, at
   most ``2.5 value_range`` times that in output units (the normalisation ``2^e`` is chosen from
   the column's range: at most twice it, plus a few subnormal spacings, within the widened
   ``value_range``). Negligible (below 1e-30 of the bound) unless the degree is very high.
9. The result may itself be subnormal: the division and the scaling back (float64), the store
   in the compute dtype and the cast to the output dtype each add at most half the subnormal
   spacing of their dtype: ``sigma_64 + sigma_c / 2 + sigma_out / 2``, in absolute terms (for
   values near the underflow threshold this, not ``u max|V|``, is the cost of the output dtype).

Total: ``range * (t(dmin', dmax') + (gamma_K rho + 5 H') / (1 - gamma_K rho - H')) +
(2 u_c + u_out) max|V| + sigma_64 + (sigma_c + sigma_out) / 2``, times ``1 + 1e-9`` for the
float64 arithmetic of the bound itself. ``range`` is the largest column range of V (of
``V1 ⊘ V2`` for tensor attention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from ._poly import Approximation, tv_factor

__all__ = [
    "BoundParts",
    "certified_bound",
    "gamma",
    "subnormal_spacing",
    "underflow_term",
    "unit_roundoff",
]

_U64 = 2.0**-53


@lru_cache(maxsize=16)
def unit_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff u of a floating dtype (half the machine epsilon)."""
    return float(torch.finfo(dtype).eps) / 2.0


@lru_cache(maxsize=16)
def subnormal_spacing(dtype: torch.dtype) -> float:
    """The smallest positive subnormal of ``dtype`` (the spacing of its subnormal range).

    A power of two, exact in float64 for all four supported dtypes (2^-1074 for float64).
    """
    fi = torch.finfo(dtype)
    return float(fi.tiny) * float(fi.eps)


def _logsumexp(logs: list[float]) -> float:
    top = max(logs)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(x - top) for x in logs))


def underflow_term(
    approx: Approximation, *, dimension: int, entry_max: float, compute_dtype: torch.dtype
) -> float:
    """``H'`` of step 8 (module docstring): the gradual-underflow error of num and den relative
    to den, for balanced entries ``<= entry_max`` and normalised values; ``inf`` when it is not
    representable. Evaluated in logarithms (``eta`` of float64 is below the smallest float);
    cached on the polynomial's coefficients and radius)."""
    key = (approx.family, approx.degree, approx.radius, approx.dmin, dimension, entry_max)
    h = _UNDERFLOW.get((*key, compute_dtype))
    if h is None:
        coeffs = tuple(float(c) for c in approx.coeffs[: approx.degree + 1])
        h = _underflow(
            coeffs, approx.radius, float(approx.dmin), dimension, entry_max, compute_dtype
        )
        if len(_UNDERFLOW) > 8192:
            _UNDERFLOW.clear()
        _UNDERFLOW[(*key, compute_dtype)] = h
    return h


# a polynomial is determined by its family, degree and radius (and its certified dmin)
_UNDERFLOW: dict[tuple[object, ...], float] = {}


def _underflow(
    coeffs: tuple[float, ...],
    radius: float,
    dmin: float,
    d: int,
    entry_max: float,
    dtype: torch.dtype,
) -> float:
    g = len(coeffs) - 1
    E = max(1.0, entry_max)
    if not (math.isfinite(E) and dmin > -1.0):
        return math.inf
    log_eta = math.log(subnormal_spacing(dtype)) - math.log(2.0)
    log_ef = math.log(1.01 * (g - 1)) + log_eta + (g - 1) * math.log(E) if g >= 2 else -math.inf
    log_a = _logsumexp(
        [math.log(abs(c)) + m * math.log(d * E) for m, c in enumerate(coeffs) if c != 0.0]
    )
    log_r = math.log(math.comb(d + g, g))
    log_eg1 = 2.0 * _logsumexp([g * math.log(E), 0.0])  # (E^g + 1)^2
    inner = _logsumexp(
        [
            log_a + _logsumexp([math.log(3.0) + log_ef, math.log(6.0) + log_eta]),
            log_r + log_eta + _logsumexp([log_eg1, math.log(2.0)]),
        ]
    )
    log_h = math.log(1.01) + radius - math.log1p(dmin) + inner
    return math.exp(log_h) if log_h < 700.0 else math.inf


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


@lru_cache(maxsize=32)
def _dtype_terms(
    compute_dtype: torch.dtype, out_dtype: torch.dtype
) -> tuple[float, float, float, float]:
    """``(u_c, u_out, sigma_c, sigma_64 + (sigma_c + sigma_out) / 2)`` (steps 6 and 9); the cast
    to the output dtype is free when it is the compute dtype or a float32 -> float64 cast."""
    u_c, sigma_c = unit_roundoff(compute_dtype), subnormal_spacing(compute_dtype)
    exact_cast = out_dtype == compute_dtype or (
        out_dtype == torch.float64 and compute_dtype == torch.float32
    )
    u_out = 0.0 if exact_cast else unit_roundoff(out_dtype)
    sigma_out = 0.0 if exact_cast else subnormal_spacing(out_dtype)
    return u_c, u_out, sigma_c, subnormal_spacing(torch.float64) + (sigma_c + sigma_out) / 2.0


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
    dimension: int = 1,
    entry_max: float | None = None,
) -> BoundParts:
    """Certified bound on ``max |output - exact attention|`` for the factored path (see module).

    ``dimension`` is d (the number of variables of the monomials) and ``entry_max`` a bound on
    the balanced entries of q and k (default ``2 sqrt(R)``, what ``attention``'s balancing
    guarantees); both enter only the underflow terms of steps 7 and 8.
    """
    if not (math.isfinite(value_range) and math.isfinite(value_absmax)):
        return BoundParts(math.inf, math.inf, math.inf)  # values beyond float64's range
    u_c, u_out, sigma_c, absolute = _dtype_terms(compute_dtype, out_dtype)
    E = max(1.0, 2.0001 * math.sqrt(approx.radius)) if entry_max is None else entry_max
    # keys centred in centring_dtype (default: the compute dtype), see step 1; balancing, step 7
    u_k = unit_roundoff(centring_dtype) if centring_dtype is not None else u_c
    delta_b = 2.0 * dimension * sigma_c * (E + sigma_c)
    delta_s = max(u_k, u_c) * approx.radius * 1.0001 + delta_b
    dmin = (1.0 + approx.dmin) * math.exp(-delta_s) - 1.0
    dmax = (1.0 + approx.dmax) * math.exp(delta_s) - 1.0
    poly = tv_factor(dmin, dmax) * value_range
    if dmin <= -1.0:
        return BoundParts(math.inf, math.inf, math.inf)
    k = 2 * approx.degree + 2 + block + 1 + features
    # float64 accumulation across blocks / chunks adds at most this
    g = gamma(k, u_c) + gamma(k + max(0, int(float64_terms)), _U64)
    rho = approx.kappa / (1.0 + dmin)
    h = underflow_term(approx, dimension=dimension, entry_max=E, compute_dtype=compute_dtype)
    denom = 1.0 - g * rho - h
    if not denom > 0.0:
        return BoundParts(poly, math.inf, math.inf)
    rounding = (
        value_range * (g * rho + 5.0 * h) / denom + (2.0 * u_c + u_out) * value_absmax + absolute
    )
    # (1 + 1e-9) covers the bound's own float64 roundings; where the bound is itself near
    # float64's subnormal range (values near the underflow threshold) each of its few
    # operations may instead err by half a subnormal spacing: four spacings cover them
    total = (poly + rounding) * (1.0 + 1e-9)
    if total < 2.0**-1000:
        total += 4.0 * subnormal_spacing(torch.float64)
    return BoundParts(poly, rounding, total)
