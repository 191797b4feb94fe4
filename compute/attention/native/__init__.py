"""The compiled CPU route of attention (docs/attention.md, "Compiled CPU kernel").

``attention_poly.c`` beside this file computes the statistics of a float32 call in one pass
per tensor (``at_stats``) and the non-causal float32 polynomial path after balancing and
normalisation (``at_moments``, ``at_readout``), with the rounding model of the PyTorch route
(``polynomial.noncausal_blocks``), so one certified bound covers both. It is built by
``core.native`` on first use (sharing its C building blocks with tensor attention:
``core/native_poly.h``) and used only once it has passed its self-test in this process
(``kernel``); else, and wherever ``NATIVE`` is False, the PyTorch route runs. float64, CUDA and
causal calls always take the PyTorch route.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, TypeVar

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
from ..polynomial import NativeCore, polynomial_forward
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
# multiply-adds per thread below which one thread does all (a hand-off costs ~50 us on a
# quiet machine, more on a busy one; measured: splitting 2^22 multiply-adds still lost)
PARALLEL_MIN = 1 << 23
_SIG32 = 2.0 * subnormal_spacing(torch.float32)  # (statistics' normalisation slack)
# queries read out between two progress reports (a cancelled call stops there)
QUERY_BLOCK = 16384


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
        mo = lib.at_moments
        mo.argtypes = [p, lg, i, i, i, p, i, p, i, i, i, i, i, p]
        mo.restype = i
        ro = lib.at_readout
        ro.argtypes = [p, lg, i, i, i, p, i, p, i, i, i, i, i, p, p, p]
        ro.restype = i
        ca = lib.at_causal
        ca.argtypes = [p, p, lg, i, i, p, i, p, i, i, i, i, i, i, p, p, p, p]
        ca.restype = i
        self._stats, self._moments, self._readout, self._causal = st, mo, ro, ca

    def stats(self, *args: float) -> None:
        _check(self._stats(*args))

    def moments(self, *args: int) -> None:
        _check(self._moments(*args))

    def readout(self, *args: int) -> None:
        _check(self._readout(*args))

    def causal(self, *args: int) -> None:
        _check(self._causal(*args))


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


def _spans(total: int, parts: int) -> list[tuple[int, int]]:
    step = -(-total // parts)
    return [(s, min(total, s + step)) for s in range(0, total, step)]


def core(
    kern: AttentionPoly,
    qb: torch.Tensor,
    kb: torch.Tensor,
    vn: torch.Tensor,
    c: torch.Tensor,
    p2: torch.Tensor,
    w64: torch.Tensor,
    table: MonomialTable,
    key_inner: int,
    feature_inner: int,
    threads: int | None = None,
    progress: Progress | None = None,
    min_part: int = PARALLEL_MIN,
) -> torch.Tensor:
    """The non-causal polynomial path of ``polynomial_forward`` after its preparation, compiled.

    ``qb [L, d, n]``, ``kb [L, d, m]`` balanced and transposed (float32), ``vn [L, m, dv]`` the
    normalised centred values, ``c [L, 1, dv]`` their centre (float32), ``p2 [L, 1, dv]``
    (float64) the normalisation, ``w64 [r]`` the weights; float32 dot products of depth at
    most ``key_inner`` (keys) and ``feature_inner`` (features), what the bound certified.
    Returns ``[L, n, dv]`` float32: ``(num / den) p2 + c`` rounded once.

    With ``threads`` > 1 (default: torch's thread count) long problems are split, each part
    at least ``min_part`` multiply-adds: keys into contiguous parts of at least ``key_inner``
    keys whose float64 moments are added in float64 (one more float64 addition per part,
    within the model's float64 chain: docs/attention.md), queries into parts read out
    independently (the same arithmetic). ``progress(done, total)``
    after each slice's moments and each block of (at least) ``QUERY_BLOCK`` queries of the part
    read out on the calling thread.
    """
    L, d, n = qb.shape
    m, dv = kb.shape[2], vn.shape[2]
    e, r = dv + 1, table.r
    steps, nlow, top = native_steps(d, table.g)
    nsteps = len(table.steps)
    qb, kb = qb.contiguous(), kb.contiguous()
    ve = torch.cat([vn, torch.ones(L, m, 1, dtype=vn.dtype)], dim=2).contiguous()  # [L, m, e]
    c32 = c.reshape(L, dv).to(torch.float32).contiguous()
    p64 = p2.reshape(L, dv).to(torch.float64).contiguous()
    w = w64.to(torch.float64).contiguous()
    out = torch.empty(L, n, dv, dtype=torch.float32)
    nt = _threads() if threads is None else max(1, threads)
    # a thread takes a part only when it has at least min_part multiply-adds; key parts only
    # of at least key_inner keys each, so that a term's float64 additions (its part's
    # segments, then the sum of the parts) stay within ceil(m / key_inner): docs/attention.md,
    # "Compiled CPU kernel"
    per = max(1, r * e)
    kparts = max(1, min(nt, m * per // max(1, min_part)))
    while kparts > 1 and min(b - a for a, b in _spans(m, kparts)) < key_inner:
        kparts -= 1
    qparts = max(1, min(nt, n * per // max(1, min_part)))
    qspans = _spans(n, qparts)
    # progress after the moments and every block of queries of the first part (read out on
    # this thread, so that progress and cancellation stay on the caller's thread)
    qblock = max(QUERY_BLOCK, (1 << 26) // max(1, r * e))
    first = qspans[0]
    blocks = [(s, min(first[1], s + qblock)) for s in range(first[0], first[1], qblock)]
    sp = steps.data_ptr()
    total = L * (1 + len(blocks))
    done = 0

    def tick(_: object) -> None:
        nonlocal done
        done += 1
        report(progress, done, total)

    for b in range(L):
        kbp, vep = kb[b].data_ptr(), ve[b].data_ptr()

        def moments(span: tuple[int, int], kbp: int = kbp, vep: int = vep) -> np.ndarray:
            M = np.empty((e, r), dtype=np.float64)
            kern.moments(
                kbp, m, span[0], span[1], d, vep, e, sp, nsteps, nlow, top, r, key_inner,
                M.ctypes.data,
            )  # fmt: skip
            return M

        parts = _on_threads(moments, _spans(m, kparts), lambda _: None)
        M = parts[0]
        for extra in parts[1:]:
            M = M + extra  # float64
        tick(None)
        # weights in float64, one rounding to float32 (as Mw.to(float32))
        me = torch.from_numpy(M * w.numpy()[None, :]).to(torch.float32).contiguous()  # [e, r]
        qbp, mep = qb[b].data_ptr(), me.data_ptr()
        p2p, cp, ob = p64[b].data_ptr(), c32[b].data_ptr(), out[b]

        def readout(
            span: tuple[int, int], qbp: int = qbp, mep: int = mep, p2p: int = p2p, cp: int = cp,
            ob: torch.Tensor = ob,
        ) -> None:  # fmt: skip
            kern.readout(
                qbp, n, span[0], span[1], d, mep, e, sp, nsteps, nlow, top, r, feature_inner,
                p2p, cp, ob[span[0]:].data_ptr(),
            )  # fmt: skip

        _on_threads(readout, qspans, tick, blocks)
    return out


T = TypeVar("T")


def _on_threads(
    fn: Callable[[tuple[int, int]], T],
    spans: list[tuple[int, int]],
    tick: Callable[[object], None],
    first_blocks: list[tuple[int, int]] | None = None,
) -> list[T]:
    """``fn`` on every span: the first on this thread (in ``first_blocks`` if given, calling
    ``tick`` after each), the others on the pool at the same time; returns the results of the
    spans in order. Waits for the pool's spans also when this thread's part raises (a cancelled
    call must not free buffers the kernel is still writing)."""
    futures = [_pool().submit(fn, sp) for sp in spans[1:]]
    try:
        if first_blocks is None:
            head = fn(spans[0])
            tick(head)
        else:
            for blk in first_blocks:
                head = fn(blk)
                tick(head)
    finally:
        wait(futures)
    return [head, *(f.result() for f in futures)]


def core_causal(
    kern: AttentionPoly,
    qb: torch.Tensor,
    kb: torch.Tensor,
    vn: torch.Tensor,
    c: torch.Tensor,
    p2: torch.Tensor,
    w64: torch.Tensor,
    table: MonomialTable,
    key_inner: int,
    feature_inner: int,
    threads: int | None = None,
    progress: Progress | None = None,
    **_: Any,
) -> torch.Tensor:
    """The causal polynomial path of ``polynomial_forward`` (``causal_blocks``) after its
    preparation, compiled (``at_causal``): sub-blocks of ``key_inner`` rows (the causal unit,
    16 or 32), feature chunks of ``feature_inner``; n queries and n keys. One thread per slice
    (slices in parallel when there are several); ``progress`` after each slice."""
    L, d, n = qb.shape
    dv = vn.shape[2]
    e = dv + 1
    steps, nlow, top = native_steps(d, table.g)
    nsteps = len(table.steps)
    qb, kb = qb.contiguous(), kb.contiguous()
    ve = torch.cat([vn, torch.ones(L, n, 1, dtype=vn.dtype)], dim=2).contiguous()  # [L, n, e]
    c32 = c.reshape(L, dv).to(torch.float32).contiguous()
    p64 = p2.reshape(L, dv).to(torch.float64).contiguous()
    w = w64.to(torch.float64).contiguous()
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
        for threads, key_chunk, min_part in ((1, 16, PARALLEL_MIN), (2, 64, 1000)):
            # (threads, long key chunks and short parts: keys and queries split in two)
            kw = {"dtype": torch.float32, "key_chunk": key_chunk, "feature_chunk": 8}
            ref = polynomial_forward(q, k, v, approx, 0.5, **kw).double()  # type: ignore[arg-type]
            got = polynomial_forward(
                q, k, v, approx, 0.5, native=bound_core(kern), native_threads=threads,
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
    qb, kb = (0.5 * torch.randn(1, d, n, generator=gen) for _ in range(2))
    vn = 0.5 * torch.randn(1, n, dv, generator=gen)
    c, p2 = torch.zeros(1, 1, dv), torch.ones(1, 1, dv, dtype=torch.float64)
    w = torch.ones(table.r, dtype=torch.float64)
    best = best_time(
        lambda: core(kern, qb, kb, vn, c, p2, w, table, 512, 256, threads=1),
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
