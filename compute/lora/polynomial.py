"""LoRA's polynomial path: reverse mode through the factored polynomial attention, as a
closed-form backward in three streaming passes (keys, queries, keys), in float64
(docs/lora.md, "polynomial").

The derivative of a monomial ``x^alpha`` is a monomial of one degree lower
(``core.monomials.derivative_table``), so the gradients with respect to Q and K are products
of the degree ``<= g-1`` features with small ``[r', d (d+1)]`` tables. With a certificate the
same products carry the extra columns of the a-posteriori bound (``certificate``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..core.monomials import (
    MonomialTable,
    derivative_table,
    feature_count,
    features,
    monomial_table,
    weights,
)
from ..core.polynomials import Approximation
from ..core.progress import Progress, report
from .certificate import (
    Certificate,
    Consts,
    Prepared,
    certify,
    col_bound,
    constants,
    row_bound,
)
from .inputs import Inputs, adapter_grads

__all__ = ["POLY_BLOCK_ELEMS", "poly_blocking", "poly_qkv_grads", "run_polynomial"]

POLY_BLOCK_ELEMS = 1 << 20  # elements of one [slices, r, block] feature block (fits in cache)


def _features(x: torch.Tensor, table: MonomialTable) -> torch.Tensor:
    """Unweighted monomials of ``x: [nb, b, d]`` as ``[nb, r, b]``."""
    nb, b, d = x.shape
    xt = x.permute(2, 0, 1).reshape(d, nb * b).contiguous()  # [d, nb*b]
    return features(xt, table).view(-1, nb, b).transpose(0, 1)  # [nb, r, b]


def poly_blocking(nb: int, L: int, r: int) -> tuple[int, int]:
    """Rows per block and number of blocks of the polynomial passes (also used by
    docs/lora_bound.md §5's N)."""
    blk = max(16, min(L, POLY_BLOCK_ELEMS // max(1, nb * r)))
    return blk, -(-L // blk)


def _row_terms(
    nd: torch.Tensor, y: torch.Tensor, d: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One query block's forward, from its ``[num, den, ...]`` columns ``nd`` ``[nb, b, .]``:
    ``den`` ``[nb, b, 1]``, the residual ``E = num/den - Y`` ``[nb, b, d]``,
    ``C = [E, -rho]/den`` ``[nb, b, d+1]`` with ``rho_i = E_i·O_i`` (= ``sum_j F~_ij E_i·V_j``,
    the softmax backward's row term) and the block's loss ``1/2 ||E||^2``; the same for both
    estimators."""
    den = nd[..., d : d + 1]
    o = nd[..., :d] / den
    e = o - y
    rho = (e * o).sum(dim=-1, keepdim=True)
    c = torch.cat([e / den, -(rho / den)], dim=-1)
    return den, e, c, 0.5 * e.square().sum()


class KeyBounds:
    """Pass 3's per-row bounds (docs/lora_bound.md §4.6-4.7, §7b): the error bounds and
    natural-scale lower bounds of ``dK`` and ``dV``, filled block by block from the bound's
    column sums (``dK``'s stay zero without key adaptation)."""

    def __init__(self, kc: torch.Tensor, vc: torch.Tensor) -> None:
        self.err_k, self.n_k = torch.zeros_like(kc), torch.zeros_like(kc)
        self.err_v, self.n_v = torch.empty_like(vc), torch.empty_like(vc)

    def store(
        self, j0: int, j1: int, cert: Consts, sums: torch.Tensor, zmax: torch.Tensor, beta: float
    ) -> None:
        ek, ev, nk, nv = col_bound(cert, sums, zmax, beta)
        self.err_k[:, j0:j1] = ek
        self.err_v[:, j0:j1] = ev
        self.n_k[:, j0:j1] = nk
        self.n_v[:, j0:j1] = nv

    def errs(self, err_q: torch.Tensor, n_q: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(err_q, err_k, err_v, nq_lo, nk_lo, nv_lo)``, the estimators' last return value."""
        return (err_q, self.err_k, self.err_v, n_q, self.n_k, self.n_v)


def poly_qkv_grads(
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
    """Surrogate ``loss, dQ, dK, dV`` by the closed-form backward of the factored forward.

    Shapes: ``q, kc, vc, yc: [nb, L, d]`` float64 (keys and values centred, ``yc`` shifted by the
    same value centre). With ``F(x) = [x^alpha]_alpha`` (unweighted, degree-ordered, ``[r]``),
    ``w`` the weights of :func:`core.monomials.weights`, ``Vext = [V, 1]`` ``[L, d+1]``:

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
    (column sums ``sum_i F~_ij z_i`` in pass 3), and ``d`` more query weights for the lower
    bound of the natural scale (docs/lora_bound.md §7b); the last return value is then the
    per-row error bounds and
    natural-scale lower bounds ``(err_q, err_k, err_v, nq_lo, nk_lo, nv_lo)`` ``[nb, L, d]``
    each (``err_k``, ``nk_lo`` zeros when ``need_k`` is False), else None.
    """
    nb, L, d = q.shape
    g = approx.degree
    tables = monomial_table(d, g)
    r = tables.r
    child_np, factor_np = derivative_table(d, g)
    r_low = child_np.shape[0]
    dev = q.device
    f64 = torch.float64
    child = torch.from_numpy(child_np).to(dev)  # [r', d]
    factor = torch.from_numpy(factor_np).to(dev, f64)  # [r', d]
    w = torch.from_numpy(weights(approx.coeffs, tables, scale)).to(dev, f64)  # [r]
    blk, nblocks = poly_blocking(nb, L, r)
    total = 3 * nblocks
    done = 0
    ones = torch.ones((nb, L, 1), dtype=f64, device=dev)
    vext = torch.cat([vc, ones], dim=-1)  # [nb, L, d+1]
    # key-side columns: [V, 1] and, for the bound, |Kc| (docs/lora_bound.md §4.5)
    kside = torch.cat([vext, kc.abs()], dim=-1) if cert is not None else vext  # [nb, L, .]
    beta = abs(scale)

    # pass 1: keys -> Mext = [M, z] (and sum_j F(k_j) |Kc_j|^T for the bound)
    maug = torch.zeros((nb, r, kside.shape[-1]), dtype=f64, device=dev)
    for jb in range(nblocks):
        j0, j1 = jb * blk, min(L, (jb + 1) * blk)
        f2 = _features(kc[:, j0:j1], tables)  # [nb, r, b]
        maug.baddbmm_(f2, kside[:, j0:j1])  # [nb, r, d+1 (+d)]
        done += 1
        report(progress, done, total)
    mwaug = maug * w[:, None]  # [nb, r, .]  (w∘Mext)
    mw = mwaug[..., : d + 1]  # [nb, r, d+1]
    hq = (factor[None, :, :, None] * mw[:, child]).reshape(nb, r_low, d * (d + 1))

    # pass 2: queries -> loss, dQ, dMext (and the per-row bound of dQ, the z weights)
    nz = 3 * d + 2 if cert is not None else 0
    dmu = torch.zeros((nb, r, d + 1 + nz), dtype=f64, device=dev)
    dq = torch.empty_like(q)
    err_q = torch.empty_like(q) if cert is not None else None
    n_q = torch.empty_like(q) if cert is not None else None
    zmax = torch.zeros((nb, 1, nz), dtype=f64, device=dev)
    loss = torch.zeros((), dtype=f64, device=dev)
    for ib in range(nblocks):
        i0, i1 = ib * blk, min(L, (ib + 1) * blk)
        f1 = _features(q[:, i0:i1], tables)  # [nb, r, b]
        nd = torch.bmm(f1.transpose(1, 2), mwaug)  # [nb, b, d+1 (+d)]  [num, den, T|K|]
        den, e, c, loss_b = _row_terms(nd, yc[:, i0:i1], d)  # den, E, C = [E, -D]/den
        loss += loss_b
        if cert is not None and err_q is not None and n_q is not None:
            z, eq, nq = row_bound(cert, nd[..., d + 1 :] / den, e, q[:, i0:i1], beta)
            err_q[:, i0:i1] = eq  # [nb, b, d]
            n_q[:, i0:i1] = nq
            zmax = torch.maximum(zmax, z.amax(dim=1, keepdim=True))
            dmu.baddbmm_(f1, torch.cat([c, z / den], dim=-1))  # [nb, r, d+1+3d+2]
        else:
            dmu.baddbmm_(f1, c)  # [nb, r, d+1]
        t = torch.bmm(f1[:, :r_low].transpose(1, 2), hq)  # [nb, b, d*(d+1)]
        dq[:, i0:i1] = (t.view(nb, -1, d, d + 1) * c[:, :, None, :]).sum(-1)  # [nb, b, d]
        done += 1
        report(progress, done, total)
    dmaug = dmu * w[:, None]  # [nb, r, d+1 (+2d+2)]
    dmext = dmaug[..., : d + 1]  # [nb, r, d+1]  = U1^T C
    dm = dmaug[..., :d]  # [nb, r, d]
    dmsel = torch.cat([dm, dmaug[..., d + 1 :]], dim=-1)  # [nb, r, d + 3d+2]  [dM, z sums]
    hk = (factor[None, :, :, None] * dmext[:, child]).reshape(nb, r_low, d * (d + 1))

    # pass 3: keys -> dV, dK (and their per-row bounds)
    dv = torch.empty_like(vc)
    dk = torch.empty_like(kc) if need_k else None
    kb = KeyBounds(kc, vc) if cert is not None else None
    for jb in range(nblocks):
        j0, j1 = jb * blk, min(L, (jb + 1) * blk)
        f2t = _features(kc[:, j0:j1], tables).transpose(1, 2)  # [nb, b, r]
        if cert is not None and kb is not None:
            both = torch.bmm(f2t, dmsel)  # [nb, b, d + 3d+2]
            dv[:, j0:j1] = both[..., :d]  # [nb, b, d]
            kb.store(j0, j1, cert, both[..., d:], zmax, beta)
        else:
            dv[:, j0:j1] = torch.bmm(f2t, dm)  # [nb, b, d]
        if dk is not None:
            t = torch.bmm(f2t[:, :, :r_low], hk)  # [nb, b, d*(d+1)]
            dk[:, j0:j1] = (t.view(nb, -1, d, d + 1) * vext[:, j0:j1, None, :]).sum(-1)
        done += 1
        report(progress, done, total)
    errs = None if kb is None or err_q is None or n_q is None else kb.errs(err_q, n_q)
    return float(loss), dq, dk, dv, errs


def run_polynomial(
    inp: Inputs, prep: Prepared, approx: Approximation, progress: Progress | None
) -> tuple[float, dict[str, tuple[torch.Tensor, torch.Tensor]], Certificate | str]:
    """One polynomial run with degree ``approx.degree`` and its a-posteriori certificate."""
    return run_estimator(inp, prep, approx, progress, poly_qkv_grads, "reverse")


def run_estimator(
    inp: Inputs,
    prep: Prepared,
    approx: Approximation,
    progress: Progress | None,
    qkv_grads: Callable[..., tuple[float, torch.Tensor, torch.Tensor | None, torch.Tensor, Any]],
    estimator: str,
) -> tuple[float, dict[str, tuple[torch.Tensor, torch.Tensor]], Certificate | str]:
    """One run of an estimator (``qkv_grads``: reverse mode's ``poly_qkv_grads`` or the chained
    one's) with degree ``approx.degree``, the adapter gradients and the certificate of
    ``estimator`` (``certificate.constants``)."""
    _, L, dm = prep.x.shape
    dh = prep.q.shape[-1]
    full = "k" in inp.adapters
    blocking = poly_blocking(prep.q.shape[0], L, feature_count(dh, approx.degree))
    cert = constants(
        prep, approx, L=L, dh=dh, scale=inp.scale, blocking=blocking, estimator=estimator
    )
    loss, dq, dk, dv, errs = qkv_grads(
        prep.q, prep.kc, prep.vc, prep.yc, approx, inp.scale, progress, need_k=full,
        cert=cert if isinstance(cert, Consts) else None,
    )  # fmt: skip
    xf = prep.x.reshape(-1, dm)  # [nb*L, dm]
    d_hat = {"q": dq, "v": dv}
    if dk is not None:
        d_hat["k"] = dk
    dw = {mu: xf.T @ t.reshape(-1, dh) for mu, t in d_hat.items()}  # [dm, dh]
    if not (math.isfinite(loss) and all(bool(torch.isfinite(t).all()) for t in dw.values())):
        # a huge |scale| makes the weights c_m scale^m overflow float64 (the scale is not
        # balanced into the inputs here): no certificate, the next degree or exact runs
        return loss, {}, "the polynomial surrogate leaves float64's range (its weights overflow)"
    grads = adapter_grads(inp, dw)
    if errs is None:
        assert isinstance(cert, str)
        return loss, grads, cert
    return loss, grads, certify(inp, prep.x, errs, d_hat, dw, grads)
