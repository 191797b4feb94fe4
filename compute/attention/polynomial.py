"""The polynomial path: factored attention streamed in blocks (docs/attention.md, "The two
paths", steps 1-6, float32 chunking and causal attention).

``polynomial_forward`` runs ``(U1 (w M)) / (U1 (w z))`` with ``U1, U2`` the monomial features of
the balanced queries and keys (``core.monomials``), ``M = sum_blocks U2_b^T [V_b, 1]`` in float64,
and exactly the inner lengths the certified bound counts (``Config``, chosen by ``plan``).
Never an n x m or n x r matrix. The naive reference is ``naive.naive_attention(..., poly=)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

import numpy as np
import torch

from ..core.monomials import FeatureBuilder, MonomialTable, monomial_table, weights
from ..core.polynomials import Approximation
from ..core.progress import Progress, report
from ..core.radius import column_midrange
from ..core.rounding import BoundParts
from .balance import apply_factors, balance_factors, value_exponents, value_factors
from .stats import Extremes


@dataclass(frozen=True)
class Prepared:
    """One call's preparation, decided on the host without a pass over q, k or v.

    ``q [L, n, d]``, ``k [L, m, d]``, ``v [L, m, dv]`` in the compute dtype as given; the
    centred keys are ``fl(k - key_mid)`` (``key_mid [L, d]``, None: k is centred already); the
    balanced inputs ``fl(...fl(x f_0)... f_last)`` with ``fq`` / ``fk`` the per-column powers of
    two (``balance_factors``, ``[L, d]`` float64 each, applied in order); the normalised values
    ``fl(...fl(v - c) fv_0 ...)`` with ``c [L, 1, dv]`` their centre and ``fv`` the powers of two
    (``[L, 1, dv]`` each), undone by ``p2 [L, 1, dv]`` (float64) on the output; ``w64 [r]`` the
    weights. ``apply`` forms what the PyTorch route computes with (the compiled route forms the
    same numbers while it loads its blocks: native/attention_poly.c, ``Fused``).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_mid: torch.Tensor | None
    fq: list[np.ndarray]
    fk: list[np.ndarray]
    c: torch.Tensor
    fv: list[np.ndarray]
    p2: torch.Tensor
    w64: torch.Tensor

    def apply(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(qb [L, d, n], kb [L, d, m], vc [L, m, dv])``: balanced and transposed queries and
        keys, normalised centred values (the PyTorch route's preparation)."""
        kc = self.k if self.key_mid is None else self.k - self.key_mid.unsqueeze(1)
        vc = self.v - self.c
        for f in self.fv:
            vc.mul_(torch.from_numpy(f).to(device=vc.device, dtype=vc.dtype))
        return apply_factors(self.q, self.fq), apply_factors(kc, self.fk), vc


class NativeCore(Protocol):
    """The compiled core (``attention.native.core`` / ``core_causal`` bound to its kernel)."""

    def __call__(
        self,
        prep: Prepared,
        table: MonomialTable,
        key_inner: int,
        feature_inner: int,
        threads: int | None = None,
        progress: Progress | None = None,
        *,
        causal: bool = False,
        **kw: Any,
    ) -> torch.Tensor: ...


__all__ = [
    "CAUSAL_BLOCK",
    "FEATURE_BLOCK_ELEMS",
    "MAX_BLOCK",
    "Config",
    "NativeCore",
    "Prepared",
    "geometry",
    "polynomial_forward",
    "prepare",
    "run_polynomial",
]

FEATURE_BLOCK_ELEMS = 1 << 22  # elements of one feature block (slices * r * B): 16 MiB float32
MAX_BLOCK = 4096  # columns (keys or queries) per feature block
CAUSAL_BLOCK = 32  # diagonal sub-block rows for causal attention (prefix granularity)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclass(frozen=True)
class Config:
    """One certified way to run the factored path."""

    approx: Approximation
    dtype: torch.dtype  # compute dtype of features and products
    features: int  # r
    block: int  # B: columns per feature block
    key_chunk: int  # float32: largest key chunk (``polynomial_forward``'s key_chunk)
    feature_chunk: int  # float32: largest feature chunk (its feature_chunk)
    key_inner: int  # inner length of the key-side products the bound was certified with
    feature_inner: int  # inner length of the query-side products (float32: chunk; float64: r)
    float64_terms: int  # longest chain of float64 roundings (for the bound)
    bound: BoundParts


def polynomial_forward(
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
    extremes: Extremes | None = None,
    native: NativeCore | None = None,
    native_threads: int | None = None,
    native_min_part: int | None = None,
    key_mid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Factored attention ``(U1 (w*M)) / (U1 (w*z))`` streamed in blocks.

    Not differentiable: it writes into preallocated buffers (``naive.naive_attention`` with
    ``poly`` is the differentiable definition).

    Args:
        q: ``[L, n, d]`` queries.
        k: ``[L, m, d]`` keys (centred here per slice and column; the caller certifies
            ``approx`` for ``R = matrix_radius(q, centre(k), scale)`` computed in ``dtype``).
        v: ``[L, m, dv]`` values (centred here per slice and column by the midrange).
        approx: certified polynomial for exp on ``[-R, R]`` (``core.polynomials.certified_best``).
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
        key_mid: ``[L, d]`` the key columns' midranges (``statistics``' ``mid``): the centred
            keys are ``fl(k - key_mid)`` in k's dtype (as ``Stats.kc``), formed where they are
            loaded (overrides ``centred``).
        extremes: column extremes of these q, (centred) k and v already reduced by
            ``statistics`` (skips those reductions; same result bit for bit).
        native: the compiled core (``attention.native.bound_core`` of a self-tested kernel): a
            float32 CPU call runs it (``prepare``'s preparation, features, moments, readout),
            with the same rounding model; ``native_threads`` its thread count and
            ``native_min_part`` the fewest multiply-adds a thread takes (tests).

    Returns:
        ``[L, n, dv]`` in ``dtype``. Memory O(L_g * r * B + L * r * dv), never n x m or n x r.
    """
    dtype = dtype or q.dtype
    L, n, d = q.shape
    m, dv = k.shape[1], v.shape[2]
    if causal and m != n:
        raise ValueError(f"polynomial_forward: causal needs n == m, got n={n}, m={m}")
    dev = q.device
    plan = monomial_table(d, approx.degree)
    r = plan.r
    fp32 = dtype != torch.float64
    B, ck, cr, rp, unit = geometry(
        r,
        max(n, m),
        fp32=fp32,
        key_chunk=key_chunk or 256,
        feature_chunk=feature_chunk or 128,
        causal=causal,
        block=block,
    )

    prep = prepare(
        q, k, v, approx, scale, plan, dtype, centred=centred, key_mid=key_mid, extremes=extremes
    )
    if native is not None and fp32 and dev.type == "cpu" and ck is not None:
        return native(
            prep,
            plan,
            key_inner=unit if causal else ck,  # causal: the sub-block rows (the causal unit)
            feature_inner=cr or r,
            threads=native_threads,
            progress=progress,
            causal=causal,
            **({} if native_min_part is None else {"min_part": native_min_part}),
        )
    qb, kb, vc = prep.apply()
    c, p2, w64 = prep.c, prep.p2, prep.w64
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
        work = Work(
            qb[g0:g1], kb[g0:g1], vc[g0:g1], c[g0:g1], p2[g0:g1], w64, plan, xbuf, ubuf, vbuf
        )
        if causal:
            assert ck is None or cr is not None
            for s, o in causal_blocks(work, unit=unit, cr=cr):
                out[g0:g1, s : s + o.shape[1]] = o
                done += 1
                report(progress, done, total)
        else:
            for s, ob in noncausal_blocks(work, ck=ck, cr=cr):
                if ob is not None:  # None: a key block (no output rows yet)
                    out[g0:g1, s : s + ob.shape[1]] = ob
                done += 1
                report(progress, done, total)
    return out


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


@lru_cache(maxsize=256)
def _weights(coeffs: tuple[float, ...], d: int, g: int, s_mant: float) -> torch.Tensor:
    """``weights`` as a CPU float64 tensor, cached per polynomial, table and scale (the
    caller never writes into it)."""
    return torch.from_numpy(weights(np.array(coeffs), monomial_table(d, g), s_mant))


def prepare(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    approx: Approximation,
    scale: float,
    table: MonomialTable,
    dtype: torch.dtype,
    *,
    centred: bool = False,
    key_mid: torch.Tensor | None = None,
    extremes: Extremes | None = None,
) -> Prepared:
    """``polynomial_forward``'s preparation (its arguments): the factors and centres on the
    host, from ``extremes`` when given (no pass over q, k, v then; else the reductions and one
    host sync each, as ``balance`` and ``normalise_values`` do)."""
    q, v = _cast(q, dtype), _cast(v, dtype)
    if key_mid is not None and k.dtype != dtype:  # centre in the keys' own dtype, then cast
        k, key_mid = (k - key_mid.unsqueeze(1)).to(dtype), None
    elif key_mid is None and not centred:
        k = _cast(k, dtype)
        key_mid = column_midrange(k).squeeze(1)  # [L, d]: centre(k) = fl(k - key_mid)
    else:
        k = _cast(k, dtype)
    L, dv = v.shape[0], v.shape[2]
    if extremes is None:
        v_hi = v.max(dim=1).values  # [L, dv]
        v_lo = v.min(dim=1).values  # [L, dv]
        kc = k if key_mid is None else k - key_mid.unsqueeze(1)
        qa, ka = q.abs().max(dim=1).values, kc.abs().max(dim=1).values  # [L, d]
        known = (qa.double().cpu().numpy(), ka.double().cpu().numpy())
        vexp = None
    else:  # casts up are exact and monotone: the extremes of the cast are the cast extremes
        v_hi, v_lo = extremes.v_hi, extremes.v_lo  # [L, dv] (exact in dtype)
        if extremes.q_absmax is None:  # (row subsets: reduced again)
            qa_h = q.abs().max(dim=1).values.double().cpu().numpy()
            ka_h = extremes.k_absmax.double().cpu().numpy()
        elif extremes.balance is not None:
            qa_h, ka_h = extremes.balance
        else:
            qa_h = extremes.q_absmax.double().cpu().numpy()
            ka_h = extremes.k_absmax.double().cpu().numpy()
        known = (qa_h, ka_h)
        vexp = extremes.value_exp
    # the values' centre, midrange(v_hi, v_lo) in dtype, on the host: hi/2 + lo/2, each
    # operation one IEEE rounding in dtype (numpy and torch agree bit for bit)
    npdt = np.dtype(np.float32 if dtype != torch.float64 else np.float64)
    hi_h = v_hi.detach().cpu().numpy().astype(npdt).reshape(L, 1, dv)
    lo_h = v_lo.detach().cpu().numpy().astype(npdt).reshape(L, 1, dv)
    half = np.array(0.5, dtype=npdt)
    c_h: np.ndarray = hi_h * half + lo_h * half  # [L, 1, dv]
    c = torch.from_numpy(c_h)
    if q.device.type != "cpu":
        c = c.to(q.device)
    # values normalised per column by a power of two (undone in float64 on the output), so that
    # no product with a value underflows however small the values are (rounding model, step 8)
    if vexp is None:
        vexp = value_exponents(torch.from_numpy(np.maximum(hi_h - c_h, c_h - lo_h)))
    # 2^ev: finite here (a finite value range keeps |v - c| below 2^1023)
    p2 = torch.from_numpy(np.ldexp(1.0, vexp.astype(np.int64)))  # [L, 1, dv] float64
    if q.device.type != "cpu":
        p2 = p2.to(q.device)
    fq, fk, s_mant = balance_factors(*known, scale, dtype)
    coeffs = tuple(float(x) for x in approx.coeffs)
    w64 = _weights(coeffs, table.d, approx.degree, s_mant)  # [r] float64
    if q.device.type != "cpu":
        w64 = w64.to(q.device)
    return Prepared(q, k, v, key_mid, fq, fk, c, value_factors(vexp, dtype), p2, w64)


def default_block(rp: int, unit: int) -> int:
    b = FEATURE_BLOCK_ELEMS // max(rp, 1)
    return max(unit, min(MAX_BLOCK, (b // unit) * unit))


def geometry(
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
    Every inner length is at most what ``plan.select`` certified (they only shrink with n).
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
    bmax = max(unit, block or default_block(rp, unit))
    nb = -(-n_max // bmax)
    B = _round_up(-(-n_max // nb), unit)
    return B, ck, cr, rp, unit


def load(xbuf: torch.Tensor, src: torch.Tensor, s: int) -> int:
    """Copy columns ``[s, s + B)`` of ``src [lg, d, n]`` into ``xbuf [lg, d, B]``; zero the rest."""
    B = xbuf.shape[2]
    e = min(src.shape[2], s + B)
    xbuf[:, :, : e - s].copy_(src[:, :, s:e])
    if e - s < B:
        xbuf[:, :, e - s :].zero_()
    return e - s


@dataclass(frozen=True)
class Work:
    """One group of slices: its balanced inputs and the buffers its blocks are built in.

    ``qb [lg, d, n]``, ``kb [lg, d, m]`` balanced and transposed; ``vc [lg, m, dv]`` normalised
    centred values, ``c [lg, 1, dv]`` their centre, ``p2 [lg, 1, dv]`` (float64) the
    normalisation (``out = (num / den) p2 + c``); ``w64 [r]`` the weights; ``xbuf [lg, d, B]``,
    ``ubuf [lg, rp, B]`` (rows >= r stay 0) and ``vbuf [lg, B, dv + 1]`` the block buffers.
    """

    qb: torch.Tensor
    kb: torch.Tensor
    vc: torch.Tensor
    c: torch.Tensor
    p2: torch.Tensor
    w64: torch.Tensor
    table: MonomialTable
    xbuf: torch.Tensor
    ubuf: torch.Tensor
    vbuf: torch.Tensor

    def load_keys(self, s: int) -> int:
        """Keys ``[s, s + B)`` into ``xbuf`` and their ``[Vc, 1]`` into ``vbuf`` (zero past the
        end); returns how many there are."""
        cnt = load(self.xbuf, self.kb, s)
        dv, B = self.vc.shape[2], self.vbuf.shape[1]
        self.vbuf[:, :cnt, :dv].copy_(self.vc[:, s : s + cnt])
        self.vbuf[:, :cnt, dv].fill_(1.0)
        if cnt < B:
            self.vbuf[:, cnt:].zero_()
        return cnt


def noncausal_blocks(
    w: Work, *, ck: int | None, cr: int | None
) -> Iterator[tuple[int, torch.Tensor | None]]:
    """Yield ``(start, out_block or None)`` per key block (None) then per query block."""
    lg, rp, B = w.ubuf.shape
    n, m, dv = w.qb.shape[2], w.kb.shape[2], w.vc.shape[2]
    r = w.table.r
    vbuf, p2, c = w.vbuf, w.p2, w.c
    builder = FeatureBuilder(w.table, w.xbuf, w.ubuf)
    M = torch.zeros((lg, rp, dv + 1), dtype=torch.float64, device=w.qb.device)  # [lg, rp, dv+1]
    for s in range(0, m, B):
        w.load_keys(s)
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
    Mw[:, :r] *= w.w64.view(1, r, 1)  # weights on the query side, in float64
    if cr is None:
        MwT = Mw.transpose(1, 2).contiguous()  # [lg, dv+1, rp] float64
    else:
        nr = rp // cr
        MwT = Mw.to(w.ubuf.dtype).view(lg, nr, cr, dv + 1).transpose(2, 3).contiguous()
        # MwT: [lg, nr, dv+1, cr]
    for s in range(0, n, B):
        cnt = load(w.xbuf, w.qb, s)
        u1 = builder.build()  # [lg, rp, B]
        if cr is None:
            nd = torch.bmm(MwT, u1)  # [lg, dv+1, B]
        else:
            nr = rp // cr
            part = torch.matmul(MwT, u1.view(lg, nr, cr, B))  # [lg, nr, dv+1, B]
            nd = part.sum(dim=1, dtype=torch.float64)  # [lg, dv+1, B]
        o = (nd[:, :dv, :cnt] / nd[:, dv:, :cnt]).transpose(1, 2) * p2 + c  # [lg, cnt, dv]
        yield s, o


def causal_blocks(w: Work, *, unit: int, cr: int | None) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, out_block)`` per block of rows; keys and queries share the blocks.

    Inside a block of B rows, sub-blocks of ``unit`` rows t = 0..T-1: the key state before
    sub-block t (exclusive prefix sum, float64) serves its queries, and the diagonal sub-block is
    the polynomial evaluated pairwise, ``P = (w U1_t)^T U2_t`` masked to ``j <= i``.
    """
    lg, rp, B = w.ubuf.shape
    n, dv = w.qb.shape[2], w.vc.shape[2]  # qb, kb: [lg, d, n]
    r, b = w.table.r, unit
    T = B // b
    dt, dev = w.ubuf.dtype, w.ubuf.device
    f64 = torch.float64
    vbuf, p2, c = w.vbuf, w.p2, w.c
    u2buf = torch.zeros_like(w.ubuf)  # [lg, rp, B]; rows >= r stay 0
    build_k = FeatureBuilder(w.table, w.xbuf, u2buf)
    build_q = FeatureBuilder(w.table, w.xbuf, w.ubuf)
    M = torch.zeros((lg, rp, dv + 1), dtype=f64, device=dev)  # key state before this block
    wc = w.w64.to(dt).view(r, 1)  # [r, 1] weights in the compute dtype
    visible = torch.ones((b, b), dtype=torch.bool, device=dev).tril()  # [b, b]: key j <= query i
    for s in range(0, n, B):
        w.load_keys(s)
        u2 = build_k.build()  # [lg, rp, B]
        load(w.xbuf, w.qb, s)
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


def run_polynomial(
    q3: torch.Tensor,
    k3: torch.Tensor,
    v3: torch.Tensor,
    cfg: Config,
    scale: float,
    *,
    causal: bool,
    progress: Progress | None,
    extremes: Extremes | None = None,
    native: NativeCore | None = None,
    key_mid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dispatch to :func:`polynomial_forward`; causal with m < n runs the rows >= m unmasked.

    ``k3``: the centred keys ``centre(k)`` in the input compute dtype, or with ``key_mid``
    (``statistics``' ``mid``, ``[L, d]``) the keys as given, centred as ``fl(k3 - key_mid)``
    (``Stats.kc``, formed where the blocks are loaded). ``extremes``: from ``statistics`` on
    these q3, k3, v3; ``native``: the compiled float32 CPU core (None: the PyTorch route).
    """
    kw: dict[str, Any] = {
        "dtype": cfg.dtype,
        "block": cfg.block,
        "key_chunk": cfg.key_chunk if cfg.dtype != torch.float64 else None,
        "feature_chunk": cfg.feature_chunk if cfg.dtype != torch.float64 else None,
        "centred": key_mid is None,  # casts up are exact
        "key_mid": key_mid,
        "native": native,
    }
    n, m = q3.shape[1], k3.shape[1]
    if not causal or n == m:
        return polynomial_forward(
            q3, k3, v3, cfg.approx, scale, causal=causal, progress=progress, extremes=extremes, **kw
        )
    if extremes is not None:  # the query extremes below are of row subsets: reduce them again
        kw["extremes"] = dataclasses.replace(extremes, q_absmax=None, balance=None)
    # causal, m < n: rows [0, m) are a square causal problem; rows [m, n) see every key
    top = polynomial_forward(
        q3[:, :m], k3, v3, cfg.approx, scale, causal=True, progress=progress, **kw
    )
    rest = polynomial_forward(
        q3[:, m:], k3, v3, cfg.approx, scale, causal=False, progress=progress, **kw
    )
    return torch.cat([top, rest.to(top.dtype)], dim=1)
