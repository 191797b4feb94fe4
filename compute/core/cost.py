"""A cost model calibrated on the machine it runs on, and the timing helper behind it.

``rates(device, dtype)`` times a few small kernels and returns sustained throughputs; each
operation turns its operation counts into predicted seconds with them (docs/attention.md,
"Planner and cost model"). They are measured robustly (best of repeated rounds) once per machine,
library and torch version, device, dtype and thread count, and kept in a file that every process
reads (``core.calibration``), so that the same inputs get the same plan in every process.
Feature construction is memory-bound, which is why it gets its own rates: counting GEMM flops
alone would make the factored path look cheaper than it is.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from .calibration import calibrated
from .monomials import FeatureBuilder, monomial_table

__all__ = [
    "Rates",
    "best_time",
    "feature_rate",
    "predict_exact_attention",
    "predict_polynomial_attention",
    "rates",
]


@dataclass(frozen=True)
class Rates:
    gemm: float  # flop/s, square-ish blocks (exact attention's Q K^T and P V)
    skinny: float  # flop/s, [r, b] @ [b, dv] with small dv (the factored path's products)
    elems: float  # elements/s of a gather-multiply (the feature term of the cost models)
    exps: float  # elements/s of exp + row max/sum bookkeeping (exact path softmax)
    stream: float  # elements/s of one read-modify-write pass over a 4M-element block


def best_time(fn: Callable[[], object], device: torch.device, reps: int = 5) -> float:
    """Seconds of the fastest of ``reps`` runs of ``fn`` after one warm-up (synchronised on
    CUDA)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return max(best, 1e-9)


Kernel = tuple[str, Callable[[], object], float]  # (constant, kernel, work units per call)


def _rate_kernels(device: torch.device, dtype: torch.dtype) -> list[Kernel]:
    """The kernels :class:`Rates` times, on fixed data, each with the work it does per call."""
    big = 2048 if device.type == "cuda" else 512
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device, dtype)

    # every kernel writes into a preallocated buffer: timing fresh allocations would measure
    # page faults (large blocks are mmap-ed anew each call), not the arithmetic
    a, b, ab = rnd(big, 64), rnd(64, big), rnd(big, big)
    f, v, fv = rnd(512, big), rnd(big, 16), rnd(512, 16)
    idx = torch.randint(0, 512, (512,), generator=gen).to(device)
    x, g1, g2, g3 = rnd(512, big), rnd(512, big), rnd(512, big), rnd(512, big)

    def gather_mul() -> None:  # the gather-multiply of a monomial feature block
        torch.index_select(x, 0, idx, out=g1)
        torch.index_select(x, 0, idx, out=g2)
        torch.mul(g1, g2, out=g3)

    s, e, rowsum = rnd(big, big), rnd(big, big), rnd(big)

    def softmax_rows() -> None:
        torch.sub(s, s.amax(dim=-1, keepdim=True), out=e)
        torch.exp(e, out=e)
        torch.sum(e, dim=-1, out=rowsum)

    # a block of the size the exact LoRA path streams through ([slices, block, L] scores)
    blk = torch.ones(1 << 22, device=device, dtype=dtype)
    blk_out = torch.empty_like(blk)
    return [
        ("gemm", lambda: torch.matmul(a, b, out=ab), 2.0 * big * 64 * big),
        ("skinny", lambda: torch.matmul(f, v, out=fv), 2.0 * 512 * big * 16),
        ("elems", gather_mul, 512.0 * big),
        ("exps", softmax_rows, float(big * big)),
        ("stream", lambda: torch.mul(blk, 1.5, out=blk_out), float(1 << 22)),
    ]


def _measure_rates(
    device: torch.device, dtype: torch.dtype, kernels: list[Kernel]
) -> dict[str, float]:
    """One measuring round of :class:`Rates` (a few tens of ms on a CPU); ``kernels`` is filled
    on the first round and reused by the next."""
    if not kernels:
        kernels.extend(_rate_kernels(device, dtype))
    return {name: work / best_time(fn, device) for name, fn, work in kernels}


_RATE_NAMES = tuple(f.name for f in fields(Rates))


def _device(device: torch.device | str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def rates(device: torch.device | str, dtype: torch.dtype) -> Rates:
    """Calibrated throughputs for ``device`` (``core.calibration``: measured once per machine)."""
    dev = _device(device)
    kernels: list[Kernel] = []
    got = calibrated(
        "rates", dev, dtype, lambda: _measure_rates(dev, dtype, kernels), names=_RATE_NAMES
    )
    return Rates(**got)


def predict_exact_attention(
    rt: Rates, *, batch: int, n_q: int, n_k: int, d: int, dv: int, causal: bool = False
) -> float:
    """Seconds for blocked exact attention: two GEMMs and the softmax bookkeeping per pair."""
    pairs = float(batch) * n_q * n_k * (0.5 if causal else 1.0)
    return pairs * 2.0 * (d + dv) / rt.gemm + pairs / rt.exps


def predict_polynomial_attention(
    rt: Rates, *, batch: int, n_q: int, n_k: int, r: int, dv: int, causal: bool = False
) -> float:
    """Seconds for the factored path: features on both sides and four skinny products."""
    feats = float(batch) * (n_q + n_k) * r
    flops = float(batch) * 2.0 * (n_q + n_k) * r * (dv + 1) * (2.0 if causal else 1.0)
    return feats / rt.elems + flops / rt.skinny


def _measure_feature_rate(
    dev: torch.device, dtype: torch.dtype, built: list[FeatureBuilder]
) -> dict[str, float]:
    table = monomial_table(8, 4)
    if not built:
        x = torch.rand((1, 8, 2048), device=dev, dtype=dtype)
        out = torch.zeros((1, table.r, 2048), device=dev, dtype=dtype)
        built.append(FeatureBuilder(table, x, out))
    return {"features": table.r * 2048 / best_time(built[0].build, dev, reps=3)}


def feature_rate(device: str | torch.device, dtype: torch.dtype) -> float:
    """Elements/s of the feature builder (``monomials.FeatureBuilder``) on one cache-sized block
    (d = 8, degree 4, 2048 columns), calibrated once per machine (``core.calibration``).
    ``Rates.elems`` times a gather-multiply, which the builder's contiguous products beat
    several times over."""
    dev = _device(device)
    built: list[FeatureBuilder] = []
    got = calibrated(
        "feature-rate",
        dev,
        dtype,
        lambda: _measure_feature_rate(dev, dtype, built),
        names=("features",),
    )
    return got["features"]
