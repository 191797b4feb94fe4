"""The compiled CPU route of tensor attention (docs/tensor_attention.md, "Compiled CPU kernel").

``tensor_poly.c`` beside this file computes the statistics (``ta_stats``) and the whole
polynomial path after planning (``ta_poly_run``) for float32 on the CPU, with the rounding model
of the PyTorch route (``polynomial.poly_core``), so one certified bound covers both. It is built
by ``core.native`` on first use and used only once it has passed its self-test in this process
(``kernel``); else, and wherever ``NATIVE`` is False, the PyTorch route runs.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ...core.calibration import calibrated
from ...core.cost import best_time
from ...core.monomials import feature_count, monomial_table
from ...core.native import NativeKernel, check_rc, native_steps
from ...core.polynomials import Approximation, certified_best
from ...core.progress import Progress, report
from ...core.scaling import mul_pow2_
from ..polynomial import poly_core, query_weights
from ..stats import Stats, reductions_torch

__all__ = [
    "NATIVE",
    "SOURCE",
    "TensorPoly",
    "kernel",
    "kernel_status",
    "native_rate",
    "reductions",
    "route_ok",
    "run_native",
    "status",
    "tensor_poly",
]

_log = logging.getLogger(__name__)

# Use the compiled kernel for the statistics and for the float32 polynomial path on the CPU
# when it builds; tests turn this off to exercise the PyTorch route, which follows the same
# rounding model.
NATIVE = True


class TensorPoly:
    """ctypes bindings of ``tensor_poly.c``: ``ta_stats`` and ``ta_poly_run``."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self.vector_bytes = int(lib.ta_vector_bytes())
        p, i = ctypes.c_void_p, ctypes.c_int
        st = lib.ta_stats
        st.argtypes = [p, p, p, p, p, i, i, i, i, i, i, p, p, p]
        st.restype = ctypes.c_int
        self._stats = st
        run = lib.ta_poly_run
        run.argtypes = [p, i, i, i, i, i, p, p, p, p, p, i, p, i, i, i, i, p, i, p, p, i, i]
        run.restype = ctypes.c_int
        self._run = run

    def stats(self, *args: int) -> None:
        """``ta_stats`` on raw pointers and sizes, in its C argument order; raises on failure."""
        _check(self._stats(*args))

    def run(self, *args: int | None) -> None:
        """``ta_poly_run`` on raw pointers and sizes, in its C argument order (None for a NULL
        pointer); raises ``MemoryError``/``ValueError`` on failure."""
        _check(self._run(*args))


def _check(rc: int) -> None:
    check_rc("tensor_poly", rc)


SOURCE = Path(__file__).with_name("tensor_poly.c")
_KERNEL = NativeKernel(SOURCE, TensorPoly)


def tensor_poly() -> TensorPoly | None:
    """The compiled kernel, built on the first call (cached); None when unavailable."""
    return _KERNEL.get()


def status() -> str:
    """One line: the compiled kernel's path and vector width, or why it is not used."""
    return _KERNEL.status(lambda k: f"{k.path.name}, {k.vector_bytes}-byte vectors")


def stats_ok(*ts: torch.Tensor) -> bool:
    return NATIVE and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in ts)


def route_ok(dt: torch.dtype, dev: torch.device) -> bool:
    """Whether a polynomial path in ``dt`` on ``dev`` runs in the compiled kernel (if it loads)."""
    return NATIVE and dt == torch.float32 and dev.type == "cpu"


_native_steps = native_steps  # shared with attention's kernel (core.native)


_CHECKED: dict[str, bool] = {}


def kernel() -> TensorPoly | None:
    """The compiled kernel once it has passed its self-test in this process, else None."""
    kern = tensor_poly()
    if kern is None:
        return None
    if "ok" not in _CHECKED:
        _CHECKED["ok"] = self_test(kern)
        if not _CHECKED["ok"]:
            _log.warning("compiled tensor-attention kernel failed its self-test: not used")
    return kern if _CHECKED["ok"] else None


def kernel_status() -> str:
    """One line for logs: whether float32 CPU calls run the compiled kernel, or why not.

    Builds (or loads) the kernel, runs its self-test and calibrates its rate now, so that the
    first call does not (the worker calls this at start-up).
    """
    if not NATIVE:
        return "PyTorch route: the compiled kernel is turned off"
    if kernel() is None:
        if tensor_poly() is None:
            return status()
        return "PyTorch route: the compiled kernel failed its self-test"
    native_rate()
    return status()


def reductions_native(
    kern: TensorPoly,
    q: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
    v1: torch.Tensor,
    v2: torch.Tensor,
) -> tuple[torch.Tensor, np.ndarray]:
    """The same as ``stats.reductions_torch`` in one pass of ``ta_stats`` (float32, CPU)."""
    B, n, d = q.shape
    n1, n2, dv = k1.shape[1], k2.shape[1], v1.shape[-1]
    ins = [x.contiguous() for x in (q, k1, k2, v1, v2)]
    xt = torch.empty(d, B, n + n1 + n2, dtype=q.dtype)  # [d, B, n+n1+n2]
    host = np.empty(6 * B + 4 * B * dv, dtype=np.float64)  # [seg [B, 2, 3] | ext [4, B, dv]]
    kern.stats(
        *(x.data_ptr() for x in ins),
        B,
        n,
        n1,
        n2,
        d,
        dv,
        xt.data_ptr(),
        host.ctypes.data,
        host.ctypes.data + 6 * B * host.itemsize,
    )
    return xt, host


def reductions(
    q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor
) -> tuple[torch.Tensor, np.ndarray]:
    """``stats.statistics``' reductions by the compiled kernel where it runs, else PyTorch."""
    kern = kernel() if stats_ok(q, k1, k2, v1, v2) else None
    if kern is not None:  # the same numbers from one pass of compiled code
        return reductions_native(kern, q, k1, k2, v1, v2)
    return reductions_torch(q, k1, k2, v1, v2)


def _probe(
    kern: TensorPoly, shape: tuple[int, int, int, int, int, int], g: int, chunk: int
) -> tuple[tuple[torch.Tensor, ...], Callable[[torch.dtype], torch.Tensor]]:
    """Fixed random float32 inputs of ``shape = (B, n, n1, n2, d, dv)`` and a function running
    the whole compiled path on them (statistics and ``run_native``, unit exponents, no
    balancing, scale 0.5) with a degree-``g`` polynomial and float32 chunks of ``chunk``."""
    B, n, n1, n2, d, dv = shape
    gen = torch.Generator().manual_seed(20261128)
    q, k1, k2 = (0.5 * torch.randn(B, m, d, generator=gen) for m in (n, n1, n2))
    v1, v2 = (torch.randn(B, m, dv, generator=gen) for m in (n1, n2))
    approx = certified_best(1.0, g)
    zero = torch.zeros(B, 1, dv, dtype=torch.int64)  # exponents: no normalisation
    none = np.zeros(B * dv)

    def run(out_dtype: torch.dtype) -> torch.Tensor:
        xt, _ = reductions_native(kern, q, k1, k2, v1, v2)
        stats = Stats(1.0, [1.0, 1.0, 1.0], none, none, none, zero, zero, xt)
        return run_native(kern, stats, None, v1, v2, n, n1, approx, chunk, 0.5, out_dtype, None)

    return (q, k1, k2, v1, v2), run


def self_test(kern: TensorPoly) -> bool:
    """The compiled statistics and polynomial path against the PyTorch route, once per process.

    A small fixed problem (two slices, unequal lengths, chunk 16: several lane segments): the
    transposed inputs must be identical, the reductions equal to 1e-12, and the outputs of the
    same degree-3 polynomial equal to float32 rounding. Guards against a compiler or CPU that
    builds the library but computes something else.
    """
    try:
        n, n1, chunk = 37, 450, 16
        (q, k1, k2, v1, v2), run = _probe(kern, (2, n, n1, 200, 3, 2), 3, chunk)
        xt_c, host_c = reductions_native(kern, q, k1, k2, v1, v2)
        xt_t, host_t = reductions_torch(q, k1, k2, v1, v2)
        if not torch.equal(xt_c, xt_t) or not np.allclose(host_c, host_t, rtol=1e-12, atol=0.0):
            return False
        ones = torch.ones(v1.shape[0], v1.shape[1] + v2.shape[1], 1)
        ve = torch.cat([torch.cat([v1, v2], dim=1), ones], dim=2)  # [B, n1+n2, dv+1]
        approx = certified_best(1.0, 3)
        ref = poly_core(xt_t, ve, n, n1, approx, 0.5, chunk=chunk)  # [B, n, dv] float64
        got = run(torch.float64)
        return bool((got - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-12)
    except (ValueError, MemoryError, RuntimeError):
        return False


def run_ok(
    dtype: torch.dtype, xt: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor
) -> TensorPoly | None:
    """The compiled kernel when it can run the whole polynomial path of this call, else None."""
    if not route_ok(dtype, xt.device) or not all(t.dtype == torch.float32 for t in (xt, v1, v2)):
        return None
    return kernel()


def run_native(
    kern: TensorPoly,
    stats: Stats,
    shifts: list[int] | None,
    v1: torch.Tensor,
    v2: torch.Tensor,
    n: int,
    n1: int,
    approx: Approximation,
    chunk: int,
    scale: float,
    out_dtype: torch.dtype,
    progress: Progress | None,
) -> torch.Tensor:
    """The polynomial path after planning in compiled code (``ta_poly_run``), slice by slice.

    The same steps as the PyTorch route, with the same roundings: balancing ``xt`` by the
    powers of two ``shifts`` (in place), normalising the value columns by ``2^-e``, the fused
    core (every step of ``poly_core``, with each block of features kept in cache instead of
    the ``[r, n + n1 + n2]`` feature matrix; float32 dot products of depth at most ``chunk``,
    float64 across them: see ``tensor_poly.c``) and the exact rescaling by
    ``2^(e1 + e2)`` in float64, rounded once to a float32 output (other output dtypes are cast
    from float64 by torch). ``bound.tensor_rounding_bound`` covers both routes.
    """
    xt = stats.xt.contiguous()  # [d, B, N] float32, balanced in place below
    d, B, N = xt.shape
    if shifts is not None and not -120 <= min(shifts) <= max(shifts) <= 120:
        # the kernel applies one normal float32 factor per input: larger shifts (subnormal or
        # huge inputs with a compensating scale) are applied here, in exact steps
        n2 = N - n - n1
        spans = ((0, n), (n, n + n1), (n + n1, n + n1 + n2))
        for (lo, hi), big in zip(spans, shifts, strict=True):
            mul_pow2_(xt[:, :, lo:hi], big)
        shifts = None
    v1, v2 = v1.contiguous(), v2.contiguous()  # [B, n1, dv], [B, n2, dv]
    e1, e2 = stats.e1.contiguous(), stats.e2.contiguous()  # [B, 1, dv] int64
    dv = v1.shape[-1]
    tables = monomial_table(d, approx.degree)
    steps, nlow, top = _native_steps(d, tables.g)
    w = query_weights(approx, tables, scale).contiguous()  # [r] float64
    sh = None if shifts is None else np.asarray(shifts, dtype=np.int32)
    f32 = out_dtype == torch.float32
    out = torch.empty(B, n, dv, dtype=torch.float32 if f32 else torch.float64)
    for b in range(B):
        kern.run(
            xt.data_ptr(),
            B,
            n,
            n1,
            N - n - n1,
            d,
            None if sh is None else sh.ctypes.data,
            v1.data_ptr(),
            v2.data_ptr(),
            e1.data_ptr(),
            e2.data_ptr(),
            dv,
            steps.data_ptr(),
            len(tables.steps),
            nlow,
            top,
            tables.r,
            w.data_ptr(),
            chunk,
            out.data_ptr() if f32 else None,
            None if f32 else out.data_ptr(),
            b,
            b + 1,
        )
        report(progress, b + 1, B)
    return out if f32 else out.to(out_dtype)


def _measure_native(kern: TensorPoly) -> dict[str, float]:
    m, d, dv, g = 512, 8, 8, 3
    _, run = _probe(kern, (1, m, m, m, d, dv), g, 128)
    best = best_time(lambda: run(torch.float32), torch.device("cpu"))
    return {"madds": 3 * m * feature_count(d, g) * (dv + 1) / best}


def native_rate() -> float:
    """Multiply-adds per second of the compiled polynomial path, whole call included
    (statistics, balancing, features, products, scaling): timed on n = n1 = n2 = 512,
    d = dv = 8, degree 3 (best of 5, about 1 ms a round), calibrated once per machine and
    compiled library (``core.calibration``); 0.0 without the kernel."""
    kern = kernel()
    if kern is None:
        return 0.0
    got = calibrated(
        "tensor-native",
        "cpu",
        torch.float32,
        lambda: _measure_native(kern),
        depends=kern.path.name,
        names=("madds",),
    )
    return got["madds"]
