"""Attention's compiled CPU route (compute/attention/native/): statistics and the non-causal
float32 polynomial core against the PyTorch route, the rounding model, and the fallbacks."""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import compute
from compute.attention import native as at_native
from compute.attention import polynomial as at_poly
from compute.attention.naive import naive_attention
from compute.attention.stats import statistics
from compute.core import native as core_native
from compute.core.polynomials import certified_best
from compute.core.radius import centre, matrix_radius

F64 = torch.float64
needs_kernel = pytest.mark.skipif(
    at_native.kernel() is None, reason="no compiled attention kernel here (no C compiler)"
)


@pytest.fixture(autouse=True)
def _warm() -> None:
    """Build, self-test and calibrate the kernel first (they call ``core`` themselves), so
    that the spies below count only the calls under test."""
    at_native.kernel_status()


def make(
    L: int, n: int, m: int, d: int, dv: int, radius: float, seed: int, offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(L, n, d, generator=gen, dtype=F64)
    k = torch.randn(L, m, d, generator=gen, dtype=F64) + offset
    v = torch.randn(L, m, dv, generator=gen, dtype=F64) - offset
    r0 = matrix_radius(q, centre(k), 1 / math.sqrt(d))
    if r0 > 0:
        q = q * (radius / r0)
    return q.float(), k.float(), v.float()


def both_routes(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    eps: float,
    monkeypatch: pytest.MonkeyPatch,
    causal: bool = False,
) -> tuple[compute.AttentionResult, compute.AttentionResult]:
    """``method="polynomial"`` by the compiled route and by the PyTorch route."""
    calls: list[int] = []
    name = "core_causal" if causal and q.shape[1] <= k.shape[1] else "core"
    real = getattr(at_native, name)

    def spy(*a: object, **kw: object) -> torch.Tensor:
        calls.append(1)
        return real(*a, **kw)  # type: ignore[no-any-return]

    monkeypatch.setattr(at_native, name, spy)
    nat = compute.attention(q, k, v, method="polynomial", eps=eps, causal=causal)
    assert calls, "the compiled core did not run"
    monkeypatch.setattr(at_native, "NATIVE", False)
    ref = compute.attention(q, k, v, method="polynomial", eps=eps, causal=causal)
    monkeypatch.setattr(at_native, "NATIVE", True)
    assert len(calls) == 1
    assert nat.plan.degree == ref.plan.degree and nat.error_bound == ref.error_bound
    return nat, ref


def check_rounding_part(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    res: compute.AttentionResult,
    causal: bool = False,
) -> None:
    """The output is within the bound's rounding part of what the path computes in exact
    arithmetic: P(S) v / P(S) 1 on the keys centred in float32 (their rounding belongs to the
    polynomial part, rounding model step 1), P the polynomial actually used."""
    plan = res.plan
    approx = certified_best(plan.radius, plan.degree)
    assert approx.family == plan.family
    n = q.shape[1]
    if causal and k.shape[1] > n:  # keys beyond the last query are never visible
        k, v = k[:, :n], v[:, :n]
    ideal = naive_attention(
        q.double(), centre(k).double(), v.double(), causal=causal, poly=approx.coeffs
    )
    err = float((res.output.double() - ideal).abs().max())
    rounding = plan.extra["bound_rounding"]
    assert err <= rounding, (err, rounding)
    exact = naive_attention(q, k, v, causal=causal)
    assert res.error_bound is not None
    assert float((res.output.double() - exact).abs().max()) <= res.error_bound


@needs_kernel
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    ("L", "n", "m", "d", "dv", "radius", "eps"),
    [
        (1, 300, 280, 8, 8, 1.0, 1e-3),
        (2, 97, 131, 4, 3, 2.0, 1e-2),
        (1, 1, 1, 1, 1, 0.5, 1e-3),
        (3, 64, 700, 6, 2, 1.5, 1e-3),
        (1, 40, 50, 3, 9, 0.0, 1e-3),  # q = 0: degree 0
        (1, 13, 13, 5, 70, 1.0, 1e-3),  # dv > 64 (causal: two column groups); one sub-block
    ],
)
def test_compiled_core_matches_the_pytorch_route(
    L: int,
    n: int,
    m: int,
    d: int,
    dv: int,
    radius: float,
    eps: float,
    causal: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    q, k, v = make(L, n, m, d, dv, radius, seed=n + m, offset=0.75)
    if radius == 0.0:
        q = torch.zeros_like(q)
    nat, ref = both_routes(q, k, v, eps, monkeypatch, causal)
    check_rounding_part(q, k, v, nat, causal)
    check_rounding_part(q, k, v, ref, causal)


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(
    L=st.integers(1, 2),
    n=st.integers(1, 260),
    m=st.integers(1, 260),
    d=st.integers(1, 7),
    dv=st.integers(1, 10),
    radius=st.floats(0.05, 2.5),
    eps=st.sampled_from([1e-2, 1e-3, 1e-4]),
    offset=st.floats(-50.0, 50.0),
    causal=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_compiled_core_within_the_rounding_part_drawn(
    L: int,
    n: int,
    m: int,
    d: int,
    dv: int,
    radius: float,
    eps: float,
    offset: float,
    causal: bool,
    seed: int,
) -> None:
    q, k, v = make(L, n, m, d, dv, radius, seed, offset)
    try:
        res = compute.attention(q, k, v, method="polynomial", eps=eps, causal=causal)
    except compute.CertificationError:
        return
    if res.plan.compute_dtype != "float32":
        return  # float64 runs the PyTorch route
    check_rounding_part(q, k, v, res, causal)


@needs_kernel
def test_long_inputs_split_across_threads_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys and queries cut into chunks the kernel's two threads share, slice by slice (a long
    problem): the same bound covers it."""
    q, k, v = make(1, 20000, 17000, 8, 3, 1.0, seed=3)
    chunks: list[tuple[str, int]] = []
    for name, at in (("moments_f", -2), ("readout_f", -1)):
        real = getattr(at_native.AttentionPoly, name)

        def spy(self: object, *a: int, real: object = real, name: str = name, at: int = at) -> None:
            chunks.append((name, a[at]))
            real(self, *a)  # type: ignore[operator]

        monkeypatch.setattr(at_native.AttentionPoly, name, spy)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    nat, ref = both_routes(q, k, v, 1e-3, monkeypatch)
    assert [c for c in chunks if c[0] == "moments_f"] == [("moments_f", 16)]
    assert chunks[1][0] == "readout_f" and chunks[1][1] > 1
    rows = torch.arange(0, 20000, 97)
    for res in (nat, ref):
        exact = naive_attention(q[:, rows], k, v)
        assert res.error_bound is not None
        assert float((res.output[:, rows].double() - exact).abs().max()) <= res.error_bound
    rounding = nat.plan.extra["bound_rounding"]
    assert float((nat.output - ref.output).abs().max()) <= 2 * rounding


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(
    L=st.integers(1, 3),
    n=st.integers(1, 300),
    m=st.integers(1, 300),
    d=st.integers(1, 6),
    dv=st.integers(1, 10),
    degree=st.integers(0, 4),
    key_chunk=st.sampled_from([16, 64, 256]),
    feature_chunk=st.sampled_from([4, 32, 128]),
    min_part=st.sampled_from([1, 500, 1 << 20]),
    one_call=st.booleans(),
    offset=st.floats(-20.0, 20.0),
    log_scale=st.floats(-8.0, 8.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_fused_kernel_matches_the_pytorch_preparation_drawn(
    L: int,
    n: int,
    m: int,
    d: int,
    dv: int,
    degree: int,
    key_chunk: int,
    feature_chunk: int,
    min_part: int,
    one_call: bool,
    offset: float,
    log_scale: float,
    seed: int,
) -> None:
    """The compiled route prepares q, k, v while it loads them (centring by the statistics'
    midranges, balancing, value normalisation): drawn shapes, scales of the inputs, degrees,
    chunkings and thread chunks (one call or slice by slice) against the PyTorch route, within
    the rounding part of the bound's budget (the two differ only in float32 summation order),
    and the same chunks twice give the same bits (the helper thread's share is fixed ahead)."""
    gen = torch.Generator().manual_seed(seed)
    sc = 2.0**log_scale
    q = (0.3 * torch.randn(L, n, d, generator=gen) / sc).float()
    k = (0.3 * torch.randn(L, m, d, generator=gen) * sc + offset * sc).float()
    v = (torch.randn(L, m, dv, generator=gen) * sc - offset).float()
    approx = certified_best(1.0, degree)
    kw = {"dtype": torch.float32, "key_chunk": key_chunk, "feature_chunk": feature_chunk}
    mid = centre_mid(k)

    def nat(prep: at_poly.Prepared, *a: object, causal: bool = False, **kw2: object) -> object:
        return at_native.core(
            at_native.kernel(),
            prep,
            *a,
            one_call=(1 << 40) if one_call else 0,
            **kw2,  # type: ignore[arg-type]
        )

    got = at_poly.polynomial_forward(
        q, k, v, approx, 0.5, native=nat, native_threads=2, native_min_part=min_part,  # type: ignore[arg-type]
        key_mid=mid, **kw,  # type: ignore[arg-type]
    )  # fmt: skip
    again = at_poly.polynomial_forward(
        q, k, v, approx, 0.5, native=nat, native_threads=2, native_min_part=min_part,  # type: ignore[arg-type]
        key_mid=mid, **kw,  # type: ignore[arg-type]
    )  # fmt: skip
    assert torch.equal(got, again)
    ref = at_poly.polynomial_forward(q, k, v, approx, 0.5, key_mid=mid, **kw)  # type: ignore[arg-type]
    ideal = naive_attention(
        q.double(), (k - mid.unsqueeze(1)).double(), v.double(), scale=0.5, poly=approx.coeffs
    )
    # both routes' distance to the same polynomial in exact arithmetic: float32 rounding only
    # (the value range sets the scale of float32 rounding; max|v| that of the output's)
    spread = float((v.amax(dim=1) - v.amin(dim=1)).max()) + 1e-7 * float(v.abs().max())
    for out in (got, ref):
        assert torch.isfinite(out).all()
    dn = float((got.double() - ideal).abs().max())
    dr = float((ref.double() - ideal).abs().max())
    assert dn <= 4 * dr + 1e-5 * spread, (dn, dr, spread)


def centre_mid(k: torch.Tensor) -> torch.Tensor:
    """The key columns' midranges ``[L, d]`` (as ``statistics`` computes them)."""
    from compute.core.radius import column_midrange

    return column_midrange(k).squeeze(1)


@needs_kernel
@settings(max_examples=30, deadline=None)
@given(
    L=st.integers(1, 3),
    n=st.integers(1, 70),
    m=st.integers(1, 70),
    d=st.integers(1, 9),
    dv=st.integers(1, 5),
    log_size=st.floats(-30.0, 30.0),
    offset=st.floats(-1e3, 1e3),
    scale=st.floats(-4.0, 4.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_compiled_statistics_equal_pytorch_statistics(
    L: int,
    n: int,
    m: int,
    d: int,
    dv: int,
    log_size: float,
    offset: float,
    scale: float,
    seed: int,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    size = 2.0**log_size
    q = (torch.randn(L, n, d, generator=gen, dtype=F64) * size).float()
    k = (torch.randn(L, m, d, generator=gen, dtype=F64) * size + offset).float()
    v = (torch.randn(L, m, dv, generator=gen, dtype=F64) * size - offset).float()
    if seed % 3 == 0:
        q[:, : n // 2] = 0.0
        k[:, m // 2 :] = k[:, :1]
    a = statistics(q, k, v, scale)
    b = statistics(q, k, v, scale, at_native.reductions)
    assert torch.equal(a.kc, b.kc) and torch.equal(b.kc, centre(k))
    assert a.value_range == b.value_range and a.value_absmax == b.value_absmax
    assert (a.q_peak, a.k_peak) == (b.q_peak, b.k_peak)
    # float64 sums of exact squares and products in another order: within the inflation
    assert abs(a.radius - b.radius) <= 1e-13 * a.radius
    assert b.radius >= matrix_radius(q.double(), centre(k).double(), scale) * (1 - 1e-13)
    for x, y in zip(
        (a.extremes.q_absmax, a.extremes.k_absmax, a.extremes.v_hi, a.extremes.v_lo),
        (b.extremes.q_absmax, b.extremes.k_absmax, b.extremes.v_hi, b.extremes.v_lo),
        strict=True,
    ):
        assert x is not None and y is not None and torch.equal(x, y)
    for x, y in zip(a.extremes.balance or (), b.extremes.balance or (), strict=True):
        assert np.array_equal(x, y)
    assert a.extremes.value_exp is not None and b.extremes.value_exp is not None
    assert np.array_equal(a.extremes.value_exp, b.extremes.value_exp)


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 700),
    d=st.sampled_from([1, 2, 3, 5, 7, 8, 9, 12, 16, 17, 24, 32, 64, 80]),
    bad=st.sampled_from([None, math.nan, math.inf, -math.inf]),
    where=st.sampled_from(["q", "k", "v"]),
    frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_compiled_column_extremes_over_periods_and_tail(
    n: int, d: int, bad: float | None, where: str, frac: float, seed: int
) -> None:
    """The compiled statistics read the rows as a flat stream in periods of lcm(d, 16) floats
    plus a row-by-row tail: the extremes (and so the midranges, max|q|, max|kc|, the value
    range) equal PyTorch's bit for bit, and a NaN or infinity anywhere (a period or the tail)
    is caught, for every d."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, n, d, generator=gen) * 3.0 + 1.0 for _ in range(3))
    row = min(n - 1, int(frac * n))
    if bad is not None:  # a NaN or infinity at a random row (inside a period or in the tail)
        {"q": q, "k": k, "v": v}[where][1, row, (row * 7) % d] = bad
        with pytest.raises(compute.InvalidInputError, match=where):
            statistics(q, k, v, 0.3, at_native.reductions)
        return
    # the extremes at a random row, then at each of the last 17 rows (the tail, whatever the
    # period) and the first
    for at in [row, 0, *range(max(0, n - 17), n)]:
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        q2[0, at] = -60.0
        k2[1, at] = 50.0
        v2[0, at] = -70.0
        a = statistics(q2, k2, v2, 0.3)
        b = statistics(q2, k2, v2, 0.3, at_native.reductions)
        assert torch.equal(a.mid, b.mid) and torch.equal(a.kc, b.kc)
        assert a.value_range == b.value_range and a.value_absmax == b.value_absmax
        assert (a.q_peak, a.k_peak) == (b.q_peak, b.k_peak)
        assert abs(a.radius - b.radius) <= 1e-13 * a.radius
        for x, y in zip(a.extremes.balance or (), b.extremes.balance or (), strict=True):
            assert np.array_equal(x, y)


@needs_kernel
@pytest.mark.parametrize("arg", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_compiled_statistics_name_the_non_finite_input(arg: str, bad: float) -> None:
    q, k, v = make(2, 9, 11, 4, 3, 1.0, seed=1)
    t = {"q": q, "k": k, "v": v}[arg]
    t[1, 3, 0] = bad
    with pytest.raises(compute.InvalidInputError, match=arg):
        compute.attention(q, k, v)


def test_float64_takes_the_pytorch_route(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **kw: object) -> torch.Tensor:
        raise AssertionError("compiled core used")

    monkeypatch.setattr(at_native, "core", boom)
    monkeypatch.setattr(at_native, "core_causal", boom)
    q, k, v = make(1, 200, 200, 4, 3, 1.0, seed=2)
    args = (q.double(), k.double(), v.double())
    for causal in (False, True):
        res = compute.attention(*args, method="polynomial", eps=1e-3, causal=causal)
        assert res.error_bound is not None
        exact = naive_attention(*args, causal=causal)
        assert float((res.output.double() - exact).abs().max()) <= res.error_bound


def test_compiled_kernel_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMPUTE_NATIVE", "0")
    assert core_native.build(at_native.SOURCE) == "disabled by COMPUTE_NATIVE=0"


def test_failed_build_or_self_test_falls_back(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A compiler that fails leaves no library and says why; a kernel that fails its self-test
    is never used; either way the call runs the PyTorch route with the same bound."""
    monkeypatch.setenv("COMPUTE_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # exits 1
    got = core_native.build(at_native.SOURCE)
    assert isinstance(got, str) and "failed" in got
    assert not list(tmp_path.glob("*.so"))
    q, k, v = make(1, 300, 300, 4, 3, 1.0, seed=4)
    ref = naive_attention(q, k, v)
    # no compiler: a fresh kernel object whose build fails
    monkeypatch.setattr(at_native, "_KERNEL", core_native.NativeKernel(at_native.SOURCE, object))
    assert at_native.kernel() is None and "failed" in at_native.status()
    res = compute.attention(q, k, v, method="polynomial")
    assert res.error_bound is not None
    assert float((res.output.double() - ref).abs().max()) <= res.error_bound
    # a kernel that builds but computes something else: its self-test fails
    monkeypatch.delenv("CC")
    monkeypatch.delenv("COMPUTE_NATIVE_CACHE")
    fresh = core_native.NativeKernel(at_native.SOURCE, at_native.AttentionPoly)
    if fresh.get() is None:
        pytest.skip("no C compiler here")
    real = at_native.AttentionPoly.poly

    def wrong(self: at_native.AttentionPoly, *args: int) -> None:
        real(self, *args)
        ctypes.c_float.from_address(args[-3]).value += 1.0  # scribble on the first output

    monkeypatch.setattr(at_native.AttentionPoly, "poly", wrong)
    monkeypatch.setattr(at_native, "_KERNEL", fresh)
    assert at_native.kernel() is None
    assert "self-test" in at_native.kernel_status()
    res = compute.attention(q, k, v, method="polynomial")
    assert res.error_bound is not None
    assert float((res.output.double() - ref).abs().max()) <= res.error_bound


def test_pytorch_route_unchanged_by_the_native_argument() -> None:
    """``polynomial_forward`` without ``native`` is the PyTorch route (used by the self-test)."""
    q, k, v = make(1, 50, 60, 3, 2, 1.0, seed=5)
    approx = certified_best(1.0, 3)
    a = at_poly.polynomial_forward(q, k, v, approx, 0.5)
    b = at_poly.polynomial_forward(q, k, v, approx, 0.5, native=None)
    assert torch.equal(a, b)


def test_kernel_builds_and_passes_its_self_test_where_a_compiler_exists() -> None:
    """Where cc/gcc exists the compiled route must be live (else every test above would skip
    and a broken kernel would go unnoticed)."""
    import os
    import shutil

    if os.environ.get("COMPUTE_NATIVE", "1") == "0" or not (
        os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    ):
        pytest.skip("no C compiler here, or COMPUTE_NATIVE=0")
    assert at_native.kernel() is not None, at_native.kernel_status()


# ---- what planning costs: the t prefilter and the fast exit change no decision ---------------


@settings(max_examples=60, deadline=None)
@given(
    R=st.floats(0.01, 12.0),
    g=st.integers(0, 12),
    d=st.integers(1, 16),
    absmax=st.floats(1e-3, 1e3),
    range_frac=st.floats(1e-3, 2.0),
    eps=st.floats(1e-7, 0.5),
)
def test_degrees_the_prefilter_skips_certify_nowhere(
    R: float, g: int, d: int, absmax: float, range_frac: float, eps: float
) -> None:
    """A degree whose own ``t range`` misses the target is certified by no dtype or chunking:
    the rounding only widens [dmin, dmax] (the prefilter in ``plan.select``)."""
    from compute.attention.bound import certified_bound

    approx = certified_best(R, g)
    value_range = range_frac * absmax
    target = eps * absmax
    if approx.t * value_range <= target * (1.0 + 1e-9):
        return
    for dtype in (torch.float32, torch.float64):
        for block, features in ((16, 8), (512, 256), (4096, 100000)):
            b = certified_bound(
                approx,
                features=features,
                block=block,
                compute_dtype=dtype,
                out_dtype=torch.float32,
                value_range=value_range,
                value_absmax=absmax,
                float64_terms=40,
                dimension=d,
            )
            assert not b.total <= target


@pytest.mark.parametrize("causal", [False, True])
def test_fast_exit_never_changes_the_method(monkeypatch: pytest.MonkeyPatch, causal: bool) -> None:
    """``auto``'s fast exit (no certified polynomial can be predicted faster) picks exact only
    where the full search picks exact too."""
    from compute.attention import plan as at_plan

    cases = [
        (n, d, R, eps)
        for n in (16, 256, 1024, 4096, 65536)
        for d in (4, 8, 64)
        for R in (0.5, 1.0, 3.0, 6.0)
        for eps in (1e-2, 1e-3)
    ]
    fast = [
        compute.plan_attention(n=n, d=d, radius=R, eps=eps, causal=causal) for n, d, R, eps in cases
    ]
    monkeypatch.setattr(at_plan, "polynomial_floor", lambda *a, **kw: 0.0)  # never exits early
    full = [
        compute.plan_attention(n=n, d=d, radius=R, eps=eps, causal=causal) for n, d, R, eps in cases
    ]
    exits = 0
    for f, s in zip(fast, full, strict=True):
        assert f.method == s.method, (f.reason, s.reason)
        if "predicted at least" in f.reason:
            exits += 1
            assert s.method == "exact"
            assert s.degree is None or f.degree is None or f.degree <= s.degree
            assert f.cost_polynomial is not None and f.cost_exact == s.cost_exact
            if s.cost_polynomial is not None:
                assert f.cost_polynomial <= s.cost_polynomial
    assert exits > 0  # the fast exit is exercised


@needs_kernel
def test_the_kernels_helper_thread_survives_fork(monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker process forks after the kernel's helper thread started (the parent's helper does
    not exist in the child): the child and a grandchild start their own, never wait for the
    parent's, and give the parent's bits (chunks fixed in advance, summed in chunk order)."""
    import os
    import time

    q, k, v = make(1, 4096, 4096, 8, 3, 1.0, seed=5)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the helper thread takes part
    parent = compute.attention(q, k, v, method="polynomial", eps=1e-3)  # starts the helper

    def run_child(depth: int) -> int:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                out = compute.attention(q, k, v, method="polynomial", eps=1e-3).output
                code = 0 if torch.equal(out, parent.output) else 2
                if code == 0 and depth > 1:
                    code = run_child(depth - 1)
            finally:
                os._exit(code)
        deadline = time.monotonic() + 60  # a child stuck on the parent's helper: fail, not hang
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.01)
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        return -9

    assert run_child(2) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [None, math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("shape", [(1, 7, 3), (2, 4096, 16), (1, 1, 1)])
def test_output_finiteness_check_equals_torch(
    dtype: torch.dtype, bad: float | None, shape: tuple[int, int, int]
) -> None:
    """``attention``'s check of the polynomial output (numpy on the CPU, in the calling
    thread) says finite exactly when ``torch.isfinite(x).all()`` does: any position, strided
    views, tensors that require grad."""
    from compute.attention.api import _all_finite

    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=gen, dtype=dtype) * 1e3
    positions = [(0, 0, 0), (shape[0] - 1, shape[1] - 1, shape[2] - 1), (0, shape[1] // 2, 0)]
    for pos in positions:
        y = x.clone()
        if bad is not None:
            y[pos] = bad
        for z in (y, y.transpose(1, 2), y.clone().requires_grad_(True)):
            assert _all_finite(z) == bool(torch.isfinite(z).all())
        assert _all_finite(y) == (bad is None)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_polynomial_output_raises_or_runs_exact(
    monkeypatch: pytest.MonkeyPatch, bad: float
) -> None:
    """An intermediate that overflowed (a non-finite polynomial output): method="polynomial"
    raises CertificationError, method="auto" runs the exact path and says so."""
    import importlib

    api = importlib.import_module("compute.attention.api")
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 4096, 8, generator=gen) for _ in range(3))
    q = q * (0.5 / matrix_radius(q[0], centre(k[0]), 8**-0.5))  # radius 0.5
    assert compute.attention(q, k, v, eps=1e-2).plan.method == "polynomial"  # (not vacuous)
    real = api.run_polynomial

    def spoiled(*a: object, **kw: object) -> torch.Tensor:
        out = real(*a, **kw)  # type: ignore[arg-type]
        out[0, 1234, 3] = bad
        return out

    monkeypatch.setattr(api, "run_polynomial", spoiled)
    with pytest.raises(compute.CertificationError, match="overflowed"):
        compute.attention(q, k, v, method="polynomial", eps=1e-2)
    res = compute.attention(q, k, v, eps=1e-2)
    assert res.plan.method == "exact" and "overflowed" in res.plan.reason
    exact = naive_attention(q.double(), k.double(), v.double())
    assert res.error_bound is not None
    assert float((res.output.double() - exact).abs().max()) <= res.error_bound
