"""The a-priori rounding bound of an exact (blocked, online-softmax) attention kernel.

Both softmax operations compute, per output row, ``T = sum_j w_j v_j / sum_j w_j`` with
``w_j = exp(s_j - max)`` by an online softmax over key blocks (a running max, rescaling of the
partial sums by ``exp(old max - new max)``, a final division). ``softmax_rounding_bound`` bounds
``max |computed T - exact T|`` for any such kernel whose geometry is at most ``inner`` keys
reduced in one unknown order per block and ``blocks`` key blocks per row; the argument, step by
step, is docs/attention.md, "The exact path's bound" (steps E1-E7 below refer to it).

Assumptions (stated there too, checked by tests/test_exact_bound.py): IEEE arithmetic in the
compute dtype, subnormal results either gradual or flushed to zero (an absolute error of at most
the smallest normal number ``tiny`` either way); ``exp`` within ``EXP_ULPS`` units in the last
place (PyTorch's CPU kernels use Sleef's 1-ulp ``exp`` and, in the fused attention kernel, an
``exp`` documented as 20 ulps) and ``exp(0) = 1`` exactly; the fused kernel processes keys in
blocks of at least ``KERNEL_MIN_KEY_BLOCK`` keys (PyTorch's CPU flash kernel: 512, CUDA's
memory-efficient kernel: 64 or 128, the math fallback: one block).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from .rounding import gamma, unit_roundoff

__all__ = [
    "EXP_ULPS",
    "KERNEL_MIN_KEY_BLOCK",
    "TF32_UNIT_ROUNDOFF",
    "Geometry",
    "exp_log_error",
    "fused_geometry",
    "loop_geometry",
    "softmax_rounding_bound",
    "tiny",
]

EXP_ULPS = 32  # assumed accuracy of exp (Sleef: 1 ulp; PyTorch's fused-kernel exp_u20: 20)
KERNEL_MIN_KEY_BLOCK = 64  # fewest keys a fused kernel processes per block (see module)
TF32_UNIT_ROUNDOFF = 2.0**-11  # float32 operands rounded to 10 bits (TF32)


@lru_cache(maxsize=16)
def tiny(dtype: torch.dtype) -> float:
    """The smallest positive normal number of ``dtype``: what a subnormal result loses at most,
    gradual or flushed to zero."""
    return float(torch.finfo(dtype).tiny)


def exp_log_error(u: float) -> float:
    """``|ln(exp~(x) / exp(x))|`` for an ``exp`` within ``EXP_ULPS`` ulps (relative error at most
    ``2 EXP_ULPS u``, an ulp being at most ``2 u`` of the value)."""
    delta = 2.0 * EXP_ULPS * u
    return -math.log1p(-delta) if delta < 1.0 else math.inf


@dataclass(frozen=True)
class Geometry:
    """How a kernel reduces one row's keys: at most ``inner`` keys summed in an unknown order
    per block, at most ``blocks`` blocks (``blocks - 1`` rescalings)."""

    inner: int
    blocks: int


@lru_cache(maxsize=256)
def fused_geometry(keys: int) -> Geometry:
    """A fused kernel of unknown blocking: a block may hold every key (``inner = keys``) and
    there are at most ``ceil(keys / KERNEL_MIN_KEY_BLOCK)`` blocks; both maxima at once."""
    keys = max(1, int(keys))
    return Geometry(inner=keys, blocks=-(-keys // KERNEL_MIN_KEY_BLOCK))


def loop_geometry(keys: int, block: int) -> Geometry:
    """A loop over key blocks of ``block`` keys whose inner reductions have unknown order."""
    keys, block = max(1, int(keys)), max(1, int(block))
    return Geometry(inner=min(block, keys), blocks=-(-keys // block))


def softmax_rounding_bound(
    *,
    score_bound: float,
    score_error: float,
    keys: int,
    geometry: Geometry,
    value_range: float,
    value_absmax: float,
    compute_dtype: torch.dtype,
    out_dtype: torch.dtype,
    value_roundings: int = 0,
    matmul_u: float | None = None,
    den_floor: float = 1.0,
    num_under_scale: float = 1.0,
) -> float:
    """Certified bound on ``max |T~ - T|`` (output units, before any scaling back) for one
    online-softmax kernel (see module and docs/attention.md, "The exact path's bound").

    Args:
        score_bound: ``S >= |s_ij|`` for every score the kernel sees (``|scale| sum_l |q_l k_l|``
            bounds it and is what ``score_error`` is relative to).
        score_error: ``Delta >= |s~_ij - s_ij|``, the computed scores' absolute error (E1).
        keys: ``m``, keys per row.
        geometry: the kernel's key blocking (``fused_geometry`` / ``loop_geometry``).
        value_range, value_absmax: the largest column range of the values and ``max |v|``.
        compute_dtype, out_dtype: the kernel's dtype and the dtype the result is cast to.
        value_roundings: roundings of each value before the kernel sees it (tensor attention's
            ``v1 * v2``: 1), each ``u |v_j|``.
        matmul_u: unit roundoff of the products inside matrix multiplications when it is
            coarser than the compute dtype's (TF32); default the compute dtype's.
        den_floor: a lower bound of the computed denominator in the kernel's units: 1 for a
            running max (the maximal key's weight is ``exp(0) = 1``), less for a kernel that
            shifts by a fixed bound instead (tensor attention's ``exp(s - h)``).
        num_under_scale: the largest factor a partial result of the numerator is multiplied by
            after it may have underflowed (tensor attention multiplies ``sum_j2 w v2`` by
            ``v1``: ``max |v1|``); 1 when the values enter first.
    """
    if not (
        math.isfinite(value_range)
        and math.isfinite(value_absmax)
        and math.isfinite(score_bound)
        and math.isfinite(score_error)
    ):
        return math.inf
    u = unit_roundoff(compute_dtype)
    um = max(u, matmul_u or 0.0)
    t_c, t_out = tiny(compute_dtype), tiny(out_dtype)
    m = max(1, int(keys))
    inner, blocks = geometry.inner, geometry.blocks
    # E2-E3: the weights' shared errors, three stages, each a total-variation bound on the
    # output (weights off by factors in [e^-t, e^t] move it by at most tanh(t / 2) range):
    # (a) the computed scores: |s~_j - s_j| <= Delta;
    stage_scores = math.tanh(score_error / 2.0)
    # (b) the rounded exp arguments x = s~_j - M~ (subtraction, conversion to base 2, scale):
    # relative gamma_3 each, telescoping over the rescalings to gamma_3 y_j, y_j = M~ - s~_j in
    # [0, Y], Y = 2 S + 2 Delta. With a = gamma_3 Y, |e^t - 1| <= gamma_3 y e^a, the weights'
    # sum shrinks by at most e^-a, and the softmax(s~)-mean of y is at most its entropy, ln m:
    # at most gamma_3 e^(2a) ln m (or tanh(a / 2), uniformly)
    a = gamma(3, u) * (2.0 * score_bound + 2.0 * score_error)
    log_m = math.log(m)
    mean_y = gamma(3, u) * math.exp(2.0 * a) * log_m if a < 1.0 else math.inf
    stage_args = min(math.tanh(a / 2.0), mean_y)
    # (c) one exp per block on a weight's path (its own and the rescaling factors)
    stage_exp = math.tanh(blocks * exp_log_error(u) / 2.0)
    # (any weights give a convex combination of the values: never more than the range)
    shared = min(1.0, stage_scores + stage_args + stage_exp) * value_range
    # E4: per-term roundings of num and den (product, unknown-order sums within a block, the add
    # into the running sum and the rescaling multiplication per block, the normalisation of a
    # math-style kernel), with the matmul's unit roundoff for the products
    k_num = inner + 2 * blocks + 2
    g_num = gamma(k_num, u) + 2.0 * (um - u) if um > u else gamma(k_num, u)
    g_den = gamma(inner + 2 * blocks + 1, u)
    if not (g_den < 0.5 and g_num < 0.5):
        return math.inf
    # E5: underflow: each exp result below tiny (gradual or flushed) loses at most 2 tiny, every
    # rounding of num and den at most tiny; the computed den is >= 1 (the maximal key's weight
    # is exp(0) = 1, rescaled only by exp(0) = 1, and rounded sums of non-negatives are monotone)
    under_ops = 4 * m + 4 * blocks + 8
    if not den_floor > 0.0:
        return math.inf
    e_u = under_ops * t_c / den_floor  # relative to the computed denominator
    e_num = e_u * max(1.0, num_under_scale)  # the numerator's, amplified by later factors
    weights_lo = (1.0 - e_u) / (1.0 + g_den)  # sum of the computed weights over den~
    if not weights_lo > 0.0:
        return math.inf
    flushed = 2.0 * m * t_c * value_range / (weights_lo * den_floor)
    # E4 continued: |num~/den~ - T'| with T' the ratio of the computed weights (|T'| <= max|v|)
    ratio = (g_num + g_den) * value_absmax * (1.0 + e_u) / (1.0 - g_den) + (
        e_num + e_u * value_absmax
    )
    # values rounded before the kernel (tensor attention's v1 * v2): the convex combination moves
    # by at most their largest error
    values = gamma(value_roundings, u) * value_absmax if value_roundings else 0.0
    inside = shared + flushed + ratio + values
    # E6: the final division (or reciprocal and product): gamma_2 |T~|, plus tiny if subnormal
    top = value_absmax + inside
    division = gamma(2, u) * top + t_c
    # E7: the cast to the output dtype (free when it is the compute dtype or wider)
    exact_cast = out_dtype == compute_dtype or (
        out_dtype == torch.float64 and compute_dtype == torch.float32
    )
    cast = 0.0 if exact_cast else unit_roundoff(out_dtype) * (top + division) + t_out
    return inside + division + cast
