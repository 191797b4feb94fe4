"""Exact and polynomial-method softmax attention with a certified error bound (theory §1–2, §5).

Public: :func:`attention` and :func:`plan_attention`. Two internal kernels are shared with the
other operations and are kept stable (signatures and semantics): :func:`_exact_forward` (the
blocked exact reference) and :func:`_polynomial_forward` (the streamed factored path). A plain,
differentiable, fully materialised version of the factored path, :func:`_polynomial_reference`,
is kept for autograd users and tests.

Polynomial pipeline (the floating-point model of ``compute/_bound.py`` describes exactly this):

1. cast to the compute dtype (float16/bfloat16 -> float32); centre keys and values per column
   (midrange), which changes nothing in exact arithmetic (softmax is shift invariant in the
   scores, attention is affine equivariant in V);
2. certified radius ``R >= |scale| sum_l |q_il| |kc_jl|`` (Cauchy–Schwarz / Hölder, O(n d));
   steps 1–2, the finiteness checks and the value statistics are one set of reductions per
   tensor with a single host sync (``_statistics``; the radius equals ``matrix_radius``'s);
3. the smallest degree g (Chebyshev, Taylor or minimax, ``_poly.certified_best``) and dtype whose
   certified bound, rounding included, is at most ``eps * max|v|``;
4. keys and queries are rescaled per coordinate by powers of two (exact) so that monomials of
   unbalanced inputs neither overflow nor underflow; the scale's whole power of two is split
   between them the same way (balanced entries <= 2 sqrt(R) whatever its size) and only its
   mantissa goes into the weights; value columns are normalised by powers of two likewise;
5. keys streamed in blocks: ``U2 = monomials(k_b)`` ``[r, B]`` (graded order, contiguous
   construction), ``M += U2 @ [Vc_b, 1]`` accumulated in float64 ``[r, dv + 1]``;
6. weights ``w_alpha = c_|alpha| scale^|alpha| |alpha|!/alpha!`` folded into ``M`` in float64,
   all on the query side; queries streamed in blocks: ``U1 = monomials(q_b)``,
   ``[num | den] = U1^T (w * M)``; ``out = num / den + c``.

In float32 the products of steps 5 and 6 are split along their inner dimension into chunks
(``key_chunk`` keys, ``feature_chunk`` features) whose partial sums are added in float64: the
certified rounding term grows with the inner length, and unchunked float32 would not certify
``eps = 1e-3`` at R = 1. Causal attention keeps the key state as prefix sums over sub-blocks of
``causal_block`` rows and evaluates the polynomial exactly inside each diagonal sub-block
(``(w * U1)^T U2`` masked, inner length ``feature_chunk``), so the bound model is unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from . import _validate
from ._bound import BoundParts, certified_bound, subnormal_spacing, unit_roundoff
from ._cost import predict_exact_attention, predict_polynomial_attention, rates
from ._device import default_device, float32_matmul_is_ieee
from ._features import GradedBuilder, GradedMonomials, feature_count, graded_monomials
from ._poly import Approximation, certified_best
from ._radius import centre, midrange, radius_from
from .errors import CertificationError, InvalidInputError, OutOfRangeError
from .result import AttentionResult, Plan

__all__ = ["attention", "plan_attention"]

Progress = Callable[[int, int], Any]

# ---- constants (documented in docs/attention.md) ------------------------------------------------
MAX_DEGREE = 24  # highest polynomial degree considered
MAX_RADIUS = 32.0  # above this no degree <= MAX_DEGREE certifies any eps < 1: go exact at once
MAX_FEATURES = 500_000  # r cap: the feature block and M must stay small
MAX_STATE_BYTES = 1 << 29  # cap on the float64 key state r * (dv + 1) * 8 bytes (512 MiB)
FEATURE_BLOCK_ELEMS = 1 << 22  # elements of one feature block (slices * r * B): 16 MiB float32
MAX_BLOCK = 4096  # columns (keys or queries) per feature block
# float32 chunk lengths (key chunk, feature chunk), largest first; the first certified is used
FP32_CHUNKS = ((512, 256), (256, 128), (128, 64), (64, 32))
CAUSAL_BLOCK = 32  # diagonal sub-block rows for causal attention (prefix granularity)
EXACT_BLOCK_ELEMS = 1 << 21  # elements of one score block (slices * Bq * Bk) on the exact path
EXACT_MAX_BLOCK = 1024
SAMPLE_SEED = 0  # torch.Generator seed for sample_rows (reproducible)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# =================================================================================================
# Exact path
# =================================================================================================


def _exact_forward(
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

    Stable internal API (used by tensor attention, LoRA and the tests).

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
            block: same semantics, about twice as fast. ``False`` always runs the loop below,
            which is the reference implementation.

    Returns:
        ``[L, n, dv]`` in ``q.dtype``. Memory O(L * block^2 + L * n * (d + dv)); never n x m.
    """
    L, n, _ = q.shape
    m, dv = k.shape[1], v.shape[2]
    if block is None:
        block = int(math.sqrt(EXACT_BLOCK_ELEMS / max(L, 1)))
        block = max(16, min(EXACT_MAX_BLOCK, block))
    if positions is None:
        positions = torch.arange(n, device=q.device)
    out = torch.empty((L, n, dv), dtype=q.dtype, device=q.device)
    n_blocks = -(-n // block)
    if fused and not causal and q.dtype in (torch.float32, torch.float64):
        rows = max(block, 1024)
        n_blocks = -(-n // rows)
        sdpa = torch.nn.functional.scaled_dot_product_attention
        for bi, s in enumerate(range(0, n, rows)):
            e = min(n, s + rows)
            # 4-D [1, L, b, d]: the layout the fused CPU kernel takes (3-D falls back to math)
            o = sdpa(q[None, :, s:e], k[None], v[None], scale=scale)  # [1, L, b, dv]
            out[:, s:e] = o[0]
            if progress is not None:
                progress(bi + 1, n_blocks)
        return out
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
        if progress is not None:
            progress(bi + 1, n_blocks)
    return out


def _exact_is_safe(stats: _Stats, scale: float, d: int, m: int, dtype: torch.dtype) -> bool:
    """Whether ``_exact_forward`` on the raw inputs keeps every intermediate finite in ``dtype``.

    The scores and their partial sums are at most ``|scale| d max|q| max|k|`` (also before the
    scale is applied, whichever order a fused kernel uses), the scaled queries at most
    ``|scale| max|q|``, and the weighted value sums (weights <= 1 after the running max) at most
    ``m max|v|``; all of them far below the dtype's largest number is the usual case.
    """
    big = float(torch.finfo(dtype).max) / 64.0
    with np.errstate(over="ignore"):
        raw = (abs(scale) + 1.0) * (d * stats.q_peak * stats.k_peak + stats.q_peak + 1.0)
    return raw < big and stats.k_peak < big and m * stats.value_absmax < big


def _exact_wide(
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
    power-of-two transformations as the polynomial path: q and k balanced per coordinate with
    the scale's whole power of two (``_balance``: entries <= ``2 sqrt(R)``, scores <= ``2 R``
    for the radius R of these q, k), values centred and normalised per column
    (``_normalise_values``). The result is scaled back in float64 and clamped per column to
    ``[min v, max v]``, where the exact output lies (a convex combination of the values): the
    clamp never increases the error and keeps the output finite in v's dtype. Returns
    ``[L, n, dv]`` in ``dtype``.
    """
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    qt, kt, s2 = _balance(q, k, scale)  # [L, d, n], [L, d, m]
    v_hi = v.max(dim=1, keepdim=True).values  # [L, 1, dv]
    v_lo = v.min(dim=1, keepdim=True).values
    c = midrange(v_hi, v_lo)
    vn, ev = _normalise_values(v - c, torch.maximum(v_hi - c, c - v_lo))
    o = _exact_forward(
        qt.transpose(1, 2).contiguous(),
        kt.transpose(1, 2).contiguous(),
        vn,
        s2,
        causal=causal,
        positions=positions,
        progress=progress,
    )  # [L, n, dv]
    out = _scale_back(o.double(), ev) + c.double()
    return torch.minimum(torch.maximum(out, v_lo.double()), v_hi.double()).to(dtype)


def _run_exact(
    q3: torch.Tensor,
    k3: torch.Tensor,
    v3: torch.Tensor,
    stats: _Stats,
    scale: float,
    *,
    causal: bool,
    progress: Progress | None,
) -> torch.Tensor:
    """The exact path of ``attention``: the plain kernel when its intermediates are safe, else
    ``_exact_wide`` on the centred keys, in the compute dtype when the balanced scores fit it
    (``<= 2 S``, S a bound on the centred scores), else in float64; raises
    ``OutOfRangeError`` when even float64 cannot hold the scores."""
    dtype = q3.dtype
    d, m = q3.shape[-1], k3.shape[-2]
    if _exact_is_safe(stats, scale, d, m, dtype):
        return _exact_forward(q3, k3, v3, scale, causal=causal, progress=progress)
    # S = d max_l |scale| max|q_l| max|kc_l| bounds the centred scores (like R, but in
    # logarithms, so also where R itself overflows float64): balanced entries are at most
    # 2 sqrt(S), the balanced scores at most 2 S (see _balance)
    ex = stats.extremes
    qa = ex.q_absmax if ex.q_absmax is not None else q3.abs().max(dim=1).values
    both = (qa.double().log2() + ex.k_absmax.double().log2()).amax()  # -inf for zero columns
    log2_s = float(both) + math.log2(d) + (math.log2(abs(scale)) if scale else -math.inf)
    log2_need = max(log2_s + 3.0, 0.5 * log2_s + 3.0, math.log2(m) + 1.0)
    for wide in (dtype, torch.float64):
        if log2_need < math.log2(float(torch.finfo(wide).max) / 64.0):
            out = _exact_wide(q3, stats.kc, v3, scale, causal=causal, dtype=wide, progress=progress)
            return out.to(dtype)
    raise OutOfRangeError(
        "q",
        f"the scores scale * <q, k> reach about 2^{log2_s:.0f} (after centring the keys), "
        "beyond the range of float64; rescale q or k, or pass a smaller scale",
    )


# =================================================================================================
# Polynomial path
# =================================================================================================


@dataclass(frozen=True)
class _Config:
    """One certified way to run the factored path."""

    approx: Approximation
    dtype: torch.dtype  # compute dtype of features and products
    features: int  # r
    block: int  # B: columns per feature block
    key_chunk: int  # float32: largest key chunk (``_polynomial_forward``'s key_chunk)
    feature_chunk: int  # float32: largest feature chunk (its feature_chunk)
    key_inner: int  # inner length of the key-side products the bound was certified with
    feature_inner: int  # inner length of the query-side products (float32: chunk; float64: r)
    float64_terms: int  # longest chain of float64 roundings (for the bound)
    bound: BoundParts


def _weights(approx: Approximation, plan: GradedMonomials, scale_mantissa: float) -> np.ndarray:
    """``w_alpha = c_|alpha| * scale^|alpha| * |alpha|!/alpha!`` in float64, ``[r]``.

    ``attention`` passes the balanced scale' in [1/2, 1); any other scale (the differentiable
    reference) may overflow to inf here but never raises.
    """
    c = np.asarray(approx.coeffs, dtype=np.float64)  # [g + 1]
    with np.errstate(over="ignore", invalid="ignore"):
        powers = np.power(float(scale_mantissa), np.arange(len(c), dtype=np.float64))
        return (c * powers)[plan.degree] * plan.multinomial  # [r]


# powers of two that one multiplication may apply in each dtype (normal numbers, with margin)
_POW2_STEP = {torch.float32: 120, torch.float64: 1000}


def _pow2_factors(e: np.ndarray, dtype: torch.dtype) -> list[np.ndarray]:
    """``2^e`` (``e`` integer-valued float64, on the host) as float64 factors each of which is a
    normal power of two of ``dtype`` (so each multiplication by one is exact but for underflow);
    one factor in the usual case. The product of the factors is ``2^e`` exactly."""
    lim = _POW2_STEP.get(dtype, 120)
    out = []
    rest = e
    while True:
        step = np.clip(rest, -lim, lim)
        out.append(np.ldexp(1.0, step.astype(np.int64)))
        rest = rest - step
        if not rest.any():
            return out


def _to_device(x: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(x).to(device=like.device, dtype=like.dtype)


def _scale_back(o: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``o * 2^e`` in float64 (``o`` float64, ``e`` from ``_normalise_values``), in two normal
    factors: ``2^e`` itself is 2^1024 (inf) for float64 values near the largest finite."""
    half = torch.floor(e / 2)
    one = torch.ones_like(e)
    return o * torch.ldexp(one, half) * torch.ldexp(one, e - half)


def _balance(
    q: torch.Tensor,
    kc: torch.Tensor,
    scale: float,
    q_absmax: torch.Tensor | None = None,
    k_absmax: torch.Tensor | None = None,
    known: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Exact power-of-two rescaling: ``scale <q, k> == s' <q', k'>`` with balanced q', k'.

    ``q: [L, n, d]``, ``kc: [L, m, d]``; returns ``q'`` and ``k'`` transposed, ``[L, d, n]`` and
    ``[L, d, m]`` contiguous (the layout of a feature block's input), and ``s'``. With
    ``|scale| = mant 2^E`` (mant in [1/2, 1)), per slice and coordinate l, q is multiplied by
    ``2^a_l`` and k by ``2^(E - a_l)``, ``a_l = round((log2 max|k_l| - log2 max|q_l| + E) / 2)``,
    and ``s' = sign(scale) mant``: the whole power of two of the scale goes into the inputs, and
    the largest entries of ``q'_l`` and ``k'_l`` meet at ``sqrt(2^E max|q_l| max|k_l|)``, within
    a factor sqrt(2). Since ``|scale| max|q_l| max|k_l| <= R`` (both radii dominate every single
    coordinate's product), every balanced entry is at most ``2 sqrt(R)``: monomials neither
    overflow nor, for the coordinates that matter, underflow, whatever the scale's exponent.
    Multiplying by powers of two is exact but for underflow (entries far below the others may be
    flushed, by at most twice the subnormal spacing: ``_bound`` step 7); factors outside a
    dtype's normal range are applied in several exact steps. A coordinate that is zero on one
    side contributes nothing to the scores and is zeroed on both (so the other side cannot
    overflow), as is everything when ``scale == 0``.
    ``q_absmax, k_absmax: [L, d]``: ``max |q|`` and ``max |kc|`` per slice and column when
    already known (``_statistics``; any floating dtype, the values are exact); else reduced here.
    ``known``: host copies of those extremes (float64 ``[L, d]`` each) when ``_statistics``
    transferred them; else transferred here (one host sync). The exponents are computed on the
    host (``_balance_exponents``).
    """
    mant = math.frexp(abs(scale))[0]
    if known is None:  # one host sync: the column extremes
        qa = q.abs().max(dim=1).values if q_absmax is None else q_absmax  # [L, d]
        ka = kc.abs().max(dim=1).values if k_absmax is None else k_absmax  # [L, d]
        known = (qa.double().cpu().numpy(), ka.double().cpu().numpy())
    a, b, zero = _balance_exponents(*known, scale)  # [L, d] each, on the host
    fq, fk = _pow2_factors(a, q.dtype), _pow2_factors(b, q.dtype)
    if zero.any():
        fq[0][zero] = 0.0
        fk[0][zero] = 0.0
    signed = math.copysign(mant, scale) if scale != 0.0 else 0.0
    # written straight into the transposed layout the feature blocks load: [L, d, n], [L, d, m]
    qt = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=q.dtype, device=q.device)
    kt = torch.empty((kc.shape[0], kc.shape[2], kc.shape[1]), dtype=kc.dtype, device=kc.device)
    torch.mul(q.transpose(1, 2), _to_device(fq[0], q).unsqueeze(2), out=qt)  # [L, d, n]
    torch.mul(kc.transpose(1, 2), _to_device(fk[0], kc).unsqueeze(2), out=kt)  # [L, d, m]
    for f in fq[1:]:
        qt.mul_(_to_device(f, q).unsqueeze(2))
    for f in fk[1:]:
        kt.mul_(_to_device(f, kc).unsqueeze(2))
    return qt, kt, signed


def _balance_exponents(
    qa: np.ndarray, ka: np.ndarray, scale: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``_balance``'s exponents from ``max |q|`` and ``max |kc|`` (``[L, d]`` float64, host): ``a``
    for q, ``b = E - a`` for k, and the coordinates to zero on both sides."""
    expo = math.frexp(abs(scale))[1]
    ok = (qa > 0) & (ka > 0) & (scale != 0.0)
    lq = np.log2(np.where(ok, qa, 1.0))
    lk = np.log2(np.where(ok, ka, 1.0))
    a = np.round((lk - lq + expo) / 2)  # [L, d]
    return a, expo - a, ~ok


def _normalise_values(
    vc: torch.Tensor, vmax: torch.Tensor, exps: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``vc * 2^-e`` per slice and column with ``max |vc| = vmax in [2^(e-1), 2^e)`` (in place)
    and ``e`` (float64, ``[L, 1, dv]``) to scale results back (``_scale_back``).

    ``vc: [L, m, dv]`` centred values, ``vmax: [L, 1, dv]`` their largest magnitude (0 for a
    constant column: factor 1). Exact but for underflow of entries far below their column's
    largest (``_bound`` step 8): value products then never underflow for the entries that matter.
    ``exps``: exponents with ``max |vc| < 2^e`` computed on the host by the caller (``[L, 1,
    dv]``, from the columns' ranges: ``max |vc|`` is then in ``[2^(e-2), 2^e)``), saving the
    reduction and its host sync.
    """
    if exps is None:  # one host sync
        exps = torch.frexp(vmax.double())[1].double().cpu().numpy()  # [L, 1, dv]
    for f in _pow2_factors(-exps, vc.dtype):
        vc.mul_(_to_device(f, vc))
    e = torch.from_numpy(exps).to(vc.device)
    return vc, e


@dataclass(frozen=True)
class _Extremes:
    """Column extremes reduced once by ``_statistics`` (exact values, input compute dtype)."""

    q_absmax: torch.Tensor | None  # [L, d] max |q| per slice and column (None: reduce again)
    k_absmax: torch.Tensor  # [L, d] max |centre(k)| per slice and column
    v_hi: torch.Tensor  # [L, dv] max v per slice and column
    v_lo: torch.Tensor  # [L, dv] min v
    # from _statistics' one sync (None: _balance / _normalise_values reduce and sync themselves)
    balance: tuple[np.ndarray, np.ndarray] | None = None  # q_absmax, k_absmax on the host
    value_exp: np.ndarray | None = None  # [L, 1, dv] float64: normalisation exponents (host)


@dataclass(frozen=True)
class _Stats:
    """The data-dependent numbers of one call (see ``_statistics``)."""

    kc: torch.Tensor  # [L, m, d] centre(k), bit for bit
    radius: float  # as matrix_radius(q, centre(k), scale), bit for bit
    value_range: float  # max over slices and columns of max v - min v (float64, exact)
    value_absmax: float  # max |v| (exact)
    extremes: _Extremes
    q_peak: float = 0.0  # max |q| (exact)
    k_peak: float = 0.0  # max |k| of the uncentred keys (exact)


_INPUT_NAMES = ("q", "k", "v")


def _statistics(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> _Stats:
    """Finiteness, centred keys, the certified radius and the value statistics, one host sync.

    ``q: [L, n, d]``, ``k: [L, m, d]``, ``v: [L, m, dv]``, all in the compute dtype. On the
    device: the column extremes of q, k and v (``[L, d]``, ``[L, dv]``; exact), the centred
    keys ``kc = k - midrange(hi, lo)`` exactly as :func:`compute._radius.centre`, and the three
    per-slice factors of :func:`compute._radius.matrix_radius` (largest row 2-norm of q and
    of kc, accumulated in float64 without a float64 copy; largest Hölder sum
    ``sum_l |q_il| max_j |kc_jl|`` in float64). ``max_j |kc_jl|`` needs no pass over kc:
    ``x -> fl(x - c)`` is monotone, so the column extremes of kc are ``fl(hi - c)`` and
    ``fl(lo - c)``. These ``3 L + 2 L dv + 3`` numbers cross to the host once; the radius is
    then the same float64 arithmetic as ``matrix_radius`` (so equal bit for bit), the value
    range and ``max |v|`` the same as ``attention`` computed before.

    Finiteness comes from the same reductions: max/min propagate NaN and an infinite entry
    makes a column extreme infinite, so a tensor is finite exactly when its extremes are.
    Raises ``InvalidInputError`` naming the first non-finite tensor (q, k, v order).
    """
    f64 = torch.float64
    L, dv = q.shape[0], v.shape[2]
    q_hi, q_lo = q.max(dim=1).values, q.min(dim=1).values  # [L, d] (max/min: see centre)
    k_hi, k_lo = k.max(dim=1).values, k.min(dim=1).values  # [L, d]
    v_hi, v_lo = v.max(dim=1).values, v.min(dim=1).values  # [L, dv]
    mid = midrange(k_hi, k_lo)  # [L, d], as centre()
    kc = k - mid.unsqueeze(1)  # [L, m, d]
    qa = torch.maximum(q_hi.abs(), q_lo.abs())  # [L, d] max |q|
    ka = torch.maximum((k_hi - mid).abs(), (k_lo - mid).abs())  # [L, d] max |kc|, exact
    q_two = torch.linalg.vector_norm(q, dim=-1, dtype=f64).amax(dim=-1)  # [L]
    k_two = torch.linalg.vector_norm(kc, dim=-1, dtype=f64).amax(dim=-1)  # [L]
    holder = (q.abs().double().mul_(ka.double().unsqueeze(1))).sum(dim=-1).amax(dim=-1)  # [L]
    # (q.abs() is a fresh tensor in either dtype, so the in-place product never touches q)
    peaks = torch.stack(
        [
            qa.amax(),
            torch.maximum(k_hi.abs(), k_lo.abs()).amax(),
            torch.maximum(v_hi.abs(), v_lo.abs()).amax(),
        ]
    ).double()  # [3]: NaN or Inf exactly when the tensor has one
    host = (
        torch.cat(
            [
                peaks,
                qa.double().reshape(-1),
                ka.double().reshape(-1),
                q_two,
                k_two,
                holder,
                v_hi.double().reshape(-1),
                v_lo.double().reshape(-1),
            ]
        )
        .cpu()
        .numpy()
    )  # the one host sync
    for name, peak in zip(_INPUT_NAMES, host[:3], strict=True):
        if not math.isfinite(float(peak)):
            raise InvalidInputError(name, "contains NaN or Inf")
    d = q.shape[-1]
    qa_h = host[3 : 3 + L * d].reshape(L, d)  # exact
    ka_h = host[3 + L * d : 3 + 2 * L * d].reshape(L, d)
    at = 3 + 2 * L * d
    qn, kn, hs = (host[at + i * L : at + (i + 1) * L] for i in range(3))
    hi = host[at + 3 * L : at + 3 * L + L * dv]  # [L dv] float64, exact
    lo = host[at + 3 * L + L * dv :]  # [L dv]
    qt, kt = qa_h.max(axis=1), ka_h.max(axis=1)  # [L]: largest |q|, |kc| per slice
    # as matrix_radius (also float64 inputs whose squares or products under- or overflow)
    radius = radius_from(qn, kn, hs, qt, kt, q.shape[-1], scale)
    with np.errstate(over="ignore"):  # float64 values near the top: range inf, path exact
        spans = hi - lo  # [L dv]
        value_range = float(spans.max())
    value_exp = None
    if math.isfinite(value_range):
        # max |v - c| <= (hi - lo)/2 (1 + 2u) + the centre's rounding (half a subnormal spacing)
        # < 2^e, e the exponent of the column's range (plus two spacings): 2^e <= 2 range (+4
        # spacings), within the widened range the bound uses; 0 (factor 1) for a constant column
        sig = 2.0 * subnormal_spacing(q.dtype)
        raw = np.frexp(spans * (1.0 + 2.0**-20) + sig)[1].astype(np.float64)
        value_exp = np.where(spans > 0.0, raw, 0.0).reshape(L, 1, dv)
    return _Stats(
        kc=kc,
        radius=radius,
        value_range=value_range,
        value_absmax=float(np.maximum(np.abs(hi), np.abs(lo)).max()),
        extremes=_Extremes(
            q_absmax=qa,
            k_absmax=ka,
            v_hi=v_hi,
            v_lo=v_lo,
            balance=(qa_h, ka_h),
            value_exp=value_exp,
        ),
        q_peak=float(host[0]),
        k_peak=float(host[1]),
    )


def _polynomial_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    approx: Approximation,
    scale: float,
    *,
    causal: bool = False,
    dtype: torch.dtype | None = None,
    block: int | None = None,
    key_chunk: int | None = None,
    feature_chunk: int | None = None,
    progress: Progress | None = None,
    centred: bool = False,
    extremes: _Extremes | None = None,
) -> torch.Tensor:
    """Factored attention ``(U1 (w*M)) / (U1 (w*z))`` streamed in blocks (theory §1.2).

    Stable internal API (used by LoRA and tensor attention). Not differentiable: it writes into
    preallocated buffers (use :func:`_polynomial_reference` for autograd).

    Args:
        q: ``[L, n, d]`` queries.
        k: ``[L, m, d]`` keys (centred here per slice and column; the caller certifies
            ``approx`` for ``R = matrix_radius(q, centre(k), scale)`` computed in ``dtype``).
        v: ``[L, m, dv]`` values (centred here per slice and column by the midrange).
        approx: certified polynomial for exp on ``[-R, R]`` (``_poly.candidates(R)[g]``).
        scale: scores are ``scale * <q_i, k_j>``.
        causal: SDPA's ``is_causal`` (top-left): query i sees keys ``j <= i``; requires n == m
            after the caller's alignment (``attention`` pads or truncates keys to n).
        dtype: compute dtype (default ``q.dtype``); float32 uses chunked products with float64
            partial sums, float64 plain products.
        block: columns per feature block B (default from ``FEATURE_BLOCK_ELEMS`` and r).
        key_chunk / feature_chunk: float32 inner lengths (defaults 256 / 128); ignored in
            float64. They must be the values the bound was certified with.
        progress: ``progress(done, total)`` after each block; exceptions propagate.
        centred: k is already ``centre(k)`` in ``dtype`` (skips recentring; same result).
        extremes: column extremes of these q, (centred) k and v already reduced by
            ``_statistics`` (skips those reductions; same result bit for bit).

    Returns:
        ``[L, n, dv]`` in ``dtype``. Memory O(L_g * r * B + L * r * dv), never n x m or n x r.
    """
    dtype = dtype or q.dtype
    L, n, d = q.shape
    m, dv = k.shape[1], v.shape[2]
    if causal and m != n:
        raise ValueError(f"_polynomial_forward: causal needs n == m, got n={n}, m={m}")
    dev = q.device
    plan = graded_monomials(d, approx.degree)
    r = plan.r
    fp32 = dtype != torch.float64
    B, ck, cr, rp, unit = _geometry(
        r,
        max(n, m),
        fp32=fp32,
        key_chunk=key_chunk or 256,
        feature_chunk=feature_chunk or 128,
        causal=causal,
        block=block,
    )

    q = q.to(dtype)
    kc = k.to(dtype) if centred else centre(k.to(dtype))  # [L, m, d]
    v = v.to(dtype)
    if extremes is None:
        v_hi = v.max(dim=1, keepdim=True).values  # [L, 1, dv]
        v_lo = v.min(dim=1, keepdim=True).values  # [L, 1, dv]
        qa, ka = None, None
    else:  # casts up are exact and monotone: the extremes of the cast are the cast extremes
        v_hi = extremes.v_hi.to(dtype).unsqueeze(1)  # [L, 1, dv]
        v_lo = extremes.v_lo.to(dtype).unsqueeze(1)  # [L, 1, dv]
        qa, ka = extremes.q_absmax, extremes.k_absmax
    c = midrange(v_hi, v_lo)  # [L, 1, dv]
    # values normalised per column by a power of two (undone in float64 on the output), so that
    # no product with a value underflows however small the values are (_bound step 8)
    vexp = extremes.value_exp if extremes is not None else None
    vc, ev = _normalise_values(v - c, torch.maximum(v_hi - c, c - v_lo), vexp)  # [L, m, dv]
    # 2^ev: finite here (a finite value range keeps |v - c| below 2^1023)
    p2 = torch.ldexp(torch.ones_like(ev), ev)  # [L, 1, dv] float64
    known = extremes.balance if extremes is not None and qa is not None else None
    qb, kb, s_mant = _balance(q, kc, scale, qa, ka, known)
    w64 = torch.from_numpy(_weights(approx, plan, s_mant)).to(dev)  # [r] float64

    Lg = max(1, min(L, FEATURE_BLOCK_ELEMS // (rp * B)))
    out = torch.empty((L, n, dv), dtype=dtype, device=dev)
    groups = list(range(0, L, Lg))
    per_group = -(-n // B) if causal else -(-m // B) + -(-n // B)
    total = len(groups) * per_group
    done = 0
    for g0 in groups:
        g1 = min(L, g0 + Lg)
        lg = g1 - g0
        xbuf = torch.zeros((lg, d, B), dtype=dtype, device=dev)  # [lg, d, B]
        ubuf = torch.zeros((lg, rp, B), dtype=dtype, device=dev)  # [lg, rp, B]; rows >= r stay 0
        vbuf = torch.zeros((lg, B, dv + 1), dtype=dtype, device=dev)  # [lg, B, dv + 1]
        args = (qb[g0:g1], kb[g0:g1], vc[g0:g1], c[g0:g1], p2[g0:g1], w64, plan, xbuf, ubuf, vbuf)
        if causal:
            assert ck is None or cr is not None
            for s, o in _causal_blocks(*args, unit=unit, cr=cr):
                out[g0:g1, s : s + o.shape[1]] = o
                done += 1
                if progress is not None:
                    progress(done, total)
        else:
            for s, o in _noncausal_blocks(*args, ck=ck, cr=cr):
                if o is not None:
                    out[g0:g1, s : s + o.shape[1]] = o
                done += 1
                if progress is not None:
                    progress(done, total)
    return out


def _default_block(rp: int, unit: int) -> int:
    b = FEATURE_BLOCK_ELEMS // max(rp, 1)
    return max(unit, min(MAX_BLOCK, (b // unit) * unit))


def _geometry(
    r: int,
    n_max: int,
    *,
    fp32: bool,
    key_chunk: int,
    feature_chunk: int,
    causal: bool,
    block: int | None = None,
) -> tuple[int, int | None, int | None, int, int]:
    """Block and chunk sizes: ``(B, ck, cr, rp, unit)``.

    float32: ``cr <= feature_chunk`` splits r into equal chunks (``rp = cr * ceil(r / cr)``
    rows, the extra rows zero); ``ck <= key_chunk`` keys per key-side chunk. B, the columns of
    a feature block, is a multiple of ``unit`` (``ck``, or the causal sub-block) chosen so that
    the blocks split ``n_max`` evenly with at most ``block`` (default: about
    ``FEATURE_BLOCK_ELEMS / rp``) columns. float64: no chunks (``ck = cr = None``, ``rp = r``).
    Every inner length is at most what ``_select`` certified (they only shrink with n).
    """
    if fp32:
        nr = -(-r // feature_chunk)
        cr: int | None = -(-r // nr)
        rp = nr * (cr or 1)
        ck: int | None = min(key_chunk, _round_up(n_max, 16))
        unit = ck or 16
    else:
        cr, rp, ck, unit = None, r, None, 64
    if causal:
        unit = min(unit, CAUSAL_BLOCK)
    bmax = max(unit, block or _default_block(rp, unit))
    nb = -(-n_max // bmax)
    B = _round_up(-(-n_max // nb), unit)
    return B, ck, cr, rp, unit


def _load(xbuf: torch.Tensor, src: torch.Tensor, s: int) -> int:
    """Copy columns ``[s, s + B)`` of ``src [lg, d, n]`` into ``xbuf [lg, d, B]``; zero the rest."""
    B = xbuf.shape[2]
    e = min(src.shape[2], s + B)
    xbuf[:, :, : e - s].copy_(src[:, :, s:e])
    if e - s < B:
        xbuf[:, :, e - s :].zero_()
    return e - s


def _noncausal_blocks(
    qb: torch.Tensor,
    kb: torch.Tensor,
    vc: torch.Tensor,
    c: torch.Tensor,
    p2: torch.Tensor,
    w64: torch.Tensor,
    plan: GradedMonomials,
    xbuf: torch.Tensor,
    ubuf: torch.Tensor,
    vbuf: torch.Tensor,
    *,
    ck: int | None,
    cr: int | None,
) -> Any:
    """Yield ``(start, out_block or None)`` per key block (None) then per query block.

    ``vc``: normalised centred values, ``c [lg, 1, dv]`` the centre, ``p2 [lg, 1, dv]`` (float64)
    the normalisation: ``out = (num / den) p2 + c``.
    """
    lg, rp, B = ubuf.shape
    n, m, dv = qb.shape[2], kb.shape[2], vc.shape[2]  # qb: [lg, d, n], kb: [lg, d, m]
    r = plan.r
    builder = GradedBuilder(plan, xbuf, ubuf)
    M = torch.zeros((lg, rp, dv + 1), dtype=torch.float64, device=qb.device)  # [lg, rp, dv+1]
    for s in range(0, m, B):
        cnt = _load(xbuf, kb, s)
        vbuf[:, :cnt, :dv].copy_(vc[:, s : s + cnt])
        vbuf[:, :cnt, dv].fill_(1.0)
        if cnt < B:
            vbuf[:, cnt:].zero_()
        u2 = builder.build()  # [lg, rp, B]
        if ck is None:  # float64: plain product, inner length B
            M += torch.bmm(u2, vbuf)  # [lg, r, dv+1]
        else:  # float32: chunks of ck keys, partial sums added in float64
            T = B // ck
            u2c = u2.view(lg, rp, T, ck)[:, :r].transpose(1, 2)  # [lg, T, r, ck]
            part = torch.matmul(u2c, vbuf.view(lg, T, ck, dv + 1))  # [lg, T, r, dv+1]
            M[:, :r] += part.sum(dim=1, dtype=torch.float64)
        yield s, None
    Mw = M  # [lg, rp, dv+1] float64; rows >= r are zero
    Mw[:, :r] *= w64.view(1, r, 1)  # weights on the query side, in float64
    if cr is None:
        MwT = Mw.transpose(1, 2).contiguous()  # [lg, dv+1, rp] float64
    else:
        nr = rp // cr
        MwT = Mw.to(ubuf.dtype).view(lg, nr, cr, dv + 1).transpose(2, 3).contiguous()
        # MwT: [lg, nr, dv+1, cr]
    for s in range(0, n, B):
        cnt = _load(xbuf, qb, s)
        u1 = builder.build()  # [lg, rp, B]
        if cr is None:
            nd = torch.bmm(MwT, u1)  # [lg, dv+1, B]
        else:
            nr = rp // cr
            part = torch.matmul(MwT, u1.view(lg, nr, cr, B))  # [lg, nr, dv+1, B]
            nd = part.sum(dim=1, dtype=torch.float64)  # [lg, dv+1, B]
        o = (nd[:, :dv, :cnt] / nd[:, dv:, :cnt]).transpose(1, 2) * p2 + c  # [lg, cnt, dv]
        yield s, o


def _causal_blocks(
    qb: torch.Tensor,
    kb: torch.Tensor,
    vc: torch.Tensor,
    c: torch.Tensor,
    p2: torch.Tensor,
    w64: torch.Tensor,
    plan: GradedMonomials,
    xbuf: torch.Tensor,
    ubuf: torch.Tensor,
    vbuf: torch.Tensor,
    *,
    unit: int,
    cr: int | None,
) -> Any:
    """Yield ``(start, out_block)`` per block of rows; keys and queries share the blocks.

    Inside a block of B rows, sub-blocks of ``unit`` rows t = 0..T-1: the key state before
    sub-block t (exclusive prefix sum, float64) serves its queries, and the diagonal sub-block is
    the polynomial evaluated pairwise, ``P = (w U1_t)^T U2_t`` masked to ``j <= i``.
    """
    lg, rp, B = ubuf.shape
    n, dv = qb.shape[2], vc.shape[2]  # qb, kb: [lg, d, n]
    r, b = plan.r, unit
    T = B // b
    dt, dev = ubuf.dtype, ubuf.device
    f64 = torch.float64
    u2buf = torch.zeros_like(ubuf)  # [lg, rp, B]; rows >= r stay 0
    build_k = GradedBuilder(plan, xbuf, u2buf)
    build_q = GradedBuilder(plan, xbuf, ubuf)
    M = torch.zeros((lg, rp, dv + 1), dtype=f64, device=dev)  # key state before this block
    wc = w64.to(dt).view(r, 1)  # [r, 1] weights in the compute dtype
    visible = torch.ones((b, b), dtype=torch.bool, device=dev).tril()  # [b, b]: key j <= query i
    for s in range(0, n, B):
        cnt = _load(xbuf, kb, s)
        vbuf[:, :cnt, :dv].copy_(vc[:, s : s + cnt])
        vbuf[:, :cnt, dv].fill_(1.0)
        if cnt < B:
            vbuf[:, cnt:].zero_()
        u2 = build_k.build()  # [lg, rp, B]
        _load(xbuf, qb, s)
        u1 = build_q.build()  # [lg, rp, B]
        u1[:, :r] *= wc  # w on the query side
        vt = vbuf.view(lg, T, b, dv + 1)  # [lg, T, b, dv+1]
        u2t = u2.view(lg, rp, T, b).transpose(1, 2)  # [lg, T, rp, b]
        part = torch.matmul(u2t, vt).to(f64)  # [lg, T, rp, dv+1], inner length b
        cum = torch.cumsum(part, dim=1)  # [lg, T, rp, dv+1]
        prefix = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=1) + M.unsqueeze(1)
        M += cum[:, -1]
        state = prefix.to(dt)  # [lg, T, rp, dv+1]
        if cr is None:  # float64: inner length rp
            u1t = u1.view(lg, rp, T, b).transpose(1, 2)  # [lg, T, rp, b]
            off = torch.matmul(state.transpose(2, 3), u1t)  # [lg, T, dv+1, b]
            pair = torch.matmul(u1t.transpose(2, 3), u2t)  # [lg, T, b, b]
        else:  # float32: chunks of cr features, partial sums in float64
            nr = rp // cr
            st = state.view(lg, T, nr, cr, dv + 1).transpose(3, 4)  # [lg, T, nr, dv+1, cr]
            u1c = u1.view(lg, nr, cr, T, b).permute(0, 3, 1, 2, 4)  # [lg, T, nr, cr, b]
            u2c = u2.view(lg, nr, cr, T, b).permute(0, 3, 1, 2, 4)  # [lg, T, nr, cr, b]
            off = torch.matmul(st, u1c).sum(dim=2, dtype=f64)  # [lg, T, dv+1, b]
            pair = torch.matmul(u1c.transpose(3, 4), u2c).sum(dim=2, dtype=f64)  # [lg,T,b,b]
        pair = pair.to(f64).masked_fill_(~visible, 0.0)  # [lg, T, b, b]
        diag = torch.matmul(pair, vt.to(f64))  # [lg, T, b, dv+1]
        nd = (off.to(f64).transpose(2, 3) + diag).reshape(lg, B, dv + 1)[:, : min(B, n - s)]
        yield s, nd[..., :dv] / nd[..., dv:] * p2 + c  # [lg, cnt, dv]


def _polynomial_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    approx: Approximation,
    scale: float,
    *,
    causal: bool = False,
) -> torch.Tensor:
    """The factored path fully materialised and differentiable (O(L n r) memory; small n only).

    Same shapes and semantics as :func:`_polynomial_forward` (keys centred here; no value
    centring, no balancing, no chunking): ``P(S) V / P(S) 1`` with ``P(S) = U1 U2^T`` built from
    weighted query monomials and plain key monomials. Stable internal API (autograd users).
    """
    d = q.shape[-1]
    plan = graded_monomials(d, approx.degree)
    kc = centre(k)
    w = torch.from_numpy(_weights(approx, plan, scale)).to(q.device, q.dtype)  # [r]

    def feats(x: torch.Tensor) -> torch.Tensor:  # [L, n, d] -> [L, n, r], out of place
        rows = [torch.ones_like(x[..., :1])]
        for dst, end, src, var in plan.steps:
            prev = torch.cat(rows, dim=-1)[..., src : src + end - dst]  # [L, n, cnt]
            rows.append(prev * x[..., var : var + 1])
        return torch.cat(rows, dim=-1)

    u1 = feats(q) * w  # [L, n, r]
    u2 = feats(kc)  # [L, m, r]
    p = u1 @ u2.transpose(-1, -2)  # [L, n, m]
    if causal:
        p = p.masked_fill(torch.ones_like(p, dtype=torch.bool).triu(1), 0.0)
    return (p @ v) / p.sum(dim=-1, keepdim=True)


# =================================================================================================
# Planning
# =================================================================================================


@dataclass(frozen=True)
class _Selection:
    config: _Config | None
    why_not: str  # when config is None: one clause saying why no polynomial is usable
    degree_needed: int | None = None  # smallest certified degree even if infeasible
    features_needed: int | None = None


def _float64_terms(n_k: int, rp: int, key_inner: int, feature_inner: int, causal: bool) -> int:
    """Longest chain of float64 roundings a term passes through (see _bound)."""
    chain = -(-n_k // max(1, key_inner)) + -(-rp // max(1, feature_inner)) + 8
    return chain + (CAUSAL_BLOCK if causal else 0)


def _select(
    *,
    R: float,
    d: int,
    dv: int,
    n_q: int,
    n_k: int,
    target: float,
    value_range: float,
    value_absmax: float,
    dtypes: tuple[torch.dtype, ...],
    out_dtype: torch.dtype,
    causal: bool,
    centring_dtype: torch.dtype,
) -> _Selection:
    """Smallest certified degree, then the fastest certified dtype/chunking for it."""
    if not math.isfinite(R) or R > MAX_RADIUS:
        return _Selection(None, f"R = {R:.3g} is beyond the polynomial regime (R > {MAX_RADIUS:g})")
    n_max = max(n_q, n_k)
    for g in range(MAX_DEGREE + 1):
        approx = certified_best(R, g)
        r = feature_count(d, g)
        for dtype in dtypes:
            fp32 = dtype != torch.float64
            for ck_max, cr_max in FP32_CHUNKS if fp32 else ((0, 0),):
                rr = min(r, MAX_FEATURES + 1)  # the geometry of an over-cap r is never used
                B, ck, cr, _, unit = _geometry(
                    rr, n_max, fp32=fp32, key_chunk=ck_max, feature_chunk=cr_max, causal=causal
                )
                key_inner = unit if causal else (ck or B)  # inner lengths of the products
                feature_inner = cr or r
                f64_terms = _float64_terms(n_k, r, key_inner, feature_inner, causal)
                if causal and n_q > n_k:
                    # rows >= n_k see every key and run the non-causal kernel with its own
                    # geometry (_run_polynomial): certify the longer of the two inner lengths
                    B2, ck2, cr2, _, _ = _geometry(
                        rr,
                        max(n_q - n_k, n_k),
                        fp32=fp32,
                        key_chunk=ck_max,
                        feature_chunk=cr_max,
                        causal=False,
                        block=B,
                    )
                    key_inner = max(key_inner, ck2 or B2)
                    feature_inner = max(feature_inner, cr2 or r)
                    f64_terms = max(f64_terms, _float64_terms(n_k, r, ck2 or B2, cr2 or r, False))
                bound = certified_bound(
                    approx,
                    features=feature_inner,
                    block=key_inner,
                    compute_dtype=dtype,
                    out_dtype=out_dtype,
                    value_range=value_range,
                    value_absmax=value_absmax,
                    float64_terms=f64_terms,
                    centring_dtype=centring_dtype,
                    dimension=d,
                )
                if not bound.total <= target:  # (NaN-safe)
                    continue
                if r > MAX_FEATURES or r * (dv + 1) * 8 > MAX_STATE_BYTES:
                    return _Selection(
                        None,
                        f"it needs degree {g} with r = {r:.3g} features, above the cap of "
                        f"{MAX_FEATURES:.3g}",
                        g,
                        r,
                    )
                cfg = _Config(
                    approx,
                    dtype,
                    r,
                    B,
                    ck_max if fp32 else B,
                    cr_max if fp32 else r,
                    key_inner,
                    feature_inner,
                    f64_terms,
                    bound,
                )
                return _Selection(cfg, "", g, r)
    u_out = unit_roundoff(out_dtype) if out_dtype in (torch.float16, torch.bfloat16) else 0.0
    if u_out * value_absmax > target:
        return _Selection(
            None,
            f"rounding the output to {_dtype_name(out_dtype)} alone (u = {u_out:.2g} of max|v|) "
            "exceeds it",
        )
    return _Selection(None, f"no polynomial of degree <= {MAX_DEGREE} certifies it at R = {R:.3g}")


@lru_cache(maxsize=16)
def _fused_exact_factor(device: str, dtype: torch.dtype) -> float:
    """Measured time of the fused SDPA kernel over ``_cost``'s exact prediction (1024^2, d=16).

    ``predict_exact_attention`` models the unfused loop; the non-causal exact path runs the fused
    kernel, whose constant the planner measures here once per process.
    """
    dev = torch.device(device)
    n, d = 1024, 16
    x = torch.rand((1, 1, n, d), device=dev, dtype=dtype)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    best = math.inf
    for _ in range(4):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        sdpa(x, x, x)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        best = min(best, time.perf_counter() - t0)
    model = predict_exact_attention(rates(dev, dtype), batch=1, n_q=n, n_k=n, d=d, dv=d)
    return min(10.0, max(0.1, best / model))


@lru_cache(maxsize=16)
def _feature_rate(device: str, dtype: torch.dtype) -> float:
    """Elements/s of the graded feature builder on one cache-sized block (measured once).

    ``_cost.rates().elems`` times a gather-multiply, the older construction; the graded builder
    used here has no gathers and runs several times faster, so the planner measures it.
    """
    dev = torch.device(device)
    plan = graded_monomials(8, 4)
    x = torch.rand((1, 8, 2048), device=dev, dtype=dtype)
    out = torch.zeros((1, plan.r, 2048), device=dev, dtype=dtype)
    builder = GradedBuilder(plan, x, out)
    best = math.inf
    for _ in range(4):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        builder.build()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        best = min(best, time.perf_counter() - t0)
    return plan.r * 2048 / max(best, 1e-9)


def _predict_polynomial(
    device: torch.device,
    cfg: _Config,
    *,
    batch: int,
    n_q: int,
    n_k: int,
    d: int,
    dv: int,
    causal: bool,
) -> float:
    """Predicted seconds: features on both sides, the skinny products, per-block overhead.

    Uses ``_cost.rates`` for the products (``predict_polynomial_attention`` with the feature
    term replaced by the graded builder's measured rate) and about 4 us per launched op.
    """
    rt = rates(device, cfg.dtype)
    r = cfg.features
    feats = float(batch) * (n_q + n_k) * r / _feature_rate(str(device), cfg.dtype)
    flops = (
        predict_polynomial_attention(rt, batch=batch, n_q=n_q, n_k=n_k, r=r, dv=dv, causal=causal)
        - float(batch) * (n_q + n_k) * r / rt.elems
    )
    blocks = batch * (-(-n_q // cfg.block) + -(-n_k // cfg.block))
    ops = blocks * (cfg.approx.degree * d + 8) * 4e-6  # one multiply per (degree, variable)
    prep = 2e-4 + float(batch) * (n_q + n_k) * (d + dv) * 16 / _feature_rate(str(device), cfg.dtype)
    t = feats + flops + ops + prep  # prep: checks, centring, radius, balancing (~16 passes)
    if causal:  # diagonal sub-blocks: pairwise polynomial (inner r) and its product with V
        t += float(batch) * n_q * CAUSAL_BLOCK * 2.0 * (r + dv + 1) / rt.skinny
    return t


def _plan(
    *,
    method: str,
    R: float,
    n_q: int,
    n_k: int,
    d: int,
    dv: int,
    batch: int,
    eps: float,
    value_range: float,
    value_absmax: float,
    compute_dtype: torch.dtype,
    out_dtype: torch.dtype,
    causal: bool,
    device: torch.device,
) -> tuple[Plan, _Config | None]:
    """The planner shared by :func:`attention` and :func:`plan_attention`."""
    rho = R / math.log(max(n_k, 2))
    cost_exact = predict_exact_attention(
        rates(device, compute_dtype), batch=batch, n_q=n_q, n_k=n_k, d=d, dv=dv, causal=causal
    )
    if not causal:  # the non-causal exact path runs the fused kernel (see _exact_forward)
        cost_exact *= _fused_exact_factor(str(device), compute_dtype)
    base: dict[str, Any] = {
        "op": "attention",
        "radius": R,
        "rho": rho,
        "n": n_k,
        "d": d,
        "eps": eps,
        "cost_exact": cost_exact,
    }
    extra: dict[str, Any] = {"n_queries": n_q, "batch": batch, "dv": dv, "causal": causal}
    if method == "exact":
        plan = Plan(
            method="exact",
            reason="method='exact' was requested: blocked exact attention, no approximation "
            "error to bound.",
            compute_dtype=_dtype_name(compute_dtype),
            extra=extra,
            **base,
        )
        return plan, None
    target = eps * value_absmax
    # float32 products are certified only when they are IEEE float32 (no TF32/bf16 inside)
    f32 = compute_dtype != torch.float64 and float32_matmul_is_ieee()
    dtypes = (torch.float32, torch.float64) if f32 else (torch.float64,)
    sel = _select(
        R=R,
        d=d,
        dv=dv,
        n_q=n_q,
        n_k=n_k,
        target=target,
        value_range=value_range,
        value_absmax=value_absmax,
        dtypes=dtypes,
        out_dtype=out_dtype,
        causal=causal,
        centring_dtype=compute_dtype,
    )
    where = f"R = {R:.3g} (rho = {rho:.2g}) at d = {d}, eps = {eps:.2g}"
    if sel.config is None:
        why = f"{where}: {sel.why_not}"
        if method == "polynomial":
            raise CertificationError(
                f"method='polynomial' cannot certify eps = {eps:.3g} (relative to max|v|): "
                f"{why}. Use method='exact' or 'auto', or a larger eps."
            )
        plan = Plan(
            method="exact",
            reason=f"{why}; exact is the only certified path.",
            compute_dtype=_dtype_name(compute_dtype),
            degree=sel.degree_needed,
            features=sel.features_needed,
            extra=extra,
            **base,
        )
        return plan, None
    cfg = sel.config
    a = cfg.approx
    cost_poly = _predict_polynomial(
        device, cfg, batch=batch, n_q=n_q, n_k=n_k, d=d, dv=dv, causal=causal
    )
    rel = cfg.bound.total / value_absmax if value_absmax > 0 else 0.0
    certified = (
        f"{where} is certified by a degree-{a.degree} {a.family} polynomial with "
        f"r = {cfg.features} features in {_dtype_name(cfg.dtype)} (bound {rel:.2g} of max|v|)"
    )
    costs = f"predicted {cost_poly:.3g} s versus {cost_exact:.3g} s exact"
    extra.update(
        block=cfg.block,
        key_inner=cfg.key_inner,
        feature_inner=cfg.feature_inner,
        bound_polynomial=float(cfg.bound.polynomial),
        bound_rounding=float(cfg.bound.rounding),
    )
    fields: dict[str, Any] = {
        "family": a.family,
        "degree": a.degree,
        "features": cfg.features,
        "cost_polynomial": cost_poly,
        "compute_dtype": _dtype_name(cfg.dtype),
        "predicted_bound": float(cfg.bound.total),
        "extra": extra,
    }
    if method == "polynomial":
        plan = Plan(
            method="polynomial",
            reason=f"method='polynomial': {certified}; {costs}.",
            **fields,
            **base,
        )
        return plan, cfg
    if cost_poly < cost_exact:
        plan = Plan(method="polynomial", reason=f"{certified}, {costs}.", **fields, **base)
        return plan, cfg
    fields["compute_dtype"] = _dtype_name(compute_dtype)
    fields["predicted_bound"] = None
    plan = Plan(
        method="exact",
        reason=f"{certified}, but the polynomial path is {costs}, so exact is cheaper.",
        **fields,
        **base,
    )
    return plan, None


# =================================================================================================
# Public API
# =================================================================================================


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if k.shape[-1] != q.shape[-1]:
        raise InvalidInputError(
            "k", f"feature dimension {k.shape[-1]} does not match q's d = {q.shape[-1]}"
        )
    if v.shape[-2] != k.shape[-2]:
        raise InvalidInputError(
            "v", f"sequence length {v.shape[-2]} does not match k's {k.shape[-2]} keys"
        )
    _validate.check_same_batch(("q", "k", "v"), (q, k, v))


def _sample_error(
    out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool,
    rows: int,
) -> float:
    """Max abs error of ``out`` on ``rows`` random (slice, query) rows recomputed in float64.

    ``out, q: [L, n, .]``, ``k, v: [L, m, .]``. Rows are drawn without replacement by a CPU
    ``torch.Generator`` seeded with ``SAMPLE_SEED`` (reproducible); all rows when ``rows >= L n``.
    """
    L, n = q.shape[0], q.shape[1]
    gen = torch.Generator(device="cpu").manual_seed(SAMPLE_SEED)
    total = L * n
    flat = torch.randperm(total, generator=gen)[: min(rows, total)]
    worst = 0.0
    for sl in torch.unique(flat // n).tolist():
        idx = (flat[flat // n == sl] % n).to(q.device)  # [s]
        exact = _exact_wide(
            q[sl : sl + 1, idx].double(),
            centre(k[sl : sl + 1].double()),  # shift invariance: scores that fit float64
            v[sl : sl + 1].double(),
            scale,
            causal=causal,
            dtype=torch.float64,
            positions=idx,
        )  # [1, s, dv]
        diff = (out[sl : sl + 1, idx].double() - exact).abs().max()
        worst = max(worst, float(diff))
    return worst


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    method: str = "auto",
    eps: float = 1e-3,
    scale: float | None = None,
    causal: bool = False,
    sample_rows: int = 0,
    progress: Progress | None = None,
) -> AttentionResult:
    """Softmax attention, exact or by the polynomial method, with a certified error bound.

    Reference semantics: ``torch.nn.functional.scaled_dot_product_attention(q, k, v,
    scale=scale, is_causal=causal)``.

    Args:
        q: ``(..., n, d)`` queries; any leading batch/head dims.
        k: ``(..., m, d)`` keys; same leading dims as q.
        v: ``(..., m, dv)`` values; ``dv`` may differ from d.
            float32 and float64 are computed in their own precision; float16 and bfloat16 are
            computed in float32. All on one device (CPU or CUDA; computed there).
        method: ``"exact"`` (blocked online softmax, never an n x m matrix), ``"polynomial"``
            (must certify ``eps`` or raises :class:`CertificationError`), or ``"auto"``
            (polynomial only where it is certified and predicted faster).
        eps: requested bound on ``max |output - exact|`` as a fraction of ``max |v|``, in (0, 1).
        scale: scores are ``scale * q k^T``; default ``1 / sqrt(d)``.
        causal: SDPA's ``is_causal=True``: query i sees keys ``j <= i`` (top-left aligned also
            when n != m).
        sample_rows: if > 0, that many random query rows (over all leading dims) are recomputed
            exactly in float64 and ``measured_error`` is their max abs error.
        progress: ``progress(done, total)`` after each block; an exception stops the work and
            propagates (raise :class:`compute.Cancelled` to cancel).

    Returns:
        :class:`AttentionResult`: ``output`` ``(..., n, dv)`` in v's dtype; ``error_bound``, the
        certified bound on ``max |output - exact|`` in output units (rounding included; None for
        the exact method); ``plan`` (method, degree, features r, radius R, rho = R / ln m, predicted
        costs, reason); ``measured_error``.

    Raises:
        InvalidInputError: mismatched shapes or devices, non-finite values, unsupported dtype,
            empty tensors, eps outside (0, 1), unknown method, bad scale or sample_rows.
        CertificationError: ``method="polynomial"`` and no polynomial certifies ``eps``.
    """
    t0 = time.perf_counter()
    method = _validate.check_method(method)
    eps = _validate.check_eps(eps)
    # finiteness is read off _statistics' reductions below
    q = _validate.check_tensor("q", q, finite=False)
    k = _validate.check_tensor("k", k, finite=False)
    v = _validate.check_tensor("v", v, finite=False)
    _check_shapes(q, k, v)
    if not isinstance(causal, bool):
        raise InvalidInputError("causal", f"expected True or False, got {causal!r}")
    sample_rows = _validate.check_sample_rows(sample_rows)
    if progress is not None and not callable(progress):
        raise InvalidInputError("progress", "expected a callable progress(done, total) or None")
    d, dv = q.shape[-1], v.shape[-1]
    n, m = q.shape[-2], k.shape[-2]
    s = _validate.check_scale(scale, d)
    lead = tuple(q.shape[:-2])
    cd = _validate.compute_dtype_of(q, k, v)
    out_dtype = v.dtype
    q3 = q.reshape(-1, n, d).to(cd)  # [L, n, d]
    k3 = k.reshape(-1, m, d).to(cd)  # [L, m, d]
    v3 = v.reshape(-1, m, dv).to(cd)  # [L, m, dv]
    L = q3.shape[0]
    if causal and m > n:  # keys beyond the last query are never visible (top-left mask)
        for name, x in (("k", k3[:, n:]), ("v", v3[:, n:])):  # _statistics sees rows < n only
            if not bool(torch.isfinite(x).all()):
                raise InvalidInputError(name, "contains NaN or Inf")
        k3, v3, m = k3[:, :n], v3[:, :n], n
    stats = _statistics(q3, k3, v3, s)  # raises InvalidInputError on NaN/Inf
    kc3 = stats.kc  # [L, m, d]: the keys the polynomial path uses (softmax shift invariance)
    R = stats.radius  # matrix_radius(q3, centre(k3), s)
    value_range = stats.value_range  # exact in float64
    value_absmax = stats.value_absmax
    # the computed midrange c may miss the true one by u |c| (plus half the subnormal spacing
    # when (hi + lo) / 2 underflows): widen the range accordingly
    value_range += 4.0 * unit_roundoff(cd) * value_absmax + 2.0 * subnormal_spacing(cd)
    plan, cfg = _plan(
        method=method,
        R=R,
        n_q=n,
        n_k=m,
        d=d,
        dv=dv,
        batch=L,
        eps=eps,
        value_range=value_range,
        value_absmax=value_absmax,
        compute_dtype=cd,
        out_dtype=out_dtype,
        causal=causal,
        device=q.device,
    )
    bound: float | None = None
    if cfg is not None:
        out3 = _run_polynomial(
            q3, kc3, v3, cfg, s, causal=causal, progress=progress, extremes=stats.extremes
        )
        bound = float(cfg.bound.total)
        # finite exactly when both global extremes are (NaN propagates): one cheap reduction
        if not all(math.isfinite(x) for x in torch.stack(torch.aminmax(out3)).tolist()):
            # overflow outside the model (extreme inputs)
            if method == "polynomial":
                raise CertificationError(
                    "method='polynomial': an intermediate overflowed for these inputs (extreme "
                    "entries); use method='exact' or 'auto'"
                )
            cfg, bound = None, None
            plan = dataclasses.replace(
                plan,
                method="exact",
                reason=plan.reason.rstrip(".") + "; an intermediate overflowed, so exact was run.",
                predicted_bound=None,
            )
        elif value_absmax + bound > float(torch.finfo(out_dtype).max) / 2.0:
            # near the top of the output dtype: clamp to the column's value range, where the
            # exact output lies (never increases the error; keeps the rounded output finite)
            ex = stats.extremes
            lo = ex.v_lo.to(out3.dtype).unsqueeze(1)  # [L, 1, dv]
            hi = ex.v_hi.to(out3.dtype).unsqueeze(1)
            out3 = torch.minimum(torch.maximum(out3, lo), hi)
    if cfg is None:
        out3 = _run_exact(q3, k3, v3, stats, s, causal=causal, progress=progress)
    measured = None
    if sample_rows > 0:
        measured = _sample_error(out3.to(out_dtype), q3, k3, v3, s, causal, sample_rows)
    output = out3.to(out_dtype).reshape(*lead, n, dv)
    return AttentionResult(
        output=output,
        error_bound=bound,
        plan=plan,
        measured_error=measured,
        seconds=time.perf_counter() - t0,
    )


def _run_polynomial(
    q3: torch.Tensor,
    k3: torch.Tensor,
    v3: torch.Tensor,
    cfg: _Config,
    scale: float,
    *,
    causal: bool,
    progress: Progress | None,
    extremes: _Extremes | None = None,
) -> torch.Tensor:
    """Dispatch to :func:`_polynomial_forward`; causal with m < n runs the rows >= m unmasked.

    ``extremes``: from ``_statistics`` on these q3, k3 (uncentred), v3.
    """
    kw: dict[str, Any] = {
        "dtype": cfg.dtype,
        "block": cfg.block,
        "key_chunk": cfg.key_chunk if cfg.dtype != torch.float64 else None,
        "feature_chunk": cfg.feature_chunk if cfg.dtype != torch.float64 else None,
        "centred": True,  # k3 is centre(k) in the input compute dtype; casts up are exact
    }
    n, m = q3.shape[1], k3.shape[1]
    if not causal or n == m:
        return _polynomial_forward(
            q3, k3, v3, cfg.approx, scale, causal=causal, progress=progress, extremes=extremes, **kw
        )
    if extremes is not None:  # the query extremes below are of row subsets: reduce them again
        kw["extremes"] = dataclasses.replace(extremes, q_absmax=None, balance=None)
    # causal, m < n: rows [0, m) are a square causal problem; rows [m, n) see every key
    top = _polynomial_forward(
        q3[:, :m], k3, v3, cfg.approx, scale, causal=True, progress=progress, **kw
    )
    rest = _polynomial_forward(
        q3[:, m:], k3, v3, cfg.approx, scale, causal=False, progress=progress, **kw
    )
    return torch.cat([top, rest.to(top.dtype)], dim=1)


def plan_attention(
    *,
    n: int,
    d: int,
    radius: float,
    eps: float = 1e-3,
    causal: bool = False,
    dv: int | None = None,
    batch: int = 1,
    dtype: str = "float32",
    method: str = "auto",
    device: str | torch.device | None = None,
) -> Plan:
    """The plan :func:`attention` would make, without data ("what would this cost").

    ``n`` queries and keys, head dimension ``d``, value dimension ``dv`` (default d), ``batch``
    independent slices (batch x heads), certified score radius ``radius`` (R, as
    ``attention`` would compute it), input ``dtype`` name. Values are unknown, so the bound
    assumes the worst case ``value_range = 2 max|v|`` and reports ``predicted_bound`` as a
    fraction of ``max|v|``. ``device`` (default :func:`compute.default_device`) selects the
    calibrated cost rates. ``method="polynomial"`` raises :class:`CertificationError` when no
    polynomial certifies ``eps``.
    """
    method = _validate.check_method(method)
    eps = _validate.check_eps(eps)
    n = _validate.check_count("n", n)
    d = _validate.check_count("d", d)
    batch = _validate.check_count("batch", batch)
    dv = d if dv is None else _validate.check_count("dv", dv)
    radius = _validate.check_radius(radius)
    if not isinstance(causal, bool):
        raise InvalidInputError("causal", f"expected True or False, got {causal!r}")
    in_dtype = _validate.check_dtype_name(dtype)
    cd = torch.float64 if in_dtype == torch.float64 else torch.float32
    dev = torch.device(device) if device is not None else default_device()
    plan, _ = _plan(
        method=method,
        R=float(radius),
        n_q=n,
        n_k=n,
        d=d,
        dv=dv,
        batch=batch,
        eps=eps,
        value_range=2.0 + 4.0 * unit_roundoff(cd),
        value_absmax=1.0,
        compute_dtype=cd,
        out_dtype=in_dtype,
        causal=causal,
        device=dev,
    )
    return plan
