"""What ``method="auto"`` caches to plan cheaply (docs/attention.md, "What auto costs"), and the
pieces of the exact path's bound computed from the statistics alone.

A cache keyed on too little returns another problem's number: every test here changes one thing
a memoised prediction reads (an argument, the thread count, the calibration, the compiled route)
and checks the value is recomputed and equals a fresh computation.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import compute
from compute.attention import cost
from compute.attention import exact as exact_module
from compute.attention import native as at_native
from compute.attention.stats import statistics
from compute.core import calibration

CPU = torch.device("cpu")
SHAPE: dict[str, Any] = {"batch": 1, "n_q": 16, "n_k": 16, "d": 8, "dv": 8, "causal": False}


@pytest.fixture
def memo(monkeypatch: pytest.MonkeyPatch) -> dict[Any, float]:
    """An empty memo for this test (the process's own is left as it was)."""
    fresh: dict[Any, float] = {}
    monkeypatch.setattr(cost, "_MEMO", fresh)
    return fresh


class Counting:
    """Stands in for an unmemoised prediction: counts its calls, returns a fresh number each."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> float:
        self.calls += 1
        return float(self.calls)


def test_memo_key_names_every_argument_and_state(
    memo: dict[Any, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each argument, the thread count, the calibration epoch and (for the floor) the compiled
    route's switch and kernel object: changing any one of them is a miss, repeating is a hit."""
    exact, floor = Counting(), Counting()
    monkeypatch.setattr(cost, "_predict_exact", exact)
    monkeypatch.setattr(cost, "_polynomial_floor", floor)
    dtypes = (torch.float32, torch.float64)

    def both(**change: Any) -> tuple[float, float]:
        kw = {**SHAPE, **change}
        dtype = kw.pop("dtype", torch.float32)
        r = kw.pop("r", 495)
        return (
            cost.predict_exact(CPU, dtype, **kw),
            cost.polynomial_floor(CPU, dtypes, r=r, **kw),
        )

    first = both()
    assert (exact.calls, floor.calls) == (1, 1)
    assert both() == first and (exact.calls, floor.calls) == (1, 1)  # a hit: the same numbers
    changes: list[dict[str, Any]] = [
        {"batch": 2},
        {"n_q": 17},
        {"n_k": 17},
        {"d": 9},
        {"dv": 9},
        {"causal": True},
    ]
    seen = {first}
    for change in changes:
        before = (exact.calls, floor.calls)
        got = both(**change)
        assert (exact.calls, floor.calls) == (before[0] + 1, before[1] + 1), change
        assert got not in seen
        seen.add(got)
    # the dtype is the exact prediction's, the dtypes and r the floor's
    calls = exact.calls
    cost.predict_exact(CPU, torch.float64, **SHAPE)
    assert exact.calls == calls + 1
    calls = floor.calls
    cost.polynomial_floor(CPU, (torch.float64,), r=495, **SHAPE)
    cost.polynomial_floor(CPU, dtypes, r=496, **SHAPE)
    assert floor.calls == calls + 2
    # the thread count (part of every calibration key)
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads + 3)
    before = (exact.calls, floor.calls)
    both()
    assert (exact.calls, floor.calls) == (before[0] + 1, before[1] + 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    before = (exact.calls, floor.calls)
    both()
    assert (exact.calls, floor.calls) == before  # back to the first key: still there
    # the calibration: forgetting the constants (or recalibrating) changes the epoch
    epoch = calibration.epoch()
    calibration.clear_memory()
    assert calibration.epoch() != epoch
    both()
    assert (exact.calls, floor.calls) == (before[0] + 1, before[1] + 1)
    # the compiled route: its switch, and the kernel object a test may replace
    before = (exact.calls, floor.calls)
    monkeypatch.setattr(at_native, "NATIVE", False)
    both()
    assert (exact.calls, floor.calls) == (before[0], before[1] + 1)
    monkeypatch.setattr(at_native, "_KERNEL", object())
    both()
    assert floor.calls == before[1] + 2


def test_memo_is_bounded(memo: dict[Any, float], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cost, "_predict_exact", Counting())
    monkeypatch.setattr(cost, "MEMO_SIZE", 8)
    for n in range(1, 30):
        cost.predict_exact(CPU, torch.float32, **{**SHAPE, "n_q": n})
        assert len(memo) <= 8


@pytest.mark.parametrize("native", [True, False], ids=["native", "pytorch"])
def test_memoised_predictions_equal_fresh_ones(
    memo: dict[Any, float], monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    """The numbers themselves: a memoised prediction is the unmemoised one, for every key in a
    grid visited twice (the second time from the memo), with the compiled route on and off."""
    monkeypatch.setattr(at_native, "NATIVE", native)
    grid = [
        (dtype, causal, batch, n, d)
        for dtype in (torch.float32, torch.float64)
        for causal in (False, True)
        for batch in (1, 3)
        for n in (16, 1024)
        for d in (8, 64)
    ]
    for _ in range(2):
        for dtype, causal, batch, n, d in grid:
            kw = {"batch": batch, "n_q": n, "n_k": n, "d": d, "dv": d, "causal": causal}
            assert cost.predict_exact(CPU, dtype, **kw) == cost._predict_exact(CPU, dtype, **kw)
            dts = (dtype, torch.float64) if dtype == torch.float32 else (torch.float64,)
            got = cost.polynomial_floor(CPU, dts, r=495, **kw)
            assert got == cost._polynomial_floor(CPU, dts, r=495, **kw)
    assert len(memo) == 2 * len(grid)


@pytest.fixture
def cal_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh calibration directory for this test; the process forgets what it held."""
    d = tmp_path / "cal"
    monkeypatch.setenv("COMPUTE_CALIBRATION_DIR", str(d))
    monkeypatch.delenv("COMPUTE_RECALIBRATE", raising=False)
    monkeypatch.setattr(calibration, "PAUSE", 0.0)
    monkeypatch.setattr(calibration, "MAX_ROUNDS", calibration.MIN_ROUNDS)
    calibration.clear_memory()
    yield d
    calibration.clear_memory()


def test_predictions_follow_new_constants(memo: dict[Any, float], cal_dir: Path) -> None:
    """Constants changed on disk and read again (``clear_memory``) or measured again
    (``recalibrate``): the memoised prediction is the fresh one, not the old number."""
    kw = {**SHAPE, "causal": True}  # (the non-causal one divides the rates out: see cost.py)
    old = cost.predict_exact(CPU, torch.float32, **kw)
    (rates_file,) = [f for f in cal_dir.glob("rates-*.json")]
    doc = json.loads(rates_file.read_text())
    doc["values"] = {name: 2.0 * x for name, x in doc["values"].items()}  # twice as fast
    rates_file.write_text(json.dumps(doc))
    assert cost.predict_exact(CPU, torch.float32, **kw) == old  # still the constants held
    calibration.clear_memory()
    new = cost.predict_exact(CPU, torch.float32, **kw)
    assert new == cost._predict_exact(CPU, torch.float32, **kw)
    assert new == pytest.approx(old / 2.0, rel=1e-12)
    calibration.recalibrate()  # measured again: whatever the new numbers, the memo has them
    assert cost.predict_exact(CPU, torch.float32, **kw) == cost._predict_exact(
        CPU, torch.float32, **kw
    )


def _inputs(dtype: torch.dtype, n: int = 16, d: int = 8, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 1, n, d, generator=gen).to(dtype) for _ in range(3))


def test_auto_plans_from_the_memo_equal_fresh_plans(memo: dict[Any, float]) -> None:
    """Whole plans: a call whose predictions come from the memo (filled by calls of another
    dtype, eps and length first) plans exactly as a call with an empty memo."""
    cases = [
        (dtype, eps, n)
        for dtype in (torch.float32, torch.float64, torch.bfloat16)
        for eps in (1e-3, 1e-2)
        for n in (16, 64)
    ]
    warm = {c: compute.attention(*_inputs(c[0], c[2]), eps=c[1]).plan for c in cases}
    warm_again = {c: compute.attention(*_inputs(c[0], c[2]), eps=c[1]).plan for c in cases}
    for c in cases:
        memo.clear()
        fresh = compute.attention(*_inputs(c[0], c[2]), eps=c[1]).plan
        assert warm[c] == fresh == warm_again[c], c
    # and they differ where they should: the dtype and eps are in every plan
    assert warm[(torch.float32, 1e-3, 16)] != warm[(torch.float64, 1e-3, 16)]
    assert warm[(torch.float32, 1e-3, 16)].reason != warm[(torch.float32, 1e-2, 16)].reason


# ------------------------------------------------------------------ the exact path's score bound


def _true_raw_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> float:
    """``max_ij |scale| sum_l |q_il| |k_jl|`` over every slice, in float64 (the reference)."""
    qa, ka = q.double().abs(), k.double().abs()
    return float((qa @ ka.transpose(-1, -2)).amax()) * abs(scale)


@pytest.mark.parametrize("native", [True, False], ids=["native", "pytorch"])
@pytest.mark.parametrize(
    ("L", "n", "d"),
    [(1, 16, 8), (2, 40, 64), (32, 24, 16)],  # L d = 8, 128: Python floats; 512: NumPy
    ids=["small", "python-128", "numpy-512"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_raw_score_bound_certifies_the_raw_scores(
    monkeypatch: pytest.MonkeyPatch, native: bool, L: int, n: int, d: int, dtype: torch.dtype
) -> None:
    """``raw_score_bound`` bounds every raw score ``|scale| sum_l |q_il| |k_jl|`` (keys far
    from 0 with columns of both signs, so that the shift term matters), in both of its
    summations (Python floats for small ``L d``, NumPy above ``SMALL_SUM``), which agree."""
    monkeypatch.setattr(at_native, "NATIVE", native)
    gen = torch.Generator().manual_seed(L * 1000 + n + d)
    q = torch.randn(L, n, d, generator=gen, dtype=torch.float64)
    shift = torch.where(torch.arange(d) % 2 == 0, 3.0, -5.0).double()
    k = torch.randn(L, n, d, generator=gen, dtype=torch.float64) * 0.1 + shift
    q, k = q.to(dtype), k.to(dtype)
    v = torch.randn(L, n, 4, generator=gen).to(dtype)
    scale = -0.37  # (the sign is irrelevant: |scale|)
    reductions = at_native.reductions if native else None
    stats = statistics(q, k, v, scale, reductions)
    got = exact_module.raw_score_bound(stats, scale, dtype)
    assert got is not None
    true = _true_raw_scores(q, k, scale)
    assert true <= got
    # the centred radius alone is far below the raw scores here: the shift term is needed
    assert stats.radius < 0.5 * true
    assert got <= 5.0 * true  # and not loose (per-column maxima of |q|: a small overestimate)
    # the other summation gives the same bound up to the reordering of d float64 sums
    monkeypatch.setattr(
        exact_module, "SMALL_SUM", 0 if L * d <= exact_module.SMALL_SUM else 1 << 30
    )
    other = exact_module.raw_score_bound(stats, scale, dtype)
    assert other is not None
    assert other == pytest.approx(got, rel=4 * d * 2.0**-52)


@pytest.mark.parametrize("small_sum", [256, 0], ids=["python", "numpy"])
def test_raw_score_bound_none_when_it_overflows(
    monkeypatch: pytest.MonkeyPatch, small_sum: int
) -> None:
    """Scores beyond float64 give no bound (the wide route then runs), in either summation."""
    monkeypatch.setattr(exact_module, "SMALL_SUM", small_sum)
    big = 1e300
    q = torch.full((1, 4, 2), big, dtype=torch.float64)
    k = torch.full((1, 4, 2), big, dtype=torch.float64)
    k[0, 0] = -big  # the midrange 0, centred keys +-big: R overflows
    v = torch.ones(1, 4, 1, dtype=torch.float64)
    stats = statistics(q, k, v, 1.0)
    assert not math.isfinite(stats.radius)
    assert exact_module.raw_score_bound(stats, 1.0, torch.float64) is None
    k2 = torch.full((1, 4, 2), big, dtype=torch.float64)  # constant keys: R ~ 0, shift overflows
    stats = statistics(q, k2, v, 1.0)
    assert stats.radius < 1e-300
    assert exact_module.raw_score_bound(stats, 1.0, torch.float64) is None


@pytest.mark.parametrize(
    "scale_q",
    [1.0, 1e36],  # the plain kernel; scores beyond float32: the wide route (in float64)
    ids=["plain", "wide"],
)
def test_exact_plan_reports_the_bound_the_run_has(scale_q: float) -> None:
    """The exact route and its bound are decided before planning (``exact_route``): the plan's
    ``predicted_bound`` is the result's ``error_bound`` and ``exact_route``'s, auto and exact,
    plain or wide; the output within it."""
    q, k, v = _inputs(torch.float32, n=64)
    q = q * scale_q
    q3, k3, v3 = (t.reshape(1, 64, 8) for t in (q, k, v))
    st = statistics(q3, k3, v3, 8**-0.5, at_native.reductions)
    route = exact_module.exact_route(
        q3,
        k3,
        st,
        8**-0.5,
        causal=False,
        value_range=st.value_range + 4 * 2.0**-24 * st.value_absmax + 2.0**-148,  # as attention
        value_absmax=st.value_absmax,
        out_dtype=torch.float32,
    )
    assert route.in_range and (route.wide is None) == (scale_q == 1.0)
    ref = compute.attention(q.double(), k.double(), v.double(), method="exact").output
    for method in ("auto", "exact"):
        res = compute.attention(q, k, v, method=method)
        assert res.plan.method == "exact"
        assert res.error_bound is not None and math.isfinite(res.error_bound)
        assert res.plan.predicted_bound == res.error_bound == route.bound
        assert float((res.output.double() - ref).abs().max()) <= res.error_bound


def test_out_of_range_still_raises_after_planning() -> None:
    """Scores beyond float64 even after centring: the same ``OutOfRangeError`` as before."""
    q = torch.full((1, 4, 2), 1e300, dtype=torch.float64)
    k = torch.full((1, 4, 2), 1e300, dtype=torch.float64)
    k[0, 0] = -1e300
    v = torch.ones(1, 4, 1, dtype=torch.float64)
    for method in ("auto", "exact"):
        with pytest.raises(compute.OutOfRangeError, match="beyond the range of float64"):
            compute.attention(q, k, v, method=method)


def test_extremes_formed_on_first_use_equal_the_pytorch_route() -> None:
    """The compiled route's extremes are formed lazily from its host numbers: equal to the
    PyTorch route's, and the same object on every access."""
    q, k, v = (t.reshape(1, 64, 8) for t in _inputs(torch.float32, n=64, seed=3))
    a = statistics(q, k, v, 0.5, at_native.reductions)
    b = statistics(q, k, v, 0.5)
    assert a.extremes is a.extremes
    for x, y in (
        (a.extremes.q_absmax, b.extremes.q_absmax),
        (a.extremes.k_absmax, b.extremes.k_absmax),
        (a.extremes.v_hi, b.extremes.v_hi),
        (a.extremes.v_lo, b.extremes.v_lo),
    ):
        assert x is not None and y is not None and torch.equal(x, y)
    assert np.array_equal(a.q_absmax_host, b.q_absmax_host)


def test_fast_shape_check_agrees_with_the_shape_rule() -> None:
    """``_usual_shapes`` (a few comparisons) passes exactly the shapes ``check_shapes`` passes,
    so every refused shape still gets the rule's own error."""
    api = sys.modules["compute.attention.api"]
    dims = [(4, 3), (5, 3), (4, 2), (2, 4, 3), (3, 4, 3), (2, 5, 3), (2, 4, 2), (1, 2, 4, 3)]
    checked = 0
    for qs, ks, vs in itertools.product(dims, repeat=3):
        q, k, v = torch.zeros(qs), torch.zeros(ks), torch.zeros(vs)
        try:
            api.check_shapes(q, k, v)
            ok = True
        except compute.InvalidInputError:
            ok = False
        assert api._usual_shapes(q, k, v) == ok, (qs, ks, vs)
        checked += ok
    assert 0 < checked < len(dims) ** 3
