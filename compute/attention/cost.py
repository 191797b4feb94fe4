"""Predicted seconds of attention's two paths on this machine (docs/attention.md, "Planner and
cost model").

The exact path's model (``core.cost.predict_exact_attention``) counts the unfused loop; the
non-causal exact path runs PyTorch's fused kernel, whose constant is measured here (once per
machine, ``core.calibration``). The polynomial path's features are priced at the feature
builder's measured rate, or, where the compiled route runs (``native``), at the compiled core's
measured rate. ``polynomial_floor`` is a lower bound of every polynomial prediction with at least
r features: the planner's fast exit to exact.

Both predictions the planner makes on every call (``predict_exact``, ``polynomial_floor``) are
memoised (``_memo``): per their arguments and everything else they read (the calibration's
``epoch``, torch's thread count, the device CUDA resolves an unindexed device to, and for the
floor the compiled route's switch and kernel object), so a repeated shape is priced with a dict
lookup and gets the same number as the first call.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

from ..core.calibration import calibrated, epoch
from ..core.cost import (
    best_time,
    feature_rate,
    predict_exact_attention,
    predict_polynomial_attention,
    rates,
)
from . import native
from .polynomial import CAUSAL_BLOCK, Config

__all__ = ["NATIVE_PREP", "polynomial_floor", "predict_exact", "predict_polynomial"]

# the compiled route's fixed cost per call: checks, statistics, planning and the host-side
# preparation (factors and centres from the statistics; the kernel prepares q, k, v while it
# loads them): measured 0.25-0.31 ms at n = 16 on the 2-core development machine (was 0.5 ms
# with the preparation in PyTorch); seconds, plus NATIVE_PREP_ELEM per input element (the
# statistics' two passes over q and k and one over v)
NATIVE_PREP = 3e-4
NATIVE_PREP_ELEM = 1e-9


_MEMO: dict[Hashable, float] = {}
MEMO_SIZE = 4096  # entries kept at most (cleared when full: shapes of a workload repeat)


def _memo(key: Hashable, compute: Callable[[], float]) -> float:
    """``compute()`` memoised under ``key`` (which must name everything the value depends on)."""
    got = _MEMO.get(key)
    if got is None:
        got = compute()
        if len(_MEMO) >= MEMO_SIZE:
            _MEMO.clear()
        _MEMO[key] = got
    return got


def _state(device: torch.device) -> tuple[int, int, int | None]:
    """What a prediction reads besides its arguments: the calibration epoch (bumped when the
    constants may change), torch's thread count (a part of every calibration key) and, for an
    unindexed CUDA device, the current device (``core.cost.rates`` prices that one)."""
    cur = torch.cuda.current_device() if device.type == "cuda" and device.index is None else None
    return epoch(), torch.get_num_threads(), cur


FUSED_N, FUSED_D = 1024, 16  # the fused kernel's calibration problem: n queries and keys, d = dv


def _measure_fused(dev: torch.device, dtype: torch.dtype) -> dict[str, float]:
    x = torch.rand((1, 1, FUSED_N, FUSED_D), device=dev, dtype=dtype)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return {"calls": 1.0 / best_time(lambda: sdpa(x, x, x), dev, reps=3)}


def _fused_exact_factor(device: str, dtype: torch.dtype) -> float:
    """Measured time of the fused SDPA kernel over the exact prediction (1024^2, d=16), both
    calibrated once per machine."""
    dev = torch.device(device)
    got = calibrated("fused-sdpa", dev, dtype, lambda: _measure_fused(dev, dtype), names=("calls",))
    best = 1.0 / got["calls"]
    model = predict_exact_attention(
        rates(dev, dtype), batch=1, n_q=FUSED_N, n_k=FUSED_N, d=FUSED_D, dv=FUSED_D
    )
    return min(10.0, max(0.1, best / model))


def predict_exact(
    device: torch.device,
    dtype: torch.dtype,
    *,
    batch: int,
    n_q: int,
    n_k: int,
    d: int,
    dv: int,
    causal: bool,
) -> float:
    """Predicted seconds of the exact path (the fused kernel's constant where it runs);
    memoised."""
    key = ("exact", device, dtype, batch, n_q, n_k, d, dv, causal, _state(device))
    return _memo(
        key,
        lambda: _predict_exact(
            device, dtype, batch=batch, n_q=n_q, n_k=n_k, d=d, dv=dv, causal=causal
        ),
    )


def _predict_exact(
    device: torch.device,
    dtype: torch.dtype,
    *,
    batch: int,
    n_q: int,
    n_k: int,
    d: int,
    dv: int,
    causal: bool,
) -> float:
    cost = predict_exact_attention(
        rates(device, dtype), batch=batch, n_q=n_q, n_k=n_k, d=d, dv=dv, causal=causal
    )
    if not causal:  # the non-causal exact path runs the fused kernel (see exact_forward)
        cost *= _fused_exact_factor(str(device), dtype)
    return cost


def predict_polynomial(
    device: torch.device,
    cfg: Config,
    *,
    batch: int,
    n_q: int,
    n_k: int,
    d: int,
    dv: int,
    causal: bool,
) -> float:
    """Predicted seconds: features on both sides, the skinny products, per-block overhead.

    Uses ``core.cost.rates`` for the products (``predict_polynomial_attention`` with the feature
    term replaced by the feature builder's measured rate) and about 4 us per launched op. Where
    the compiled route runs (float32, CPU, non-causal, kernel live), its own measured rate of
    multiply-adds (features, moments and readout together) and its fixed cost instead.
    """
    if native.route_ok(cfg.dtype, device, causal) and native.kernel() is not None:
        rate = native_threads_rate(batch, causal, cfg.features * (dv + 1) * min(n_q, n_k))
        if rate > 0.0:
            return native_seconds(rate, batch, n_q, n_k, cfg.features, d, dv, causal)
    rt = rates(device, cfg.dtype)
    r = cfg.features
    rate = feature_rate(str(device), cfg.dtype)
    feats = float(batch) * (n_q + n_k) * r / rate
    flops = (
        predict_polynomial_attention(rt, batch=batch, n_q=n_q, n_k=n_k, r=r, dv=dv, causal=causal)
        - float(batch) * (n_q + n_k) * r / rt.elems
    )
    blocks = batch * (-(-n_q // cfg.block) + -(-n_k // cfg.block))
    ops = blocks * (cfg.approx.degree * d + 8) * 4e-6  # one multiply per (degree, variable)
    prep = 2e-4 + float(batch) * (n_q + n_k) * (d + dv) * 16 / rate
    t = feats + flops + ops + prep  # prep: checks, centring, radius, balancing (~16 passes)
    if causal:  # diagonal sub-blocks: pairwise polynomial (inner r) and its product with V
        t += float(batch) * n_q * CAUSAL_BLOCK * 2.0 * (r + dv + 1) / rt.skinny
    return t


def native_threads_rate(batch: int, causal: bool, side: float = float("inf")) -> float:
    """The compiled core's multiply-adds per second with the threads it uses: up to two
    (non-causal: the kernel's helper thread shares a slice's key and query chunks once a side,
    ``side`` multiply-adds, makes two chunks of ``native.SPLIT_MIN``; causal slices run one per
    thread)."""
    threads = max(1, min(2, torch.get_num_threads()))
    if causal:
        threads = min(threads, batch)
    elif side < 2 * native.SPLIT_MIN:
        threads = 1
    return native.native_rate() * threads


def native_seconds(
    rate: float, batch: int, n_q: int, n_k: int, r: int, d: int, dv: int, causal: bool = False
) -> float:
    """The compiled route's prediction: ``(n_q + n_k) r (dv + 1)`` multiply-adds (causal: plus
    the pairwise diagonal sub-blocks, ``n_q CAUSAL_BLOCK r``) at ``rate`` plus its fixed and
    per-element costs."""
    macs = float(batch) * (n_q + n_k) * r * (dv + 1)
    if causal:
        macs += float(batch) * n_q * CAUSAL_BLOCK * (r + dv + 1)
    work = macs / rate
    return work + NATIVE_PREP + float(batch) * (n_q + n_k) * (d + dv) * NATIVE_PREP_ELEM


def polynomial_floor(
    device: torch.device,
    dtypes: tuple[torch.dtype, ...],
    *,
    batch: int,
    n_q: int,
    n_k: int,
    r: int,
    d: int,
    dv: int,
    causal: bool,
) -> float:
    """A lower bound of ``predict_polynomial`` for every configuration with at least ``r``
    features in one of ``dtypes``: the two skinny products at the fastest dtype's rate, or the
    compiled route's prediction where it may run, whichever is smaller; memoised (the
    compiled route's switch and kernel object are part of the key)."""
    key = (
        "floor", device, dtypes, batch, n_q, n_k, r, d, dv, causal, _state(device),
        native.NATIVE, native._KERNEL,
    )  # fmt: skip
    return _memo(
        key,
        lambda: _polynomial_floor(
            device, dtypes, batch=batch, n_q=n_q, n_k=n_k, r=r, d=d, dv=dv, causal=causal
        ),
    )


def _polynomial_floor(
    device: torch.device,
    dtypes: tuple[torch.dtype, ...],
    *,
    batch: int,
    n_q: int,
    n_k: int,
    r: int,
    d: int,
    dv: int,
    causal: bool,
) -> float:
    best = float("inf")
    for dt in dtypes:
        rt = rates(device, dt)
        flops = float(batch) * 2.0 * (n_q + n_k) * r * (dv + 1) * (2.0 if causal else 1.0)
        best = min(best, flops / rt.skinny)
        if native.route_ok(dt, device, causal) and native.kernel() is not None:
            rate = native_threads_rate(batch, causal)  # (two threads: a lower bound)
            if rate > 0.0:
                best = min(best, native_seconds(rate, batch, n_q, n_k, r, d, dv, causal))
    return best
