"""LoRA's exact path: the closed-form gradient blocked over queries, as FlashAttention-2's
backward does (docs/lora.md, "exact"): O(L^2 d) time, O(L block) memory, never an L x L matrix.
"""

from __future__ import annotations

import math

import torch

from ..core.errors import OutOfRangeError
from ..core.progress import Progress, report
from .inputs import Inputs, effective_weights

__all__ = ["EXACT_BLOCK_ELEMS", "exact_blocks", "exact_gradients", "exact_qkv_grads"]

EXACT_BLOCK_ELEMS = 1 << 22  # elements of one [slices, block, L] score block


def exact_blocks(nb: int, L: int) -> int:
    """Query rows per block of ``exact_qkv_grads``."""
    return max(1, min(L, EXACT_BLOCK_ELEMS // max(1, nb * L)))


def exact_qkv_grads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    y: torch.Tensor,
    scale: float,
    progress: Progress | None,
    need_k: bool = True,
    colsum: torch.Tensor | None = None,
    enorm: torch.Tensor | None = None,
) -> tuple[float, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Exact ``loss, dQ, dK, dV`` for ``q, k, v, y: [nb, L, dh]``; never forms ``[L, L]``.

    Per query block ``b``: ``F_b = softmax(scale Q_b K^T)`` [nb, b, L], ``O_b = F_b V``,
    ``E_b = O_b - Y_b``, ``D_b = rowsum(E_b ∘ O_b)`` (= ``(F∘G) 1``),
    ``dS_b = F_b ∘ (E_b V^T - D_b)``,
    ``dQ_b = scale dS_b K``, and the key-side sums ``dK += scale dS_b^T Q_b``, ``dV += F_b^T E_b``.
    ``colsum``: a float64 ``[nb, L]`` to which the column sums of the computed ``F`` over each
    block of ``exact_blocks`` rows are added (each summed in ``F``'s dtype),
    ``enorm``: a float64 ``[nb, L]`` that receives the row 2-norms of the computed ``E`` (both
    for the exact path's bound, ``compute/lora/exact_bound.py``).
    """
    nb, L, _ = q.shape
    bq = exact_blocks(nb, L)
    nblocks = -(-L // bq)
    dq = torch.empty_like(q)
    dk = torch.zeros_like(k) if need_k else None
    dv = torch.zeros_like(v)
    kt = k.transpose(1, 2)  # [nb, dh, L]
    vt = v.transpose(1, 2)  # [nb, dh, L]
    loss = torch.zeros((), dtype=torch.float64, device=q.device)
    # a row of ones for the column sums of F (a GEMV per block), sliced for the last block
    ones = torch.ones((nb, 1, bq), dtype=q.dtype, device=q.device) if colsum is not None else None
    for ib in range(nblocks):
        i0, i1 = ib * bq, min(L, (ib + 1) * bq)
        qb = q[:, i0:i1]  # [nb, b, dh]
        # scores [nb, b, L]: the scale applied to the queries first, so that Q K^T itself
        # cannot overflow where the scaled scores fit (a tiny scale on huge projections)
        f = torch.bmm(qb * scale, kt)
        f.sub_(f.amax(dim=-1, keepdim=True)).exp_()
        f.div_(f.sum(dim=-1, keepdim=True))  # F_b, rows sum to 1
        if colsum is not None and ones is not None:  # in the compute dtype: at most gamma_bq
            # relative error for these non-negative terms in any order (exact_bound.py)
            colsum += torch.bmm(ones[:, :, : i1 - i0], f).squeeze(1).to(torch.float64)  # [nb, L]
        o = torch.bmm(f, v)  # [nb, b, dh]
        e = o - y[:, i0:i1]  # [nb, b, dh]
        if enorm is not None:  # (sqrt(dh) max |e_i| where float64 squares may underflow)
            top = e.abs().amax(dim=-1).double()  # [nb, b]
            two = torch.linalg.vector_norm(e, dim=-1, dtype=torch.float64) * (1.0 + 1e-12)
            enorm[:, i0:i1] = torch.where(top < 2.0**-480, math.sqrt(e.shape[-1]) * top, two)
        loss += 0.5 * e.double().square().sum()
        dd = (e * o).sum(dim=-1, keepdim=True)  # [nb, b, 1]
        dv.baddbmm_(f.transpose(1, 2), e)  # dV += F_b^T E_b
        g = torch.bmm(e, vt).sub_(dd)  # [nb, b, L]  G - D
        g.mul_(f).mul_(scale)  # scale * dS_b: scaled before the products with K and Q, so
        # that they cannot overflow where the scaled gradients fit (as the scores above)
        dq[:, i0:i1] = torch.bmm(g, k)
        if dk is not None:
            dk.baddbmm_(g.transpose(1, 2), qb)
        report(progress, ib + 1, nblocks)
    return float(loss), dq, dk, dv


def _exact_in(
    inp: Inputs,
    dt: torch.dtype,
    progress: Progress | None,
    parts: dict[str, torch.Tensor] | None = None,
) -> tuple[float, dict[str, torch.Tensor]] | None:
    """The blocked closed form in ``dt``; None when anything it computes is not finite there.

    An overflow anywhere (projections, scores, their running max, gradient terms) shows as an
    inf or a NaN in the loss or the gradients (``inf - inf`` in the softmax shift), so one
    finiteness check of the results decides; an ``exp`` that underflows is exact to ``dt``.
    ``parts``: filled with what the bound needs (the projections, the score gradients, the
    column sums of F), when given.
    """
    # the projections in float64, rounded once to dt: their error is then u |Q| instead of
    # gamma_dm |X| |W| (it drives the exact path's bound, compute/lora/exact_bound.py), for
    # O(L d_model d_head) of the O(L^2 d_head) work
    w64 = effective_weights(inp, torch.float64)
    x64 = inp.x.to(torch.float64)
    q, k, v = ((x64 @ w64[mu]).to(dt) for mu in ("q", "k", "v"))  # [nb, L, dh] each
    x = inp.x.to(dt)  # [nb, L, dm]
    colsum = enorm = None
    if parts is not None:
        colsum = torch.zeros(q.shape[:2], dtype=torch.float64, device=q.device)
        enorm = torch.zeros(q.shape[:2], dtype=torch.float64, device=q.device)
    loss, dq, dk, dv = exact_qkv_grads(
        q,
        k,
        v,
        inp.y.to(dt),
        inp.scale,
        progress,
        need_k="k" in inp.adapters,
        colsum=colsum,
        enorm=enorm,
    )
    if parts is not None and colsum is not None and enorm is not None:
        parts.update(q=q, k=k, v=v, dq=dq, dv=dv, colsum=colsum, enorm=enorm)
        if dk is not None:
            parts["dk"] = dk
    xf = x.reshape(-1, x.shape[-1])  # [nb*L, dm]
    dh = dq.shape[-1]
    dw = {"q": xf.T @ dq.reshape(-1, dh), "v": xf.T @ dv.reshape(-1, dh)}  # [dm, dh]
    if dk is not None:
        dw["k"] = xf.T @ dk.reshape(-1, dh)
    ok = math.isfinite(loss) and all(bool(torch.isfinite(t).all()) for t in dw.values())
    return (loss, dw) if ok else None


def exact_gradients(
    inp: Inputs,
    progress: Progress | None,
    parts: dict[str, torch.Tensor] | None = None,
) -> tuple[float, dict[str, torch.Tensor]]:
    """The blocked closed form in the compute dtype, or in float64 when something leaves the
    compute dtype's range; raises ``OutOfRangeError`` when float64 cannot hold it either.
    ``parts``: filled as by ``_exact_in`` for the pass whose result is returned."""
    for dt in (inp.dtype, torch.float64) if inp.dtype != torch.float64 else (torch.float64,):
        if abs(inp.scale) >= float(torch.finfo(dt).max):
            continue  # the scale itself is beyond dt: its scores would overflow at once
        if parts is not None:
            parts.clear()
        got = _exact_in(inp, dt, progress, parts)
        if got is not None:
            return got
    raise OutOfRangeError(
        "x",
        "the projections x @ W, the scores scale * Q K^T, the loss or the gradients leave "
        "the range of float64 for these inputs; rescale x, y, the weights or scale",
    )
