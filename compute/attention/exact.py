"""The exact path: blocked online softmax, never an n x m matrix (docs/attention.md, "The two
paths" and "Extreme inputs").

``exact_forward`` is the kernel (PyTorch's fused SDPA kernel per query block where it applies,
else the loop below, which is the reference implementation). ``run_exact`` is what
``attention`` runs: the kernel on the raw inputs when every intermediate is safely finite (the
usual case), else on exactly rescaled inputs (``exact_wide``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ..core.device import float32_matmul_is_ieee
from ..core.errors import OutOfRangeError
from ..core.exact_bound import (
    TF32_UNIT_ROUNDOFF,
    fused_geometry,
    loop_geometry,
    softmax_rounding_bound,
    tiny,
)
from ..core.progress import Progress, report
from ..core.radius import matrix_radius, midrange
from ..core.rounding import gamma, round_bound_up, subnormal_spacing, unit_roundoff
from ..core.scaling import times_pow2
from .balance import balance, normalise_values
from .stats import Stats

__all__ = [
    "EXACT_BLOCK_ELEMS",
    "EXACT_FUSED_ELEMS",
    "EXACT_MAX_BLOCK",
    "ExactRoute",
    "default_block",
    "exact_bound",
    "exact_forward",
    "exact_route",
    "exact_wide",
    "raw_score_bound",
    "run_exact",
    "uses_fused",
]

EXACT_BLOCK_ELEMS = 1 << 21  # elements of one score block (slices * Bq * Bk)
EXACT_MAX_BLOCK = 1024  # rows per query/key block at most (the loop)
EXACT_FUSED_ELEMS = 1 << 27  # score entries (slices * query rows * keys) per fused call
SMALL_SUM = 256  # raw_score_bound sums in Python floats up to this many products (L d)


def exact_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    causal: bool = False,
    positions: torch.Tensor | None = None,
    progress: Progress | None = None,
    block: int | None = None,
    fused: bool = True,
) -> torch.Tensor:
    """Exact softmax attention, blocked over queries and keys with a running max and sum.

    Args:
        q: ``[L, n, d]`` queries (L = flattened batch/head dims), any floating dtype; all three
            inputs must share it, and it is the compute dtype (float64 gives a float64 result).
        k: ``[L, m, d]`` keys.
        v: ``[L, m, dv]`` values.
        scale: scores are ``scale * <q_i, k_j>``.
        causal: query at position p sees keys ``j <= p`` (SDPA's ``is_causal``, top-left).
        positions: ``[n]`` int64 position of each query row for the causal mask (default
            ``arange(n)``); lets callers compute a subset of rows exactly.
        progress: ``progress(done, total)`` after each query block; exceptions propagate.
        block: rows per query/key block (default: about ``EXACT_BLOCK_ELEMS / L`` score entries
            per block, at most ``EXACT_MAX_BLOCK``).
        fused: for non-causal float32/float64 inputs, let PyTorch's fused SDPA kernel (itself an
            online-softmax flash kernel on CPU and CUDA, exact up to rounding) do each query
            block (of about ``EXACT_FUSED_ELEMS`` score entries; the whole problem in one call
            when it is smaller): same semantics, about twice as fast. ``False`` always runs the
            loop below.

    Returns:
        ``[L, n, dv]`` in ``q.dtype``. Memory O(L * block^2 + L * n * (d + dv)); never n x m.
    """
    L, n, _ = q.shape
    m, dv = k.shape[1], v.shape[2]
    if block is None:
        block = default_block(L)
    n_blocks = -(-n // block)
    if fused and uses_fused(causal, q.dtype):
        # query blocks as long as about 2^27 score entries (one call up to n = m = 11585 for
        # one slice): PyTorch's fused kernel is up to 2x slower on short query blocks than on
        # the whole problem (1024-row blocks at n = 4096, d = 64), and a cancellation still
        # lands within a fraction of a second
        rows = max(block, 1024, EXACT_FUSED_ELEMS // max(1, L * m))
        n_blocks = -(-n // rows)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        if n_blocks == 1:  # one query block: the fused kernel's own output, no copy
            o = sdpa(q[None], k[None], v[None], scale=scale)[0]  # [L, n, dv]
            report(progress, 1, 1)
            return o
        out = torch.empty((L, n, dv), dtype=q.dtype, device=q.device)
        for bi, s in enumerate(range(0, n, rows)):
            e = min(n, s + rows)
            # 4-D [1, L, b, d]: the layout the fused CPU kernel takes (3-D falls back to math)
            o = sdpa(q[None, :, s:e], k[None], v[None], scale=scale)  # [1, L, b, dv]
            out[:, s:e] = o[0]
            report(progress, bi + 1, n_blocks)
        return out
    if positions is None:
        positions = torch.arange(n, device=q.device)
    out = torch.empty((L, n, dv), dtype=q.dtype, device=q.device)
    qs = q * scale  # [L, n, d]
    kt = k.transpose(1, 2)  # [L, d, m]
    key_cols = torch.arange(m, device=q.device)
    pos_host = positions.tolist() if causal else None
    for bi, s in enumerate(range(0, n, block)):
        e = min(n, s + block)
        q_b = qs[:, s:e]  # [L, b, d]
        pos_b = positions[s:e]  # [b]
        # causal: keys beyond the largest position in this block are invisible to all of it
        m_eff = m if pos_host is None else min(m, max(pos_host[s:e]) + 1)
        run_max = torch.full((L, e - s, 1), -math.inf, dtype=q.dtype, device=q.device)
        run_sum = torch.zeros((L, e - s, 1), dtype=q.dtype, device=q.device)
        acc = torch.zeros((L, e - s, dv), dtype=q.dtype, device=q.device)
        for t in range(0, m_eff, block):
            u = min(m_eff, t + block)
            sc = torch.bmm(q_b, kt[:, :, t:u])  # [L, b, bk]
            if causal:
                hidden = key_cols[t:u].unsqueeze(0) > pos_b.unsqueeze(1)  # [b, bk]
                sc.masked_fill_(hidden, -math.inf)
            new_max = torch.maximum(run_max, sc.amax(dim=-1, keepdim=True))  # [L, b, 1]
            p = torch.exp(sc - new_max)  # [L, b, bk]
            corr = torch.exp(run_max - new_max)  # [L, b, 1]
            run_sum = run_sum * corr + p.sum(dim=-1, keepdim=True)
            acc = torch.baddbmm(acc * corr, p, v[:, t:u])  # [L, b, dv]
            run_max = new_max
        out[:, s:e] = acc / run_sum
        report(progress, bi + 1, n_blocks)
    return out


def default_block(L: int) -> int:
    """``exact_forward``'s default rows per query/key block for ``L`` slices."""
    block = int(math.sqrt(EXACT_BLOCK_ELEMS / max(L, 1)))
    return max(16, min(EXACT_MAX_BLOCK, block))


def uses_fused(causal: bool, dtype: torch.dtype) -> bool:
    """Whether ``exact_forward`` (``fused=True``) hands its query blocks to the fused kernel."""
    return not causal and dtype in (torch.float32, torch.float64)


def _matmul_u(dtype: torch.dtype) -> float | None:
    """TF32/bf16 operand rounding of float32 matrix products when it may be on."""
    if dtype == torch.float32 and not float32_matmul_is_ieee():
        return TF32_UNIT_ROUNDOFF
    return None


def _score_error(
    S: float,
    d: int,
    dtype: torch.dtype,
    scale: float,
    operand: float,
    um: float | None,
) -> float:
    """E1: ``|s~ - s| <= gamma_{d+2} S`` (d products and sums, the scale, one more rounding of
    the argument's conversion) plus the TF32 operand roundings (``um``: ``_matmul_u(dtype)``),
    plus what underflowing products lose (``tiny`` each, times the largest factor it
    multiplies: ``operand``)."""
    u = unit_roundoff(dtype)
    rel = gamma(d + 2, u) + (2.01 * um if um is not None else 0.0)
    return rel * S + 2.0 * d * tiny(dtype) * (abs(scale) + 1.0) * (operand + 1.0)


def exact_bound(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    *,
    causal: bool,
    value_range: float,
    value_absmax: float,
    out_dtype: torch.dtype,
    block: int | None = None,
    fused: bool = True,
    score_bound: float | None = None,
    k_peak: float | None = None,
) -> float:
    """Certified bound on ``max |exact_forward(q, k, v, scale) - exact attention|`` (output
    units, cast to ``out_dtype`` included) for values of column range <= ``value_range`` and
    ``max |v| <= value_absmax`` (docs/attention.md, "The exact path's bound").

    ``q: [L, n, d]``, ``k: [L, m, d]`` in the compute dtype. The scores are bounded by the
    certified radius of the raw (uncentred) keys, ``S = matrix_radius(q, k, scale) >= |scale|
    sum_l |q_il| |k_jl|`` (O((n + m) d), float64). The geometry is the loop's (``block``) for
    causal attention, else the fused
    kernel's, of which only ``KERNEL_MIN_KEY_BLOCK`` is assumed. ``score_bound`` (any certified
    bound on ``|scale| sum_l |q_il| |k_jl|``, e.g. ``raw_score_bound``) and ``k_peak``
    (``max |k|``) spare the two passes over the inputs that compute them here.
    """
    dtype = q.dtype
    L, m, d = k.shape
    # raw keys: the scores the kernel forms
    S = matrix_radius(q, k, scale) if score_bound is None else score_bound
    if not math.isfinite(S):
        return math.inf
    if k_peak is None:
        k_peak = float(k.abs().amax()) if k.numel() else 0.0
    if fused and uses_fused(causal, dtype):
        geometry = fused_geometry(m)
    else:
        geometry = loop_geometry(m, default_block(L) if block is None else block)
    um = _matmul_u(dtype)
    total = softmax_rounding_bound(
        score_bound=S,
        score_error=_score_error(S, d, dtype, scale, k_peak, um),
        keys=m,
        geometry=geometry,
        value_range=value_range,
        value_absmax=value_absmax,
        compute_dtype=dtype,
        out_dtype=out_dtype,
        matmul_u=um,
    )
    return round_bound_up(total)


def _wide_bound(
    log2_s: float,
    d: int,
    m: int,
    *,
    causal: bool,
    L: int,
    centring_dtype: torch.dtype,
    wide: torch.dtype,
    value_range: float,
    value_absmax: float,
    out_dtype: torch.dtype,
) -> float:
    """``exact_wide``'s bound (docs/attention.md, "The exact path's bound", E8): the kernel's on
    centred, balanced inputs and normalised values, scaled back, plus the centring of the keys
    (in ``centring_dtype``) and of the values (in ``wide``), the float64 scaling back and the
    casts; at most ``value_range``, since the clamped output and the exact one both lie in each
    column's ``[min v, max v]``."""
    if value_absmax >= 2.0**1000 or not math.isfinite(value_range):
        # values near float64's top (their range may overflow): the same bound on values times
        # 2^-64, times 2^64 (the model is linear in the values but for its tiny absolute terms,
        # which the scaling enlarges: still a bound)
        small = 2.0**-64
        va = value_absmax * small
        vr = min(value_range * small, 2.0 * va)
        total = _wide_bound(
            log2_s,
            d,
            m,
            causal=causal,
            L=L,
            centring_dtype=centring_dtype,
            wide=wide,
            value_range=vr,
            value_absmax=va,
            out_dtype=out_dtype,
        )
        return round_bound_up(total * 2.0**64)
    S = 2.0**log2_s if log2_s < 1000.0 else math.inf  # centred scores, see run_exact
    u_w, u_k = unit_roundoff(wide), unit_roundoff(centring_dtype)
    sig = subnormal_spacing(wide)
    E = 2.0 * math.sqrt(S) + 1.0  # balanced entries (see balance)
    um = _matmul_u(wide)
    rel = gamma(d + 2, u_w) + (2.01 * um if um is not None else 0.0) + u_k
    delta = rel * 2.0 * S + 2.0 * d * sig * (E + sig) + 2.0 * d * tiny(wide) * (E + 1.0)
    geometry = fused_geometry(m) if uses_fused(causal, wide) else loop_geometry(m, default_block(L))
    kernel = softmax_rounding_bound(
        score_bound=2.0 * S,  # balanced scores, scale' in [1/2, 1)
        score_error=delta,
        keys=m,
        geometry=geometry,
        value_range=2.0,  # normalised values lie in [-1, 1]
        value_absmax=1.0,
        compute_dtype=wide,
        out_dtype=wide,
        matmul_u=um,
    )
    # 2^e <= 2 max|v - c| <= range (1 + 2 u) + a spacing: the normalisation scaled back
    scale_back = 2.0 * (value_range * (1.0 + 4.0 * u_w) + 2.0 * sig)
    casts = (
        u_w * value_range  # v - c rounded in the wide dtype (the output moves as the values)
        + tiny(wide)  # ... or flushed
        + 2.0**-53 * 2.0 * value_absmax  # the float64 sum o 2^e + c
        + 2.0 * float(torch.finfo(torch.float64).tiny)
        + unit_roundoff(centring_dtype) * value_absmax  # the cast back to the compute dtype
        + tiny(centring_dtype)
        + (unit_roundoff(out_dtype) * value_absmax + tiny(out_dtype))  # the output cast
    )
    total = kernel * scale_back + casts
    return round_bound_up(min(total, value_range))


def exact_is_safe(stats: Stats, scale: float, d: int, m: int, dtype: torch.dtype) -> bool:
    """Whether ``exact_forward`` on the raw inputs keeps every intermediate finite in ``dtype``.

    The scores and their partial sums are at most ``|scale| d max|q| max|k|`` (also before the
    scale is applied, whichever order a fused kernel uses), the scaled queries at most
    ``|scale| max|q|``, and the weighted value sums (weights <= 1 after the running max) at most
    ``m max|v|``; all of them far below the dtype's largest number is the usual case.
    """
    big = _dtype_max(dtype) / 64.0
    qp, kp = float(stats.q_peak), float(stats.k_peak)  # Python floats: overflow gives inf
    raw = (abs(scale) + 1.0) * (d * qp * kp + qp + 1.0)
    return raw < big and kp < big and m * float(stats.value_absmax) < big


@lru_cache(maxsize=16)
def _dtype_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def exact_wide(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    *,
    causal: bool,
    dtype: torch.dtype,
    positions: torch.Tensor | None = None,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Exact attention for inputs whose raw scores or value sums would leave ``dtype``'s range.

    ``q: [L, n, d]``, ``k: [L, m, d]`` (centred or not: softmax is shift invariant per row, also
    under the causal mask), ``v: [L, m, dv]``, computed in ``dtype`` after the same exact
    power-of-two transformations as the polynomial path (``balance``: entries <= ``2 sqrt(R)``,
    scores <= ``2 R``; values centred and normalised per column). The result is scaled back in
    float64 and clamped per column to ``[min v, max v]``, where the exact output lies (a convex
    combination of the values): the clamp never increases the error and keeps the output finite
    in v's dtype. Returns ``[L, n, dv]`` in ``dtype``.
    """
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    qt, kt, s2 = balance(q, k, scale)  # [L, d, n], [L, d, m]
    v_hi = v.max(dim=1, keepdim=True).values  # [L, 1, dv]
    v_lo = v.min(dim=1, keepdim=True).values
    c = midrange(v_hi, v_lo)
    vn, ev = normalise_values(v - c, torch.maximum(v_hi - c, c - v_lo))
    o = exact_forward(
        qt.transpose(1, 2).contiguous(),
        kt.transpose(1, 2).contiguous(),
        vn,
        s2,
        causal=causal,
        positions=positions,
        progress=progress,
    )  # [L, n, dv]
    out = times_pow2(o.double(), ev) + c.double()
    return torch.minimum(torch.maximum(out, v_lo.double()), v_hi.double()).to(dtype)


def raw_score_bound(stats: Stats, scale: float, dtype: torch.dtype) -> float | None:
    """A certified bound on ``|scale| sum_l |q_il| |k_jl|`` (the raw keys' scores) from the
    statistics alone, no pass over the inputs: with ``c`` the key midranges and
    ``kc = fl(k - c)``, ``|k_jl| (1 - u) <= |kc_jl| + (1 + u) |c_l|``, so the sum is at most
    ``(R + (1 + u) |scale| max_i sum_l |q_il| |c_l|) / (1 - u)`` with ``R`` the centred keys'
    certified radius, and ``max_i sum_l |q_il| |c_l| <= sum_l max|q_l| |c_l|`` per slice
    (docs/attention.md, "The exact path's bound"). Evaluated in float64 with its d + 2
    roundings absorbed by the factor ``1 + (d + 4) 2^-52``; None where it is not finite."""
    if not math.isfinite(stats.radius):
        return None
    qa = stats.q_absmax_host  # [L, d] float64: max |q| per slice and column
    u = unit_roundoff(dtype)
    d = qa.shape[-1] if qa.ndim else 0
    if qa.size <= SMALL_SUM:  # a few products: Python floats (no NumPy call overhead)
        mids = stats.mid.tolist()  # [L][d], exact (float32 or float64 -> float)
        shift = 0.0
        for qs, cs in zip(qa.tolist(), mids, strict=True):
            shift = max(shift, sum(a * abs(c) for a, c in zip(qs, cs, strict=True)))
    else:
        # [L, d] in its own dtype: the products below are float64 (an exact widening)
        mid = stats.mid.cpu().numpy().reshape(qa.shape)
        with np.errstate(all="ignore"):
            shift = float((qa * np.abs(mid)).sum(axis=-1).max()) if qa.size else 0.0
    # (an overflowing product or sum is inf either way: the bound is then None)
    total = (stats.radius + (1.0 + u) * abs(scale) * shift) / (1.0 - u)
    total *= 1.0 + (d + 4) * 2.0**-52
    return total if math.isfinite(total) else None


@dataclass(frozen=True)
class ExactRoute:
    """How ``run_exact`` runs and its certified bound, decided from the statistics alone (before
    the kernel runs: the plan reports it as ``predicted_bound``)."""

    wide: torch.dtype | None  # None: exact_forward on the raw inputs; else exact_wide in it
    bound: float  # the certified bound (output units)
    log2_s: float = 0.0  # wide routes: log2 of the centred scores' bound (see run_exact)
    in_range: bool = True  # False: not even float64 holds the scores (run_exact raises)


def exact_route(
    q3: torch.Tensor,
    k3: torch.Tensor,
    stats: Stats,
    scale: float,
    *,
    causal: bool,
    value_range: float,
    value_absmax: float,
    out_dtype: torch.dtype,
) -> ExactRoute:
    """``run_exact``'s choice for these inputs and the bound it certifies (see there)."""
    dtype = q3.dtype
    d, m = q3.shape[-1], k3.shape[-2]
    if exact_is_safe(stats, scale, d, m, dtype):
        bound = exact_bound(
            q3,
            k3,
            scale,
            causal=causal,
            value_range=value_range,
            value_absmax=value_absmax,
            out_dtype=out_dtype,
            score_bound=raw_score_bound(stats, scale, dtype),
            k_peak=stats.k_peak,
        )
        return ExactRoute(None, bound)
    # S = d max_l |scale| max|q_l| max|kc_l| bounds the centred scores (like R, but in
    # logarithms, so also where R itself overflows float64): balanced entries are at most
    # 2 sqrt(S), the balanced scores at most 2 S (see balance)
    ex = stats.extremes
    qa = ex.q_absmax if ex.q_absmax is not None else q3.abs().max(dim=1).values
    both = (qa.double().log2() + ex.k_absmax.double().log2()).amax()  # -inf for zero columns
    log2_s = float(both) + math.log2(d) + (math.log2(abs(scale)) if scale else -math.inf)
    log2_need = max(log2_s + 3.0, 0.5 * log2_s + 3.0, math.log2(m) + 1.0)
    for wide in (dtype, torch.float64):
        if log2_need < math.log2(float(torch.finfo(wide).max) / 64.0):
            bound = _wide_bound(
                log2_s,
                d,
                m,
                causal=causal,
                L=q3.shape[0],
                centring_dtype=dtype,
                wide=wide,
                value_range=value_range,
                value_absmax=value_absmax,
                out_dtype=out_dtype,
            )
            return ExactRoute(wide, bound, log2_s)
    return ExactRoute(None, math.inf, log2_s, in_range=False)


def run_exact(
    q3: torch.Tensor,
    k3: torch.Tensor,
    v3: torch.Tensor,
    stats: Stats,
    scale: float,
    *,
    causal: bool,
    progress: Progress | None,
    value_range: float,
    value_absmax: float,
    out_dtype: torch.dtype,
    route: ExactRoute | None = None,
) -> tuple[torch.Tensor, float]:
    """The exact path of ``attention`` and its certified bound (``exact_bound``, or for
    ``exact_wide`` its own): the plain kernel when its intermediates are safe, else
    ``exact_wide`` on the centred keys, in the compute dtype when the balanced scores fit it
    (``<= 2 S``, S a bound on the centred scores), else in float64; raises
    ``OutOfRangeError`` when even float64 cannot hold the scores. ``value_range`` (widened for
    the centre's rounding, as ``attention`` does) and ``value_absmax`` describe v3;
    ``out_dtype`` is the dtype the result will be cast to; ``route``: ``exact_route``'s
    choice for these arguments when the caller has made it already."""
    if route is None:
        route = exact_route(
            q3,
            k3,
            stats,
            scale,
            causal=causal,
            value_range=value_range,
            value_absmax=value_absmax,
            out_dtype=out_dtype,
        )
    if not route.in_range:
        raise OutOfRangeError(
            "q",
            f"the scores scale * <q, k> reach about 2^{route.log2_s:.0f} (after centring the "
            "keys), beyond the range of float64; rescale q or k, or pass a smaller scale",
        )
    if route.wide is None:
        return exact_forward(q3, k3, v3, scale, causal=causal, progress=progress), route.bound
    out = exact_wide(q3, stats.kc, v3, scale, causal=causal, dtype=route.wide, progress=progress)
    return out.to(q3.dtype), route.bound
