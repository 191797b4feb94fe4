"""The certified a-priori bound of tensor attention's polynomial path, rounding included
(docs/tensor_attention.md, "Certified bound" and "The rounding model, step by step").

The bound is linear in the per-column value statistics, so the planner evaluates it for every
candidate (degree, dtype, chunk) from three cached coefficients (``rounding_coefficients``) and
``bound_parts``; ``tensor_rounding_bound`` is the same bound as one call.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from ..core.polynomials import Approximation
from ..core.rounding import U64, BoundParts, gamma, round_bound_up, subnormal_spacing, unit_roundoff

__all__ = ["bound_parts", "overflow_safe", "rounding_coefficients", "tensor_rounding_bound"]


def tensor_rounding_bound(
    approx: Approximation,
    *,
    features: int,
    n1: int,
    n2: int,
    compute_dtype: torch.dtype,
    out_dtype: torch.dtype,
    weight_max: float,
    entry_max: float,
    value_range: np.ndarray | torch.Tensor,
    value_absmax: np.ndarray | torch.Tensor,
    chunk: int,
    value_scale: np.ndarray | torch.Tensor | None = None,
) -> BoundParts:
    """Certified bound on ``max |output - exact tensor attention|`` of the polynomial path.

    ``value_range`` and ``value_absmax`` hold, per leading slice and value column (any shape,
    same shape), the range and the largest magnitude of ``v1[j1, k] * v2[j2, k]`` over all
    pairs; the bound is the max over their entries. ``features`` is ``r``; ``chunk`` the
    inner length ``c`` of the compute-dtype products; ``value_scale`` the normalisation factor
    ``2^(e1 + e2)`` per entry (0 for an all-zero column; default ``4 value_absmax``);
    ``weight_max >= max_a |w_a|`` and ``entry_max >= max(1, max |q'|, |k1'|, |k2'|)`` for the
    balanced inputs the path multiplies.

    The model, step by step (what each step of ``polynomial.poly_core`` and of the compiled
    kernel rounds) and the total are in docs/tensor_attention.md, "The rounding model, step by
    step"; ``rounding_coefficients`` evaluates it as ``ca Vabs + cs 2^(e1+e2) + c0`` per entry.
    """
    vr = _as_numpy(value_range)
    va = _as_numpy(value_absmax)
    vs = 4.0 * va if value_scale is None else _as_numpy(value_scale)
    coef = rounding_coefficients(
        approx,
        features=features,
        n1=n1,
        n2=n2,
        compute_dtype=compute_dtype,
        out_dtype=out_dtype,
        weight_max=weight_max,
        entry_max=entry_max,
        chunk=chunk,
    )
    return bound_parts(approx.t, coef, vr, np.stack([va, vs]))


def rounding_coefficients(
    approx: Approximation,
    *,
    features: int,
    n1: int,
    n2: int,
    compute_dtype: torch.dtype,
    out_dtype: torch.dtype,
    weight_max: float,
    entry_max: float,
    chunk: int,
) -> tuple[float, float, float] | None:
    """``(ca, cs, c0)``: per entry, rounding ``= ca Vabs + cs 2^(e1+e2) + c0``
    (``tensor_rounding_bound``).

    Expands ``E + cast (Vabs + E) + A0`` with ``E = (2 Gamma rho Vabs + 8 H' 2^(e1+e2)) / denom``.
    None when no rounding bound exists (``dmin <= -1``, non-finite ``t``, ``denom <= 0``).
    """
    if approx.dmin <= -1.0 or not math.isfinite(approx.t):
        return None
    return _rounding_coefficients_cached(
        approx.degree,
        approx.radius,
        approx.dmin,
        approx.kappa,
        features,
        n1,
        n2,
        compute_dtype,
        out_dtype,
        weight_max,
        entry_max,
        chunk,
    )


@lru_cache(maxsize=4096)
def _rounding_coefficients_cached(
    g: int,
    R: float,
    dmin: float,
    kappa: float,
    r: int,
    n1: int,
    n2: int,
    compute_dtype: torch.dtype,
    out_dtype: torch.dtype,
    weight_max: float,
    entry_max: float,
    c: int,
) -> tuple[float, float, float] | None:
    """``rounding_coefficients`` on the numbers it depends on (all discrete per shape: cached)."""
    u = unit_roundoff(compute_dtype)
    u_out = 0.0 if out_dtype == torch.float64 else unit_roundoff(out_dtype)
    k_c = 3 * max(g - 1, 0) + min(c, n1) + min(c, n2) + 1 + min(c, r)
    k_64 = -(-n1 // c) + -(-n2 // c) + -(-r // c) + (g + 4) + 5
    big_gamma = (1.0 + gamma(k_c, u)) * (1.0 + gamma(k_64, U64)) - 1.0
    rho = kappa / (1.0 + dmin)
    log_h = (
        math.log(2.0 * (3 * g + 13) * r)
        + math.log2(subnormal_spacing(compute_dtype)) * math.log(2.0)
        + math.log(max(weight_max, 1e-300))
        + 3 * g * math.log(max(entry_max, 1.0))
        + R
        - math.log1p(dmin)
    )
    h_rel = math.exp(log_h) if log_h < 700.0 else math.inf
    denom = 1.0 - big_gamma * rho - h_rel
    if not denom > 0.0:
        return None
    cast = (1.0 + U64) * (1.0 + u_out) - 1.0
    ca = (1.0 + cast) * (2.0 * big_gamma * rho / denom) + cast
    cs = (1.0 + cast) * (8.0 * h_rel / denom)
    sigma_out = 0.0 if out_dtype == torch.float64 else subnormal_spacing(out_dtype)
    c0 = subnormal_spacing(torch.float64) + sigma_out / 2.0  # step 8
    return ca, cs, c0


def bound_parts(
    t: float, coef: tuple[float, float, float] | None, vr: np.ndarray, vavs: np.ndarray
) -> BoundParts:
    """Max over entries of ``t range``, the rounding and their sum (times ``1 + 1e-9``).

    ``vr: [K]`` value ranges, ``vavs: [2, K]`` = ``[Vabs; 2^(e1+e2)]``.
    """
    if not math.isfinite(t):
        return BoundParts(math.inf, math.inf, math.inf)
    if vr.size == 0:
        return BoundParts(0.0, 0.0, 0.0)
    poly_k = t * vr
    if coef is None:
        return BoundParts(float(poly_k.max()), math.inf, math.inf)
    rounding_k = coef[0] * vavs[0] + coef[1] * vavs[1]  # + coef[2], a constant, added below
    total = round_bound_up(float((poly_k + rounding_k).max()) + coef[2])
    return BoundParts(float(poly_k.max()), float(rounding_k.max()) + coef[2], total)


def _as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().double().reshape(-1).cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def overflow_safe(
    *,
    degree: int,
    features: int,
    n1: int,
    n2: int,
    weight_max: float,
    entry_max: float,
    dtype: torch.dtype,
) -> bool:
    """A-priori: no intermediate of the polynomial path can overflow ``dtype``.

    With balanced inputs (``|x'| <= entry_max``) and normalised values (``|v'| <= 1``), every
    partial sum is at most ``2 r n1 n2 W entry_max^{3g}`` (features and ``A`` need less).
    """
    log_max = (
        math.log(2.0 * features * n1 * n2)
        + math.log(max(weight_max, 1.0))
        + 3.0 * degree * math.log(max(entry_max, 1.0))
    )
    return log_max < math.log(torch.finfo(dtype).max) - 1.0
