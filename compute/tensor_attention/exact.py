"""The exact path of tensor attention: blocked, cubic, never ``n * n1 * n2`` scores at once
(docs/tensor_attention.md, "method=exact" and "Exact path at the extremes").
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from ..core.device import float32_matmul_is_ieee
from ..core.errors import OutOfRangeError
from ..core.exact_bound import TF32_UNIT_ROUNDOFF, loop_geometry, softmax_rounding_bound, tiny
from ..core.progress import Progress, report
from ..core.rounding import gamma, round_bound_up, unit_roundoff
from ..core.scaling import mul_pow2_, times_pow2
from .balance import balance_shifts, normalise_into, value_exponents
from .stats import Stats

__all__ = [
    "EXACT_BLOCK",
    "check_output_range",
    "dtype_max",
    "exact_bound",
    "exact_forward",
    "exact_wide",
    "run_exact",
]

EXACT_BLOCK = 1 << 20  # elements of one exact score block [B, bq, b1, n2] (4 MiB fp32)
# exp(-limit) is far above the smallest normal number (so are its products with the values):
# below it the exact path may use a fixed per-row shift instead of a running max.
SHIFT_LIMIT = {torch.float32: 40.0, torch.float64: 600.0}


def exact_blocks(batch: int, n: int, n1: int, n2: int) -> tuple[int, int]:
    """Query rows and j1 keys per exact block so that ``batch * bq * b1 * n2`` stays bounded."""
    per_j1 = batch * n * n2
    if per_j1 <= EXACT_BLOCK:
        return n, max(1, min(n1, EXACT_BLOCK // per_j1))
    return max(1, min(n, EXACT_BLOCK // max(1, batch * n2))), 1


def exact_forward(
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
    block's j1 accumulates the output. Memory: one block of at most ``EXACT_BLOCK`` scores.

    Shift: when every score of a row lies in ``[-h_i, h_i]`` with ``h_i = |scale| sum_l
    |q_il| max|k1_l| max|k2_l|`` and ``2 h_i <= SHIFT_LIMIT`` (so ``exp(-2 h_i)`` and its
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
    fixed = bool(2.0 * float(h.max()) <= SHIFT_LIMIT.get(dtype, 40.0)) if h.numel() else True
    ones2 = torch.ones(B, n2, 1, dtype=dtype, device=dev)
    k2e = torch.cat([k2, ones2], dim=-1).transpose(1, 2)  # [B, d+1, n2]
    v2e = torch.cat([v2, ones2], dim=-1)  # [B, n2, dv+1]
    bq, b1 = exact_blocks(B, n, n1, n2)
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
            report(progress, done, total)
        out[:, qs0 : qs0 + Lq] = acc / den.unsqueeze(-1)
    return out


def _matmul_u(dtype: torch.dtype) -> float:
    """The unit roundoff of float32 GEMM operands (TF32/bf16 when allowed), else 0."""
    if dtype == torch.float32 and not float32_matmul_is_ieee():
        return TF32_UNIT_ROUNDOFF
    return 0.0


def exact_bound(
    q: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
    scale: float,
    *,
    value_range: float,
    value_absmax: float,
    out_dtype: torch.dtype,
    log_h: float | None = None,
    entry_max: float = 1.0,
    dtype: torch.dtype | None = None,
    v1_max: float = 1.0,
) -> float:
    """Certified bound on ``max |exact_forward(...) - exact tensor attention|`` (output units,
    the cast to ``out_dtype`` included) for values ``v1 ⊘ v2`` of column range <=
    ``value_range`` and ``max |v1 v2| <= value_absmax`` (docs/tensor_attention.md, "The exact
    path's bound"): the online-softmax model of ``core.exact_bound`` with

    - the scores' bound ``H = |scale| max_i sum_l |q_il| max|k1_l| max|k2_l|`` (float64; it
      also bounds the fixed shift ``h_i``), or ``e^log_h`` when given (``exact_wide``: from
      logarithms, balanced entries at most ``entry_max``);
    - score error ``gamma_{d+4} 2 H`` with the fixed shift (per term the scale, the two
      products, the GEMM's sum of d + 1 terms, the shift folded in, relative to ``sum |terms|
      <= S + h <= 2 H``), ``gamma_{d+3} H`` with a running max;
    - the geometry of the loop: ``n2 + b1`` keys summed in an unknown order per block (the
      GEMM over j2, the sum over the block's j1), ``ceil(n1 / b1)`` blocks, ``n1 n2`` keys, and
      one rounding of each value product ``v2 v1``;
    - the denominator at least ``exp(-2 H - 2 Delta)`` (1 - exp's error) with the fixed shift.

    ``dtype``: the kernel's dtype (default q's; with ``log_h`` the tensors give only shapes).
    ``v1_max``: ``max |v1|``, by which the kernel multiplies ``sum_j2 w v2`` after it may have
    underflowed (normalised values: 1).
    """
    dtype = q.dtype if dtype is None else dtype
    B, n, d = q.shape
    n1, n2 = k1.shape[1], k2.shape[1]
    u = unit_roundoff(dtype)
    g = gamma(d + 3, u)  # the kernel's own h_i (scaled queries, products, sum) errs by this
    if log_h is None:
        f64 = torch.float64
        m12 = k1.abs().amax(dim=1).double() * k2.abs().amax(dim=1).double()  # [B, d]
        h = (q.abs().to(f64) * m12.unsqueeze(1)).sum(dim=-1).amax() if q.numel() else 0.0
        H0 = abs(scale) * float(h)
        H = H0 * (1.0 + 1e-12) + d * 5e-324
        h_low = H0 * (1.0 - 1e-12) * (1.0 - g)  # the kernel's largest h_i is at least this
    else:
        H = math.exp(log_h) if log_h < 700.0 else math.inf
        h_low = 0.0  # unknown: the balanced kernel may take either branch
    if not math.isfinite(H):
        return math.inf
    H *= 1.0 + g  # also bounds the kernel's h_i
    um = _matmul_u(dtype)
    # a product q scale k1 k2 whose partial product underflows loses tiny times the factors
    # still to come: at most (1 + max|k1|)(1 + max|k2|) (balanced: entry_max each)
    if log_h is None and k1.numel() and k2.numel():
        f1, f2 = float(k1.abs().amax()), float(k2.abs().amax())
    else:
        f1 = f2 = entry_max
    under = 3.0 * d * tiny(dtype) * (abs(scale) + 1.0) * (f1 + 1.0) * (f2 + 1.0)
    limit = SHIFT_LIMIT.get(dtype, 40.0)
    # the kernel's branch: the fixed shift when its largest h_i <= limit / 2 (then every score
    # is at most h_i <= limit / 2 too), else a running max; both when undecidable from here
    fixed = 2.0 * h_low <= limit
    running = limit < 2.0 * H
    delta = 0.0
    floor = 1.0
    if fixed:
        # the shift is a term of the GEMM's sum: relative to S + h <= 2 min(H, limit / 2)
        h_top = min(H, 0.5 * limit * (1.0 + g))
        delta = (gamma(d + 4, u) + 2.01 * um) * 2.0 * h_top + under
        # weights exp(s - h) <= 1, the largest at least exp(-2 h_top - 2 Delta) (1 - exp's)
        floor = math.exp(-2.0 * h_top - 2.0 * delta) * (1.0 - 64.0 * u)
    if running:  # a running max subtracts afterwards (an exp argument's rounding, E2 (b))
        delta = max(delta, (gamma(d + 3, u) + 2.01 * um) * H + under)
    _, b1 = exact_blocks(B, n, n1, n2)
    geometry = loop_geometry(n1, b1)
    geometry = type(geometry)(inner=n2 + geometry.inner, blocks=geometry.blocks)
    total = softmax_rounding_bound(
        score_bound=H,
        score_error=delta,
        keys=n1 * n2,
        geometry=geometry,
        value_range=value_range,
        value_absmax=value_absmax,
        compute_dtype=dtype,
        out_dtype=out_dtype,
        value_roundings=1,
        matmul_u=um or None,
        den_floor=floor,
        num_under_scale=v1_max,
    )
    return round_bound_up(total)


def exact_is_safe(
    maxima: list[float],
    vmax: tuple[float, float],
    scale: float,
    d: int,
    n1: int,
    n2: int,
    dtype: torch.dtype,
) -> bool:
    """Whether ``exact_forward`` on the raw inputs keeps every intermediate finite in ``dtype``:
    the scaled queries, their products with k1, the scores, the row shift (``|scale| d max|q|
    max|k1| max|k2|`` bounds them all, with each factor at least 1) and the value sums
    (``n1 n2 max|v1| max|v2|``, the weights being at most 1). The usual case by far."""
    big = float(torch.finfo(dtype).max) / 64.0
    qm, am, bm = maxima
    v1m, v2m = vmax
    scores = (abs(scale) + 1.0) * d * (qm + 1.0) * (am + 1.0) * (bm + 1.0)
    return scores < big and n1 * n2 * (v1m + 1.0) * (v2m + 1.0) < big


def exact_wide(
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

    q, k1, k2 are balanced (``balance_shifts``, applied by ``mul_pow2_``: every intermediate
    of ``exact_forward`` is then at most ``64 d |scale| max|q| max|k1| max|k2|``), the value
    columns normalised to ``max |v'| in [1/2, 1)`` (``normalise_into``), and the result scaled
    back by ``2^(e1 + e2)`` in float64 (``times_pow2``). All scores zero (``scale == 0`` or an
    all-zero input) is computed as such, so huge entries on the other inputs cannot meet a zero.
    Raises ``OutOfRangeError`` when the balanced entries do not fit ``dtype``.
    """
    q, k1, k2, v1, v2 = (x.to(dtype) for x in (q, k1, k2, v1, v2))
    maxima = [float(x.abs().amax()) for x in (q, k1, k2)]
    shifts, scale_b, _ = balance_shifts(maxima, scale, dtype)
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
            mul_pow2_(x, sh)
    e1, e2 = value_exponents(v1), value_exponents(v2)  # [B, 1, dv]
    v1n, v2n = torch.empty_like(v1), torch.empty_like(v2)
    normalise_into(v1n, v1, e1, direct=False)
    normalise_into(v2n, v2, e2, direct=False)
    out = exact_forward(q, k1, k2, v1n, v2n, scale_b, progress)
    return times_pow2(out.double(), e1 + e2)


@lru_cache(maxsize=8)
def dtype_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def _pow2_up(e: int) -> float:
    """``2^e`` as a float: inf beyond float64 (2^1024 bounds values near the largest finite)."""
    return math.ldexp(1.0, e) if e < 1024 else math.inf


def run_exact(
    q: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
    v1: torch.Tensor,
    v2: torch.Tensor,
    scale: float,
    stats: Stats,
    progress: Progress | None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, float]:
    """The exact path of ``tensor_attention`` and its certified bound: the blocked kernel on the
    raw inputs when all its intermediates are safely finite (``exact_is_safe``), else
    ``exact_wide`` in the input's compute dtype when the balanced intermediates (``<= 64 d
    R3``) fit it, else in float64; ``OutOfRangeError`` when R3 is beyond float64 too. Returns
    the compute dtype or float64, and the bound for the result cast to ``out_dtype`` (default
    the compute dtype); docs/tensor_attention.md, "The exact path's bound"."""
    dtype = q.dtype
    out_dtype = dtype if out_dtype is None else out_dtype
    d, n1, n2 = q.shape[-1], k1.shape[1], k2.shape[1]
    vmax = (_pow2_up(int(stats.e1.max())), _pow2_up(int(stats.e2.max())))  # >= max |v1|, |v2|
    v_range = float(stats.value_range.max()) if stats.value_range.size else 0.0
    v_absmax = float(stats.value_absmax.max()) if stats.value_absmax.size else 0.0
    if exact_is_safe(stats.maxima, vmax, scale, d, n1, n2, dtype):
        out = exact_forward(q, k1, k2, v1, v2, scale, progress)
        bound = exact_bound(
            q,
            k1,
            k2,
            scale,
            value_range=v_range,
            value_absmax=v_absmax,
            out_dtype=out_dtype,
            v1_max=vmax[0],  # 2^e1 >= max |v1|
        )
        return out, bound
    # P = |scale| max|q| max|k1| max|k2| (in logarithms: it may exceed float64): balanced
    # entries are at most (16 P)^(1/3), every intermediate at most 64 d P (see exact_wide)
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
            out = exact_wide(q, k1, k2, v1, v2, scale, wide, progress)
            bound = _wide_bound(q, k1, k2, scale, stats, log_p, wide, out_dtype)
            return out, bound
    raise OutOfRangeError(
        "q",
        f"the scores scale * q k1 k2 reach about 1e{log_p / math.log(10.0):.0f} (|scale| "
        "max|q| max|k1| max|k2|), beyond the range of float64; rescale q, k1 or k2, or pass a "
        "smaller scale",
    )


def _wide_bound(
    q: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
    scale: float,
    stats: Stats,
    log_p: float,
    wide: torch.dtype,
    out_dtype: torch.dtype,
) -> float:
    """``exact_wide``'s bound: the kernel's on the balanced inputs (scores at most ``d P``,
    entries at most ``entry_max``, what balancing flushes in the score error) and normalised
    values (``|v1' v2'| < 1``, range 2, each flushed value at most ``tiny``), times the largest
    ``2^(e1 + e2)`` (the exact float64 scaling back), plus the float64 result's own underflow
    and the cast to ``out_dtype``."""
    _, scale_b, entry_max = balance_shifts(stats.maxima, scale, wide)
    if scale == 0.0 or min(stats.maxima) == 0.0:  # exact_wide zeroes every score
        scale_b, log_h, entry_max = 0.0, -math.inf, 1.0
    else:
        log_h = log_p + math.log(q.shape[-1])
    # the kernel sees q, k1, k2 in the wide dtype (exact casts); only their shapes matter here
    kernel = exact_bound(
        q,
        k1,
        k2,
        scale_b,
        value_range=2.0 + 4.0 * tiny(wide),
        value_absmax=1.0 + 2.0 * tiny(wide),
        out_dtype=wide,
        log_h=log_h,
        entry_max=entry_max,
        dtype=wide,
    )
    top = float(stats.value_scale.max()) if stats.value_scale.size else 0.0
    v_absmax = float(stats.value_absmax.max()) if stats.value_absmax.size else 0.0
    cast = 0.0
    if out_dtype != torch.float64:
        cast = unit_roundoff(out_dtype) * (v_absmax + kernel * top) + tiny(out_dtype)
    total = kernel * top + 2.0 * float(torch.finfo(torch.float64).tiny) + cast
    return round_bound_up(total)


def check_output_range(out: torch.Tensor, top: float) -> None:
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
