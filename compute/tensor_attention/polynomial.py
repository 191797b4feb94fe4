"""The polynomial path of tensor attention, PyTorch route (docs/tensor_attention.md,
"method=polynomial").

``exp`` replaced by a certified polynomial factors through three feature maps with all weights
on the query side::

    U1 = w * Q^alpha,  U2 = K1^alpha,  U3 = K2^alpha                   # [r, n], [r, n1], [r, n2]
    M  = (U2 @ [V1 | 1]) * (U3 @ [V2 | 1])                             # [r, dv + 1]
    out = (U1^T M)[:, :dv] / (U1^T M)[:, dv]                           # [n, dv]

O((n + n1 + n2) r dv); the n x n1 n2 score matrix is never formed. The compute-dtype products
have inner length at most ``chunk``, their partial sums are added in float64: the roundings
``bound.tensor_rounding_bound`` counts. The compiled kernel (``native``) computes the same steps.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from ..core.monomials import MonomialTable, features, monomial_table, weights
from ..core.polynomials import Approximation
from ..core.progress import Progress, report

__all__ = ["FEATURE_BLOCK", "poly_core", "polynomial_forward", "query_weights"]

FEATURE_BLOCK = 1 << 23  # entries of one feature block [r, columns] (32 MiB fp32)


def query_weights(approx: Approximation, table: MonomialTable, scale: float) -> torch.Tensor:
    """``core.monomials.weights`` as a float64 tensor, cached on (d, g, coefficients, scale):
    the returned tensor is shared, never modify it."""
    coeffs = tuple(float(c) for c in approx.coeffs[: approx.degree + 1])
    return _weights_cached(table.d, approx.degree, coeffs, scale)


@lru_cache(maxsize=256)
def _weights_cached(d: int, g: int, coeffs: tuple[float, ...], scale: float) -> torch.Tensor:
    return torch.from_numpy(weights(np.asarray(coeffs), monomial_table(d, g), scale))  # [r]


def chunked_moments(f: torch.Tensor, ve: torch.Tensor, chunk: int, acc: torch.Tensor) -> None:
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


def chunked_readout(f: torch.Tensor, me: torch.Tensor, chunk: int) -> torch.Tensor:
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


def polynomial_forward(
    q: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
    v1: torch.Tensor,
    v2: torch.Tensor,
    approx: Approximation,
    scale: float,
    *,
    chunk: int,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Polynomial-method tensor attention: ``[B, n, dv]`` in float64 (see ``poly_core``).

    ``q: [B, n, d]``, ``k1: [B, n1, d]``, ``k2: [B, n2, d]``, ``v1: [B, n1, dv]``,
    ``v2: [B, n2, dv]``, all in the compute dtype; lays them out as ``poly_core`` takes them.
    """
    n, n1 = q.shape[1], k1.shape[1]
    xt = torch.cat([q, k1, k2], dim=1).permute(2, 0, 1).contiguous()  # [d, B, n+n1+n2]
    ones = torch.ones(v1.shape[0], n1 + k2.shape[1], 1, dtype=v1.dtype, device=v1.device)
    ve = torch.cat([torch.cat([v1, v2], dim=1), ones], dim=2)  # [B, n1+n2, dv+1]
    return poly_core(xt, ve, n, n1, approx, scale, chunk=chunk, progress=progress)


def poly_core(
    xt: torch.Tensor,
    ve: torch.Tensor,
    n: int,
    n1: int,
    approx: Approximation,
    scale: float,
    *,
    chunk: int,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Polynomial-method tensor attention: ``[B, n, dv]`` in float64 (see the module docstring).

    ``xt: [d, B, n+n1+n2]`` holds ``[q | k1 | k2]`` transposed and ``ve: [B, n1+n2, dv+1]``
    holds ``[v1; v2 | 1]``, both in the compute dtype; ``approx`` is the polynomial ``P`` for
    ``exp`` and ``scale`` multiplies the trilinear form. Per slice (features of q, k1 and k2
    built together when they fit in one block of ``FEATURE_BLOCK`` entries)::

        A1 = U2 @ [V1 | 1]        # [r, dv+1]  ``chunk`` keys per product, float64 across
        A2 = U3 @ [V2 | 1]        # [r, dv+1]
        Me = w * A1 * A2          # [r, dv+1]  = [M | z] in float64, cast to the compute dtype
        o  = U1^T @ Me            # [n, dv+1]  ``chunk`` features per product, float64 across
        T  = o[:, :dv] / o[:, dv] # [n, dv]

    The rounding of exactly these steps is what ``bound.tensor_rounding_bound`` certifies. (In one
    block the feature rows are padded with zero rows to a multiple of ``chunk``, so that all
    chunks of the readout are one batched product: zero terms add no rounding.)
    """
    d, B, N = xt.shape
    n2, e = N - n - n1, ve.shape[-1]
    dv = e - 1
    dt, dev = xt.dtype, xt.device
    c = chunk
    tables = monomial_table(d, approx.degree)
    r = tables.r
    w = query_weights(approx, tables, scale).to(dev)  # [r] float64
    r_pad = r if r <= c else -(-r // c) * c  # readout rows: whole chunks
    one_block = r_pad * N <= FEATURE_BLOCK
    kb = max(c, (FEATURE_BLOCK // r) // c * c)  # keys per feature block (a multiple of c)
    qb = max(1, FEATURE_BLOCK // r)  # queries per feature block
    per_slice = 2 if one_block else -(-n1 // kb) + -(-n2 // kb) + -(-n // qb)
    total, done = B * per_slice, 0

    def tick() -> None:
        nonlocal done
        done += 1
        report(progress, done, total)

    out = torch.empty(B, n, dv, dtype=torch.float64, device=dev)
    fused = one_block and n1 % c == 0 and n2 % c == 0  # both moments in one batched product
    me_pad = torch.zeros(r_pad, e, dtype=dt, device=dev) if one_block else None
    for b in range(B):
        ve1, ve2 = ve[b, :n1], ve[b, n1:]  # [n1, dv+1], [n2, dv+1]
        f_all: torch.Tensor | None = None
        if one_block:
            f_all = torch.empty(r_pad, N, dtype=dt, device=dev)  # [r_pad, n+n1+n2]
            features(xt[:, b], tables, out=f_all)  # rows [0, r)
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
            chunked_moments(f_all[:r, n : n + n1], ve1, c, a1)
            chunked_moments(f_all[:r, n + n1 :], ve2, c, a2)
            tick()
        else:
            a1 = torch.zeros(r, e, dtype=torch.float64, device=dev)  # [r, dv+1]
            a2 = torch.zeros(r, e, dtype=torch.float64, device=dev)  # [r, dv+1]
            for lo, hi, vk, acc in ((n, n + n1, ve1, a1), (n + n1, N, ve2, a2)):
                for s in range(lo, hi, kb):
                    f = features(xt[:, b, s : min(s + kb, hi)].contiguous(), tables)
                    chunked_moments(f, vk[s - lo : s - lo + kb], c, acc)  # f: [r, L]
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
            fq = features(xt[:, b, s : min(s + qb, n)].contiguous(), tables)  # [r, L]
            o = chunked_readout(fq, me, c)  # [dv+1, L] float64
            out[b, s : s + fq.shape[1]] = (o[:dv] / o[dv:]).T
            tick()
    return out  # [B, n, dv] float64
