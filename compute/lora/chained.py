"""LoRA's chained polynomial estimator: the exact softmax backward applied to the factored
surrogate weights ``F~ = U1 V1^T`` (docs/lora.md, "Two estimators"; docs/lora_bound.md §10).

Reverse mode (``polynomial.py``) differentiates the surrogate, so its score gradient weighs by
``P'(S) / den`` and its error follows the relative error of ``P'``. The chained estimator
keeps the exact gradient's form ``dS_ij = F_ij E_i·(V_j - O_i)`` and only replaces ``F`` by
``F~``: its error follows the relative error of ``P`` itself (``theta``, 8-80x below
``eta + theta`` at the degrees eps = 1e-3 takes), so it may certify at a lower degree. The price
is ``d (d + 1)``-column products with all ``r`` features instead of the ``r' < r`` derivative
features: O(L r d^2).

With ``U1_i = w∘F(q_i) / den_i``, ``V1_j = F(k_j)``, ``C_i = [E_i, -D_i] / den_i``
(``D_i = E_i·O_i``, the ``rho`` of the face-splitting formulation ``rho = U3 V3^T 1``) and
``Vext_j = [V_j, 1]``, the products ``F~∘(E V^T) - diag(rho) F~`` never materialise: they are
contracted per block of rows through ``[r, d (d+1)]`` tables,

    dQ_il = scale * sum_k C_ik (F(q_i) @ (w∘Mk))[l, k],   Mk[a, l, k] = sum_j F_a(k_j) K_jl Vext_jk
    dK_jl = scale * sum_k Vext_jk (F(k_j) @ (w∘Nq))[l, k], Nq[a, l, k] = sum_i F_a(q_i) Q_il C_ik
    dV_j  = F(k_j) @ (w∘sum_i F(q_i) E_i / den_i)

so memory stays O(nb (block + r) d^2) whatever L.
"""

from __future__ import annotations

import torch

from ..core.monomials import monomial_table, weights
from ..core.polynomials import Approximation
from ..core.progress import Progress, report
from .certificate import Certificate, Consts, Prepared, row_bound
from .inputs import Inputs
from .polynomial import KeyBounds, _features, _row_terms, poly_blocking, run_estimator

__all__ = ["chained_qkv_grads", "run_chained"]


def _outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise outer products ``[nb, n, p] x [nb, n, q] -> [nb, n, p*q]`` (face-splitting)."""
    return (a[..., :, None] * b[..., None, :]).flatten(-2)


def chained_qkv_grads(
    q: torch.Tensor,
    kc: torch.Tensor,
    vc: torch.Tensor,
    yc: torch.Tensor,
    approx: Approximation,
    scale: float,
    progress: Progress | None,
    need_k: bool = True,
    cert: Consts | None = None,
) -> tuple[float, torch.Tensor, torch.Tensor | None, torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """Surrogate ``loss`` and the chained ``dQ, dK, dV`` (same shapes, arguments and bound
    columns as :func:`polynomial.poly_qkv_grads`; ``cert`` must come from
    ``constants(..., estimator="chained")``).

    1. keys:    ``[Mext, T|K|, Mk] = sum_j F(k_j) [Vext_j, |Kc_j|, Kc_j ⊗ Vext_j]^T``
    2. queries: ``[num, den, T|K|, Tk] = (w∘F(q_i)) @ [...]``, ``O, E, D``, ``C = [E, -D]/den``;
                ``dQ_il = scale sum_k C_ik Tk[l, k]``; accumulate
                ``sum_i F(q_i) [C_i, z_i/den_i, Q_i ⊗ C_i]^T``
    3. keys:    ``dV_j``, the column sums of the bound, ``dK_jl = scale sum_k Vext_jk Tq[l, k]``
    """
    nb, L, d = q.shape
    g = approx.degree
    tables = monomial_table(d, g)
    r = tables.r
    dev = q.device
    f64 = torch.float64
    w = torch.from_numpy(weights(approx.coeffs, tables, scale)).to(dev, f64)  # [r]
    blk, nblocks = poly_blocking(nb, L, r)
    total = 3 * nblocks
    done = 0
    dd1 = d * (d + 1)
    ones = torch.ones((nb, L, 1), dtype=f64, device=dev)
    vext = torch.cat([vc, ones], dim=-1)  # [nb, L, d+1]
    nfwd = 2 * d + 1 if cert is not None else d + 1  # [V, 1 (, |Kc|)]

    # pass 1: keys -> w∘[Mext, T|K|, Mk]
    maug = torch.zeros((nb, r, nfwd + dd1), dtype=f64, device=dev)
    for jb in range(nblocks):
        j0, j1 = jb * blk, min(L, (jb + 1) * blk)
        f2 = _features(kc[:, j0:j1], tables)  # [nb, r, b]
        vx = vext[:, j0:j1]
        kside = [vx, kc[:, j0:j1].abs()] if cert is not None else [vx]
        kside.append(_outer(kc[:, j0:j1], vx))  # [nb, b, d (d+1)]  Kc_jl Vext_jk
        maug.baddbmm_(f2, torch.cat(kside, dim=-1))
        done += 1
        report(progress, done, total)
    mwaug = maug * w[:, None]  # [nb, r, nfwd + d(d+1)]

    # pass 2: queries -> loss, dQ, and the query-side accumulators
    nz = 3 * d + 2 if cert is not None else 0
    nqc = dd1 if need_k else 0
    dmu = torch.zeros((nb, r, d + 1 + nz + nqc), dtype=f64, device=dev)
    dq = torch.empty_like(q)
    err_q = torch.empty_like(q) if cert is not None else None
    n_q = torch.empty_like(q) if cert is not None else None
    zmax = torch.zeros((nb, 1, nz), dtype=f64, device=dev)
    loss = torch.zeros((), dtype=f64, device=dev)
    for ib in range(nblocks):
        i0, i1 = ib * blk, min(L, (ib + 1) * blk)
        qb = q[:, i0:i1]
        f1 = _features(qb, tables)  # [nb, r, b]
        nd = torch.bmm(f1.transpose(1, 2), mwaug)  # [nb, b, nfwd + d(d+1)]
        # C = [E, -rho]/den, rho_i = E_i·O~_i = sum_j F~_ij E_i·V_j (the softmax backward's)
        den, e, c, loss_b = _row_terms(nd, yc[:, i0:i1], d)
        loss += loss_b
        tk = nd[..., nfwd:].view(nb, -1, d, d + 1)  # [nb, b, d, d+1]  sum_j P K_jl Vext_jk
        dq[:, i0:i1] = scale * (tk * c[:, :, None, :]).sum(-1)  # [nb, b, d]
        cols = [c]
        if cert is not None and err_q is not None and n_q is not None:
            z, eq, nq = row_bound(cert, nd[..., d + 1 : nfwd] / den, e, qb, abs(scale))
            err_q[:, i0:i1] = eq
            n_q[:, i0:i1] = nq
            zmax = torch.maximum(zmax, z.amax(dim=1, keepdim=True))
            cols.append(z / den)
        if need_k:
            cols.append(_outer(qb, c))  # [nb, b, d (d+1)]  Q_il C_ik
        dmu.baddbmm_(f1, torch.cat(cols, dim=-1) if len(cols) > 1 else c)
        done += 1
        report(progress, done, total)
    dmaug = dmu * w[:, None]  # [nb, r, d+1 + nz + nqc]
    dm = dmaug[..., :d]  # [nb, r, d]  w∘U1^T E (per den)
    ksel = [dm, dmaug[..., d + 1 : d + 1 + nz]]
    if need_k:
        ksel.append(dmaug[..., d + 1 + nz :])
    dmsel = torch.cat(ksel, dim=-1)  # [nb, r, d + nz + nqc]

    # pass 3: keys -> dV, dK and the per-row bounds
    dv = torch.empty_like(vc)
    dk = torch.empty_like(kc) if need_k else None
    kb = KeyBounds(kc, vc) if cert is not None else None
    for jb in range(nblocks):
        j0, j1 = jb * blk, min(L, (jb + 1) * blk)
        f2t = _features(kc[:, j0:j1], tables).transpose(1, 2)  # [nb, b, r]
        both = torch.bmm(f2t, dmsel)  # [nb, b, d + nz + nqc]
        dv[:, j0:j1] = both[..., :d]
        if cert is not None and kb is not None:
            kb.store(j0, j1, cert, both[..., d : d + nz], zmax, abs(scale))
        if dk is not None:
            tq = both[..., d + nz :].reshape(nb, -1, d, d + 1)  # [nb, b, d, d+1]
            dk[:, j0:j1] = scale * (tq * vext[:, j0:j1, None, :]).sum(-1)
        done += 1
        report(progress, done, total)
    errs = None if kb is None or err_q is None or n_q is None else kb.errs(err_q, n_q)
    return float(loss), dq, dk, dv, errs


def run_chained(
    inp: Inputs, prep: Prepared, approx: Approximation, progress: Progress | None
) -> tuple[float, dict[str, tuple[torch.Tensor, torch.Tensor]], Certificate | str]:
    """One chained run with degree ``approx.degree`` and its a-posteriori certificate
    (docs/lora_bound.md §10)."""
    return run_estimator(inp, prep, approx, progress, chained_qkv_grads, "chained")
