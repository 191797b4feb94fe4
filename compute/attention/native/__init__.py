"""The compiled CPU route of attention (docs/attention.md, "Compiled CPU kernel").

``attention_poly.c`` beside this file computes the statistics of a float32 call in one pass
per tensor (``at_stats``) and the float32 polynomial path with the rounding model of the
PyTorch route (``polynomial.noncausal_blocks`` / ``causal_blocks``), so one certified bound
covers both: non-causal with its preparation fused into the loads (``at_poly`` for a whole
small problem in one call, ``at_moments_f`` / ``at_readout_f`` slice by slice for long ones;
chunks shared with the kernel's helper thread), causal after the PyTorch preparation
(``at_causal``). It is built by ``core.native`` on first use (sharing its C building blocks
with tensor attention: ``core/native_poly.h``) and used only once it has passed its self-test
in this process (``kernel``); else, and wherever ``NATIVE`` is False, the PyTorch route runs.
float64 and CUDA calls always take the PyTorch route.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...core.calibration import calibrated
from ...core.cost import best_time
from ...core.monomials import MonomialTable, monomial_table
from ...core.native import NativeKernel, check_rc, native_steps
from ...core.polynomials import certified_best
from ...core.progress import Progress, report
from ...core.radius import INFLATE
from ...core.rounding import subnormal_spacing
from ..polynomial import NativeCore, Prepared, polynomial_forward, prepare
from ..stats import torch_reductions

__all__ = [
    "NATIVE",
    "SOURCE",
    "AttentionPoly",
    "bound_core",
    "core",
    "core_causal",
    "kernel",
    "kernel_status",
    "native_rate",
    "reductions",
    "route_ok",
    "status",
]

_log = logging.getLogger(__name__)

# Use the compiled kernel for float32 CPU statistics and non-causal polynomial paths when it
# builds; tests turn this off to exercise the PyTorch route (same rounding model).
NATIVE = True
# causal: multiply-adds of a slice below which the slices run one after another (a hand-off to
# the Python thread pool costs ~50 us on a quiet machine, more on a busy one)
PARALLEL_MIN = 1 << 23
_SIG32 = 2.0 * subnormal_spacing(torch.float32)  # (statistics' normalisation slack)
# queries read out between two progress reports (a cancelled call stops there)
QUERY_BLOCK = 16384
# multiply-adds of a problem that runs in one kernel call (no progress report inside it: about
# 0.3-0.8 ms at the core's rate on the development machine); longer ones run slice by slice
# and step by step (a few calls more: about 10 us each)
ONE_CALL_MAX = 1 << 24
# multiply-adds of one chunk of keys or queries at_poly shares with its helper thread (a
# hand-off costs a few microseconds; a chunk of 2^20 about 30 us on the development machine)
SPLIT_MIN = 1 << 20
MAX_CHUNKS = 16  # at_poly's limit


class AttentionPoly:
    """ctypes bindings of ``attention_poly.c``."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self.vector_bytes = int(lib.at_vector_bytes())
        p, i, lg = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
        st = lib.at_stats
        d = ctypes.c_double
        st.argtypes = [p, p, p, i, i, i, i, i, p, p, d, d, d, p]
        st.restype = i
        ca = lib.at_causal
        ca.argtypes = [p, p, lg, i, i, p, i, p, i, i, i, i, i, i, p, p, p, p]
        ca.restype = i
        mf = lib.at_moments_f
        mf.argtypes = [p, p, p, i, lg, p, p, p, i, lg, i, i, i, p, i, i, i, i, i, i, p]
        mf.restype = i
        rf = lib.at_readout_f
        rf.argtypes = [p, p, i, lg, i, i, i, p, i, p, i, i, i, i, i, p, p, p, i]
        rf.restype = i
        po = lib.at_poly
        po.argtypes = [p, p, p, i, i, i, i, i, p, p, i, p, i, p, p, i, p, i, i, i, i, i, i, p, p]
        po.argtypes += [p, i, i]
        po.restype = i
        self._stats, self._causal = st, ca
        self._moments_f, self._readout_f, self._poly = mf, rf, po

    def stats(self, *args: float) -> None:
        _check(self._stats(*args))

    def causal(self, *args: int) -> None:
        _check(self._causal(*args))

    def moments_f(self, *args: int | None) -> None:
        _check(self._moments_f(*args))

    def readout_f(self, *args: int | None) -> None:
        _check(self._readout_f(*args))

    def poly(self, *args: int | None) -> None:
        _check(self._poly(*args))


def _check(rc: int) -> None:
    check_rc("attention_poly", rc)


SOURCE = Path(__file__).with_name("attention_poly.c")
_KERNEL = NativeKernel(SOURCE, AttentionPoly)


def kernel() -> AttentionPoly | None:
    """The compiled kernel once it has passed its self-test in this process, else None."""
    if not NATIVE:
        return None
    got = _KERNEL.checked(self_test)
    if got is None and _KERNEL.self_test_failed():
        _log.warning("compiled attention kernel failed its self-test: not used")
    return got


def status() -> str:
    """One line: the compiled kernel's path and vector width, or why it is not used."""
    return _KERNEL.status(lambda k: f"{k.path.name}, {k.vector_bytes}-byte vectors")


def kernel_status() -> str:
    """One line for logs: whether float32 CPU calls run the compiled kernel, or why not
    (builds, self-tests and calibrates it now, so that the first call does not)."""
    if not NATIVE:
        return "PyTorch route: the compiled kernel is turned off"
    if kernel() is None:
        if _KERNEL.self_test_failed():
            return "PyTorch route: the compiled kernel failed its self-test"
        return status()
    native_rate()
    return status()


def stats_ok(*ts: torch.Tensor) -> bool:
    # (on every call: is_cpu reads a flag, where device.type would build a device object)
    return NATIVE and all(t.dtype == torch.float32 and t.is_cpu for t in ts)


def route_ok(dtype: torch.dtype, device: torch.device, causal: bool = False) -> bool:
    """Whether a polynomial path in ``dtype`` on ``device`` runs in the compiled kernel (if it
    loads and passes its self-test); causal or not."""
    return NATIVE and dtype == torch.float32 and device.type == "cpu"


def reductions_native(
    kern: AttentionPoly, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float = 1.0
) -> tuple[np.ndarray, torch.Tensor, np.ndarray]:
    """``at_stats``: the host numbers of ``stats.statistics`` (its layout), the key columns'
    midranges ``[L, d]`` (float32), from one pass per tensor (plus one over q and k for the
    centred norms and Hölder sums), and what statistics derives from them (``info``: the
    radius in radius_from's usual case, else NaN; value range; max|v|; the value columns'
    normalisation exponents), in the same float64 operations."""
    L, n, d = q.shape
    m, dv = k.shape[1], v.shape[2]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    size = 3 + 2 * L * d + 3 * L + 2 * L * dv
    buf = torch.empty(size + 3 + L * dv, dtype=torch.float64)  # host | info, one allocation
    mid = torch.empty(L, d, dtype=torch.float32)
    at = buf.data_ptr()
    kern.stats(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), L, n, m, d, dv, at, mid.data_ptr(),
        float(scale), _SIG32, INFLATE, at + 8 * size,
    )  # fmt: skip
    both = buf.numpy()
    return both[:size], mid, both[size:]


def reductions(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[np.ndarray, torch.Tensor, np.ndarray] | None:
    """The compiled statistics where they run (float32 on the CPU), else None."""
    kern = kernel() if stats_ok(q, k, v) else None
    return None if kern is None else reductions_native(kern, q, k, v, scale)


def bound_core(kern: AttentionPoly | None) -> NativeCore | None:
    """``core`` bound to ``kern`` (looked up when called), the form ``polynomial_forward``
    takes; None for None."""
    if kern is None:
        return None

    def run(*args: Any, causal: bool = False, **kw: Any) -> torch.Tensor:
        return (core_causal if causal else core)(kern, *args, **kw)

    return run


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="attention-native")
        return _POOL


_CPUS = os.cpu_count() or 1


def _threads() -> int:
    return max(1, min(4, torch.get_num_threads(), _CPUS))


@lru_cache(maxsize=64)
def _steps(d: int, g: int) -> tuple[torch.Tensor, int, int]:
    """``native_steps`` cached per (d, degree) (read-only: the kernels never write it)."""
    return native_steps(d, g)


def _chunks(total: int, per: int, split_min: int, least: int) -> int:
    """How many equal chunks ``at_poly`` cuts ``total`` items of ``per`` multiply-adds into:
    about ``split_min`` multiply-adds each, at most ``MAX_CHUNKS``, every chunk (C's
    ``chunk_span``: ``ceil(total / chunks)`` each, the last one the rest) at least ``least``
    items long; 1 when the work is too small to share."""
    c = max(1, min(MAX_CHUNKS, total * per // max(1, split_min)))
    while c > 1 and total - (c - 1) * -(-total // c) < max(1, least):
        c -= 1
    return c


def _factors(fs: list[np.ndarray], rows: int, cols: int) -> torch.Tensor:
    """Per-column factors ``[nf][rows][cols]`` as one contiguous float32 tensor (powers of two
    and zeros: exact in float32)."""
    if len(fs) == 1:  # the usual case
        arr = np.ascontiguousarray(fs[0], dtype=np.float32).reshape(1, rows, cols)
    else:
        arr = np.ascontiguousarray(np.stack([f.reshape(rows, cols) for f in fs]), dtype=np.float32)
    return torch.from_numpy(arr)


def _ptr(x: torch.Tensor | None) -> int | None:
    return None if x is None else x.data_ptr()


def core(
    kern: AttentionPoly,
    prep: Prepared,
    table: MonomialTable,
    key_inner: int,
    feature_inner: int,
    threads: int | None = None,
    progress: Progress | None = None,
    *,
    min_part: int = SPLIT_MIN,
    one_call: int = ONE_CALL_MAX,
) -> torch.Tensor:
    """The non-causal polynomial path of ``polynomial_forward``, compiled, its preparation
    included (``prepare``; the kernel forms the centred, balanced, normalised inputs as it
    loads them, bit for bit those of ``Prepared.apply``).

    float32 dot products of depth at most ``key_inner`` (keys) and ``feature_inner``
    (features), what the bound certified. Returns ``[L, n, dv]`` float32:
    ``(num / den) p2 + c`` rounded once.

    With ``threads`` > 1 (default: torch's thread count, at most 2 used) the keys and the
    queries of a slice are cut into chunks of about ``min_part`` multiply-adds that the calling
    thread and the kernel's helper thread share: key chunks of at least ``key_inner`` keys
    whose float64 moments are added in float64 in chunk order (one more float64 addition per
    chunk, within the model's float64 chain: docs/attention.md), query chunks read out
    independently (the same arithmetic). The chunks are fixed before the threads start, so the
    result does not depend on the scheduling. A problem of at most ``one_call`` multiply-adds
    runs in one kernel call (``at_poly``: every slice; ``progress`` once at its end); longer
    ones slice by slice, ``progress(done, total)`` after each slice's moments and each block
    of (at least) ``QUERY_BLOCK`` queries.
    """
    q, k, v = prep.q.contiguous(), prep.k.contiguous(), prep.v.contiguous()
    L, n, d = q.shape
    m, dv = k.shape[1], v.shape[2]
    e, r = dv + 1, table.r
    steps, nlow, top = _steps(d, table.g)
    nsteps = len(table.steps)
    sp = steps.data_ptr()
    kmid = None if prep.key_mid is None else prep.key_mid.to(torch.float32).contiguous()
    fq, fk = _factors(prep.fq, L, d), _factors(prep.fk, L, d)
    fv = _factors(prep.fv, L, dv)
    c32 = prep.c.reshape(L, dv).to(torch.float32).contiguous()
    p64 = prep.p2.reshape(L, dv).contiguous()  # float64
    w = prep.w64.contiguous()  # float64
    out = torch.empty(L, n, dv, dtype=torch.float32)
    nt = _threads() if threads is None else max(1, threads)
    per = max(1, r * e)
    # key chunks of at least key_inner keys each, so that a term's float64 additions (its
    # chunk's segments, then the sum of the chunks) stay within ceil(m / key_inner):
    # docs/attention.md, "Compiled CPU kernel"
    kchunks = _chunks(m, per, min_part, key_inner) if nt >= 2 else 1
    if L * (n + m) * per <= one_call:
        qchunks = _chunks(n, per, min_part, 1) if nt >= 2 else 1
        kern.poly(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), L, n, m, d, dv, _ptr(kmid), _ptr(fq),
            len(fq), _ptr(fk), len(fk), c32.data_ptr(), _ptr(fv), len(fv), sp, nsteps, nlow,
            top, r, key_inner, feature_inner, w.data_ptr(), p64.data_ptr(), out.data_ptr(),
            kchunks, qchunks,
        )  # fmt: skip
        report(progress, 1, 1)
        return out
    # progress after the moments and every block of queries
    qblock = max(QUERY_BLOCK, (1 << 26) // per)
    blocks = [(s, min(n, s + qblock)) for s in range(0, n, qblock)]
    total = L * (1 + len(blocks))
    done = 0
    fs, vfs = L * d, L * dv
    wn = w.numpy()[None, :]
    Mt = torch.empty((kchunks, e, r), dtype=torch.float64)
    M = Mt.numpy()
    for b in range(L):
        kern.moments_f(
            k[b].data_ptr(), None if kmid is None else kmid[b].data_ptr(), _ptr(fk[0, b]),
            len(fk), fs, v[b].data_ptr(), c32[b].data_ptr(), _ptr(fv[0, b]), len(fv), vfs, m,
            d, dv, sp, nsteps, nlow, top, r, key_inner, kchunks, Mt.data_ptr(),
        )  # fmt: skip
        done += 1
        report(progress, done, total)
        # weights in float64, one rounding to float32 (as Mw.to(float32))
        me = torch.from_numpy(np.ascontiguousarray(M[0] * wn, dtype=np.float32))  # [e, r]
        for s0, s1 in blocks:
            qchunks = _chunks(s1 - s0, per, min_part, 1) if nt >= 2 else 1
            kern.readout_f(
                q[b].data_ptr(), _ptr(fq[0, b]), len(fq), fs, s0, s1, d, _ptr(me), e, sp,
                nsteps, nlow, top, r, feature_inner, p64[b].data_ptr(), c32[b].data_ptr(),
                out[b, s0:].data_ptr(), qchunks,
            )  # fmt: skip
            done += 1
            report(progress, done, total)
    return out


def core_causal(
    kern: AttentionPoly,
    prep: Prepared,
    table: MonomialTable,
    key_inner: int,
    feature_inner: int,
    threads: int | None = None,
    progress: Progress | None = None,
    **_: Any,
) -> torch.Tensor:
    """The causal polynomial path of ``polynomial_forward`` (``causal_blocks``), compiled
    (``at_causal``) after the PyTorch preparation (``Prepared.apply``): sub-blocks of
    ``key_inner`` rows (the causal unit, 16 or 32), feature chunks of ``feature_inner``; n
    queries and n keys. One thread per slice (slices in parallel when there are several);
    ``progress`` after each slice."""
    qb, kb, vn = prep.apply()
    qb, kb = qb.contiguous(), kb.contiguous()
    L, d, n = qb.shape
    dv = vn.shape[2]
    e = dv + 1
    steps, nlow, top = _steps(d, table.g)
    nsteps = len(table.steps)
    ve = torch.cat([vn, torch.ones(L, n, 1, dtype=vn.dtype)], dim=2).contiguous()  # [L, n, e]
    c32 = prep.c.reshape(L, dv).to(torch.float32).contiguous()
    p64 = prep.p2.reshape(L, dv).to(torch.float64).contiguous()
    w = prep.w64.to(torch.float64).contiguous()
    out = torch.empty(L, n, dv, dtype=torch.float32)

    def one(b: int) -> None:
        kern.causal(
            qb[b].data_ptr(), kb[b].data_ptr(), n, n, d, ve[b].data_ptr(), e, steps.data_ptr(),
            nsteps, nlow, top, table.r, feature_inner, key_inner, w.data_ptr(),
            p64[b].data_ptr(), c32[b].data_ptr(), out[b].data_ptr(),
        )  # fmt: skip

    nt = _threads() if threads is None else max(1, threads)
    done = 0
    for b0 in range(0, L, nt):
        group = list(range(b0, min(L, b0 + nt)))
        if len(group) == 1 or n * table.r * e < PARALLEL_MIN:
            for b in group:
                one(b)
        else:
            list(_pool().map(one, group))
        done += len(group)
        report(progress, done, L)
    return out


def _probe(
    n: int, m: int, d: int, dv: int, g: int, L: int = 2, seed: int = 20261129
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = 0.4 * torch.randn(L, n, d, generator=gen)
    k = 0.4 * torch.randn(L, m, d, generator=gen) + 0.25
    v = torch.randn(L, m, dv, generator=gen) - 0.5
    return q, k, v


def self_test(kern: AttentionPoly) -> bool:
    """The compiled statistics and polynomial core against the PyTorch route, once per process.

    Small fixed problems (two slices, unequal lengths, short chunks: several segments and
    feature chunks, threads on and off): the column extremes and midranges must be identical,
    the norms equal to 1e-12, and the outputs of the same degree-3 polynomial equal to float32
    rounding. Guards against a compiler or CPU that builds the library but computes something
    else.
    """
    try:
        q, k, v = _probe(137, 450, 3, 2, 3)
        host_c, mid_c, _ = reductions_native(kern, q, k, v)
        host_t, mid_t, _ = torch_reductions(q, k, v)
        if not torch.equal(mid_c, mid_t) or not np.allclose(host_c, host_t, rtol=1e-12, atol=0):
            return False
        approx = certified_best(1.0, 3)

        def slice_by_slice(prep: Prepared, *a: Any, causal: bool = False, **kw: Any) -> Any:
            return core(kern, prep, *a, **kw, one_call=0)

        cases: list[tuple[int, int, int, Any]] = [
            (1, 16, SPLIT_MIN, bound_core(kern)),
            (2, 64, 1000, bound_core(kern)),
            (2, 64, 1000, slice_by_slice),
        ]
        for threads, key_chunk, min_part, nat in cases:
            # (threads, long key chunks and short parts: keys and queries in chunks; one call
            # for all slices, or a call per slice and step)
            kw = {"dtype": torch.float32, "key_chunk": key_chunk, "feature_chunk": 8}
            ref = polynomial_forward(q, k, v, approx, 0.5, **kw).double()  # type: ignore[arg-type]
            got = polynomial_forward(
                q, k, v, approx, 0.5, native=nat, native_threads=threads,
                native_min_part=min_part, **kw,  # type: ignore[arg-type]
            ).double()  # fmt: skip
            if not bool((got - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-12):
                return False
        for m_ in (137, 7):  # causal: several sub-blocks of 32, and one of 16
            qc, kc, vc = q[:, :m_], k[:, :m_], v[:, :m_]
            kw = {"dtype": torch.float32, "key_chunk": 64, "feature_chunk": 8}
            ref = polynomial_forward(qc, kc, vc, approx, 0.5, causal=True, **kw)  # type: ignore[arg-type]
            got = polynomial_forward(
                qc, kc, vc, approx, 0.5, causal=True, native=bound_core(kern), **kw  # type: ignore[arg-type]
            )  # fmt: skip
            if not bool((got - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-12):
                return False
        return True
    except (ValueError, MemoryError, RuntimeError):
        return False


def _measure_native(kern: AttentionPoly) -> dict[str, float]:
    n, d, dv, g = 2048, 8, 8, 3
    table = monomial_table(d, g)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (0.5 * torch.randn(1, n, x, generator=gen) for x in (d, d, dv))
    prep = prepare(q, k, v, certified_best(1.0, g), 0.5, table, torch.float32)
    best = best_time(
        lambda: core(kern, prep, table, 512, 256, threads=1),
        torch.device("cpu"),
        reps=3,
    )
    return {"madds": 2 * n * table.r * (dv + 1) / best}


def native_rate() -> float:
    """Multiply-adds per second of the compiled core (features, moments, readout; one
    thread): timed on n = m = 2048, d = dv = 8, degree 3 (best of 3, about 2 ms a round),
    calibrated once per machine and compiled library (``core.calibration``); 0.0 without the
    kernel."""
    kern = kernel()
    if kern is None:
        return 0.0
    got = calibrated(
        "attention-native",
        "cpu",
        torch.float32,
        lambda: _measure_native(kern),
        depends=kern.path.name,
        names=("madds",),
    )
    return got["madds"]
