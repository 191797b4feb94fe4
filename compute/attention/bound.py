"""The certified a-priori bound of attention's polynomial path, rounding included.

``certified_bound`` models exactly what ``polynomial.polynomial_forward`` computes (centring,
balancing, value normalisation, chunked products with float64 partial sums, the division and
the casts); the model, step by step, and the total are in docs/attention.md, "The rounding
model, step by step" (steps 1-9 below refer to it). ``range`` is the largest column range of V.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from ..core.polynomials import Approximation, tv_factor
from ..core.rounding import U64, BoundParts, gamma, round_bound_up, subnormal_spacing, unit_roundoff

__all__ = ["certified_bound", "underflow_term"]


def _logsumexp(logs: list[float]) -> float:
    top = max(logs)
    if top == -math.inf:
        return -math.inf
    return top + math.log(sum(math.exp(x - top) for x in logs))


def underflow_term(
    approx: Approximation, *, dimension: int, entry_max: float, compute_dtype: torch.dtype
) -> float:
    """``H'`` of step 8: the gradual-underflow error of num and den relative
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
    g = gamma(k, u_c) + gamma(k + max(0, int(float64_terms)), U64)
    rho = approx.kappa / (1.0 + dmin)
    h = underflow_term(approx, dimension=dimension, entry_max=E, compute_dtype=compute_dtype)
    denom = 1.0 - g * rho - h
    if not denom > 0.0:
        return BoundParts(poly, math.inf, math.inf)
    rounding = (
        value_range * (g * rho + 5.0 * h) / denom + (2.0 * u_c + u_out) * value_absmax + absolute
    )
    return BoundParts(poly, rounding, round_bound_up(poly + rounding))
