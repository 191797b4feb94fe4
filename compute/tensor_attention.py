"""Tensor (triple-wise) attention, exact and polynomial, with certified bounds (theory §3).

Alman & Song's generalisation of softmax attention to triple-wise correlations. For one leading
(batch/head) slice, with ``q: [n, d]``, ``k1: [n1, d]``, ``k2: [n2, d]``, ``v1: [n1, dv]``,
``v2: [n2, dv]``::

    s[i, j1, j2] = scale * sum_l q[i, l] k1[j1, l] k2[j2, l]          # [n, n1, n2] scores
    w[i, j1, j2] = softmax over all pairs (j1, j2) of s[i, :, :]
    out[i, :]    = sum_{j1, j2} w[i, j1, j2] * (v1[j1, :] * v2[j2, :])  # [n, dv]

Two paths:

* exact: blocked over (query rows, j1) with a running max and sum per query row; every block
  is two matrix products, ``[(q * k1[j1]) | -shift] @ [k2 | 1]^T`` and ``W @ [v2 | 1]``, so
  memory stays bounded by one score block (never ``n * n1 * n2``). O(n n1 n2 (d + dv)).
* polynomial: ``exp`` replaced by a certified polynomial ``P`` (``compute._poly``); because
  monomials are multiplicative, ``P(s)`` factors through three feature maps with all weights on
  the query side, and the n x (n1 n2) score matrix is never formed::

      U1 = w * Q^alpha,  U2 = K1^alpha,  U3 = K2^alpha                   # [r, n], [r, n1], [r, n2]
      M  = (U2 @ V1) * (U3 @ V2)  ;  z = (U2 @ 1) * (U3 @ 1)             # [r, dv], [r]
      out = (U1^T M) / (U1^T z)                                           # [n, dv]

  O((n + n1 + n2) r dv). Its certified error bound (theory §1.4 with the column range of
  ``v1 ⊘ v2``, plus every floating-point rounding) is derived in ``tensor_rounding_bound``.

The keys are NOT centred: softmax over (j1, j2) is invariant only to adding a constant per
query row, and ``(k1 - a) ∘ (k2 - b)`` is not ``k1 ∘ k2`` minus such a constant, so the matrix
trick of theory §1.3 does not carry over. The radius is R3 of theory §3 on the raw inputs.

Polynomials come from ``_poly.certified_best``: Chebyshev, Taylor or a certified
relative-error minimax fit, whichever has the smallest ``t`` at each degree.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from . import _native
from ._bound import BoundParts, gamma, subnormal_spacing, unit_roundoff
from ._cost import best_time, predict_exact_attention, predict_polynomial_attention, rates
from ._device import default_device, float32_matmul_is_ieee
from ._features import GradedMonomials, feature_count, graded_monomials
from ._poly import Approximation, certified_best
from ._radius import _INFLATE as _RADIUS_INFLATE
from ._radius import guard_norms, mul_up
from ._validate import (
    check_count,
    check_dtype_name,
    check_eps,
    check_method,
    check_radius,
    check_same_batch,
    check_sample_rows,
    check_scale,
    check_tensor,
    compute_dtype_of,
)
from .errors import CertificationError, InvalidInputError, OutOfRangeError
from .result import AttentionResult, Plan

__all__ = ["plan_tensor_attention", "tensor_attention"]

_log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

MAX_DEGREE = 24  # highest polynomial degree the planner considers
# Above this radius no polynomial is even evaluated: already at R = 12 the degree-24 Chebyshev
# polynomial has dmin < -1 (it is not positive), so nothing of degree <= 24 could certify.
MAX_RADIUS = 40.0
MAX_FEATURES = 1 << 22  # larger feature maps are never planned (memory of one feature block)
# Inner lengths of the compute-dtype dot products of the polynomial path. The partial sums are
# added in float64, so the worst-case rounding (gamma_K) sees these, not n or r. float32 takes
# the longest chunk that still certifies eps (fewer, larger products); float64 one fixed length.
CHUNKS_FLOAT32 = (512, 256, 128, 64, 32, 16)
CHUNK_FLOAT64 = 4096
_EXACT_BLOCK = 1 << 20  # elements of one exact score block [B, bq, b1, n2] (4 MiB fp32)
_FEATURE_BLOCK = 1 << 23  # entries of one feature block [r, columns] (32 MiB fp32)
_U64 = 2.0**-53
_F64 = torch.float64
# log2 of the smallest subnormal: bounds the absolute error one multiplication (or down-cast)
# may add on underflow (half of it, with round-to-nearest). Kept as a log: 2^-1074 is the last
# representable float64 and a product with it would underflow.
_LOG2_ETA = {torch.float32: -149.0, torch.float64: -1074.0}
# exp(-limit) is far above the smallest normal number (so are its products with the values):
# below it the exact path may use a fixed per-row shift instead of a running max.
_SHIFT_LIMIT = {torch.float32: 40.0, torch.float64: 600.0}


# --------------------------------------------------------------------------------------------
# Certified bound
# --------------------------------------------------------------------------------------------


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

    Model of ``_poly_core`` (compute dtype with unit roundoff ``u``; ``u64 = 2^-53``):

    0. ``q, k1, k2`` are multiplied by powers of two (balancing) and ``v1, v2`` per column by
       powers of two (normalising to ``max |v'| in [1/2, 1)``): exact except on underflow
       (step 7); the output is scaled back exactly in float64.
    1. Features ``x^alpha`` of degree ``m`` are built by ``m - 1`` multiplications: relative
       error ``gamma_{g-1}`` on each of ``U1, U2, U3``; the weights ``w_a = c_m scale'^m
       mult_a`` are float64 (``g + 4`` roundings).
    2. ``A1 = U2 @ [V1 | 1]``: dot products of inner length ``c1 = min(c, n1)`` in the compute
       dtype (``gamma_{c1}``), then float64 across ``ceil(n1 / c)`` chunks. Same for ``A2``
       with ``n2``.
    3. ``Me = w * A1 * A2`` in float64 (2 roundings), cast to the compute dtype (1 rounding).
    4. ``U1^T Me``: inner length ``cr = min(c, r)`` in the compute dtype, float64 across
       ``ceil(r / c)`` chunks. (The float64 sums of steps 2 and 4 add at most one partial
       term more than the chunk count, for a remainder or a block boundary: ``+ 3`` below.)
       Every one of the ``r n1 n2`` terms ``w_a q^a k1^a k2^a v1 v2`` thus reaches ``num`` (and
       likewise ``den``, with ``v = 1``) multiplied by a product of ``Kc`` factors ``(1 + d)``
       with ``|d| <= u`` and ``K64`` with ``|d| <= u64``::

           Kc  = 3 max(g - 1, 0) + c1 + c2 + 1 + cr
           K64 = ceil(n1/c) + ceil(n2/c) + ceil(r/c) + (g + 4) + 5
           Gamma = (1 + gamma_Kc(u)) (1 + gamma_K64(u64)) - 1

       so ``|num~ - num| <= Gamma S Vabs`` and ``|den~ - den| <= Gamma S``, where
       ``S = sum_{j1,j2} sum_a |w_a (q k1 k2)^a| <= n1 n2 sum_m |c_m| R3^m`` because R3 bounds
       ``|scale| sum_l |q_l k1_l k2_l|`` (multinomial theorem on absolute values).
    5. ``den = sum P(s) >= n1 n2 e^{-R3} (1 + dmin)``, so ``S / den <= rho := kappa / (1 + dmin)``
       (``kappa = e^R3 sum |c_m| R3^m``). ``T' = num / den`` is a convex combination of the
       products ``v1 v2`` (``P > 0``), so ``|T'| <= Vabs`` (column max of ``|v1 ⊘ v2|``) and
       ``|num~/den~ - T'| <= (Gamma S Vabs + |T'| Gamma S) / den~ <= 2 Gamma rho Vabs /
       (1 - Gamma rho)``. Centring ``v1 ⊘ v2`` (which the Khatri–Rao structure does not allow
       inside ``M`` anyway) would not help: ``num - c den`` has the same worst case, so the
       rounding term scales with ``max |v1 ⊘ v2|``, not with half the range.
    6. The division (float64) and the cast to the output dtype: ``((1 + u64)(1 + u_out) - 1)
       (Vabs + E)``, ``u_out = 0`` for a float64 output.
    7. Gradual underflow: each multiplication or down-cast may add an absolute error of at most
       ``eta`` (half the smallest subnormal). A term passes through at most ``3g + 13`` of them
       (balancing in several exact steps, ``_mul_pow2_``, errs by at most ``2 eta`` per input)
       and every other factor is at most ``W entry_max^{3g}`` (balanced, normalised ``|v'| <= 1``),
       so ``num`` and ``den`` each gain at most ``n1 n2 H`` with
       ``H = 2 (3g + 13) r eta W entry_max^{3g}``; relative to ``den`` that is
       ``H' = H e^R3 / (1 + dmin)``; with ``|T'| <= 1`` in normalised units the quotient moves by
       at most ``2 H' / (1 - Gamma rho - H')``, in output units times the normalisation factor
       ``2^(e1 + e2)`` (counted as ``8 H' 2^(e1+e2)``; an all-zero column is computed exactly).
       Negligible (about 1e-40) unless the degree is very high.
    8. The result itself may be subnormal (values near the underflow threshold): the division
       and the scaling by ``2^(e1 + e2)`` in float64 add at most half the float64 subnormal
       spacing each, the cast to the output dtype at most half of its own (``sigma_out``, 0 for a
       float64 output): ``A0 = sigma_64 + sigma_out / 2`` in absolute terms, the part of the
       output dtype's cost that no relative term covers.

    Total, per slice and column::

        E     = (2 Gamma rho Vabs + 8 H' 2^(e1+e2)) / (1 - Gamma rho - H')
        bound = t(dmin, dmax) range + E + ((1 + u64)(1 + u_out) - 1) (Vabs + E) + A0

    times ``1 + 1e-9`` for the float64 arithmetic of the bound itself. There is no term for the
    scores: they are never rounded (the features of the exact inputs carry them exactly).
    """
    vr = _as_numpy(value_range)
    va = _as_numpy(value_absmax)
    vs = 4.0 * va if value_scale is None else _as_numpy(value_scale)
    coef = _rounding_coefficients(
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
    return _bound_parts(approx.t, coef, vr, np.stack([va, vs]))


def _rounding_coefficients(
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
    """``_rounding_coefficients`` on the numbers it depends on (all discrete per shape: cached)."""
    u = unit_roundoff(compute_dtype)
    u_out = 0.0 if out_dtype == torch.float64 else unit_roundoff(out_dtype)
    k_c = 3 * max(g - 1, 0) + min(c, n1) + min(c, n2) + 1 + min(c, r)
    k_64 = -(-n1 // c) + -(-n2 // c) + -(-r // c) + (g + 4) + 5
    big_gamma = (1.0 + gamma(k_c, u)) * (1.0 + gamma(k_64, _U64)) - 1.0
    rho = kappa / (1.0 + dmin)
    log_h = (
        math.log(2.0 * (3 * g + 13) * r)
        + _LOG2_ETA[compute_dtype] * math.log(2.0)
        + math.log(max(weight_max, 1e-300))
        + 3 * g * math.log(max(entry_max, 1.0))
        + R
        - math.log1p(dmin)
    )
    h_rel = math.exp(log_h) if log_h < 700.0 else math.inf
    denom = 1.0 - big_gamma * rho - h_rel
    if not denom > 0.0:
        return None
    cast = (1.0 + _U64) * (1.0 + u_out) - 1.0
    ca = (1.0 + cast) * (2.0 * big_gamma * rho / denom) + cast
    cs = (1.0 + cast) * (8.0 * h_rel / denom)
    sigma_out = 0.0 if out_dtype == torch.float64 else subnormal_spacing(out_dtype)
    c0 = subnormal_spacing(torch.float64) + sigma_out / 2.0  # step 8
    return ca, cs, c0


def _bound_parts(
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
    total = (float((poly_k + rounding_k).max()) + coef[2]) * (1.0 + 1e-9)
    if total < 2.0**-1000:  # the bound's own roundings where it is near float64's subnormals
        total += 4.0 * subnormal_spacing(_F64)
    return BoundParts(float(poly_k.max()), float(rounding_k.max()) + coef[2], total)


def _as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().double().reshape(-1).cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def _overflow_safe(
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


# --------------------------------------------------------------------------------------------
# Polynomials: the shared certified families plus a relative-error minimax fit
# --------------------------------------------------------------------------------------------


def _approximations(radius: float) -> Iterator[Approximation]:
    """Degree by degree (0..MAX_DEGREE, lazily), the certified polynomial with the smallest t.

    Chebyshev and Taylor (``compute._poly``) and, for degrees up to ``MINIMAX_MAX_DEGREE``, the
    minimax fit, all on ``[-R', R']`` with ``R' >= R`` the radius rounded up to the grid
    ``2^(k/32)``: valid on the smaller interval, cached across inputs, and conservative in every
    bound that uses the radius (``approx.radius`` is ``R'``). Nothing above ``MAX_RADIUS``.
    """
    if not radius <= MAX_RADIUS:
        return
    for g in range(MAX_DEGREE + 1):
        yield certified_best(radius, g)


# --------------------------------------------------------------------------------------------
# Exact path
# --------------------------------------------------------------------------------------------


def _exact_blocks(batch: int, n: int, n1: int, n2: int) -> tuple[int, int]:
    """Query rows and j1 keys per exact block so that ``batch * bq * b1 * n2`` stays bounded."""
    per_j1 = batch * n * n2
    if per_j1 <= _EXACT_BLOCK:
        return n, max(1, min(n1, _EXACT_BLOCK // per_j1))
    return max(1, min(n, _EXACT_BLOCK // max(1, batch * n2))), 1


def _exact_forward(
    q: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
    v1: torch.Tensor,
    v2: torch.Tensor,
    scale: float,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Exact tensor attention, blocked, in the dtype of the inputs.

    ``q: [B, n, d]``, ``k1: [B, n1, d]``, ``k2: [B, n2, d]``, ``v1: [B, n1, dv]``,
    ``v2: [B, n2, dv]`` -> ``[B, n, dv]``. For each block of query rows and each block of j1
    keys: scores ``[(q * scale) * k1[j1] | -shift] @ [k2 | 1]^T`` (one batched GEMM, the
    shift folded in), ``W = exp`` in place, then ``W @ [v2 | 1]`` (a second GEMM) gives both
    the weighted ``v2`` sums and the row sums; multiplying by ``v1[j1]`` and summing over the
    block's j1 accumulates the output. Memory: one block of at most ``_EXACT_BLOCK`` scores.

    Shift: when every score of a row lies in ``[-h_i, h_i]`` with ``h_i = |scale| sum_l
    |q_il| max|k1_l| max|k2_l|`` and ``2 h_i <= _SHIFT_LIMIT`` (so ``exp(-2 h_i)`` and its
    products with the values stay far above the smallest normal number), the fixed shift
    ``h_i`` is used (no max pass); otherwise a running max per row.
    """
    B, n, d = q.shape
    n1, n2, dv = k1.shape[1], k2.shape[1], v1.shape[-1]
    dtype, dev = q.dtype, q.device
    qs = q * scale  # [B, n, d]
    m1 = k1.abs().amax(dim=1)  # [B, d]
    m2 = k2.abs().amax(dim=1)  # [B, d]
    h = (qs.abs() * (m1 * m2).unsqueeze(1)).sum(-1)  # [B, n] bound on |s| per row
    fixed = bool(2.0 * float(h.max()) <= _SHIFT_LIMIT.get(dtype, 40.0)) if h.numel() else True
    ones2 = torch.ones(B, n2, 1, dtype=dtype, device=dev)
    k2e = torch.cat([k2, ones2], dim=-1).transpose(1, 2)  # [B, d+1, n2]
    v2e = torch.cat([v2, ones2], dim=-1)  # [B, n2, dv+1]
    bq, b1 = _exact_blocks(B, n, n1, n2)
    out = torch.empty(B, n, dv, dtype=dtype, device=dev)
    total = -(-n // bq) * -(-n1 // b1)
    done = 0
    for qs0 in range(0, n, bq):
        qb = qs[:, qs0 : qs0 + bq]  # [B, Lq, d]
        Lq = qb.shape[1]
        acc = torch.zeros(B, Lq, dv, dtype=dtype, device=dev)
        den = torch.zeros(B, Lq, dtype=dtype, device=dev)
        if fixed:
            shift = -h[:, qs0 : qs0 + Lq]  # [B, Lq]
        else:
            run_max = torch.full((B, Lq), -math.inf, dtype=dtype, device=dev)
        for j0 in range(0, n1, b1):
            kb = k1[:, j0 : j0 + b1]  # [B, L1, d]
            L1 = kb.shape[1]
            a = qb.unsqueeze(2) * kb.unsqueeze(1)  # [B, Lq, L1, d]
            if fixed:
                col = shift[:, :, None, None].expand(B, Lq, L1, 1)  # [B, Lq, L1, 1]
                a = torch.cat([a, col], dim=-1)  # [B, Lq, L1, d+1]
                s = torch.bmm(a.reshape(B, Lq * L1, d + 1), k2e)  # [B, Lq*L1, n2]
                s.exp_()
            else:
                s = torch.bmm(a.reshape(B, Lq * L1, d), k2e[:, :d])  # [B, Lq*L1, n2]
                blk_max = s.view(B, Lq, L1 * n2).amax(dim=-1)  # [B, Lq]
                new_max = torch.maximum(run_max, blk_max)  # [B, Lq]
                corr = torch.exp(run_max - new_max)  # [B, Lq]
                s.view(B, Lq, L1 * n2).sub_(new_max.unsqueeze(-1)).exp_()
                acc.mul_(corr.unsqueeze(-1))
                den.mul_(corr)
                run_max = new_max
            x = torch.bmm(s, v2e).view(B, Lq, L1, dv + 1)  # [B, Lq, L1, dv+1]
            acc += (x[..., :dv] * v1[:, None, j0 : j0 + L1, :]).sum(dim=2)  # [B, Lq, dv]
            den += x[..., dv].sum(dim=2)  # [B, Lq]
            done += 1
            if progress is not None:
                progress(done, total)
        out[:, qs0 : qs0 + Lq] = acc / den.unsqueeze(-1)
    return out


def _exact_is_safe(
    maxima: list[float],
    vmax: tuple[float, float],
    scale: float,
    d: int,
    n1: int,
    n2: int,
    dtype: torch.dtype,
) -> bool:
    """Whether ``_exact_forward`` on the raw inputs keeps every intermediate finite in ``dtype``:
    the scaled queries, their products with k1, the scores, the row shift (``|scale| d max|q|
    max|k1| max|k2|`` bounds them all, with each factor at least 1) and the value sums
    (``n1 n2 max|v1| max|v2|``, the weights being at most 1). The usual case by far."""
    big = float(torch.finfo(dtype).max) / 64.0
    qm, am, bm = maxima
    v1m, v2m = vmax
    scores = (abs(scale) + 1.0) * d * (qm + 1.0) * (am + 1.0) * (bm + 1.0)
    return scores < big and n1 * n2 * (v1m + 1.0) * (v2m + 1.0) < big


def _exact_wide(
    q: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
    v1: torch.Tensor,
    v2: torch.Tensor,
    scale: float,
    dtype: torch.dtype,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Exact tensor attention in ``dtype`` after exact power-of-two rescalings, as float64.

    q, k1, k2 are balanced (``_balance_shifts``, applied by ``_mul_pow2_``: every intermediate
    of ``_exact_forward`` is then at most ``64 d |scale| max|q| max|k1| max|k2|``), the value
    columns normalised to ``max |v'| in [1/2, 1)`` (``_normalise_into``), and the result scaled
    back by ``2^(e1 + e2)`` in float64 (``_times_pow2``). All scores zero (``scale == 0`` or an
    all-zero input) is computed as such, so huge entries on the other inputs cannot meet a zero.
    Raises ``OutOfRangeError`` when the balanced entries do not fit ``dtype``.
    """
    q, k1, k2, v1, v2 = (x.to(dtype) for x in (q, k1, k2, v1, v2))
    maxima = [float(x.abs().amax()) for x in (q, k1, k2)]
    shifts, scale_b, _ = _balance_shifts(maxima, scale, dtype)
    if scale == 0.0 or min(maxima) == 0.0:
        q, k1, k2, scale_b = torch.zeros_like(q), torch.zeros_like(k1), torch.zeros_like(k2), 0.0
    elif shifts is None:
        raise OutOfRangeError(
            "q",
            f"the scores scale * q k1 k2 are beyond the range of {dtype}; rescale q, k1 or k2, "
            "or pass a smaller scale",
        )
    else:
        q, k1, k2 = (x.clone() for x in (q, k1, k2))
        for x, sh in zip((q, k1, k2), shifts, strict=True):
            _mul_pow2_(x, sh)
    e1, e2 = _value_exponents(v1), _value_exponents(v2)  # [B, 1, dv]
    v1n, v2n = torch.empty_like(v1), torch.empty_like(v2)
    _normalise_into(v1n, v1, e1, direct=False)
    _normalise_into(v2n, v2, e2, direct=False)
    out = _exact_forward(q, k1, k2, v1n, v2n, scale_b, progress)
    return _times_pow2(out.double(), e1 + e2)


@lru_cache(maxsize=8)
def _dtype_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def _pow2_up(e: int) -> float:
    """``2^e`` as a float: inf beyond float64 (2^1024 bounds values near the largest finite)."""
    return math.ldexp(1.0, e) if e < 1024 else math.inf


def _run_exact(
    q: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
    v1: torch.Tensor,
    v2: torch.Tensor,
    scale: float,
    stats: _Stats,
    progress: Progress | None,
) -> torch.Tensor:
    """The exact path of ``tensor_attention``: the blocked kernel on the raw inputs when all its
    intermediates are safely finite (``_exact_is_safe``), else ``_exact_wide`` in the input's
    compute dtype when the balanced intermediates (``<= 64 d R3``) fit it, else in float64;
    ``OutOfRangeError`` when R3 is beyond float64 too. Returns the compute dtype or float64."""
    dtype = q.dtype
    d, n1, n2 = q.shape[-1], k1.shape[1], k2.shape[1]
    vmax = (_pow2_up(int(stats.e1.max())), _pow2_up(int(stats.e2.max())))  # >= max |v1|, |v2|
    if _exact_is_safe(stats.maxima, vmax, scale, d, n1, n2, dtype):
        return _exact_forward(q, k1, k2, v1, v2, scale, progress)
    # P = |scale| max|q| max|k1| max|k2| (in logarithms: it may exceed float64): balanced
    # entries are at most (16 P)^(1/3), every intermediate at most 64 d P (see _exact_wide)
    if scale == 0.0 or min(stats.maxima) == 0.0:
        log_p = -math.inf
    else:
        log_p = math.log(abs(scale)) + sum(math.log(m) for m in stats.maxima)
    log_need = max(
        math.log(64.0 * d) + log_p,
        math.log(8.0) + (2.0 / 3.0) * (math.log(16.0) + log_p),
        math.log(4.0 * n1 * n2),
    ) + math.log(3.0)
    for wide in (dtype, torch.float64):
        if log_need < math.log(float(torch.finfo(wide).max) / 64.0):
            return _exact_wide(q, k1, k2, v1, v2, scale, wide, progress)
    raise OutOfRangeError(
        "q",
        f"the scores scale * q k1 k2 reach about 1e{log_p / math.log(10.0):.0f} (|scale| "
        "max|q| max|k1| max|k2|), beyond the range of float64; rescale q, k1 or k2, or pass a "
        "smaller scale",
    )


def _check_output_range(out: torch.Tensor, top: float) -> None:
    """Raise ``OutOfRangeError`` when the rounded output is not finite: the products
    ``v1 ⊘ v2`` (up to ``top``) put the result beyond the largest number of its dtype."""
    if bool(torch.isfinite(out).all()):
        return
    fmax = float(torch.finfo(out.dtype).max)
    wider = "float64" if out.dtype == torch.float32 else "float32 or float64"
    if out.dtype == torch.float64:
        todo = "rescale v1 or v2 (the output is linear in each)"
    else:
        todo = f"pass {wider} inputs, or rescale v1 or v2 (the output is linear in each)"
    raise OutOfRangeError(
        "v1",
        f"the products v1 * v2 reach {top:.3g} and the output does not fit {out.dtype} "
        f"(largest {fmax:.3g}); {todo}",
    )


# --------------------------------------------------------------------------------------------
# Polynomial path
# --------------------------------------------------------------------------------------------


def _graded(d: int, g: int) -> GradedMonomials:
    """Monomials of degree <= g in d variables, graded order (``compute._features``, cached).

    Within degree m the block for variable ``v`` is ``x_v`` times a prefix of the degree m-1
    block, so every degree block is ``d`` broadcast products: no gathers, one read and one
    write per entry.
    """
    return graded_monomials(d, g)


def _graded_features_t(x_t: torch.Tensor, tables: GradedMonomials) -> torch.Tensor:
    """Monomials of ``x`` transposed: ``x_t: [d, N]`` -> ``[r, N]`` (row 0 is all ones).

    Unweighted; a monomial of degree m is the product of m entries, rounded m - 1 times.
    """
    out = torch.empty(tables.r, x_t.shape[1], dtype=x_t.dtype, device=x_t.device)  # [r, N]
    if tables.g >= 1:
        out[1 : 1 + tables.d].copy_(x_t)  # degree 1: the variables themselves, in order
    _fill_features(out, tables)
    return out


def _fill_features(out: torch.Tensor, tables: GradedMonomials) -> None:
    """Complete ``out: [r, N]`` whose degree-1 rows ``out[1 : 1 + d]`` already hold ``x^T``.

    Row 0 becomes all ones and every degree ``m >= 2`` block is built by ``tables.steps`` from
    the degree ``m - 1`` block and the degree-1 rows (the products of
    ``compute._features.graded_features_t``, reading ``x_v`` from row ``1 + v``).
    """
    out[0].fill_(1.0)
    first = tables.offsets[2] if tables.g >= 2 else tables.r  # degree-1 rows are given
    for dst, end, src, var in tables.steps:
        if dst >= first:
            torch.mul(out[src : src + (end - dst)], out[1 + var], out=out[dst:end])  # [cnt, N]


def _weights(approx: Approximation, tables: GradedMonomials, scale: float) -> torch.Tensor:
    """``w_a = c_|a| scale^|a| |a|! / a!`` in float64: ``[r]`` (all weights on the query side).

    Cached on (d, g, coefficients, scale): the returned tensor is shared, never modify it.
    """
    coeffs = tuple(float(c) for c in approx.coeffs[: approx.degree + 1])
    return _weights_cached(tables.d, approx.degree, coeffs, scale)


@lru_cache(maxsize=256)
def _weights_cached(d: int, g: int, coeffs: tuple[float, ...], scale: float) -> torch.Tensor:
    tables = graded_monomials(d, g)
    with np.errstate(over="ignore", invalid="ignore"):  # an unplanned huge scale: inf, no raise
        powers = np.power(float(scale), np.arange(len(coeffs), dtype=np.float64))
        coef = np.asarray(coeffs, dtype=np.float64) * powers  # [g+1]
    return torch.from_numpy(coef[tables.degree] * tables.multinomial)  # [r]


def _weight_max(approx: Approximation, scale: float) -> float:
    """``>= max_a |w_a|`` without building tables: ``|a|!/a! <= |a|!``; inf when that is beyond
    float64 (an unbalanced huge scale: such a polynomial is then never planned)."""
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


def _chunked_moments(f: torch.Tensor, ve: torch.Tensor, chunk: int, acc: torch.Tensor) -> None:
    """``acc += f @ ve`` with ``chunk`` keys per compute-dtype product, float64 across chunks.

    ``f: [r, m]`` features of m keys (unit column stride), ``ve: [m, dv+1]``, ``acc: [r, dv+1]``
    float64. The whole chunks go through one batched product.
    """
    m = f.shape[1]
    nc, rest = divmod(m, chunk)
    if nc > 1:
        fb = f[:, : nc * chunk].unfold(1, chunk, chunk).transpose(0, 1)  # [nc, r, chunk]
        vb = ve[: nc * chunk].view(nc, chunk, ve.shape[1])  # [nc, chunk, dv+1]
        acc += torch.bmm(fb, vb).sum(dim=0, dtype=torch.float64)  # [r, dv+1]
    elif nc == 1:
        acc += torch.mm(f[:, :chunk], ve[:chunk])
    if rest:
        acc += torch.mm(f[:, nc * chunk :], ve[nc * chunk :])  # [r, dv+1]


def _chunked_readout(f: torch.Tensor, me: torch.Tensor, chunk: int) -> torch.Tensor:
    """``me^T @ f`` with ``chunk`` features per compute-dtype product, float64 across chunks.

    ``f: [r, L]`` query features (unit column stride), ``me: [r, dv+1]`` -> ``[dv+1, L]``
    float64.
    """
    r, L = f.shape
    nc, rest = divmod(r, chunk)
    out = torch.zeros(me.shape[1], L, dtype=torch.float64, device=f.device)  # [dv+1, L]
    if nc > 0:
        fb = f[: nc * chunk].unfold(0, chunk, chunk).permute(0, 2, 1)  # [nc, chunk, L]
        mb = me[: nc * chunk].view(nc, chunk, me.shape[1]).transpose(1, 2)  # [nc, dv+1, chunk]
        out += torch.bmm(mb, fb).sum(dim=0, dtype=torch.float64)
    if rest:
        out += torch.mm(me[nc * chunk :].T, f[nc * chunk :])
    return out


def _polynomial_forward(
    q: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
    v1: torch.Tensor,
    v2: torch.Tensor,
    approx: Approximation,
    scale: float,
    *,
    chunk: int | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Polynomial-method tensor attention: ``[B, n, dv]`` in float64 (see ``_poly_core``).

    ``q: [B, n, d]``, ``k1: [B, n1, d]``, ``k2: [B, n2, d]``, ``v1: [B, n1, dv]``,
    ``v2: [B, n2, dv]``, all in the compute dtype; lays them out as ``_poly_core`` takes them.
    """
    n, n1 = q.shape[1], k1.shape[1]
    xt = torch.cat([q, k1, k2], dim=1).permute(2, 0, 1).contiguous()  # [d, B, n+n1+n2]
    ones = torch.ones(v1.shape[0], n1 + k2.shape[1], 1, dtype=v1.dtype, device=v1.device)
    ve = torch.cat([torch.cat([v1, v2], dim=1), ones], dim=2)  # [B, n1+n2, dv+1]
    return _poly_core(xt, ve, n, n1, approx, scale, chunk=chunk, progress=progress)


def _poly_core(
    xt: torch.Tensor,
    ve: torch.Tensor,
    n: int,
    n1: int,
    approx: Approximation,
    scale: float,
    *,
    chunk: int | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Polynomial-method tensor attention: ``[B, n, dv]`` in float64 (see the module docstring).

    ``xt: [d, B, n+n1+n2]`` holds ``[q | k1 | k2]`` transposed and ``ve: [B, n1+n2, dv+1]``
    holds ``[v1; v2 | 1]``, both in the compute dtype; ``approx`` is the polynomial ``P`` for
    ``exp`` and ``scale`` multiplies the trilinear form. Per slice (features of q, k1 and k2
    built together when they fit in one block of ``_FEATURE_BLOCK`` entries)::

        A1 = U2 @ [V1 | 1]        # [r, dv+1]  ``chunk`` keys per product, float64 across
        A2 = U3 @ [V2 | 1]        # [r, dv+1]
        Me = w * A1 * A2          # [r, dv+1]  = [M | z] in float64, cast to the compute dtype
        o  = U1^T @ Me            # [n, dv+1]  ``chunk`` features per product, float64 across
        T  = o[:, :dv] / o[:, dv] # [n, dv]

    The rounding of exactly these steps is what ``tensor_rounding_bound`` certifies. (In one
    block the feature rows are padded with zero rows to a multiple of ``chunk``, so that all
    chunks of the readout are one batched product: zero terms add no rounding.)
    """
    d, B, N = xt.shape
    n2, e = N - n - n1, ve.shape[-1]
    dv = e - 1
    dt, dev = xt.dtype, xt.device
    c = (CHUNK_FLOAT64 if dt == torch.float64 else CHUNKS_FLOAT32[-1]) if chunk is None else chunk
    tables = _graded(d, approx.degree)
    r = tables.r
    w = _weights(approx, tables, scale).to(dev)  # [r] float64
    r_pad = r if r <= c else -(-r // c) * c  # readout rows: whole chunks
    one_block = r_pad * N <= _FEATURE_BLOCK
    kb = max(c, (_FEATURE_BLOCK // r) // c * c)  # keys per feature block (a multiple of c)
    qb = max(1, _FEATURE_BLOCK // r)  # queries per feature block
    per_slice = 2 if one_block else -(-n1 // kb) + -(-n2 // kb) + -(-n // qb)
    total, done = B * per_slice, 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    out = torch.empty(B, n, dv, dtype=torch.float64, device=dev)
    fused = one_block and n1 % c == 0 and n2 % c == 0  # both moments in one batched product
    me_pad = torch.zeros(r_pad, e, dtype=dt, device=dev) if one_block else None
    for b in range(B):
        ve1, ve2 = ve[b, :n1], ve[b, n1:]  # [n1, dv+1], [n2, dv+1]
        f_all: torch.Tensor | None = None
        if one_block:
            f_all = torch.empty(r_pad, N, dtype=dt, device=dev)  # [r_pad, n+n1+n2]
            if tables.g >= 1:  # degree 1: the variables themselves
                f_all[1 : 1 + d].copy_(xt[:, b])
            _fill_features(f_all, tables)
            if r_pad > r:
                f_all[r:, :n].zero_()  # padding rows of the queries' readout
        if fused:
            assert f_all is not None
            nc1, nc = n1 // c, (n1 + n2) // c
            fb = f_all[:r, n:].unfold(1, c, c).transpose(0, 1)  # [nc, r, c]
            prods = torch.bmm(fb, ve[b].view(nc, c, e))  # [nc, r, dv+1]: one product per chunk
            if 2 * nc1 == nc:  # n1 == n2: both sums over chunks in one float64 reduction
                a1, a2 = prods.view(2, nc1, r, e).sum(dim=1, dtype=torch.float64)
            else:
                a1 = prods[:nc1].sum(dim=0, dtype=torch.float64)  # [r, dv+1] float64
                a2 = prods[nc1:].sum(dim=0, dtype=torch.float64)  # [r, dv+1]
            tick()
        elif f_all is not None:
            a1 = torch.zeros(r, e, dtype=torch.float64, device=dev)  # [r, dv+1]
            a2 = torch.zeros(r, e, dtype=torch.float64, device=dev)  # [r, dv+1]
            _chunked_moments(f_all[:r, n : n + n1], ve1, c, a1)
            _chunked_moments(f_all[:r, n + n1 :], ve2, c, a2)
            tick()
        else:
            a1 = torch.zeros(r, e, dtype=torch.float64, device=dev)  # [r, dv+1]
            a2 = torch.zeros(r, e, dtype=torch.float64, device=dev)  # [r, dv+1]
            for lo, hi, vk, acc in ((n, n + n1, ve1, a1), (n + n1, N, ve2, a2)):
                for s in range(lo, hi, kb):
                    f = _graded_features_t(xt[:, b, s : min(s + kb, hi)].contiguous(), tables)
                    _chunked_moments(f, vk[s - lo : s - lo + kb], c, acc)  # f: [r, L]
                    tick()
        me64 = w[:, None] * (a1 * a2)  # [r, dv+1] float64: [M | z]
        if f_all is not None and me_pad is not None:
            me_pad[:r].copy_(me64)  # cast to the compute dtype; rows >= r stay zero
            if r_pad == r:
                o = torch.mm(me_pad.T, f_all[:, :n]).double()  # [dv+1, n]: one chunk
            else:
                ncr = r_pad // c
                mb = me_pad.view(ncr, c, e).transpose(1, 2)  # [ncr, dv+1, c]
                fq = f_all[:, :n].view(ncr, c, n)  # [ncr, c, n]
                o = torch.bmm(mb, fq).sum(dim=0, dtype=torch.float64)  # [dv+1, n]
            out[b] = (o[:dv] / o[dv:]).T
            tick()
            continue
        me = me64.to(dt)  # [r, dv+1]
        for s in range(0, n, qb):
            fq = _graded_features_t(xt[:, b, s : min(s + qb, n)].contiguous(), tables)  # [r, L]
            o = _chunked_readout(fq, me, c)  # [dv+1, L] float64
            out[b, s : s + fq.shape[1]] = (o[:dv] / o[dv:]).T
            tick()
    return out  # [B, n, dv] float64


# Use the compiled kernel (compute._native) for the statistics and for the float32 polynomial
# path on the CPU when it builds; tests turn this off to exercise the PyTorch route, which
# follows the same rounding model.
NATIVE = True


def _native_stats_ok(*ts: torch.Tensor) -> bool:
    return NATIVE and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in ts)


def _native_ok(dt: torch.dtype, dev: torch.device) -> bool:
    return NATIVE and dt == torch.float32 and dev.type == "cpu"


@lru_cache(maxsize=64)
def _native_steps(d: int, g: int) -> tuple[torch.Tensor, int, int]:
    """Every graded step (degree 1 included) as int32 ``[nsteps, 4]`` (dst, end, src, var),
    the number of steps below the top degree and the first row of the top degree."""
    tables = graded_monomials(d, g)
    steps = tables.steps
    top = tables.offsets[g] if g >= 1 else 1
    nlow = sum(1 for dst, _, _, _ in steps if dst < top)
    arr = torch.tensor(steps if steps else [[0, 0, 0, 0]], dtype=torch.int32)
    return arr, nlow, top


_CHECKED: dict[str, bool] = {}


def _kernel() -> _native.TensorPoly | None:
    """The compiled kernel once it has passed its self-test in this process, else None."""
    kern = _native.tensor_poly()
    if kern is None:
        return None
    if "ok" not in _CHECKED:
        _CHECKED["ok"] = _self_test(kern)
        if not _CHECKED["ok"]:
            _log.warning("compiled tensor-attention kernel failed its self-test: not used")
    return kern if _CHECKED["ok"] else None


def kernel_status() -> str:
    """One line for logs: whether float32 CPU calls run the compiled kernel, or why not.

    Builds (or loads) the kernel, runs its self-test and calibrates its rate now, so that the
    first call does not (the worker calls this at start-up).
    """
    if not NATIVE:
        return "PyTorch route: the compiled kernel is turned off"
    if _kernel() is None:
        if _native.tensor_poly() is None:
            return _native.status()
        return "PyTorch route: the compiled kernel failed its self-test"
    _native_rate()
    return _native.status()


def _probe(
    kern: _native.TensorPoly, shape: tuple[int, int, int, int, int, int], g: int, chunk: int
) -> tuple[tuple[torch.Tensor, ...], Callable[[torch.dtype], torch.Tensor]]:
    """Fixed random float32 inputs of ``shape = (B, n, n1, n2, d, dv)`` and a function running
    the whole compiled path on them (statistics and ``_run_native``, unit exponents, no
    balancing, scale 0.5) with a degree-``g`` polynomial and float32 chunks of ``chunk``."""
    B, n, n1, n2, d, dv = shape
    gen = torch.Generator().manual_seed(20261128)
    q, k1, k2 = (0.5 * torch.randn(B, m, d, generator=gen) for m in (n, n1, n2))
    v1, v2 = (torch.randn(B, m, dv, generator=gen) for m in (n1, n2))
    choice = _Choice(
        certified_best(1.0, g), torch.float32, feature_count(d, g), chunk, BoundParts(0, 0, 0), 0
    )
    zero = torch.zeros(B, 1, dv, dtype=torch.int64)  # exponents: no normalisation
    none = np.zeros(B * dv)

    def run(out_dtype: torch.dtype) -> torch.Tensor:
        xt, _ = _reductions_native(kern, q, k1, k2, v1, v2)
        stats = _Stats(1.0, [1.0, 1.0, 1.0], none, none, none, zero, zero, xt)
        return _run_native(kern, stats, None, v1, v2, n, n1, choice, 0.5, out_dtype, None)

    return (q, k1, k2, v1, v2), run


def _self_test(kern: _native.TensorPoly) -> bool:
    """The compiled statistics and polynomial path against the PyTorch route, once per process.

    A small fixed problem (two slices, unequal lengths, chunk 16: several lane segments): the
    transposed inputs must be identical, the reductions equal to 1e-12, and the outputs of the
    same degree-3 polynomial equal to float32 rounding. Guards against a compiler or CPU that
    builds the library but computes something else.
    """
    try:
        n, n1, chunk = 37, 450, 16
        (q, k1, k2, v1, v2), run = _probe(kern, (2, n, n1, 200, 3, 2), 3, chunk)
        xt_c, host_c = _reductions_native(kern, q, k1, k2, v1, v2)
        xt_t, host_t = _reductions_torch(q, k1, k2, v1, v2)
        if not torch.equal(xt_c, xt_t) or not np.allclose(host_c, host_t, rtol=1e-12, atol=0.0):
            return False
        ones = torch.ones(v1.shape[0], v1.shape[1] + v2.shape[1], 1)
        ve = torch.cat([torch.cat([v1, v2], dim=1), ones], dim=2)  # [B, n1+n2, dv+1]
        approx = certified_best(1.0, 3)
        ref = _poly_core(xt_t, ve, n, n1, approx, 0.5, chunk=chunk)  # [B, n, dv] float64
        got = run(torch.float64)
        return bool((got - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-12)
    except (ValueError, MemoryError, RuntimeError):
        return False


def _native_run_ok(
    choice: _Choice, xt: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor
) -> _native.TensorPoly | None:
    """The compiled kernel when it can run the whole polynomial path of this call, else None."""
    ok = _native_ok(choice.dtype, xt.device)
    if not ok or not all(t.dtype == torch.float32 for t in (xt, v1, v2)):
        return None
    return _kernel()


def _run_native(
    kern: _native.TensorPoly,
    stats: _Stats,
    shifts: list[int] | None,
    v1: torch.Tensor,
    v2: torch.Tensor,
    n: int,
    n1: int,
    choice: _Choice,
    scale: float,
    out_dtype: torch.dtype,
    progress: Progress | None,
) -> torch.Tensor:
    """The polynomial path after planning in compiled code (``ta_poly_run``), slice by slice.

    The same steps as the PyTorch route, with the same roundings: balancing ``xt`` by the
    powers of two ``shifts`` (in place), normalising the value columns by ``2^-e``, the fused
    core (every step of ``_poly_core``, with each block of features kept in cache instead of
    the ``[r, n + n1 + n2]`` feature matrix; float32 dot products of depth at most ``chunk``,
    float64 across them: see ``compute/_native/tensor_poly.c``) and the exact rescaling by
    ``2^(e1 + e2)`` in float64, rounded once to a float32 output (other output dtypes are cast
    from float64 by torch). ``tensor_rounding_bound`` covers both routes.
    """
    xt = stats.xt.contiguous()  # [d, B, N] float32, balanced in place below
    d, B, N = xt.shape
    if shifts is not None and not -120 <= min(shifts) <= max(shifts) <= 120:
        # the kernel applies one normal float32 factor per input: larger shifts (subnormal or
        # huge inputs with a compensating scale) are applied here, in exact steps
        n2 = N - n - n1
        spans = ((0, n), (n, n + n1), (n + n1, n + n1 + n2))
        for (lo, hi), big in zip(spans, shifts, strict=True):
            _mul_pow2_(xt[:, :, lo:hi], big)
        shifts = None
    v1, v2 = v1.contiguous(), v2.contiguous()  # [B, n1, dv], [B, n2, dv]
    e1, e2 = stats.e1.contiguous(), stats.e2.contiguous()  # [B, 1, dv] int64
    dv = v1.shape[-1]
    tables = _graded(d, choice.approx.degree)
    steps, nlow, top = _native_steps(d, tables.g)
    w = _weights(choice.approx, tables, scale).contiguous()  # [r] float64
    sh = None if shifts is None else np.asarray(shifts, dtype=np.int32)
    f32 = out_dtype == torch.float32
    out = torch.empty(B, n, dv, dtype=torch.float32 if f32 else torch.float64)
    for b in range(B):
        kern.run(
            xt.data_ptr(),
            B,
            n,
            n1,
            N - n - n1,
            d,
            None if sh is None else sh.ctypes.data,
            v1.data_ptr(),
            v2.data_ptr(),
            e1.data_ptr(),
            e2.data_ptr(),
            dv,
            steps.data_ptr(),
            len(tables.steps),
            nlow,
            top,
            tables.r,
            w.data_ptr(),
            choice.chunk,
            out.data_ptr() if f32 else None,
            None if f32 else out.data_ptr(),
            b,
            b + 1,
        )
        if progress is not None:
            progress(b + 1, B)
    return out if f32 else out.to(out_dtype)


# --------------------------------------------------------------------------------------------
# Input preparation: balancing and value normalisation (exact scalings by powers of two)
# --------------------------------------------------------------------------------------------


def _balance_shifts(
    maxima: list[float], scale: float, dtype: torch.dtype
) -> tuple[list[int] | None, float, float]:
    """Powers of two for ``q, k1, k2`` that make their largest entries equal (``< 2^t``).

    Scores are unchanged (the product of the three factors is folded into ``scale'``) and, with
    ``|scale| max|q| max|k1| max|k2| <= R3``, ``2^t <= (16 R3)^(1/3)`` and ``|scale'| in
    [1/2, 4)``: features of degree g stay below ``entry_max^g``. Returns
    ``(shifts, scale', entry_max)`` with ``entry_max >= max(1, every balanced |entry|)``;
    ``shifts`` is None (inputs left as they are, ``scale' = scale``) when an input is all
    zeros, ``scale`` is 0, or the balanced entries ``2^t`` would not fit ``dtype`` (scores far
    beyond its range: nothing can be planned there). Shifts of any size are applied exactly by
    ``_mul_pow2_`` (several normal factors where one would leave the dtype's range).
    """
    plain = max(1.0, *maxima)
    if scale == 0.0 or min(maxima) == 0.0:
        return None, scale, plain
    exps = [math.frexp(m)[1] for m in maxima]  # m = f 2^e, f in [1/2, 1)
    big = math.frexp(abs(scale))[1] + sum(exps)
    t = big // 3
    if t >= math.frexp(float(torch.finfo(dtype).max))[1] - 2:
        return None, scale, plain
    shifts = [t - e for e in exps]
    return shifts, math.ldexp(scale, -sum(shifts)), max(1.0, math.ldexp(1.0, t))


# powers of two one multiplication applies in each dtype (normal numbers, with margin)
_POW2_STEP = {torch.float32: 120, torch.float64: 1000}


def _mul_pow2_(x: torch.Tensor, sh: int) -> None:
    """``x *= 2^sh`` in place, in steps whose factors are normal numbers of ``x.dtype``: exact
    but for underflow, where each step rounds once (at most twice the subnormal spacing in all
    when scaling down, the later steps shrinking the earlier errors; nothing underflows when
    scaling up). One step, the same multiplication as before, whenever it fits."""
    lim = _POW2_STEP.get(x.dtype, 120)
    while sh != 0:
        step = max(-lim, min(lim, sh))
        x.mul_(2.0**step)
        sh -= step


def _value_exponents(v: torch.Tensor) -> torch.Tensor:
    """Per slice and column, ``e`` with ``max |v| in [2^(e-1), 2^e)``.

    ``v: [B, m, dv]`` -> ``[B, 1, dv]`` int64; an all-zero column gets 0.
    """
    _, e = torch.frexp(v.abs().amax(dim=1, keepdim=True).double())  # [B, 1, dv]
    return e.to(torch.int64)


def _times_pow2(x: torch.Tensor, e: torch.Tensor, *, direct: bool = False) -> torch.Tensor:
    """``x * 2^e`` as two multiplications by normal powers of two (exact but for underflow).

    Any exponent of a float's range splits into two halves whose powers of two are normal
    numbers, so neither factor over- or underflows. ``direct=True`` (the caller guarantees
    ``|e| <= 1000``, as for exponents of float32 data and their sums) multiplies once in
    float64 and rounds once to ``x.dtype``: the same single rounding, fewer operations.
    """
    if direct:
        # 2^e is a normal float64 and x 2^e exact in float64 but for underflow: one rounding
        return (x.double() * torch.exp2(e.double())).to(x.dtype)
    half = torch.div(e, 2, rounding_mode="floor")
    return x * torch.exp2(half.to(x.dtype)) * torch.exp2((e - half).to(x.dtype))


def _normalise_into(out: torch.Tensor, v: torch.Tensor, e: torch.Tensor, *, direct: bool) -> None:
    """``out[...] = v * 2^-e`` rounded once to ``out.dtype`` (as ``_times_pow2``).

    ``v: [B, m, dv]``, ``e: [B, 1, dv]`` int64. When every ``2^-e`` is a normal number of
    ``out.dtype`` (the usual case) this is one multiplication written in place; a product by a
    power of two is exact but for underflow, where it rounds once, like the float64 route.
    """
    lim = 125 if out.dtype == torch.float32 else 1021
    if bool((e.abs() <= lim).all()):
        torch.mul(v, torch.exp2(-e.to(out.dtype)), out=out)
    else:
        out.copy_(_times_pow2(v.to(out.dtype), -e, direct=direct))


def _value_stats(v1: torch.Tensor, v2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Range and largest magnitude of ``v1[j1, k] v2[j2, k]`` over all pairs: ``[B, dv]`` each.

    The extremes of a product over a product set are among the four products of extremes, so
    this is O(n dv); computed in float64 and inflated by a few ulps to stay an upper bound.
    """
    a, b = v1.double(), v2.double()
    hi1, lo1 = a.amax(dim=1), a.amin(dim=1)  # [B, dv]
    hi2, lo2 = b.amax(dim=1), b.amin(dim=1)  # [B, dv]
    corners = torch.stack([hi1 * hi2, hi1 * lo2, lo1 * hi2, lo1 * lo2])  # [4, B, dv]
    top, bottom = corners.amax(dim=0), corners.amin(dim=0)
    infl = 4.0 * _U64
    value_range = (top - bottom) * (1.0 + infl) + (top.abs() + bottom.abs()) * infl
    value_absmax = corners.abs().amax(dim=0) * (1.0 + infl)
    return value_range, value_absmax


@dataclass(frozen=True)
class _Stats:
    """The data-dependent numbers of one call (see ``_statistics``)."""

    radius: float  # R3, as ``compute._radius.tensor_radius``
    maxima: list[float]  # max |q|, max |k1|, max |k2| (over every slice)
    value_range: np.ndarray  # [B*dv] float64
    value_absmax: np.ndarray  # [B*dv] float64
    value_scale: np.ndarray  # [B*dv] float64: 2^(e1+e2), 0 for all-zero columns
    e1: torch.Tensor  # [B, 1, dv] int64: max |v1| in [2^(e1-1), 2^e1) per column
    e2: torch.Tensor  # [B, 1, dv] int64
    xt: torch.Tensor  # [d, B, n+n1+n2]: [q | k1 | k2] transposed, in the input dtype


_NAMES = ("q", "k1", "k2", "v1", "v2")


def _reductions_torch(
    q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor
) -> tuple[torch.Tensor, np.ndarray]:
    """``xt: [d, B, n+n1+n2]`` and the ``6 B + 4 B dv`` reductions of ``_statistics`` (torch)."""
    B, n, _ = q.shape
    n1, n2 = k1.shape[1], k2.shape[1]
    xt = torch.cat([q, k1, k2], dim=1).permute(2, 0, 1).contiguous()  # [d, B, n+n1+n2]
    sq = xt.double().square().sum(dim=0)  # [B, n+n1+n2] squared row 2-norms
    peaks = xt.abs().amax(dim=0).double()  # [B, n+n1+n2], exact
    row = torch.stack([sq, peaks], dim=1)  # [B, 2, n+n1+n2]
    if n == n1 == n2:
        seg = row.view(B, 2, 3, n).amax(dim=-1)  # [B, 2, 3]: (|.|_2^2, |.|_inf) of q, k1, k2
    else:
        seg = torch.stack(
            [row[..., :n].amax(-1), row[..., n : n + n1].amax(-1), row[..., n + n1 :].amax(-1)],
            dim=-1,
        )  # [B, 2, 3]
    lo1, hi1 = torch.aminmax(v1, dim=1)  # [B, dv]
    lo2, hi2 = torch.aminmax(v2, dim=1)  # [B, dv]
    ext = torch.stack([hi1, lo1, hi2, lo2]).double()  # [4, B, dv], exact
    host = torch.cat([seg.reshape(-1), ext.reshape(-1)]).cpu().numpy()  # the one host sync
    return xt, host


def _reductions_native(
    kern: _native.TensorPoly,
    q: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
    v1: torch.Tensor,
    v2: torch.Tensor,
) -> tuple[torch.Tensor, np.ndarray]:
    """The same as ``_reductions_torch`` in one pass of ``ta_stats`` (float32 on the CPU)."""
    B, n, d = q.shape
    n1, n2, dv = k1.shape[1], k2.shape[1], v1.shape[-1]
    ins = [x.contiguous() for x in (q, k1, k2, v1, v2)]
    xt = torch.empty(d, B, n + n1 + n2, dtype=q.dtype)  # [d, B, n+n1+n2]
    host = np.empty(6 * B + 4 * B * dv, dtype=np.float64)  # [seg [B, 2, 3] | ext [4, B, dv]]
    kern.stats(
        *(x.data_ptr() for x in ins),
        B,
        n,
        n1,
        n2,
        d,
        dv,
        xt.data_ptr(),
        host.ctypes.data,
        host.ctypes.data + 6 * B * host.itemsize,
    )
    return xt, host


def _statistics(
    q: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
    v1: torch.Tensor,
    v2: torch.Tensor,
    scale: float,
) -> _Stats:
    """Finiteness, R3, the balancing maxima and the value statistics from one host sync.

    ``q: [B, n, d]``, ``k1: [B, n1, d]``, ``k2: [B, n2, d]``, ``v1: [B, n1, dv]``,
    ``v2: [B, n2, dv]``, all in one dtype. On the device: ``[q; k1; k2]`` is transposed once
    to ``xt: [d, B, n+n1+n2]`` (returned: the polynomial path's degree-1 features), so every
    row's squared 2-norm (float64; squares of float32 entries are exact there) and largest
    magnitude are element-wise reductions over ``d`` rows, reduced per slice and tensor to
    ``[B, 2, 3]``; one ``aminmax`` per value tensor gives the column extremes ``[B, dv]``
    (exact). For float32 inputs on the CPU the compiled ``ta_stats`` (``compute._native``)
    computes the same ``xt`` and the same numbers in one pass (the float64 sums of squares in
    another order: the radius may differ in the last bits, well inside its ``1 + 1e-12``
    inflation). These ``6 B + 4 B dv`` numbers cross to the host once; the rest is float64 numpy
    on them: R3 exactly as ``tensor_radius`` (best Hölder splitting per slice, max over
    slices, times ``1 + 1e-12``; the largest 2-norm is the square root of the largest squared
    norm, square roots being monotone), the value statistics as ``_value_stats`` (corners of
    the extremes, inflated by ``4 u64``) and the exponents as ``_value_exponents``
    (``max |v| = max(hi, -lo)``).

    Finiteness comes from the same reductions: ``amax``/``aminmax`` propagate NaN and an
    infinite entry makes its row maximum (or a column extreme) infinite, so a tensor is finite
    exactly when those reductions are (the norms are not used for this: they may overflow
    for finite float64 inputs). Raises ``InvalidInputError`` naming the first non-finite
    tensor (q, k1, k2, v1, v2 order).
    """
    B, dv = q.shape[0], v1.shape[-1]
    kern = _kernel() if _native_stats_ok(q, k1, k2, v1, v2) else None
    if kern is not None:  # the same numbers from one pass of compiled code
        xt, host = _reductions_native(kern, q, k1, k2, v1, v2)
    else:
        xt, host = _reductions_torch(q, k1, k2, v1, v2)
    sq_max, top_abs = host[: 6 * B].reshape(B, 2, 3).transpose(1, 0, 2)  # [B, 3] each
    h1, l1, h2, l2 = host[6 * B :].reshape(4, B, dv)  # [B, dv] each
    if not np.isfinite(host).all():
        finite = [
            *(bool(np.isfinite(top_abs[:, j]).all()) for j in range(3)),
            bool(np.isfinite(h1).all() and np.isfinite(l1).all()),
            bool(np.isfinite(h2).all() and np.isfinite(l2).all()),
        ]
        for name, ok in zip(_NAMES, finite, strict=True):
            if not ok:
                raise InvalidInputError(name, "contains NaN or Inf")
    two = np.sqrt(sq_max)  # [B, 3]: largest row 2-norm of q, k1, k2
    if top_abs.min() > 2.0**-200 and top_abs.max() < 2.0**200 and 2.0**-300 < abs(scale) < 2.0**300:
        # the usual case: no product below can under- or overflow (as in tensor_radius)
        options = np.stack(
            [
                two[:, 0] * two[:, 1] * top_abs[:, 2] * abs(scale),
                two[:, 0] * top_abs[:, 1] * two[:, 2] * abs(scale),
                top_abs[:, 0] * two[:, 1] * two[:, 2] * abs(scale),
            ]
        )  # [3, B]: the three Hölder splittings (inf-norm on one factor, 2-norms on two)
    else:  # guarded norms and products formed from mantissas and exponents (tensor_radius)
        two = guard_norms(two, top_abs, q.shape[-1])
        options = mul_up(
            np.stack([two[:, 0], two[:, 0], top_abs[:, 0]]),
            np.stack([two[:, 1], top_abs[:, 1], two[:, 1]]),
            np.stack([top_abs[:, 2], two[:, 2], two[:, 2]]),
            np.full((3, B), abs(scale)),
        )
    radius = float(options.min(axis=0).max()) * _RADIUS_INFLATE
    with np.errstate(over="ignore", invalid="ignore"):  # products beyond float64: inf
        corners = np.stack([h1 * h2, h1 * l2, l1 * h2, l1 * l2])  # [4, B, dv]
        top, bottom = corners.max(axis=0), corners.min(axis=0)
        infl = 4.0 * _U64
        value_range = (top - bottom) * (1.0 + infl) + (np.abs(top) + np.abs(bottom)) * infl
        value_absmax = np.abs(corners).max(axis=0) * (1.0 + infl)  # [B, dv]
        e1 = np.frexp(np.maximum(h1, -l1))[1].astype(np.int64)  # [B, dv]
        e2 = np.frexp(np.maximum(h2, -l2))[1].astype(np.int64)  # [B, dv]
        value_scale = np.where(
            value_absmax > 0, np.maximum(np.ldexp(1.0, e1 + e2), 5e-324), 0.0
        )  # [B, dv]: 2^(e1+e2), never rounded down to 0 for a nonzero column
    return _Stats(
        radius=radius if math.isfinite(radius) else math.inf,
        maxima=[float(m) for m in top_abs.max(axis=0)],
        value_range=value_range.reshape(-1),
        value_absmax=value_absmax.reshape(-1),
        value_scale=value_scale.reshape(-1),
        e1=torch.from_numpy(e1).reshape(B, 1, dv).to(q.device),
        e2=torch.from_numpy(e2).reshape(B, 1, dv).to(q.device),
        xt=xt,
    )


# --------------------------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Choice:
    approx: Approximation
    dtype: torch.dtype
    features: int
    chunk: int
    bound: BoundParts
    cost: float


@dataclass(frozen=True)
class _Problem:
    """Everything the planner needs; from real inputs or from ``plan_tensor_attention``."""

    n: int
    n1: int
    n2: int
    d: int
    dv: int
    batch: int
    radius: float
    eps: float
    target: float  # absolute error allowed: eps * max |v1 ⊘ v2|
    scale: float  # balanced scale'
    entry_max: float
    value_range: np.ndarray  # [B*dv] float64
    value_absmax: np.ndarray  # [B*dv] float64
    value_scale: np.ndarray  # [B*dv] float64: 2^(e1+e2), 0 for all-zero columns
    exact_dtype: torch.dtype
    out_dtype: torch.dtype
    device: torch.device


def _fmt_seconds(x: float) -> str:
    if not math.isfinite(x):
        return "inf s"
    if x >= 1.0:
        return f"{x:.3g} s"
    if x >= 1e-3:
        return f"{x * 1e3:.3g} ms"
    return f"{x * 1e6:.3g} us"


def _rho(radius: float, n: int, n1: int, n2: int) -> float:
    """``R3 / ln(n_eff)`` with ``n_eff = (n n1 n2)^(1/3)`` (= n when all lengths are equal)."""
    log_n = (math.log(n) + math.log(n1) + math.log(n2)) / 3.0
    return radius / log_n if log_n > 0.0 else math.inf


def _chunk_options(dtype: torch.dtype, features: int) -> tuple[int, ...]:
    """Chunk lengths to try, longest first; ``features * chunk`` fits one feature block."""
    cap = max(1, _FEATURE_BLOCK // max(1, features))
    if dtype == torch.float32:
        return tuple(c for c in CHUNKS_FLOAT32 if c <= cap)
    return (1 << (min(CHUNK_FLOAT64, cap).bit_length() - 1),)


def _first_certified(
    p: _Problem, dtype: torch.dtype, max_degree: int = MAX_DEGREE
) -> _Choice | None:
    """Lowest degree whose certified bound meets ``p.target`` in ``dtype`` (None if none)."""
    range_max = float(p.value_range.max()) if p.value_range.size else 0.0
    vavs = np.stack([p.value_absmax, p.value_scale])  # [2, B*dv]
    for approx in _approximations(p.radius):
        if approx.degree > max_degree:
            return None
        if approx.t * range_max > p.target:
            continue  # the approximation term alone is too large
        r = feature_count(p.d, approx.degree)
        if r > MAX_FEATURES:
            return None
        if approx.dmin <= -1.0:
            continue
        w_max = _weight_max(approx, p.scale)
        if not _overflow_safe(
            degree=approx.degree,
            features=r,
            n1=p.n1,
            n2=p.n2,
            weight_max=w_max,
            entry_max=p.entry_max,
            dtype=dtype,
        ):
            continue
        for chunk in _chunk_options(dtype, r):  # longest first: fewest products
            coef = _rounding_coefficients(
                approx,
                features=r,
                n1=p.n1,
                n2=p.n2,
                compute_dtype=dtype,
                out_dtype=p.out_dtype,
                weight_max=w_max,
                entry_max=p.entry_max,
                chunk=chunk,
            )
            bound = _bound_parts(approx.t, coef, p.value_range, vavs)  # = tensor_rounding_bound
            if bound.total <= p.target:
                return _Choice(approx, dtype, r, chunk, bound, _poly_cost(p, dtype, r))
    return None


def _poly_cost(p: _Problem, dtype: torch.dtype, r: int) -> float:
    """Predicted seconds of the polynomial path: the compiled kernel's calibrated rate where it
    will run (float32 on the CPU), else the PyTorch route's cost model (``compute._cost``)."""
    if _native_ok(dtype, p.device):
        rate = _native_rate()
        if rate > 0.0:
            return p.batch * (p.n + p.n1 + p.n2) * r * (p.dv + 1) / rate
    return predict_polynomial_attention(
        rates(p.device, dtype), batch=p.batch, n_q=p.n, n_k=p.n1 + p.n2, r=r, dv=p.dv
    )


@lru_cache(maxsize=1)
def _native_rate() -> float:
    """Multiply-adds per second of the compiled polynomial path, whole call included
    (statistics, balancing, features, products, scaling): timed once per process on n = n1 =
    n2 = 512, d = dv = 8, degree 3 (best of 5, about 1 ms); 0.0 without the kernel."""
    kern = _kernel()
    if kern is None:
        return 0.0
    m, d, dv, g = 512, 8, 8, 3
    _, run = _probe(kern, (1, m, m, m, d, dv), g, 128)
    best = best_time(lambda: run(torch.float32), torch.device("cpu"))
    return 3 * m * feature_count(d, g) * (dv + 1) / best


def _choose(p: _Problem) -> _Choice | None:
    """Cheapest certified (degree, compute dtype); float32 first, float64 when it helps."""
    if p.exact_dtype == torch.float64 or not float32_matmul_is_ieee():
        return _first_certified(p, torch.float64)
    c32 = _first_certified(p, torch.float32)
    if c32 is not None and c32.approx.degree <= 1:
        return c32
    top = MAX_DEGREE if c32 is None else c32.approx.degree - 1
    c64 = _first_certified(p, torch.float64, top)  # only a lower degree can beat float32
    options = [c for c in (c32, c64) if c is not None]
    return min(options, key=lambda c: c.cost) if options else None


def _make_plan(p: _Problem, method: str) -> tuple[Plan, _Choice | None]:
    rho = _rho(p.radius, p.n, p.n1, p.n2)
    cost_exact = predict_exact_attention(
        rates(p.device, p.exact_dtype), batch=p.batch, n_q=p.n * p.n1, n_k=p.n2, d=p.d, dv=p.dv
    )
    choice = None if method == "exact" else _choose(p)
    where = f"R3 = {p.radius:.3g} (rho = {rho:.3g})"
    if method == "exact":
        reason = f"exact was requested; {where}."
    elif choice is None:
        why = (
            f"no polynomial of degree <= {MAX_DEGREE} (at most {MAX_FEATURES} features) "
            f"certifies eps = {p.eps:g} at {where}"
        )
        if method == "polynomial":
            raise CertificationError(f"{why}; use method='exact' or 'auto'")
        reason = f"exact: {why}, so the cubic exact path runs."
    else:
        a = choice.approx
        what = (
            f"{a.family} degree {a.degree} ({choice.features} features, "
            f"{str(choice.dtype).removeprefix('torch.')}) certifies an error <= "
            f"{choice.bound.total:.3g} (eps * max|v1 ⊘ v2| = {p.target:.3g}) at {where}"
        )
        if method == "polynomial":
            reason = f"polynomial was requested: {what}."
        elif choice.cost < cost_exact:
            reason = (
                f"polynomial: {what}, and its predicted {_fmt_seconds(choice.cost)} beats the "
                f"exact path's {_fmt_seconds(cost_exact)} (O(n r d) vs O(n^3 d))."
            )
        else:
            reason = (
                f"exact: the certified polynomial ({a.family} degree {a.degree}, "
                f"{choice.features} features) is predicted at {_fmt_seconds(choice.cost)}, "
                f"not below the exact path's {_fmt_seconds(cost_exact)} at n = {p.n}."
            )
            choice = None
    extra: dict[str, Any] = {
        "n1": p.n1,
        "n2": p.n2,
        "dv": p.dv,
        "batch": p.batch,
        "scale_balanced": p.scale,
    }
    if choice is not None:
        extra["bound_parts"] = choice.bound.to_dict()
        extra["chunk"] = choice.chunk
        a = choice.approx
        plan = Plan(
            op="tensor-attention",
            method="polynomial",
            reason=reason,
            radius=p.radius,
            rho=rho,
            n=p.n,
            d=p.d,
            eps=p.eps,
            family=a.family,
            degree=a.degree,
            features=choice.features,
            cost_exact=cost_exact,
            cost_polynomial=choice.cost,
            compute_dtype=str(choice.dtype).removeprefix("torch."),
            predicted_bound=choice.bound.total,
            extra=extra,
        )
        return plan, choice
    plan = Plan(
        op="tensor-attention",
        method="exact",
        reason=reason,
        radius=p.radius,
        rho=rho,
        n=p.n,
        d=p.d,
        eps=p.eps,
        cost_exact=cost_exact,
        compute_dtype=str(p.exact_dtype).removeprefix("torch."),
        extra=extra,
    )
    return plan, None


def plan_tensor_attention(
    *,
    n: int,
    d: int,
    radius: float,
    eps: float = 1e-3,
    dv: int | None = None,
    batch: int = 1,
    dtype: str = "float32",
    method: str = "auto",
) -> Plan:
    """The plan ``tensor_attention`` would make, without inputs and without computing.

    ``n`` is the length of each of q, k1, k2 (v1, v2); ``d`` the head dimension; ``radius`` a
    certified bound R3 on ``|scale| sum_l |q_l k1_l k2_l|`` (theory §3); ``dv`` the value
    dimension (default ``d``); ``batch`` the number of leading slices; ``dtype`` the input
    dtype name. The values are unknown, so the worst case ``range(v1 ⊘ v2) = 2 max|v1 ⊘ v2|``
    is assumed, and balanced entries (``<= (16 R3)^(1/3)``, ``|scale'| < 4``); a plan made from
    real inputs can only pick an equal or lower degree. Raises ``CertificationError`` for
    ``method="polynomial"`` when no polynomial certifies ``eps``.
    """
    n = check_count("n", n)
    d = check_count("d", d)
    batch = check_count("batch", batch)
    dv = d if dv is None else check_count("dv", dv)
    eps = check_eps(eps)
    method = check_method(method)
    radius = check_radius(radius)
    in_dtype = check_dtype_name(dtype)
    exact_dtype = torch.float64 if in_dtype == torch.float64 else torch.float32
    problem = _Problem(
        n=n,
        n1=n,
        n2=n,
        d=d,
        dv=dv,
        batch=batch,
        radius=radius,
        eps=eps,
        target=eps,
        scale=4.0,
        entry_max=max(1.0, (16.0 * radius) ** (1.0 / 3.0)),
        value_range=np.full(1, 2.0),
        value_absmax=np.ones(1),
        value_scale=np.full(1, 4.0),
        exact_dtype=exact_dtype,
        out_dtype=in_dtype,
        device=default_device(),
    )
    return _make_plan(problem, method)[0]


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def _validate(
    q: object, k1: object, k2: object, v1: object, v2: object
) -> tuple[torch.Tensor, ...]:
    ts = [
        check_tensor(nm, x, finite=False) for nm, x in zip(_NAMES, (q, k1, k2, v1, v2), strict=True)
    ]
    check_same_batch(_NAMES, ts)
    tq, ta, tb, va, vb = ts
    d = tq.shape[-1]
    for nm, t in (("k1", ta), ("k2", tb)):
        if t.shape[-1] != d:
            raise InvalidInputError(nm, f"last dimension {t.shape[-1]} does not match q's {d}")
    if va.shape[-2] != ta.shape[-2]:
        raise InvalidInputError(
            "v1", f"has {va.shape[-2]} rows but k1 has {ta.shape[-2]} (they pair row by row)"
        )
    if vb.shape[-2] != tb.shape[-2]:
        raise InvalidInputError(
            "v2", f"has {vb.shape[-2]} rows but k2 has {tb.shape[-2]} (they pair row by row)"
        )
    if vb.shape[-1] != va.shape[-1]:
        raise InvalidInputError(
            "v2", f"last dimension {vb.shape[-1]} does not match v1's {va.shape[-1]}"
        )
    return tq, ta, tb, va, vb


def _sample_indices(n: int, rows: int, device: torch.device) -> torch.Tensor:
    """``min(rows, n)`` evenly spaced query rows, first and last included."""
    m = min(rows, n)
    if m >= n:
        return torch.arange(n, device=device)
    idx = torch.linspace(0, n - 1, steps=m, dtype=torch.float64).round().to(torch.int64)
    return torch.unique(idx).to(device)


@torch.no_grad()
def tensor_attention(
    q: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
    v1: torch.Tensor,
    v2: torch.Tensor,
    *,
    method: str = "auto",
    eps: float = 1e-3,
    scale: float | None = None,
    sample_rows: int = 0,
    progress: Progress | None = None,
) -> AttentionResult:
    """Tensor (triple-wise) softmax attention with a certified error bound (theory §3).

    Arguments (any number of leading batch/head dimensions ``...``, equal on all five):

    * ``q: (..., n, d)`` queries; ``k1: (..., n1, d)``, ``k2: (..., n2, d)`` the two key sets;
      ``v1: (..., n1, dv)`` pairs with ``k1`` and ``v2: (..., n2, dv)`` with ``k2`` (``n1``
      and ``n2`` may differ; ``v1`` and ``v2`` share ``dv``).
    * ``scale``: multiplies the trilinear score; default ``1 / sqrt(d)`` (as
      ``compute.attention``; Alman–Song use ``1/d``, pass it explicitly for that convention).
    * ``method``: ``"exact"`` (blocked, cubic), ``"polynomial"`` (certified polynomial method;
      ``CertificationError`` if no polynomial of degree <= 24 certifies ``eps``) or ``"auto"``
      (polynomial when certified and predicted faster by the calibrated cost model, else exact;
      ``plan.reason`` says why, with the numbers).
    * ``eps``: allowed error relative to ``max |v1 ⊘ v2|`` (largest ``|v1[j1,k] v2[j2,k]|``):
      the polynomial path guarantees ``max |output - exact| <= error_bound <= eps *
      max|v1 ⊘ v2|``.
    * ``sample_rows``: when > 0, that many evenly spaced query rows (per slice) are recomputed
      exactly in float64 and ``measured_error`` is the largest absolute difference.
    * ``progress(done, total)``: called after each block; an exception it raises propagates
      (``compute.Cancelled`` cancels).

    Output ``(..., n, dv)``, row i::

        out[i] = sum_{j1, j2} softmax_{(j1, j2)}(scale * sum_l q[i,l] k1[j1,l] k2[j2,l])
                 * (v1[j1] * v2[j2])

    No autograd graph is built (the output does not require grad), and inputs may be
    non-contiguous views. Dtypes: float16/bfloat16/float32 are computed in float32 (the
    polynomial path switches to float64 when float32 rounding cannot be certified below eps),
    float64 in float64; the output has the promoted input dtype. ``plan.radius`` is R3
    (theory §3, keys not centred) and ``plan.rho = R3 / ln(n_eff)`` with
    ``n_eff = (n n1 n2)^(1/3)``.

    Raises ``InvalidInputError`` (naming the argument) for non-tensors, unsupported dtypes,
    empty or non-finite tensors, fewer than 2 dimensions, mismatched leading dimensions,
    devices, ``d``, row counts (``v1``/``k1``, ``v2``/``k2``) or ``dv``, and bad ``method``,
    ``eps``, ``scale``, ``sample_rows`` or ``progress``.
    """
    start = time.perf_counter()
    tq, ta, tb, va, vb = _validate(q, k1, k2, v1, v2)
    method = check_method(method)
    eps = check_eps(eps)
    sample_rows = check_sample_rows(sample_rows)
    if progress is not None and not callable(progress):
        raise InvalidInputError("progress", f"expected a callable or None, got {progress!r}")
    lead = tuple(tq.shape[:-2])
    n, d = tq.shape[-2:]
    n1, n2, dv = ta.shape[-2], tb.shape[-2], va.shape[-1]
    sc = check_scale(scale, d)
    batch = math.prod(lead)
    exact_dtype = compute_dtype_of(tq, ta, tb, va, vb)
    out_dtype = tq.dtype
    for t in (ta, tb, va, vb):
        out_dtype = torch.promote_types(out_dtype, t.dtype)
    dev = tq.device

    def flat(x: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        return x.reshape(batch, x.shape[-2], x.shape[-1]).to(dt)

    fq, fa, fb, fv1, fv2 = (flat(x, exact_dtype) for x in (tq, ta, tb, va, vb))
    stats = _statistics(fq, fa, fb, fv1, fv2, sc)  # raises for NaN/Inf
    e1, e2 = stats.e1, stats.e2  # [B, 1, dv] each
    top = float(stats.value_absmax.max()) if stats.value_absmax.size else 0.0
    target = eps * top
    shifts, scale_b, entry_max = _balance_shifts(stats.maxima, sc, exact_dtype)
    problem = _Problem(
        n=n,
        n1=n1,
        n2=n2,
        d=d,
        dv=dv,
        batch=batch,
        radius=stats.radius,
        eps=eps,
        target=target,
        scale=scale_b,
        entry_max=entry_max,
        value_range=stats.value_range,
        value_absmax=stats.value_absmax,
        value_scale=stats.value_scale,
        exact_dtype=exact_dtype,
        out_dtype=out_dtype,
        device=dev,
    )
    plan, choice = _make_plan(problem, method)
    if choice is None:
        out = _run_exact(fq, fa, fb, fv1, fv2, sc, stats, progress).to(out_dtype)
        bound = None
    elif (kern := _native_run_ok(choice, stats.xt, fv1, fv2)) is not None:
        out = _run_native(
            kern, stats, shifts, fv1, fv2, n, n1, choice, scale_b, out_dtype, progress
        )
        bound = choice.bound.total
    else:
        cd = choice.dtype
        xt = stats.xt.to(cd)  # [d, B, n+n1+n2]: [q | k1 | k2] transposed
        if shifts is not None:  # balance by powers of two: exact
            spans = ((0, n), (n, n + n1), (n + n1, n + n1 + n2))
            for (lo, hi), sh in zip(spans, shifts, strict=True):
                if sh != 0:
                    _mul_pow2_(xt[:, :, lo:hi], sh)
        ve = torch.empty(batch, n1 + n2, dv + 1, dtype=cd, device=dev)  # [v1; v2 | 1]
        ve[..., dv].fill_(1.0)
        small = exact_dtype == torch.float32  # exponents of float32 data: |e1 + e2| <= 300
        for v, ex, lo, hi in ((fv1, e1, 0, n1), (fv2, e2, n1, n1 + n2)):
            _normalise_into(ve[:, lo:hi, :dv], v, ex, direct=small)  # |v'| < 1
        t64 = _poly_core(
            xt, ve, n, n1, choice.approx, scale_b, chunk=choice.chunk, progress=progress
        )  # [B, n, dv] float64
        out = _times_pow2(t64, e1 + e2, direct=small).to(out_dtype)  # exact in float64
        bound = choice.bound.total
    if top * (1.0 + 1e-6) + (bound or 0.0) >= _dtype_max(out_dtype):
        _check_output_range(out, top)  # the output may not fit its dtype: say so, never inf
    measured = None
    if sample_rows > 0:
        rows = _sample_indices(n, sample_rows, dev)
        ref = _exact_wide(
            flat(tq, torch.float64)[:, rows],
            flat(ta, torch.float64),
            flat(tb, torch.float64),
            flat(va, torch.float64),
            flat(vb, torch.float64),
            sc,
            torch.float64,
        )  # [B, rows, dv]
        measured = float((out[:, rows].double() - ref).abs().max())
    return AttentionResult(
        output=out.reshape(*lead, n, dv),
        error_bound=bound,
        plan=plan,
        measured_error=measured,
        seconds=time.perf_counter() - start,
    )
