"""The exact path: blocked online softmax, never an n x m matrix (docs/attention.md, "The two
paths" and "Extreme inputs").

``exact_forward`` is the kernel (PyTorch's fused SDPA kernel per query block where it applies,
else the loop below, which is the reference implementation). ``run_exact`` is what
``attention`` runs: the kernel on the raw inputs when every intermediate is safely finite (the
usual case), else on exactly rescaled inputs (``exact_wide``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..core.errors import OutOfRangeError
from ..core.progress import Progress, report
from ..core.radius import midrange
from ..core.scaling import times_pow2
from .balance import balance, normalise_values
from .stats import Stats

__all__ = [
    "EXACT_BLOCK_ELEMS",
    "EXACT_FUSED_ELEMS",
    "EXACT_MAX_BLOCK",
    "exact_forward",
    "exact_wide",
    "run_exact",
]

EXACT_BLOCK_ELEMS = 1 << 21  # elements of one score block (slices * Bq * Bk)
EXACT_MAX_BLOCK = 1024  # rows per query/key block at most (the loop)
EXACT_FUSED_ELEMS = 1 << 27  # score entries (slices * query rows * keys) per fused call


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
        block = int(math.sqrt(EXACT_BLOCK_ELEMS / max(L, 1)))
        block = max(16, min(EXACT_MAX_BLOCK, block))
    n_blocks = -(-n // block)
    if fused and not causal and q.dtype in (torch.float32, torch.float64):
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


def exact_is_safe(stats: Stats, scale: float, d: int, m: int, dtype: torch.dtype) -> bool:
    """Whether ``exact_forward`` on the raw inputs keeps every intermediate finite in ``dtype``.

    The scores and their partial sums are at most ``|scale| d max|q| max|k|`` (also before the
    scale is applied, whichever order a fused kernel uses), the scaled queries at most
    ``|scale| max|q|``, and the weighted value sums (weights <= 1 after the running max) at most
    ``m max|v|``; all of them far below the dtype's largest number is the usual case.
    """
    big = float(torch.finfo(dtype).max) / 64.0
    with np.errstate(over="ignore"):
        raw = (abs(scale) + 1.0) * (d * stats.q_peak * stats.k_peak + stats.q_peak + 1.0)
    return raw < big and stats.k_peak < big and m * stats.value_absmax < big


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


def run_exact(
    q3: torch.Tensor,
    k3: torch.Tensor,
    v3: torch.Tensor,
    stats: Stats,
    scale: float,
    *,
    causal: bool,
    progress: Progress | None,
) -> torch.Tensor:
    """The exact path of ``attention``: the plain kernel when its intermediates are safe, else
    ``exact_wide`` on the centred keys, in the compute dtype when the balanced scores fit it
    (``<= 2 S``, S a bound on the centred scores), else in float64; raises
    ``OutOfRangeError`` when even float64 cannot hold the scores."""
    dtype = q3.dtype
    d, m = q3.shape[-1], k3.shape[-2]
    if exact_is_safe(stats, scale, d, m, dtype):
        return exact_forward(q3, k3, v3, scale, causal=causal, progress=progress)
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
            out = exact_wide(q3, stats.kc, v3, scale, causal=causal, dtype=wide, progress=progress)
            return out.to(dtype)
    raise OutOfRangeError(
        "q",
        f"the scores scale * <q, k> reach about 2^{log2_s:.0f} (after centring the keys), "
        "beyond the range of float64; rescale q or k, or pass a smaller scale",
    )
