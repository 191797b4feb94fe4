"""Gradients of a LoRA-adapted attention layer's loss with respect to the adapters (theory §4).

Setting (Hu et al. 2024, one attention head, leading dimensions are independent slices)::

    W_mu = W*_mu + (alpha / r_mu) B_mu A_mu        mu in {q, k, v} adapted, W* frozen
    Q = X W_q,  K = X W_k,  V = X W_v               [..., L, d_head]
    F = softmax(scale * Q K^T)                      [..., L, L]   (rows sum to 1)
    loss = 1/2 * sum ||F V - Y||_F^2                summed over the leading dimensions

Two methods:

* ``"exact"``: the closed form of theory §4 (``E = O - Y``, ``dS = F∘(E V^T - (E·O) 1^T)``,
  ``dQ = scale dS K``, ``dK = scale dS^T Q``, ``dV = F^T E``) computed blocked over queries, as
  FlashAttention-2's backward does: O(L^2 d) time, O(L * block) memory, never the L x L matrix.
* ``"polynomial"``: reverse mode through the factored polynomial attention of theory §1.2,
  written as an explicit closed-form backward in three streaming passes (keys, queries, keys):
  O(L (r d + r' d^2)) flops in GEMMs (r' < r: degree <= g-1), O((block + d^2) r) memory.
  The derivative of a monomial ``x^alpha`` is a monomial of one degree lower, so the gradient
  with respect to Q and K is a product of the degree ``<= g-1`` features with a small
  ``[r', d (d+1)]`` table. It is computed in float64 whatever the input dtype, so the rounding
  part of the bound stays negligible.

The polynomial path's certified bound is a-posteriori: per-row bounds from the run's own
residuals and factored sums of non-negative weights (extra GEMM columns, O(L r d)), propagated
through ``|X|^T``, ``|B|^T``, ``|A|^T``; ``eps`` is checked as ``b <= eps (max|G~| - b)`` per
gradient, which implies ``b <= eps max|G_exact|``. It is derived step by step in
``docs/lora_bound.md``; ``_constants``, ``_row_bound``, ``_col_bound`` and ``_certify``
implement it with the equation numbers in comments.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from ._cost import Rates, rates
from ._features import feature_count
from ._poly import Approximation, tv_factor
from ._poly import _make as _make_approx
from ._radius import matrix_radius, midrange
from ._validate import (
    check_count,
    check_dtype_name,
    check_eps,
    check_method,
    check_radius,
    check_scale,
    check_tensor,
    compute_dtype_of,
)
from .errors import CertificationError, InvalidInputError, OutOfRangeError
from .result import LoraResult, Plan

__all__ = ["ADAPTER_NAMES", "lora_gradient", "plan_lora_gradient"]

ADAPTER_NAMES = ("q", "k", "v")
Progress = Callable[[int, int], object]

MAX_DEGREE = 16  # highest polynomial degree tried
MAX_FEATURES = 400_000  # larger feature maps are never predicted faster than exact
MAX_TRIES = 3  # polynomial runs before giving up (the certificate is a posteriori)
PREDICT_FACTOR = 5.0  # relative bound ~ factor L (eta + theta), calibrated (docs §8)
_EXACT_BLOCK_ELEMS = 1 << 22  # elements of one [slices, block, L] score block (exact path)
_POLY_BLOCK_ELEMS = 1 << 20  # elements of one [slices, r, block] feature block (fits in cache)
_U64 = 2.0**-53
_LAUNCH_SECONDS = 1e-5  # per kernel: dispatch overhead the flop counts do not see
_BOUND_INFLATE = 1.0 + 1e-6  # covers float64 rounding in evaluating the bound itself
_UNDERFLOW_GUARD = 1e-280  # absolute: covers gradual underflow (docs/lora_bound.md §6)


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def _gamma(k: float, u: float = _U64) -> float:
    """Higham's ``gamma_k = k u / (1 - k u)``; inf when ``k u >= 1``."""
    ku = k * u
    return math.inf if ku >= 1.0 else ku / (1.0 - ku)


def _unit_roundoff(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) / 2.0


def _call_progress(progress: Progress | None, done: int, total: int) -> None:
    if progress is not None:
        progress(done, total)


@dataclass(frozen=True)
class _Tables:
    """Monomials of degree <= g in d variables, ordered by degree, then by *last* variable.

    In this order the degree-m monomials whose largest variable is ``v`` are exactly the
    degree-(m-1) monomials whose largest variable is ``<= v`` (a *prefix* of the previous degree
    block) times ``x_v``; so every feature block is one broadcast multiply of a contiguous slice,
    no gathers (``_features_batched``). Each monomial still costs one multiply per degree.
    """

    d: int
    g: int
    offsets: tuple[int, ...]  # offsets[m]: first row of degree m; offsets[g + 1] == r
    steps: tuple[tuple[int, int, int, int], ...]  # (dst, src, count, v): dst rows = src rows * x_v
    degree: np.ndarray  # [r] int64
    multinomial: np.ndarray  # [r] float64, exact integers |alpha|! / alpha!
    child: np.ndarray  # [r', d] int64: index of x^(beta + e_l), beta of degree <= g - 1
    factor: np.ndarray  # [r', d] float64: beta_l + 1

    @property
    def r(self) -> int:
        return self.offsets[-1]


@lru_cache(maxsize=64)
def _tables(d: int, g: int) -> _Tables:
    exps = [np.zeros((1, d), dtype=np.int64)]  # per degree: [count_m, d] exponent vectors
    lasts = [np.full(1, -1, dtype=np.int64)]  # largest variable of each monomial
    offsets = [0, 1]
    steps: list[tuple[int, int, int, int]] = []
    for _m in range(1, g + 1):
        prev, prev_last = exps[-1], lasts[-1]
        blocks, block_last = [], []
        dst = offsets[-1]
        for v in range(d):
            cnt = int(np.count_nonzero(prev_last <= v))  # a prefix: prev is sorted by last
            child = prev[:cnt].copy()
            child[:, v] += 1
            blocks.append(child)
            block_last.append(np.full(cnt, v, dtype=np.int64))
            steps.append((dst, offsets[-2], cnt, v))
            dst += cnt
        exps.append(np.concatenate(blocks))
        lasts.append(np.concatenate(block_last))
        offsets.append(dst)
    allexp = np.concatenate(exps)  # [r, d]
    fact = np.array([math.factorial(k) for k in range(g + 1)], dtype=np.float64)
    degree = allexp.sum(axis=1)
    multinomial = fact[degree] / np.prod(fact[allexp], axis=1)
    index = {row.tobytes(): i for i, row in enumerate(allexp)}
    r_low = offsets[g]  # monomials of degree <= g - 1
    child_t = np.empty((r_low, d), dtype=np.int64)
    factor = np.empty((r_low, d), dtype=np.float64)
    for b in range(r_low):
        for lv in range(d):
            up = allexp[b].copy()
            up[lv] += 1
            child_t[b, lv] = index[up.tobytes()]
            factor[b, lv] = float(up[lv])
    return _Tables(d, g, tuple(offsets), tuple(steps), degree, multinomial, child_t, factor)


def _poly_weights(approx: Approximation, d: int, scale: float) -> np.ndarray:
    """``w_a = c_|alpha| scale^|alpha| |alpha|!/alpha!`` (theory §1.1, all on the query side)."""
    tables = _tables(d, approx.degree)
    deg = tables.degree
    coeffs = approx.coeffs[deg] * np.power(scale, deg.astype(np.float64))
    return coeffs * tables.multinomial  # [r]


def _p_abs(coeffs: np.ndarray, s: float) -> float:
    """``P^abs(s) = sum_m |c_m| s^m``."""
    return float(np.sum(np.abs(coeffs) * s ** np.arange(len(coeffs), dtype=np.float64)))


def _dp_abs(coeffs: np.ndarray, s: float) -> float:
    """``P'^abs(s) = sum_m m |c_m| s^(m-1)``."""
    m = np.arange(1, len(coeffs), dtype=np.float64)
    return float(np.sum(m * np.abs(coeffs[1:]) * s ** (m - 1.0)))


def _ratio_range(x0: float, x1: float, y0: float, y1: float) -> tuple[float, float]:
    """Range of ``x / y`` for ``x in [x0, x1]``, ``y in [y0, y1]``, ``y0 > 0``."""
    lo = min(x0 / y0, x0 / y1)
    hi = max(x1 / y0, x1 / y1)
    return lo, hi


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Inputs:
    x: torch.Tensor  # [nb, L, dm]
    y: torch.Tensor  # [nb, L, dh]
    w: dict[str, torch.Tensor]  # frozen weights [dm, dh]
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]]  # A [r, dh], B [dm, r]
    alpha: float
    scale: float
    lead: tuple[int, ...]
    dtype: torch.dtype  # compute dtype of the exact path


def _validate(
    x: object,
    y: object,
    w_q: object,
    w_k: object,
    w_v: object,
    adapters: object,
    alpha: object,
    scale: object,
) -> _Inputs:
    xt = check_tensor("x", x)
    yt = check_tensor("y", y)
    L, dm = xt.shape[-2], xt.shape[-1]
    if tuple(yt.shape[:-1]) != tuple(xt.shape[:-1]):
        raise InvalidInputError(
            "y",
            f"shape {tuple(yt.shape)} does not match x's {tuple(xt.shape)} (expected "
            f"[..., {L}, d_head] with the same leading dimensions)",
        )
    dh = yt.shape[-1]
    if yt.device != xt.device:
        raise InvalidInputError("y", f"on device {yt.device}, x is on {xt.device}")
    weights: dict[str, torch.Tensor] = {}
    for name, wt in (("w_q", w_q), ("w_k", w_k), ("w_v", w_v)):
        t = check_tensor(name, wt)
        if t.dim() != 2 or tuple(t.shape) != (dm, dh):
            raise InvalidInputError(
                name, f"expected shape (d_model, d_head) = ({dm}, {dh}), got {tuple(t.shape)}"
            )
        if t.device != xt.device:
            raise InvalidInputError(name, f"on device {t.device}, x is on {xt.device}")
        weights[name[-1]] = t
    if not isinstance(adapters, Mapping):
        raise InvalidInputError(
            "adapters",
            f"expected a dict like {{'q': (A, B), 'v': (A, B)}}, got {type(adapters).__name__}",
        )
    for key in adapters:
        if key not in ADAPTER_NAMES:
            raise InvalidInputError(
                "adapters", f"unknown adapter name {key!r}; use 'q', 'k' and 'v'"
            )
    for key in ("q", "v"):
        if key not in adapters:
            raise InvalidInputError(
                "adapters",
                f"missing {key!r}: partial adaptation needs 'q' and 'v', full adds 'k'",
            )
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in ADAPTER_NAMES:
        if key not in adapters:
            continue
        pair = adapters[key]
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise InvalidInputError(f"adapters[{key!r}]", "expected a pair (A, B)")
        a = check_tensor(f"adapters[{key!r}][0]", pair[0])
        b = check_tensor(f"adapters[{key!r}][1]", pair[1])
        if a.dim() != 2 or a.shape[1] != dh:
            raise InvalidInputError(
                f"adapters[{key!r}][0]",
                f"A must have shape (r, d_head) = (r, {dh}), got {tuple(a.shape)}",
            )
        if b.dim() != 2 or b.shape[0] != dm:
            raise InvalidInputError(
                f"adapters[{key!r}][1]",
                f"B must have shape (d_model, r) = ({dm}, r), got {tuple(b.shape)}",
            )
        if b.shape[1] != a.shape[0]:
            raise InvalidInputError(
                f"adapters[{key!r}][1]",
                f"rank mismatch: B has rank {b.shape[1]}, A has rank {a.shape[0]}",
            )
        for nm, t in ((f"adapters[{key!r}][0]", a), (f"adapters[{key!r}][1]", b)):
            if t.device != xt.device:
                raise InvalidInputError(nm, f"on device {t.device}, x is on {xt.device}")
        pairs[key] = (a, b)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise InvalidInputError("alpha", f"expected a number, got {alpha!r}")
    if not math.isfinite(float(alpha)):
        raise InvalidInputError("alpha", f"must be finite, got {alpha!r}")
    sc = check_scale(scale, dh)
    lead = tuple(xt.shape[:-2])
    tensors = [xt, yt, *weights.values()] + [t for p in pairs.values() for t in p]
    return _Inputs(
        x=xt.reshape(-1, L, dm),
        y=yt.reshape(-1, L, dh),
        w=weights,
        adapters=pairs,
        alpha=float(alpha),
        scale=sc,
        lead=lead,
        dtype=compute_dtype_of(*tensors),
    )


def _effective_weights(inp: _Inputs, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``W_mu = W*_mu + (alpha / r) B A`` in ``dtype``: [dm, dh] each."""
    out = {}
    for mu in ADAPTER_NAMES:
        w = inp.w[mu].to(dtype)
        if mu in inp.adapters:
            a, b = (t.to(dtype) for t in inp.adapters[mu])
            s = inp.alpha / a.shape[0]
            w = w + s * (b @ a)  # [dm, dh]
        out[mu] = w
    return out


def _adapter_grads(
    inp: _Inputs, dw: dict[str, torch.Tensor]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``dA = s B^T dW`` [r, dh], ``dB = s dW A^T`` [dm, r], in the adapters' dtypes."""
    grads = {}
    for mu, (a, b) in inp.adapters.items():
        g = dw[mu]
        s = inp.alpha / a.shape[0]
        da = s * (b.to(g.dtype).T @ g)  # [r, dh]
        db = s * (g @ a.to(g.dtype).T)  # [dm, r]
        grads[mu] = (da.to(a.dtype), db.to(b.dtype))
        for i, t in enumerate(grads[mu]):
            if not bool(torch.isfinite(t).all()):
                name = f"adapters[{mu!r}][{i}]"
                raise OutOfRangeError(
                    name,
                    f"the gradient d{'AB'[i]}_{mu} does not fit {t.dtype} (it overflows or is "
                    f"not finite in float64); pass float64 adapters, or rescale x, y or scale",
                )
    return grads


# --------------------------------------------------------------------------------------------
# exact path: blocked closed form (FlashAttention-2 style backward, one pass per query block)
# --------------------------------------------------------------------------------------------


def _exact_qkv_grads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    y: torch.Tensor,
    scale: float,
    progress: Progress | None,
    need_k: bool = True,
) -> tuple[float, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Exact ``loss, dQ, dK, dV`` for ``q, k, v, y: [nb, L, dh]``; never forms ``[L, L]``.

    Per query block ``b``: ``F_b = softmax(scale Q_b K^T)`` [nb, b, L], ``O_b = F_b V``,
    ``E_b = O_b - Y_b``, ``D_b = rowsum(E_b ∘ O_b)`` (= ``(F∘G) 1``),
    ``dS_b = F_b ∘ (E_b V^T - D_b)``,
    ``dQ_b = scale dS_b K``, and the key-side sums ``dK += scale dS_b^T Q_b``, ``dV += F_b^T E_b``.
    """
    nb, L, _ = q.shape
    bq = max(1, min(L, _EXACT_BLOCK_ELEMS // max(1, nb * L)))
    nblocks = -(-L // bq)
    dq = torch.empty_like(q)
    dk = torch.zeros_like(k) if need_k else None
    dv = torch.zeros_like(v)
    kt = k.transpose(1, 2)  # [nb, dh, L]
    vt = v.transpose(1, 2)  # [nb, dh, L]
    loss = torch.zeros((), dtype=torch.float64, device=q.device)
    for ib in range(nblocks):
        i0, i1 = ib * bq, min(L, (ib + 1) * bq)
        qb = q[:, i0:i1]  # [nb, b, dh]
        # scores [nb, b, L]: the scale applied to the queries first, so that Q K^T itself
        # cannot overflow where the scaled scores fit (a tiny scale on huge projections)
        f = torch.bmm(qb * scale, kt)
        f.sub_(f.amax(dim=-1, keepdim=True)).exp_()
        f.div_(f.sum(dim=-1, keepdim=True))  # F_b, rows sum to 1
        o = torch.bmm(f, v)  # [nb, b, dh]
        e = o - y[:, i0:i1]  # [nb, b, dh]
        loss += 0.5 * e.double().square().sum()
        dd = (e * o).sum(dim=-1, keepdim=True)  # [nb, b, 1]
        dv.baddbmm_(f.transpose(1, 2), e)  # dV += F_b^T E_b
        g = torch.bmm(e, vt).sub_(dd)  # [nb, b, L]  G - D
        g.mul_(f).mul_(scale)  # scale * dS_b: scaled before the products with K and Q, so
        # that they cannot overflow where the scaled gradients fit (as the scores above)
        dq[:, i0:i1] = torch.bmm(g, k)
        if dk is not None:
            dk.baddbmm_(g.transpose(1, 2), qb)
        _call_progress(progress, ib + 1, nblocks)
    return float(loss), dq, dk, dv


def _exact_in(
    inp: _Inputs, dt: torch.dtype, progress: Progress | None
) -> tuple[float, dict[str, torch.Tensor]] | None:
    """The blocked closed form in ``dt``; None when anything it computes is not finite there.

    An overflow anywhere (projections, scores, their running max, gradient terms) shows as an
    inf or a NaN in the loss or the gradients (``inf - inf`` in the softmax shift), so one
    finiteness check of the results decides; an ``exp`` that underflows is exact to ``dt``.
    """
    w = _effective_weights(inp, dt)
    x = inp.x.to(dt)  # [nb, L, dm]
    q, k, v = x @ w["q"], x @ w["k"], x @ w["v"]  # [nb, L, dh] each
    loss, dq, dk, dv = _exact_qkv_grads(
        q, k, v, inp.y.to(dt), inp.scale, progress, need_k="k" in inp.adapters
    )
    xf = x.reshape(-1, x.shape[-1])  # [nb*L, dm]
    dh = dq.shape[-1]
    dw = {"q": xf.T @ dq.reshape(-1, dh), "v": xf.T @ dv.reshape(-1, dh)}  # [dm, dh]
    if dk is not None:
        dw["k"] = xf.T @ dk.reshape(-1, dh)
    ok = math.isfinite(loss) and all(bool(torch.isfinite(t).all()) for t in dw.values())
    return (loss, dw) if ok else None


def _exact(inp: _Inputs, progress: Progress | None) -> tuple[float, dict[str, torch.Tensor]]:
    """The blocked closed form in the compute dtype, or in float64 when something leaves the
    compute dtype's range; raises ``OutOfRangeError`` when float64 cannot hold it either."""
    for dt in (inp.dtype, torch.float64) if inp.dtype != torch.float64 else (torch.float64,):
        if abs(inp.scale) >= float(torch.finfo(dt).max):
            continue  # the scale itself is beyond dt: its scores would overflow at once
        got = _exact_in(inp, dt, progress)
        if got is not None:
            return got
    raise OutOfRangeError(
        "x",
        "the projections x @ W, the scores scale * Q K^T, the loss or the gradients leave "
        "the range of float64 for these inputs; rescale x, y, the weights or scale",
    )


# --------------------------------------------------------------------------------------------
# polynomial path: closed-form reverse mode through the factored forward (float64)
# --------------------------------------------------------------------------------------------


def _features_batched(x: torch.Tensor, tables: _Tables) -> torch.Tensor:
    """Unweighted monomials of ``x: [nb, b, d]`` as ``[nb, r, b]`` in ``_Tables`` order."""
    nb, b, d = x.shape
    xt = x.permute(2, 0, 1).reshape(d, nb * b).contiguous()  # [d, nb*b]
    out = torch.empty((tables.r, nb * b), dtype=x.dtype, device=x.device)  # [r, nb*b]
    out[0].fill_(1.0)
    for dst, src, cnt, v in tables.steps:
        torch.mul(out[src : src + cnt], xt[v : v + 1], out=out[dst : dst + cnt])
    return out.view(-1, nb, b).transpose(0, 1)  # [nb, r, b]


def _poly_blocking(nb: int, L: int, r: int) -> tuple[int, int]:
    """Rows per block and number of blocks of the polynomial passes (also used by §5's N)."""
    blk = max(16, min(L, _POLY_BLOCK_ELEMS // max(1, nb * r)))
    return blk, -(-L // blk)


@dataclass(frozen=True)
class _Consts:
    """Constants of the a-posteriori bound for one approximation (docs/lora_bound.md §3-§6).

    Scalars are per approximation; tensors are per slice ``[nb]`` or per slice and column
    ``[nb, d]``.
    """

    omega: float  # §3: F_ij <= omega F~_ij
    theta: float  # §3: |F~_ij / F_ij - 1| <= theta
    eta: float  # §3: |F'~_ij / F_ij - 1| <= eta
    c1: float  # §A: factored sum bound T~ <= c1 |T^| + c2 zmax
    c2: float
    e_ehat: torch.Tensor  # [nb]     §5: |E^_ik - E~_ik| <= e_ehat
    e_o: torch.Tensor  # [nb, d]  §4.1: |O~_ik - O_ik| <= e_o[k]
    e_e: torch.Tensor  # [nb, d]  §4.2: |E~_ik - E_ik| <= e_e[k]
    vrange: torch.Tensor  # [nb, d]  column range of the computed centred values
    kmax: torch.Tensor  # [nb, d]  max_j |K^c_jl|
    e_q: float
    e_kc: float
    e_vc: float
    round_q: torch.Tensor  # [nb, d]  §6: input perturbation + term rounding of dQ (per column)
    round_k: torch.Tensor  # [nb, d]
    round_v: torch.Tensor  # [nb, d]


def _poly_qkv_grads(
    q: torch.Tensor,
    kc: torch.Tensor,
    vc: torch.Tensor,
    yc: torch.Tensor,
    approx: Approximation,
    scale: float,
    progress: Progress | None,
    need_k: bool = True,
    cert: _Consts | None = None,
) -> tuple[float, torch.Tensor, torch.Tensor | None, torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """Surrogate ``loss, dQ, dK, dV`` by the closed-form backward of the factored forward.

    Shapes: ``q, kc, vc, yc: [nb, L, d]`` float64 (keys and values centred, ``yc`` shifted by the
    same value centre). With ``F(x) = [x^alpha]_alpha`` (unweighted, degree-ordered, ``[r]``),
    ``w`` the weights of :func:`_poly_weights`, ``Vext = [V, 1]`` ``[L, d+1]``:

    1. keys:    ``Mext = sum_j F(k_j) Vext_j^T``                 [r, d+1]   (``[M, z]``)
    2. queries: ``[num, den] = (w∘F(q_i)) @ Mext``, ``O = num/den``, ``E = O - Y``,
                ``D = E·O``, ``C = [E/den, -D/den]``            [b, d+1]
                ``dMext += F(q_i) C_i^T``                          [r, d+1]  (times w after)
                ``dQ_il = sum_k C_ik (F_{<=g-1}(q_i) @ Hq)[l, k]``,
                ``Hq[beta, l, k] = (beta_l + 1) w_{beta+e_l} Mext[beta+e_l, k]``
    3. keys:    ``dV_j = F(k_j)^T dM``, ``dK_jl = sum_k Vext_jk (F_{<=g-1}(k_j) @ Hk)[l, k]``,
                ``Hk[beta, l, k] = (beta_l + 1) dMext[beta+e_l, k]``

    This is exactly the chain rule of ``1/2 ||num/den - Y||^2`` (tested against autograd).

    With ``cert`` (docs/lora_bound.md §A-§4), the same GEMMs carry extra columns: ``|Kc|``
    ``[L, d]`` on the key side of pass 1 (row sums ``sum_j F~_ij |Kc_jl|``) and the non-negative
    query weights ``z_i = [a_i |Q_i|, b_i, |E_i|, 1]`` ``[L, 2d+2]`` on the query side of pass 2
    (column sums ``sum_i F~_ij z_i`` in pass 3); the last return value is then the per-row error
    bounds ``(err_q, err_k, err_v)`` ``[nb, L, d]`` each (``err_k`` zeros when ``need_k`` is
    False), else None.
    """
    nb, L, d = q.shape
    g = approx.degree
    tables = _tables(d, g)
    r = tables.r
    child_np, factor_np = tables.child, tables.factor
    r_low = child_np.shape[0]
    dev = q.device
    f64 = torch.float64
    child = torch.from_numpy(child_np).to(dev)  # [r', d]
    factor = torch.from_numpy(factor_np).to(dev, f64)  # [r', d]
    w = torch.from_numpy(_poly_weights(approx, d, scale)).to(dev, f64)  # [r]
    blk, nblocks = _poly_blocking(nb, L, r)
    total = 3 * nblocks
    done = 0
    ones = torch.ones((nb, L, 1), dtype=f64, device=dev)
    vext = torch.cat([vc, ones], dim=-1)  # [nb, L, d+1]
    # key-side columns: [V, 1] and, for the bound, |Kc| (§4.5)
    kside = torch.cat([vext, kc.abs()], dim=-1) if cert is not None else vext  # [nb, L, .]
    beta = abs(scale)

    # pass 1: keys -> Mext = [M, z] (and sum_j F(k_j) |Kc_j|^T for the bound)
    maug = torch.zeros((nb, r, kside.shape[-1]), dtype=f64, device=dev)
    for jb in range(nblocks):
        j0, j1 = jb * blk, min(L, (jb + 1) * blk)
        f2 = _features_batched(kc[:, j0:j1], tables)  # [nb, r, b]
        maug.baddbmm_(f2, kside[:, j0:j1])  # [nb, r, d+1 (+d)]
        done += 1
        _call_progress(progress, done, total)
    mwaug = maug * w[:, None]  # [nb, r, .]  (w∘Mext)
    mw = mwaug[..., : d + 1]  # [nb, r, d+1]
    hq = (factor[None, :, :, None] * mw[:, child]).reshape(nb, r_low, d * (d + 1))

    # pass 2: queries -> loss, dQ, dMext (and the per-row bound of dQ, the z weights)
    nz = 2 * d + 2 if cert is not None else 0
    dmu = torch.zeros((nb, r, d + 1 + nz), dtype=f64, device=dev)
    dq = torch.empty_like(q)
    err_q = torch.empty_like(q) if cert is not None else None
    zmax = torch.zeros((nb, 1, nz), dtype=f64, device=dev)
    loss = torch.zeros((), dtype=f64, device=dev)
    for ib in range(nblocks):
        i0, i1 = ib * blk, min(L, (ib + 1) * blk)
        f1 = _features_batched(q[:, i0:i1], tables)  # [nb, r, b]
        nd = torch.bmm(f1.transpose(1, 2), mwaug)  # [nb, b, d+1 (+d)]  [num, den, T|K|]
        den = nd[..., d : d + 1]  # [nb, b, 1]
        o = nd[..., :d] / den  # [nb, b, d]
        e = o - yc[:, i0:i1]  # [nb, b, d]
        loss += 0.5 * e.square().sum()
        dd = (e * o).sum(dim=-1, keepdim=True)  # [nb, b, 1]
        c = torch.cat([e / den, -(dd / den)], dim=-1)  # [nb, b, d+1]
        if cert is not None and err_q is not None:
            z, eq = _row_bound(cert, nd[..., d + 1 :] / den, e, q[:, i0:i1], beta)
            err_q[:, i0:i1] = eq  # [nb, b, d]
            zmax = torch.maximum(zmax, z.amax(dim=1, keepdim=True))
            dmu.baddbmm_(f1, torch.cat([c, z / den], dim=-1))  # [nb, r, d+1+2d+2]
        else:
            dmu.baddbmm_(f1, c)  # [nb, r, d+1]
        t = torch.bmm(f1[:, :r_low].transpose(1, 2), hq)  # [nb, b, d*(d+1)]
        dq[:, i0:i1] = (t.view(nb, -1, d, d + 1) * c[:, :, None, :]).sum(-1)  # [nb, b, d]
        done += 1
        _call_progress(progress, done, total)
    dmaug = dmu * w[:, None]  # [nb, r, d+1 (+2d+2)]
    dmext = dmaug[..., : d + 1]  # [nb, r, d+1]  = U1^T C
    dm = dmaug[..., :d]  # [nb, r, d]
    dmsel = torch.cat([dm, dmaug[..., d + 1 :]], dim=-1)  # [nb, r, d + 2d+2]  [dM, z sums]
    hk = (factor[None, :, :, None] * dmext[:, child]).reshape(nb, r_low, d * (d + 1))

    # pass 3: keys -> dV, dK (and their per-row bounds)
    dv = torch.empty_like(vc)
    dk = torch.empty_like(kc) if need_k else None
    err_k = torch.zeros_like(kc) if cert is not None else None
    err_v = torch.empty_like(vc) if cert is not None else None
    for jb in range(nblocks):
        j0, j1 = jb * blk, min(L, (jb + 1) * blk)
        f2t = _features_batched(kc[:, j0:j1], tables).transpose(1, 2)  # [nb, b, r]
        if cert is not None and err_v is not None and err_k is not None:
            both = torch.bmm(f2t, dmsel)  # [nb, b, d + 2d+2]
            dv[:, j0:j1] = both[..., :d]  # [nb, b, d]
            ek, ev = _col_bound(cert, both[..., d:], zmax, beta)
            err_k[:, j0:j1] = ek
            err_v[:, j0:j1] = ev
        else:
            dv[:, j0:j1] = torch.bmm(f2t, dm)  # [nb, b, d]
        if dk is not None:
            t = torch.bmm(f2t[:, :, :r_low], hk)  # [nb, b, d*(d+1)]
            dk[:, j0:j1] = (t.view(nb, -1, d, d + 1) * vext[:, j0:j1, None, :]).sum(-1)
        done += 1
        _call_progress(progress, done, total)
    errs = None
    if err_q is not None and err_k is not None and err_v is not None:
        errs = (err_q, err_k, err_v)
    return float(loss), dq, dk, dv, errs


def _row_bound(
    cert: _Consts, tk_hat: torch.Tensor, e_hat: torch.Tensor, q: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query row (docs/lora_bound.md §4.3-§4.5): the z weights and the dQ bound.

    ``tk_hat: [nb, b, d]`` computed ``sum_j F~_ij |Kc_jl|``; ``e_hat, q: [nb, b, d]``.
    Returns ``z = [a |Q|, b, |E^|, 1]`` ``[nb, b, 2d+2]`` and ``err_q`` ``[nb, b, d]``.
    """
    vr = cert.vrange[:, None, :]  # [nb, 1, d]
    e_e = cert.e_e[:, None, :]  # [nb, 1, d]
    e_o = cert.e_o[:, None, :]
    ae = e_hat.abs() + cert.e_ehat[:, None, None]  # [nb, b, d]  >= |E~_ik|        (§4.3)
    hq = (ae * vr).sum(-1, keepdim=True)  # [nb, b, 1]   >= |H~_ij|                   (4.3a)
    e_h = (e_e * vr).sum(-1, keepdim=True) + ((ae + e_e) * (cert.e_vc + e_o)).sum(
        -1, keepdim=True
    )  # [nb, b, 1]  >= |H~_ij - H_ij|                            (4.3b)
    a = cert.eta * hq + e_h  # [nb, b, 1]  |dS~ - dS| <= F a                            (4.4)
    b = hq + e_h  # [nb, b, 1]            |dS| <= F b
    tk = cert.c1 * tk_hat.abs() + cert.c2 * cert.kmax[:, None, :]  # >= sum_j F~|K|  (A.1)
    err_q = beta * (a * cert.omega * tk + b * cert.e_kc) + cert.round_q[:, None, :]  # (4.5)
    ones = torch.ones_like(a)
    z = torch.cat([a * q.abs(), b, e_hat.abs(), ones], dim=-1)  # [nb, b, 2d+2]
    return z, err_q


def _col_bound(
    cert: _Consts, t_hat: torch.Tensor, zmax: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per key row (docs/lora_bound.md §4.6-§4.7) from computed column sums ``[nb, b, 2d+2]``."""
    d = cert.vrange.shape[-1]
    t = cert.c1 * t_hat.abs() + cert.c2 * zmax  # [nb, b, 2d+2]  >= sum_i F~_ij z_i  (A.2)
    err_k = beta * cert.omega * (t[..., :d] + cert.e_q * t[..., d : d + 1])  # (4.6)
    err_k = err_k + cert.round_k[:, None, :]
    tau_e, tau_1 = t[..., d + 1 : 2 * d + 1], t[..., 2 * d + 1 :]
    e_e = cert.e_e[:, None, :]
    err_v = cert.omega * (
        cert.theta * tau_e + (cert.theta * cert.e_ehat[:, None, None] + e_e) * tau_1
    )  # (4.7)
    return err_k, err_v + cert.round_v[:, None, :]


@dataclass(frozen=True)
class _Prepared:
    """Centred float64 projections and the data summaries the bound needs (docs §2)."""

    q: torch.Tensor  # [nb, L, dh]
    kc: torch.Tensor  # [nb, L, dh]  K - c_K
    vc: torch.Tensor  # [nb, L, dh]  V - c_V
    yc: torch.Tensor  # [nb, L, dh]  Y - c_V
    x: torch.Tensor  # [nb, L, dm]
    radius: float  # R: bounds |S| of exact and computed scores and the absolute-value sums
    sigma: float  # score perturbation by projection rounding
    e_q: float
    e_kc: float
    e_vc: float
    e_yc: float
    kinf: torch.Tensor  # [nb, dh]  max_j |K_c[j, l]| (+ error)
    q1: torch.Tensor  # [nb, dh]  mean_i |Q[i, l]| (+ error)
    nu: torch.Tensor  # [nb]  max_j ||V_c[j]||_2 (+ error)
    ebar: torch.Tensor  # [nb]  max_i ||Y_c[i]||_2 (+ error) + nu
    vrange: torch.Tensor  # [nb, dh]  max_j Vc[j, k] - min_j Vc[j, k] (computed values)
    kmax: torch.Tensor  # [nb, dh]  max_j |Kc[j, l]| (computed values)


def _prepare(inp: _Inputs) -> _Prepared:
    """float64 projections, centring and the norms of docs/lora_bound.md §2 (O(L d_model d))."""
    f64 = torch.float64
    x = inp.x.to(f64)  # [nb, L, dm]
    ax = x.abs()
    dm = x.shape[-1]
    dh = inp.y.shape[-1]
    proj: dict[str, torch.Tensor] = {}
    errs: dict[str, float] = {}
    for mu in ADAPTER_NAMES:
        wstar = inp.w[mu].to(f64)  # [dm, dh]
        if mu in inp.adapters:
            a, b = (t.to(f64) for t in inp.adapters[mu])
            s = inp.alpha / a.shape[0]
            w = wstar + s * (b @ a)  # [dm, dh]
            wabs = w.abs() + wstar.abs() + abs(s) * (b.abs() @ a.abs())
            coef = _gamma(dm) + _gamma(a.shape[0] + 2)
        else:
            w = wstar
            wabs = wstar.abs()
            coef = _gamma(dm)
        proj[mu] = x @ w  # [nb, L, dh]
        errs[mu] = coef * float((ax @ wabs).amax()) * _BOUND_INFLATE
    q, k, v = proj["q"], proj["k"], proj["v"]
    ck = midrange(k.amax(dim=1, keepdim=True), k.amin(dim=1, keepdim=True))  # [nb, 1, dh]
    cv = midrange(v.amax(dim=1, keepdim=True), v.amin(dim=1, keepdim=True))
    kc, vc = k - ck, v - cv
    yc = inp.y.to(f64) - cv
    e_q = errs["q"]
    g1 = _gamma(1)
    e_kc = errs["k"] + g1 * float(kc.abs().amax())
    e_vc = errs["v"] + g1 * float(vc.abs().amax())
    e_yc = g1 * float(yc.abs().amax())
    aq = q.abs() + e_q  # [nb, L, dh]
    ak = kc.abs() + e_kc
    radius = matrix_radius(aq, ak, inp.scale)
    sigma = (
        abs(inp.scale)
        * (e_q * float(ak.sum(-1).amax()) + e_kc * float(aq.sum(-1).amax()))
        * _BOUND_INFLATE
    )
    kinf = ak.amax(dim=1)  # [nb, dh]
    q1 = aq.mean(dim=1) * _BOUND_INFLATE  # [nb, dh]
    sq = math.sqrt(dh)
    nu = (vc.norm(dim=-1).amax(dim=1) + sq * e_vc) * _BOUND_INFLATE  # [nb]
    ebar = (yc.norm(dim=-1).amax(dim=1) + sq * e_yc) * _BOUND_INFLATE + nu  # [nb]
    vrange = (vc.amax(dim=1) - vc.amin(dim=1)) * (1 + 2 * _U64)  # [nb, dh]  (one rounding)
    kmax = kc.abs().amax(dim=1)  # [nb, dh]  exact
    del dm
    return _Prepared(
        q=q, kc=kc, vc=vc, yc=yc, x=x, radius=radius, sigma=sigma, e_q=e_q, e_kc=e_kc,
        e_vc=e_vc, e_yc=e_yc, kinf=kinf, q1=q1, nu=nu, ebar=ebar, vrange=vrange, kmax=kmax,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# the certified bound (docs/lora_bound.md, section numbers in comments)
# --------------------------------------------------------------------------------------------


def _weight_errors(approx: Approximation, sigma: float) -> tuple[float, ...]:
    """§3: ``(a1, b1, theta, eta, omega, lam)`` of the weights for scores perturbed by sigma."""
    a0, b0 = approx.dmin, approx.dmax
    ad, bd = approx.derivative_range()
    es, ems = math.exp(sigma), math.exp(-sigma)
    a1, b1 = (1 + a0) * ems - 1, (1 + b0) * es - 1
    if a1 <= -1.0:
        inf = math.inf
        return a1, b1, inf, inf, inf, inf
    a1d = (1 + ad) * (ems if 1 + ad >= 0 else es) - 1
    b1d = (1 + bd) * (es if 1 + bd >= 0 else ems) - 1
    th_lo, th_hi = _ratio_range(1 + a1, 1 + b1, 1 + a1, 1 + b1)
    theta = max(abs(th_lo - 1), abs(th_hi - 1))  # |F~/F - 1|
    et_lo, et_hi = _ratio_range(1 + a1d, 1 + b1d, 1 + a1, 1 + b1)
    eta = max(abs(et_lo - 1), abs(et_hi - 1))  # |F'~/F - 1|
    lam = max(abs(et_lo), abs(et_hi))  # |F'~/F|
    omega = (1 + b1) / (1 + a1)  # F <= omega F~
    return a1, b1, theta, eta, omega, lam


def _constants(
    prep: _Prepared, approx: Approximation, *, L: int, dh: int, scale: float
) -> _Consts | str:
    """The constants of docs/lora_bound.md §3, §5, §6, §A; a string says why none certify."""
    beta = abs(scale)
    R = prep.radius
    g = approx.degree
    r = feature_count(dh, g)
    sq = math.sqrt(dh)
    u = _U64
    # §5: roundings along any term's path; a sum over keys (queries) is blocked: at most blk
    # additions inside one block's GEMM and one per later block's accumulation
    blk, nblocks = _poly_blocking(prep.q.shape[0], L, r)
    n_chain = 3 * g + 16 + blk + nblocks + r + 2 * dh + 2
    gam = _gamma(n_chain)
    # §3: relative error ranges of P and P' on |s| <= R, widened by the score perturbation sigma
    a1, b1, theta, eta, omega, lam = _weight_errors(approx, prep.sigma)
    if a1 <= -1.0:
        return "the polynomial's relative error reaches -1 (P may vanish)"
    t1 = tv_factor(a1, b1)
    # §5: rounding of the factored sums
    kappa = math.exp(R) * _p_abs(approx.coeffs, R)
    kappa_d = math.exp(R) * _dp_abs(approx.coeffs, R)
    zeta = gam * kappa / (1 + a1)
    if not math.isfinite(zeta) or zeta >= 0.5:
        return "float64 rounding of the factored sums is not certifiably small"
    tau = (u + zeta) / (1 - zeta)
    e2r = math.exp(2 * R)
    nu, ebar = prep.nu, prep.ebar  # [nb]
    e_ohat = nu * (tau + gam * kappa * (1 + u) / ((1 + a1) * (1 - zeta)))  # [nb]
    ehat = (ebar + sq * e_ohat) * (1 + u)
    nu_o = nu + sq * e_ohat
    e_ehat = sq * e_ohat + u * ehat  # [nb]  |E^_ik - E~_ik| <= ||E^_i - E~_i||
    gdv = _gamma(dh)
    dbar = ehat * nu_o * (1 + gdv)
    e_d = e_ehat * nu_o + ebar * sq * e_ohat + gdv * ehat * nu_o
    psi = nu * (e_ehat + ehat * tau) + (e_d + dbar * tau)  # §5: den * |C^ - C~| terms
    r_qk = gam * kappa_d * (1 + u) * (ehat * nu + dbar) / ((1 + a1) * (1 - zeta))  # §6
    r_v = gam * kappa * ehat * (1 + u) / ((1 + a1) * (1 - zeta))
    kinf, q1 = prep.kinf, prep.q1  # [nb, dh]
    # §6: per-column input perturbation and term rounding of the backward
    round_q = beta * kinf * (lam * psi + r_qk)[:, None]
    round_k = beta * q1 * (e2r * lam * psi + r_qk)[:, None]
    round_v = ((1 + theta) * e2r * (e_ehat + ehat * tau) + r_v)[:, None].expand(-1, dh)
    # §4.1-4.2: per-column error of the surrogate output and residual
    e_o = t1 * prep.vrange + prep.e_vc  # [nb, dh]
    e_e = e_o + prep.e_yc
    # §A: factored sums of non-negative weights
    c1 = (1 + zeta) / (1 - u)
    c2 = gam * kappa * (1 + zeta) * (1 + u) / ((1 + a1) * (1 - zeta) * (1 - u))
    return _Consts(
        omega=omega, theta=theta, eta=eta, c1=c1, c2=c2, e_ehat=e_ehat, e_o=e_o, e_e=e_e,
        vrange=prep.vrange, kmax=prep.kmax, e_q=prep.e_q, e_kc=prep.e_kc, e_vc=prep.e_vc,
        round_q=round_q, round_k=round_k, round_v=round_v.contiguous(),
    )  # fmt: skip


@dataclass(frozen=True)
class _Certificate:
    """A-posteriori certificate of one polynomial run (docs/lora_bound.md §7)."""

    bounds: dict[str, tuple[float, float]]  # max-abs error bound of (dA, dB) per adapter
    maxabs: dict[str, tuple[float, float]]  # max |computed dA|, max |computed dB|
    ratios: dict[str, tuple[float, float]]  # b / (max|G~| - b) (inf when max|G~| <= b)

    def worst(self) -> float:
        return max((x for pair in self.ratios.values() for x in pair), default=0.0)

    def worst_raw(self) -> float:
        """Largest ``b / max|G~|`` (finite even where ``b >= max|G~|``; for the retry)."""
        out = 0.0
        for mu, pair in self.bounds.items():
            for b, m in zip(pair, self.maxabs[mu], strict=True):
                out = max(out, b / m if m > 0 else math.inf)
        return out


def _relative(b: float, m: float) -> float:
    """``b / (m - b)``: certified bound relative to the lower bound ``m - b`` of max|G|."""
    if not math.isfinite(b) or m - b <= 0:
        return math.inf
    return b / (m - b)


def _certify(
    inp: _Inputs,
    x: torch.Tensor,
    errs: tuple[torch.Tensor, ...],
    d_hat: dict[str, torch.Tensor],
    dw: dict[str, torch.Tensor],
    grads: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> _Certificate:
    """§7: per-row bounds -> dW -> dA, dB, and the relative bounds (O(L d_model d_head))."""
    err_of = {"q": errs[0], "k": errs[1], "v": errs[2]}
    nb, L, dm = x.shape
    ax = x.abs().reshape(-1, dm)  # [nb*L, dm]
    g_rows = _gamma(nb * L)
    bounds, maxabs, ratios = {}, {}, {}
    for mu, (a, b) in inp.adapters.items():
        dh = a.shape[1]
        err = err_of[mu].reshape(-1, dh)  # [nb*L, dh]
        # (7.1): |dW^ - dW| <= |X|^T err + gamma_{nb L} |X|^T |d^|
        ew = (ax.T @ err + g_rows * (ax.T @ d_hat[mu].abs().reshape(-1, dh))) * _BOUND_INFLATE
        s = abs(inp.alpha / a.shape[0])
        abs_a = a.to(torch.float64).abs()  # [r, dh]
        abs_b = b.to(torch.float64).abs()  # [dm, r]
        awh = dw[mu].abs()  # [dm, dh]  |dW^|
        # (7.2): dA = s B^T dW (inner length dm, one multiply), dB = s dW A^T (inner length dh)
        ea = s * (abs_b.T @ ew) + _gamma(dm + 1) * s * (abs_b.T @ awh)  # [r, dh]
        eb = s * (ew @ abs_a.T) + _gamma(dh + 1) * s * (awh @ abs_a.T)  # [dm, r]
        ga, gb = grads[mu]
        # (7.3): the cast to the adapter's dtype rounds once: |fl(x) - x| <= u_out |x| + tiny
        # and |x| <= |fl(x)| / (1 - u_out)
        for t, e_t in ((ga, ea), (gb, eb)):
            if t.dtype != torch.float64:
                u_out = _unit_roundoff(t.dtype)
                tiny = float(torch.finfo(t.dtype).tiny)  # covers gradual underflow of the cast
                e_t.add_(u_out / (1 - u_out) * t.to(torch.float64).abs() + tiny)
        ba = float(ea.amax()) * _BOUND_INFLATE + _UNDERFLOW_GUARD
        bb = float(eb.amax()) * _BOUND_INFLATE + _UNDERFLOW_GUARD
        ma = float(ga.abs().amax()) if ga.numel() else 0.0
        mb = float(gb.abs().amax()) if gb.numel() else 0.0
        bounds[mu] = (ba if math.isfinite(ba) else math.inf, bb if math.isfinite(bb) else math.inf)
        maxabs[mu] = (ma, mb)
        ratios[mu] = (_relative(bounds[mu][0], ma), _relative(bounds[mu][1], mb))
    return _Certificate(bounds, maxabs, ratios)


def _run_polynomial(
    inp: _Inputs, prep: _Prepared, approx: Approximation, progress: Progress | None
) -> tuple[float, dict[str, tuple[torch.Tensor, torch.Tensor]], _Certificate | str]:
    """One polynomial run with degree ``approx.degree`` and its a-posteriori certificate."""
    _, L, dm = prep.x.shape
    dh = prep.q.shape[-1]
    full = "k" in inp.adapters
    cert = _constants(prep, approx, L=L, dh=dh, scale=inp.scale)
    loss, dq, dk, dv, errs = _poly_qkv_grads(
        prep.q, prep.kc, prep.vc, prep.yc, approx, inp.scale, progress, need_k=full,
        cert=cert if isinstance(cert, _Consts) else None,
    )  # fmt: skip
    xf = prep.x.reshape(-1, dm)  # [nb*L, dm]
    d_hat = {"q": dq, "v": dv}
    if dk is not None:
        d_hat["k"] = dk
    dw = {mu: xf.T @ t.reshape(-1, dh) for mu, t in d_hat.items()}  # [dm, dh]
    grads = _adapter_grads(inp, dw)
    if errs is None:
        assert isinstance(cert, str)
        return loss, grads, cert
    return loss, grads, _certify(inp, prep.x, errs, d_hat, dw, grads)


# --------------------------------------------------------------------------------------------
# cost model, degree prediction and planning
# --------------------------------------------------------------------------------------------


def _cost_exact(rt: Rates, *, batch: int, n: int, d: int, full: bool) -> float:
    """Per pair: six ``[b, L] x d`` GEMMs (5 for partial) and the passes over the score block.

    The block (``_EXACT_BLOCK_ELEMS`` elements, far beyond the caches) is streamed through
    memory: ``_exact_qkv_grads`` writes it or reads-modifies-writes it 8 times (scores, scale,
    shift, exp, normalise, ``E V^T``, ``- D``, ``* F``) and only reads it 6 times (max, sum and
    the four ``[b, L] x [L, d]`` products, counted as half a pass each: 11 passes in all; 10.5
    for partial adaptation, without ``dK``), at the calibrated ``rt.stream`` rate.
    """
    pairs = float(batch) * n * n
    gemms = 6.0 if full else 5.0
    passes = 11.0 if full else 10.5
    blocks = -(-batch * n * n // _EXACT_BLOCK_ELEMS)
    overhead = _LAUNCH_SECONDS * (10 + 14 * blocks)
    return pairs * (2.0 * gemms * d / rt.gemm + passes / rt.stream) + overhead


def _cost_polynomial(rt64: Rates, *, batch: int, n: int, d: int, g: int, full: bool) -> float:
    """float64: features in three passes, four ``[r, 2d+2]``-ish GEMMs (the bound's extra
    columns included) and one (partial) or two (full) ``[r', d (d+1)]`` derivative GEMMs per
    row, ``r' = C(d + g - 1, g - 1)``."""
    r, r_low = feature_count(d, g), feature_count(d, g - 1)
    feats = float(batch) * 3.0 * n * r
    deriv = (2.0 if full else 1.0) * 2.0 * r_low * d * (d + 1)
    flops = float(batch) * n * (2.0 * r * (2 * d + 1 + 3 * d + 3 + 3 * d + 2) + deriv)
    blocks = -(-batch * n * r // _POLY_BLOCK_ELEMS)
    overhead = _LAUNCH_SECONDS * (40 + (8 * g + 30) * 3 * blocks)
    return feats / rt64.elems + flops / rt64.skinny + overhead


def _families(radius: float, g: int) -> list[Approximation]:
    """The Chebyshev and Taylor approximations of degree ``g`` on ``[-R, R]`` (both certified)."""
    return [_make_approx(family, g, float(radius)) for family in ("chebyshev", "taylor")]


def _rho(radius: float, n: int) -> float:
    return radius / math.log(n) if n > 1 else math.inf


def _weight_level(approx: Approximation) -> float:
    """``eta + theta`` at sigma = 0: the size of the weights' relative errors (§3)."""
    a1, _, theta, eta, _, _ = _weight_errors(approx, 0.0)
    return math.inf if a1 <= -1.0 else eta + theta


def _predict(approx: Approximation, n: int, factor: float | None = None) -> float:
    """Predicted relative bound (docs/lora_bound.md §8): ``factor n (eta + theta)``.

    A heuristic for choosing the degree, not a certificate: the a-posteriori bound of §7 is
    what is checked. ``factor`` is calibrated on random inputs and refined at run time.
    """
    f = PREDICT_FACTOR if factor is None else factor
    return f * n * _weight_level(approx)


@dataclass(frozen=True)
class _Choice:
    plan: Plan
    approx: Approximation | None


def _choose(
    *,
    method: str,
    eps: float,
    n: int,
    d: int,
    batch: int,
    full: bool,
    radius: float,
    device: torch.device,
    dtype: torch.dtype,
    factor: float | None = None,
    min_degree: int = 1,
) -> _Choice:
    """Pick exact or polynomial (and the degree) from the predicted relative bound."""
    rho = _rho(radius, n)
    rt = rates(device, dtype)
    rt64 = rates(device, torch.float64)
    c_exact = _cost_exact(rt, batch=batch, n=n, d=d, full=full)
    base: dict[str, Any] = dict(
        op="lora-gradient", radius=radius, rho=rho, n=n, d=d, eps=eps, cost_exact=c_exact,
        compute_dtype=str(dtype).replace("torch.", ""),
    )  # fmt: skip
    if method == "exact":
        return _Choice(Plan(method="exact", reason="method='exact' was requested.", **base), None)
    found: Approximation | None = None
    last_why = "no polynomial was tried"
    for g in range(max(1, min_degree), MAX_DEGREE + 1):
        if feature_count(d, g) > MAX_FEATURES:
            last_why = f"degree {g} would need more than {MAX_FEATURES} features"
            break
        c_g = _cost_polynomial(rt64, batch=batch, n=n, d=d, g=g, full=full)
        if method == "auto" and c_g >= c_exact:
            reason = (
                f"Even a degree-{g} polynomial (r={feature_count(d, g)}) is predicted slower "
                f"({c_g:.3g} s) than exact ({c_exact:.3g} s) at R={radius:.3g} (rho={rho:.3g}), "
                f"and lower degrees are not predicted to certify eps={eps:g}; exact."
            )
            return _Choice(Plan(method="exact", reason=reason, **base), None)
        # the gradient needs P and P': keep the family whose weights err least (§3)
        approx = min(_families(radius, g), key=_weight_level)
        pred = _predict(approx, n, factor)
        if pred <= eps:
            found = approx
            break
        last_why = f"degree {g} predicts a relative bound {pred:.2e}"
    if found is None:
        msg = (
            f"No polynomial of degree <= {MAX_DEGREE} is predicted to certify eps={eps:g} for "
            f"the adapter gradients at score radius R={radius:.3g} (rho=R/ln L={rho:.3g}; "
            f"{last_why})"
        )
        if method == "polynomial":
            raise CertificationError(msg + ".")
        return _Choice(Plan(method="exact", reason=msg + "; exact.", **base), None)
    r = feature_count(d, found.degree)
    c_poly = _cost_polynomial(rt64, batch=batch, n=n, d=d, g=found.degree, full=full)
    pred = _predict(found, n, factor)
    common: dict[str, Any] = dict(family=found.family, degree=found.degree, features=r,
                                  cost_polynomial=c_poly, predicted_bound=pred)  # fmt: skip
    if method == "polynomial" or c_poly < c_exact:
        reason = (
            f"Predicted relative gradient bound {pred:.2e} <= eps={eps:g} with a "
            f"degree-{found.degree} {found.family} polynomial (r={r}) at R={radius:.3g} "
            f"(rho={rho:.3g}), predicted {c_poly:.3g} s vs {c_exact:.3g} s exact"
            + ("; polynomial was requested." if method == "polynomial" else ".")
        )
        base["compute_dtype"] = "float64"  # the polynomial path always runs in float64
        return _Choice(Plan(method="polynomial", reason=reason, **base, **common), found)
    reason = (
        f"A degree-{found.degree} polynomial (r={r}) is predicted to certify eps={eps:g} at "
        f"R={radius:.3g} (rho={rho:.3g}), but it is predicted slower ({c_poly:.3g} s) than "
        f"exact ({c_exact:.3g} s); exact."
    )
    return _Choice(Plan(method="exact", reason=reason, **base, **common), None)


def plan_lora_gradient(
    *,
    n: int,
    d: int,
    radius: float,
    eps: float = 1e-3,
    d_model: int | None = None,
    rank: int = 4,
    full: bool = False,
    batch: int = 1,
    dtype: str = "float32",
    method: str = "auto",
) -> Plan:
    """What :func:`lora_gradient` would first try for ``L = n``, ``d_head = d``, radius R.

    Data-free: the degree is the lowest whose *predicted* relative bound
    ``PREDICT_FACTOR n (eta + theta)`` (docs/lora_bound.md §8) is at most ``eps``;
    ``plan.predicted_bound`` is that prediction. ``lora_gradient`` certifies the result
    a posteriori and raises the degree (or goes exact) when the certificate fails.
    ``d_model`` and ``rank`` are validated but do not enter the prediction.
    """
    for name, val in (("n", n), ("d", d), ("rank", rank), ("batch", batch)):
        check_count(name, val)
    if d_model is not None:
        check_count("d_model", d_model)
    radius = check_radius(radius)
    e = check_eps(eps)
    m = check_method(method)
    dt = torch.float64 if check_dtype_name(dtype) == torch.float64 else torch.float32
    return _choose(
        method=m, eps=e, n=n, d=d, batch=batch, full=full, radius=float(radius),
        device=torch.device("cpu"), dtype=dt,
    ).plan  # fmt: skip


# --------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------


def lora_gradient(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    adapters: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    alpha: float,
    method: str = "auto",
    eps: float = 1e-3,
    scale: float | None = None,
    progress: Progress | None = None,
) -> LoraResult:
    """Loss and adapter gradients of one LoRA-adapted attention head, with certified bounds.

    Arguments (all tensors on one device; any floating dtype)::

        x: [..., L, d_model]        layer input; leading dims are independent slices
        y: [..., L, d_head]         target of the head's output
        w_q, w_k, w_v: [d_model, d_head]   frozen weights W*
        adapters: {"q": (A, B), "v": (A, B)}           partial adaptation, or
                  {"q": ..., "k": ..., "v": ...}         full adaptation
                  A: [r, d_head], B: [d_model, r]  (r may differ per adapter)
        alpha: LoRA scaling; W_mu = W*_mu + (alpha / r) B @ A
        scale: score scale (default 1/sqrt(d_head)); F = softmax(scale * Q K^T), no mask

    Loss: ``1/2 * ||softmax(scale (x W_q)(x W_k)^T) (x W_v) - y||_F^2`` summed over the leading
    dims. Gradients: ``dA = (alpha/r) B^T dW`` [r, d_head], ``dB = (alpha/r) dW A^T``
    [d_model, r], ``dW = sum_slices x^T dQ`` (resp. dK, dV), returned in A's and B's dtypes.

    ``method``:

    * ``"exact"``: blocked closed form, O(L^2 d) time, O(L * block) memory, computed in float64
      if any input is float64, else float32. ``error_bounds`` is None.
    * ``"polynomial"``: reverse mode through the factored polynomial attention, O(L r' d^2),
      computed in float64, with an a-posteriori certified bound. Raises
      :class:`CertificationError` if no degree (within the retries) certifies ``eps``.
      ``loss`` is then the surrogate (polynomial) loss.
    * ``"auto"``: polynomial when a degree is predicted to certify ``eps`` *and* predicted
      faster by the calibrated cost model, and its certificate then holds; else exact.
      ``plan.reason`` says which and why, with numbers.

    ``eps`` (precise meaning): for every adapted ``mu`` and each gradient tensor ``G`` in
    (``dA_mu``, ``dB_mu``), the returned certified bound ``b >= max |G_computed - G_exact|``
    satisfies ``b <= eps * max |G_exact|``. The exact gradient is unknown, so this is certified
    through ``max |G_exact| >= max |G_computed| - b``: the polynomial result is accepted only if
    ``b <= eps * (max |G_computed| - b)``, i.e. ``b / (max|G_computed| - b) <= eps``
    (docs/lora_bound.md §7). ``b`` is computed a posteriori from the run's own quantities
    (per-row bounds propagated through ``|X|^T``, ``|B|^T``, ``|A|^T``). The degree is first
    predicted from the norms (``plan_lora_gradient``); if the certificate fails, a higher degree
    is tried (at most ``MAX_TRIES`` runs; ``progress`` restarts at 0 for each), then ``auto``
    goes exact with the failed ratio in ``plan.reason`` and ``polynomial`` raises.

    Returns :class:`LoraResult` with ``loss`` (float), ``grads`` ({"q": (dA, dB), ...}),
    ``error_bounds`` ({"q": (bound_dA, bound_dB), ...} certified max-abs bounds; None for
    exact) and ``plan`` (method, final degree, features, radius R of the centred scores,
    rho = R/ln L, costs, reason; ``predicted_bound`` and ``extra["relative_bound"]`` the
    certified worst ``b / (max|G| - b)``, ``extra["relative_bounds"]`` per gradient,
    ``extra["tries"]`` every degree run). ``progress(done, total)`` is called after each
    block; if it raises, the computation stops and the exception propagates.
    """
    t0 = time.perf_counter()
    inp = _validate(x, y, w_q, w_k, w_v, adapters, alpha, scale)
    m = check_method(method)
    e = check_eps(eps)
    if progress is not None and not callable(progress):
        raise InvalidInputError("progress", "expected a callable progress(done, total) or None")
    nb, L, _ = inp.x.shape
    dh = inp.y.shape[-1]
    full = "k" in inp.adapters
    device = inp.x.device
    prep = _prepare(inp) if m != "exact" else None
    radius = prep.radius if prep is not None else _radius_only(inp)
    kw: dict[str, Any] = dict(
        method=m, eps=e, n=L, d=dh, batch=nb, full=full, radius=radius, device=device,
        dtype=inp.dtype,
    )  # fmt: skip
    factor = PREDICT_FACTOR
    choice = _choose(**kw, factor=factor)
    plan = choice.plan
    approx = choice.approx
    tries: list[dict[str, Any]] = []
    while approx is not None and prep is not None:
        loss, grads, cert = _run_polynomial(inp, prep, approx, progress)
        worst = cert.worst() if isinstance(cert, _Certificate) else math.inf
        tries.append({
            "degree": approx.degree, "family": approx.family,
            "relative_bound": worst if math.isfinite(worst) else None,  # None: b >= max|G~|
        })  # fmt: skip
        if isinstance(cert, _Certificate) and worst <= e:
            return _poly_result(plan, approx, cert, tries, inp, loss, grads, L, dh, t0)
        why = (
            f"certified relative bound {worst:.2e} > eps={e:g}"
            if isinstance(cert, _Certificate)
            else str(cert)
        )
        level = _weight_level(approx)
        raw = cert.worst_raw() if isinstance(cert, _Certificate) else math.inf
        if math.isfinite(raw) and level > 0:
            # refine the prediction factor from what the certificate achieved (§8)
            factor = max(factor, raw / (L * level))
        nxt: _Choice | None = None
        if len(tries) < MAX_TRIES:
            try:
                nxt = _choose(**kw, factor=factor, min_degree=approx.degree + 1)
            except CertificationError:
                nxt = None
        msg = (
            f"The a-posteriori certificate failed for the degree-{approx.degree} "
            f"{approx.family} polynomial ({why}; tried degrees "
            f"{[t['degree'] for t in tries]})"
        )
        if nxt is None or nxt.approx is None:
            if m == "polynomial":
                raise CertificationError(msg + ".")
            extra_reason = "" if nxt is None else " " + nxt.plan.reason
            plan = dataclasses.replace(
                plan, method="exact", reason=msg + "; exact." + extra_reason,
                compute_dtype=str(inp.dtype).replace("torch.", ""),
                extra={"tries": tries},
            )  # fmt: skip
            approx = None
            break
        plan, approx = nxt.plan, nxt.approx
    loss, dw = _exact(inp, progress)
    grads = _adapter_grads(inp, dw)
    used = next(iter(dw.values())).dtype
    if used != inp.dtype:  # the compute dtype's pass overflowed: say so
        plan = dataclasses.replace(
            plan,
            compute_dtype=str(used).replace("torch.", ""),
            reason=plan.reason + " The exact pass overflowed in "
            f"{str(inp.dtype).replace('torch.', '')} and was repeated in float64.",
        )
    if tries:
        plan = dataclasses.replace(plan, extra={**plan.extra, "tries": tries})
    return LoraResult(loss, grads, None, plan, time.perf_counter() - t0)


def _poly_result(
    plan: Plan,
    approx: Approximation,
    cert: _Certificate,
    tries: list[dict[str, Any]],
    inp: _Inputs,
    loss: float,
    grads: dict[str, tuple[torch.Tensor, torch.Tensor]],
    L: int,
    dh: int,
    t0: float,
) -> LoraResult:
    worst = cert.worst()
    r = feature_count(dh, approx.degree)
    extra = {
        "relative_bound": worst,
        "relative_bounds": {mu: {"a": ra, "b": rb} for mu, (ra, rb) in cert.ratios.items()},
        "max_abs": {mu: {"a": ma, "b": mb} for mu, (ma, mb) in cert.maxabs.items()},
        "tries": tries,
        "adapted": sorted(inp.adapters),
        "route": "reverse mode through the factored forward (uses P and P')",
        "eps_meaning": "bound <= eps * (max|G computed| - bound) <= eps * max|G exact|",
    }
    reason = (
        f"Certified relative gradient bound {worst:.2e} <= eps={plan.eps:g} "
        f"(a posteriori: bound / (max|G| - bound), worst over dA, dB) with a "
        f"degree-{approx.degree} {approx.family} polynomial (r={r}) at R={plan.radius:.3g} "
        f"(rho={plan.rho:.3g})"
        + (f" after {len(tries)} tries" if len(tries) > 1 else "")
        + f"; predicted {plan.cost_polynomial:.3g} s vs {plan.cost_exact:.3g} s exact."
    )
    plan = dataclasses.replace(
        plan, method="polynomial", reason=reason, family=approx.family, degree=approx.degree,
        features=r, predicted_bound=worst, compute_dtype="float64", extra=extra,
    )  # fmt: skip
    bounds: dict[str, tuple[float | None, float | None]] = {
        mu: tuple(v if math.isfinite(v) else None for v in pair)  # type: ignore[misc]
        for mu, pair in cert.bounds.items()
    }
    return LoraResult(loss, grads, bounds, plan, time.perf_counter() - t0)


def _radius_only(inp: _Inputs) -> float:
    """Radius of the centred scores (reported in the plan of the exact path)."""
    w = _effective_weights(inp, torch.float64)
    x = inp.x.to(torch.float64)
    q, k = x @ w["q"], x @ w["k"]
    kc = k - midrange(k.amax(dim=1, keepdim=True), k.amin(dim=1, keepdim=True))
    return matrix_radius(q, kc, inp.scale)
