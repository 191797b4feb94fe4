"""Tensor (triple-wise) attention: exact and polynomial paths against a float64 brute force."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import compute
from compute.core import native as core_native
from compute.core.cost import Rates
from compute.core.monomials import features, monomial_table, weight_max, weights
from compute.core.polynomials import (
    Approximation,
    certified_best,
    grid_radius,
    minimax,
    relative_error_range,
    taylor_coeffs,
)
from compute.core.radius import tensor_radius
from compute.core.scaling import times_pow2
from compute.tensor_attention import balance as ta_balance
from compute.tensor_attention import bound as ta_bound
from compute.tensor_attention import exact as ta_exact
from compute.tensor_attention import kernel_status
from compute.tensor_attention import native as ta_native
from compute.tensor_attention import plan as ta_plan
from compute.tensor_attention import polynomial as ta_poly
from compute.tensor_attention import stats as ta_stats
from compute.tensor_attention.naive import naive_tensor_attention

F64 = torch.float64
HAVE_CC = bool(shutil.which("cc") or shutil.which("gcc"))


@pytest.fixture(params=["native", "pytorch"])
def route(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both implementations of the float32 CPU path: the compiled kernel and PyTorch ops."""
    if request.param == "native" and ta_native.kernel() is None:
        pytest.skip(f"compiled kernel unavailable: {ta_native.status()}")
    monkeypatch.setattr(ta_native, "NATIVE", request.param == "native")
    return str(request.param)


def brute_force(
    q: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
    v1: torch.Tensor,
    v2: torch.Tensor,
    scale: float,
    poly: np.ndarray | None = None,
) -> torch.Tensor:
    """The float64 reference (``compute.tensor_attention.naive``), with ``poly``: ``exp``
    replaced by that polynomial, the output the polynomial path computes in exact arithmetic."""
    return naive_tensor_attention(q, k1, k2, v1, v2, scale, poly=poly)


def make_inputs(
    lead: tuple[int, ...],
    n: int,
    n1: int,
    n2: int,
    d: int,
    dv: int,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    radius: float | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, ...]:
    """Random inputs; with ``radius``, q is rescaled so that R3 equals it."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=F64)

    q, k1, k2 = rnd(*lead, n, d), rnd(*lead, n1, d), rnd(*lead, n2, d)
    v1, v2 = rnd(*lead, n1, dv), rnd(*lead, n2, dv)
    if radius is not None:
        sc = 1.0 / math.sqrt(d) if scale is None else scale
        r3 = tensor_radius(q, k1, k2, sc)
        q = q * (radius / r3 if r3 > 0 else 0.0)
    return tuple(x.to(dtype) for x in (q, k1, k2, v1, v2))


def case_id(lead: tuple[int, ...], n: int, n1: int, n2: int, d: int, dv: int, dt: str) -> str:
    b = "x".join(map(str, lead)) or "1"
    return f"B{b}-N{n}-N1_{n1}-N2_{n2}-D{d}-DV{dv}-{dt}"


# ------------------------------------------------------ worked example (docs/theory.md §3)

Q = [[0.5, -0.2], [0.1, 0.3]]
K1 = [[0.4, 0.1], [-0.3, 0.2]]
K2 = [[0.2, -0.5], [0.6, 0.1]]
V1 = [[1.0, 2.0], [0.0, 1.0]]
V2 = [[1.0, -1.0], [2.0, 1.0]]


def _example() -> tuple[torch.Tensor, ...]:
    return tuple(torch.tensor(x, dtype=F64) for x in (Q, K1, K2, V1, V2))


def _taylor2(radius: float) -> Approximation:
    coeffs = taylor_coeffs(2)
    dmin, dmax = relative_error_range(coeffs, radius)
    return Approximation("taylor", 2, radius, coeffs, dmin, dmax)


def test_worked_example_factorisation() -> None:
    """P(Q (K1 ⊘ K2)^T) from the three feature maps, weights on the query side."""
    q, k1, k2, _, _ = _example()
    approx = _taylor2(1.0)
    tables = monomial_table(2, 2)
    w = torch.from_numpy(weights(approx.coeffs, tables, 1.0))  # [r]
    u1 = w[:, None] * features(q.T.contiguous(), tables)  # [r, n]
    u2 = features(k1.T.contiguous(), tables)  # [r, n1]
    u3 = features(k2.T.contiguous(), tables)  # [r, n2]
    p = torch.einsum("ai,aj,ak->ijk", u1, u2, u3).reshape(2, 4)  # column (i1, i2) = i1*n2 + i2
    expected = torch.tensor(
        [[1.05125, 1.12496, 0.99005, 0.91042], [0.99302, 1.02736, 0.96465, 0.98807]], dtype=F64
    )
    assert (p - expected).abs().max() <= 1e-5


def test_worked_example_outputs() -> None:
    q, k1, k2, v1, v2 = _example()
    approx_out = ta_poly.polynomial_forward(
        q[None], k1[None], k2[None], v1[None], v2[None], _taylor2(1.0), 1.0, chunk=4096
    )[0]
    assert (
        approx_out - torch.tensor([[0.80977, 0.01663], [0.76710, 0.02318]], dtype=F64)
    ).abs().max() <= 1e-5
    exact = torch.tensor([[0.80988, 0.01672], [0.76710, 0.02319]], dtype=F64)
    res = compute.tensor_attention(q, k1, k2, v1, v2, method="exact", scale=1.0)
    assert (res.output - exact).abs().max() <= 1e-5
    assert (brute_force(q, k1, k2, v1, v2, 1.0) - exact).abs().max() <= 1e-5
    assert res.error_bound is not None and res.plan.method == "exact"
    assert float((res.output - brute_force(q, k1, k2, v1, v2, 1.0)).abs().max()) <= res.error_bound


# ------------------------------------------------------------------------------ exact path

EXACT_CASES = [
    ((), 1, 1, 1, 1, 1),
    ((), 5, 7, 3, 4, 2),
    ((2,), 16, 16, 16, 4, 3),
    ((2, 3), 9, 4, 11, 8, 5),
    ((), 24, 20, 17, 3, 1),
]


@pytest.mark.parametrize("dt", ["fp32", "fp64"])
@pytest.mark.parametrize(
    ("lead", "n", "n1", "n2", "d", "dv"),
    EXACT_CASES,
    ids=[case_id(*c, "").rstrip("-") for c in EXACT_CASES],
)
def test_exact_equals_brute_force(
    lead: tuple[int, ...], n: int, n1: int, n2: int, d: int, dv: int, dt: str
) -> None:
    dtype = F64 if dt == "fp64" else torch.float32
    q, k1, k2, v1, v2 = make_inputs(lead, n, n1, n2, d, dv, dtype=dtype, seed=n + d)
    res = compute.tensor_attention(q, k1, k2, v1, v2, method="exact")
    ref = brute_force(q, k1, k2, v1, v2, 1.0 / math.sqrt(d))
    assert res.output.shape == (*lead, n, dv) and res.output.dtype == dtype
    vmax = float((v1.abs().amax(-2) * v2.abs().amax(-2)).max())
    tol = (1e-12 if dt == "fp64" else 2e-6) * vmax
    assert (res.output.to(F64) - ref).abs().max() <= tol


@pytest.mark.parametrize("dt", ["fp32", "fp64"])
def test_exact_large_scores_use_running_max(dt: str) -> None:
    """Scores far beyond exp's range: the running-max branch, still equal to brute force."""
    dtype = F64 if dt == "fp64" else torch.float32
    q, k1, k2, v1, v2 = make_inputs((2,), 12, 9, 7, 4, 3, dtype=dtype, seed=3)
    scale = 400.0 if dt == "fp32" else 3000.0
    res = compute.tensor_attention(q, k1, k2, v1, v2, method="exact", scale=scale)
    ref = brute_force(q, k1, k2, v1, v2, scale)
    assert torch.isfinite(res.output).all()
    tol = 1e-9 if dt == "fp64" else 1e-3
    assert (res.output.to(F64) - ref).abs().max() <= tol * float(ref.abs().max() + 1)


def test_exact_blocks_many(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny blocks: many query and j1 blocks, same result; progress reaches its total."""
    monkeypatch.setattr(ta_exact, "EXACT_BLOCK", 40)
    q, k1, k2, v1, v2 = make_inputs((2,), 13, 6, 10, 3, 2, dtype=F64, seed=5)
    calls: list[tuple[int, int]] = []
    res = compute.tensor_attention(
        q, k1, k2, v1, v2, method="exact", progress=lambda a, b: calls.append((a, b))
    )
    assert (res.output - brute_force(q, k1, k2, v1, v2, 1 / math.sqrt(3))).abs().max() <= 1e-12
    assert len(calls) > 4 and calls[-1][0] == calls[-1][1]
    assert [c[0] for c in calls] == list(range(1, len(calls) + 1))


# ------------------------------------------------------------------------- polynomial path

POLY_CASES = [
    ((), 20, 20, 20, 4, 4, 1.0, 1e-3),
    ((2,), 16, 11, 23, 3, 2, 0.5, 1e-2),
    ((3,), 8, 8, 8, 2, 5, 2.0, 1e-3),
    ((), 1, 1, 1, 8, 8, 1.0, 1e-3),
    ((), 18, 14, 9, 8, 3, 0.25, 1e-4),
]


@pytest.mark.parametrize("dt", ["fp32", "fp64"])
@pytest.mark.parametrize(
    ("lead", "n", "n1", "n2", "d", "dv", "radius", "eps"),
    POLY_CASES,
    ids=[case_id(*c[:6], f"R{c[6]}-eps{c[7]:g}") for c in POLY_CASES],
)
def test_polynomial_within_bound(
    lead: tuple[int, ...],
    n: int,
    n1: int,
    n2: int,
    d: int,
    dv: int,
    radius: float,
    eps: float,
    dt: str,
    route: str,
) -> None:
    dtype = F64 if dt == "fp64" else torch.float32
    q, k1, k2, v1, v2 = make_inputs(lead, n, n1, n2, d, dv, dtype=dtype, seed=7, radius=radius)
    res = compute.tensor_attention(q, k1, k2, v1, v2, method="polynomial", eps=eps)
    ref = brute_force(q, k1, k2, v1, v2, 1.0 / math.sqrt(d))
    err = float((res.output.to(F64) - ref).abs().max())
    vmax = float((v1.abs().amax(-2) * v2.abs().amax(-2)).max())
    assert res.plan.method == "polynomial" and res.error_bound is not None
    assert err <= res.error_bound <= eps * vmax * (1 + 1e-9)
    assert res.plan.op == "tensor-attention" and res.plan.degree is not None
    assert res.output.dtype == dtype and res.output.shape == (*lead, n, dv)


@pytest.mark.parametrize("dt", ["fp32", "fp64"])
def test_rounding_part_bounds_the_rounding(dt: str, route: str) -> None:
    """The float32/float64 forward vs the same polynomial in exact (float64) arithmetic."""
    dtype = F64 if dt == "fp64" else torch.float32
    q, k1, k2, v1, v2 = make_inputs((), 40, 33, 29, 4, 3, dtype=dtype, seed=11, radius=1.5)
    res = compute.tensor_attention(q, k1, k2, v1, v2, method="polynomial", eps=1e-3)
    approx = certified_best(res.plan.radius, res.plan.degree)
    assert approx.family == res.plan.family
    exact_poly = brute_force(q, k1, k2, v1, v2, 0.5, poly=approx.coeffs)
    exact = brute_force(q, k1, k2, v1, v2, 0.5)
    parts = res.plan.extra["bound_parts"]
    assert float((res.output.to(F64) - exact_poly).abs().max()) <= parts["rounding"]
    assert float((exact_poly - exact).abs().max()) <= parts["polynomial"]


def test_adversarial_delta_peaks() -> None:
    """1-d construction of docs/theory.md §1.4: weights where delta is extreme, values to match."""
    n1 = 201
    radius = 1.0
    q = torch.ones(1, 1, dtype=F64)
    k1 = torch.linspace(-radius, radius, n1, dtype=F64)[:, None]  # scores cover [-R, R]
    k2 = torch.ones(1, 1, dtype=F64)
    v2 = torch.ones(1, 1, dtype=F64)
    # pick the plan's polynomial, then put value 1 where delta is above its midpoint
    alternating = (torch.arange(n1, dtype=F64) % 2)[:, None]  # same range and max as below
    probe = compute.tensor_attention(
        q, k1, k2, alternating, v2, method="polynomial", scale=1.0, eps=1e-3
    )
    approx = certified_best(probe.plan.radius, probe.plan.degree)
    s = k1[:, 0].numpy()
    delta = np.polynomial.polynomial.polyval(s, approx.coeffs) * np.exp(-s) - 1
    v1 = torch.tensor((delta > (delta.max() + delta.min()) / 2).astype(np.float64))[:, None]
    res = compute.tensor_attention(q, k1, k2, v1, v2, method="polynomial", scale=1.0, eps=1e-3)
    ref = brute_force(q, k1, k2, v1, v2, 1.0)
    err = float((res.output - ref).abs().max())
    assert res.error_bound is not None and err <= res.error_bound
    assert res.plan.degree == probe.plan.degree
    assert err >= 0.5 * res.plan.extra["bound_parts"]["polynomial"]  # the bound is nearly tight


@st.composite
def problems(draw: st.DrawFn) -> dict[str, object]:
    return {
        "lead": draw(st.sampled_from([(), (2,), (1, 2)])),
        "n": draw(st.integers(1, 12)),
        "n1": draw(st.integers(1, 12)),
        "n2": draw(st.integers(1, 12)),
        "d": draw(st.integers(1, 6)),
        "dv": draw(st.integers(1, 4)),
        "radius": draw(st.floats(0.0, 3.0)),
        "eps": draw(st.sampled_from([0.3, 1e-1, 1e-2, 1e-3, 1e-4, 1e-6])),
        "dtype": draw(st.sampled_from([torch.float32, F64])),
        "values": draw(st.sampled_from(["normal", "positive", "spiky", "constant", "zero"])),
        "keys": draw(st.sampled_from(["normal", "constant", "sparse", "wide"])),
        "scale": draw(st.sampled_from([None, 1.0, -0.7])),
        "seed": draw(st.integers(0, 2**31 - 1)),
        "native": draw(st.booleans()),
    }


def _shape_values(v: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "positive":
        return v.abs() + 0.1
    if kind == "spiky":
        mask = torch.rand(v.shape, generator=gen, dtype=F64) < 0.1
        return torch.where(mask, 1e3 * v, 1e-3 * v)
    if kind == "constant":
        return torch.ones_like(v) * 2.5
    if kind == "zero":
        return torch.zeros_like(v)
    return v


def _shape_keys(k: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "constant":
        return torch.ones_like(k) * 0.3
    if kind == "sparse":
        return k * (torch.rand(k.shape, generator=gen, dtype=F64) < 0.3)
    if kind == "wide":
        return k * torch.exp(4 * torch.randn(k.shape, generator=gen, dtype=F64))
    return k


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_measured_error_never_exceeds_bound(p: dict[str, object]) -> None:
    lead, n, n1, n2 = p["lead"], p["n"], p["n1"], p["n2"]
    d, dv, dtype, seed = p["d"], p["dv"], p["dtype"], p["seed"]
    assert isinstance(lead, tuple) and isinstance(dtype, torch.dtype) and isinstance(seed, int)
    assert isinstance(n, int) and isinstance(n1, int) and isinstance(n2, int)
    assert isinstance(d, int) and isinstance(dv, int)
    radius, eps, scale = p["radius"], p["eps"], p["scale"]
    assert isinstance(radius, float) and isinstance(eps, float)
    assert scale is None or isinstance(scale, float)
    gen = torch.Generator().manual_seed(seed)
    q, k1, k2, v1, v2 = make_inputs(lead, n, n1, n2, d, dv, dtype=F64, seed=seed)
    k1 = _shape_keys(k1, str(p["keys"]), gen)
    k2 = _shape_keys(k2, str(p["keys"]), gen)
    sc = 1.0 / math.sqrt(d) if scale is None else scale
    r3 = tensor_radius(q, k1, k2, sc)
    q = q * (radius / r3) if r3 > 0 else q
    v1 = _shape_values(v1, str(p["values"]), gen)
    v2 = _shape_values(v2, str(p["values"]), gen)
    q, k1, k2, v1, v2 = (x.to(dtype) for x in (q, k1, k2, v1, v2))
    ref = brute_force(q, k1, k2, v1, v2, sc)
    vmax = float((v1.to(F64).abs().amax(-2) * v2.to(F64).abs().amax(-2)).max())
    ta_native.NATIVE = bool(p["native"])  # the compiled kernel or the PyTorch route (float32 CPU)
    try:
        res = compute.tensor_attention(q, k1, k2, v1, v2, method="polynomial", eps=eps, scale=scale)
    except compute.CertificationError:
        auto = compute.tensor_attention(q, k1, k2, v1, v2, method="auto", eps=eps, scale=scale)
        assert auto.plan.method == "exact" and "certifies" in auto.plan.reason
        return
    finally:
        ta_native.NATIVE = True
    err = float((res.output.to(F64) - ref).abs().max())
    assert res.error_bound is not None
    assert err <= res.error_bound, (err, res.error_bound, res.plan.to_dict())
    assert res.error_bound <= eps * vmax * (1 + 1e-9)


# --------------------------------------------------------------------- auto, plan, edge cases


def test_auto_picks_polynomial_when_it_pays() -> None:
    q, k1, k2, v1, v2 = make_inputs((), 300, 300, 300, 4, 4, seed=1, radius=0.5)
    res = compute.tensor_attention(q, k1, k2, v1, v2, eps=1e-2, sample_rows=5)
    assert res.plan.method == "polynomial", res.plan.reason
    assert "is certified by" in res.plan.reason and "so exact" not in res.plan.reason
    assert res.plan.cost_polynomial is not None and res.plan.cost_exact is not None
    assert res.plan.cost_polynomial * 1.3 < res.plan.cost_exact
    assert res.measured_error is not None and res.error_bound is not None
    assert res.measured_error <= res.error_bound


def test_huge_entries_run_exact_with_reason() -> None:
    q, k1, k2, v1, v2 = make_inputs((), 6, 5, 4, 3, 2, dtype=F64, seed=2)
    q = q * 100.0
    res = compute.tensor_attention(q, k1, k2, v1, v2)
    assert res.plan.method == "exact" and "no polynomial" in res.plan.reason
    assert res.plan.rho > 1.0
    assert (res.output - brute_force(q, k1, k2, v1, v2, 1 / math.sqrt(3))).abs().max() < 1e-12
    with pytest.raises(compute.CertificationError):
        compute.tensor_attention(q, k1, k2, v1, v2, method="polynomial")


def test_tiny_problem_runs_exact_because_cheaper(monkeypatch: pytest.MonkeyPatch) -> None:
    # fixed throughputs (this machine's unloaded rates): the decision, not the load during the
    # once-per-process calibration, is under test (a busy calibration flipped it now and then)
    fixed = Rates(gemm=2e11, skinny=1.7e11, elems=5.6e9, exps=2.4e9, stream=1.3e10)
    monkeypatch.setattr(ta_plan, "rates", lambda device, dtype: fixed)
    monkeypatch.setattr(ta_native, "native_rate", lambda: 2.8e10)
    q, k1, k2, v1, v2 = make_inputs((), 3, 3, 3, 8, 2, seed=4, radius=0.5)
    res = compute.tensor_attention(q, k1, k2, v1, v2)
    assert res.plan.method == "exact" and "exact is predicted to be faster" in res.plan.reason


def test_constant_rows_and_zero_query() -> None:
    q, k1, k2, v1, v2 = make_inputs((), 5, 6, 7, 3, 2, dtype=F64, seed=6)
    q = torch.zeros_like(q)  # every score is 0: plain means
    for method in ("exact", "polynomial"):
        res = compute.tensor_attention(q, k1, k2, v1, v2, method=method)
        expected = (v1.mean(0) * v2.mean(0)).expand(5, 2)
        assert (res.output - expected).abs().max() <= 1e-12


def test_default_scale_is_inverse_sqrt_d() -> None:
    q, k1, k2, v1, v2 = make_inputs((), 4, 5, 6, 9, 2, dtype=F64, seed=8)
    a = compute.tensor_attention(q, k1, k2, v1, v2, method="exact").output
    b = compute.tensor_attention(q, k1, k2, v1, v2, method="exact", scale=1 / 3).output
    assert torch.equal(a, b)


def test_sample_rows_measure_the_error() -> None:
    q, k1, k2, v1, v2 = make_inputs((2,), 30, 10, 12, 3, 2, seed=9, radius=1.0)
    res = compute.tensor_attention(q, k1, k2, v1, v2, method="polynomial", sample_rows=6)
    ref = brute_force(q, k1, k2, v1, v2, 1 / math.sqrt(3))
    rows = [0, 6, 12, 17, 23, 29]  # 6 evenly spaced of 30, ends included: round(5.8 i)
    want = float((res.output.to(F64)[:, rows] - ref[:, rows]).abs().max())
    assert res.measured_error is not None
    assert abs(res.measured_error - want) <= 1e-12 + 1e-9 * want
    assert res.error_bound is not None and res.measured_error <= res.error_bound


@pytest.mark.parametrize("method", ["exact", "polynomial"])
def test_progress_cancel_propagates(method: str) -> None:
    q, k1, k2, v1, v2 = make_inputs((), 8, 8, 8, 2, 2, seed=10, radius=0.5)

    def cancel(done: int, total: int) -> None:
        raise compute.Cancelled

    with pytest.raises(compute.Cancelled):
        compute.tensor_attention(q, k1, k2, v1, v2, method=method, progress=cancel)


def test_polynomial_progress_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Feature blocks smaller than the problem: several blocks, same output."""
    q, k1, k2, v1, v2 = make_inputs((2,), 21, 19, 17, 3, 2, dtype=F64, seed=12, radius=1.0)
    whole = compute.tensor_attention(q, k1, k2, v1, v2, method="polynomial").output
    monkeypatch.setattr(ta_poly, "FEATURE_BLOCK", 400)
    calls: list[tuple[int, int]] = []
    res = compute.tensor_attention(
        q, k1, k2, v1, v2, method="polynomial", progress=lambda a, b: calls.append((a, b))
    )
    assert (res.output - whole).abs().max() <= 1e-12
    assert len(calls) > 6 and calls[-1][0] == calls[-1][1]


def test_half_precision_inputs() -> None:
    q, k1, k2, v1, v2 = make_inputs((), 10, 9, 8, 4, 3, dtype=torch.float16, seed=13, radius=1)
    res = compute.tensor_attention(q, k1, k2, v1, v2, method="polynomial", eps=1e-2)
    ref = brute_force(q, k1, k2, v1, v2, 0.5)
    assert res.output.dtype == torch.float16
    assert res.error_bound is not None
    assert float((res.output.to(F64) - ref).abs().max()) <= res.error_bound


def test_plan_tensor_attention() -> None:
    plan = compute.plan_tensor_attention(n=1024, d=8, radius=1.0, eps=1e-3)
    assert plan.op == "tensor-attention" and plan.method == "polynomial", plan.reason
    assert plan.predicted_bound is not None and plan.predicted_bound <= 1e-3
    assert plan.features is not None and plan.features < 1024 * 1024
    assert math.isclose(plan.rho, 1.0 / math.log(1024))
    hard = compute.plan_tensor_attention(n=1024, d=8, radius=12.0)
    assert hard.method == "exact" and "no polynomial" in hard.reason
    with pytest.raises(compute.CertificationError):
        compute.plan_tensor_attention(n=1024, d=8, radius=12.0, method="polynomial")
    forced = compute.plan_tensor_attention(n=4, d=8, radius=0.5, method="polynomial")
    assert forced.method == "polynomial"
    assert compute.plan_tensor_attention(n=64, d=4, radius=1.0, method="exact").method == "exact"
    assert plan.to_dict()["op"] == "tensor-attention"


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"n": 0}, "n"),
        ({"d": 2.5}, "d"),
        ({"radius": -1.0}, "radius"),
        ({"radius": math.inf}, "radius"),
        ({"eps": 0.0}, "eps"),
        ({"dv": 0}, "dv"),
        ({"batch": True}, "batch"),
        ({"dtype": "int8"}, "dtype"),
        ({"method": "fast"}, "method"),
    ],
)
def test_plan_bad_arguments(kwargs: dict[str, object], argument: str) -> None:
    args: dict[str, object] = {"n": 16, "d": 4, "radius": 1.0}
    args.update(kwargs)
    with pytest.raises(compute.InvalidInputError) as info:
        compute.plan_tensor_attention(**args)  # type: ignore[arg-type]
    assert info.value.argument == argument


def _good() -> dict[str, object]:
    q, k1, k2, v1, v2 = make_inputs((2,), 4, 5, 6, 3, 2, seed=0)
    return {"q": q, "k1": k1, "k2": k2, "v1": v1, "v2": v2}


BAD = [
    ("q", lambda a: a.update(q=[[1.0]]), "q"),
    ("int", lambda a: a.update(k1=torch.ones(2, 5, 3, dtype=torch.int32)), "k1"),
    ("nan", lambda a: a["k2"].__setitem__((0, 0, 0), math.nan), "k2"),
    ("1d", lambda a: a.update(v1=torch.ones(5)), "v1"),
    ("empty", lambda a: a.update(v2=torch.ones(2, 0, 2)), "v2"),
    ("d", lambda a: a.update(k1=torch.ones(2, 5, 4)), "k1"),
    ("d2", lambda a: a.update(k2=torch.ones(2, 6, 2)), "k2"),
    ("rows1", lambda a: a.update(v1=torch.ones(2, 4, 2)), "v1"),
    ("rows2", lambda a: a.update(v2=torch.ones(2, 5, 2)), "v2"),
    ("dv", lambda a: a.update(v2=torch.ones(2, 6, 3)), "v2"),
    ("lead", lambda a: a.update(k2=torch.ones(3, 6, 3)), "k2"),
    ("method", lambda a: a.update(method="fast"), "method"),
    ("eps", lambda a: a.update(eps=1.0), "eps"),
    ("eps_bool", lambda a: a.update(eps=True), "eps"),
    ("scale", lambda a: a.update(scale=math.inf), "scale"),
    ("sample_rows", lambda a: a.update(sample_rows=-1), "sample_rows"),
    ("progress", lambda a: a.update(progress=3), "progress"),
]


@pytest.mark.parametrize(("mutate", "argument"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_raise(mutate: object, argument: str) -> None:
    args = _good()
    assert callable(mutate)
    mutate(args)
    with pytest.raises(compute.InvalidInputError) as info:
        compute.tensor_attention(**args)  # type: ignore[arg-type]
    assert info.value.argument == argument
    assert argument in str(info.value)


# ------------------------------------------------------------------- features and the bound


def test_rounding_bound_structure() -> None:
    approx = certified_best(1.0, 4)
    common: dict[str, object] = {
        "features": 495,
        "n1": 4096,
        "n2": 4096,
        "out_dtype": torch.float32,
        "weight_max": 2.0,
        "entry_max": 1.5,
        "value_range": np.array([2.0, 1.0]),
        "value_absmax": np.array([1.0, 0.5]),
    }
    b16 = ta_bound.tensor_rounding_bound(approx, compute_dtype=torch.float32, chunk=16, **common)
    b512 = ta_bound.tensor_rounding_bound(approx, compute_dtype=torch.float32, chunk=512, **common)
    b64 = ta_bound.tensor_rounding_bound(approx, compute_dtype=F64, chunk=4096, **common)
    assert b16.rounding < b512.rounding  # longer compute-dtype products round more
    assert b64.rounding < b16.rounding
    assert b16.polynomial == b512.polynomial == b64.polynomial == approx.t * 2.0
    assert b64.total >= b64.polynomial + b64.rounding  # nothing is dropped
    bad = Approximation("taylor", 1, 3.0, taylor_coeffs(1), -1.5, 0.5)  # P not positive
    assert (
        ta_bound.tensor_rounding_bound(bad, compute_dtype=F64, chunk=16, **common).total == math.inf
    )


def test_minimax_is_certified_and_better() -> None:
    for radius in (0.5, 1.0, 2.0):
        for g in (2, 4, 6):
            mm = minimax(g, radius)
            assert mm is not None
            s = np.linspace(-radius, radius, 100_001)
            delta = np.polynomial.polynomial.polyval(s, mm.coeffs) * np.exp(-s) - 1
            assert mm.dmin <= delta.min() and delta.max() <= mm.dmax
    assert certified_best(1.0, 4).family == "minimax"


def test_grid_radius_rounds_up() -> None:
    for r in (1e-3, 0.37, 1.0, 1.0000001, 2.5, 17.0):
        g = grid_radius(r)
        assert r <= g <= r * 2 ** (1 / 32) * (1 + 1e-12)


@pytest.mark.parametrize("m", [1, 15, 16, 17, 48, 53])
def test_chunked_products_match_plain_products(m: int) -> None:
    gen = torch.Generator().manual_seed(m)
    f = torch.randn(7, m + 3, generator=gen, dtype=F64)[:, 2 : 2 + m]  # a strided column slice
    ve = torch.randn(m, 3, generator=gen, dtype=F64)
    acc = torch.zeros(7, 3, dtype=F64)
    ta_poly.chunked_moments(f, ve, 16, acc)
    assert torch.allclose(acc, f @ ve, rtol=1e-12, atol=1e-12)
    feats = torch.randn(m, 5 + 2, generator=gen, dtype=F64)[:, 1:6]  # m features, 5 queries
    me = torch.randn(m, 3, generator=gen, dtype=F64)
    out = ta_poly.chunked_readout(feats, me, 4)  # [3, 5]
    assert torch.allclose(out, me.T @ feats, rtol=1e-12, atol=1e-12)


def test_float32_feature_blocks_within_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """float32 with several key and query feature blocks and chunked products (PyTorch route)."""
    monkeypatch.setattr(ta_native, "NATIVE", False)
    monkeypatch.setattr(ta_poly, "FEATURE_BLOCK", 2000)
    q, k1, k2, v1, v2 = make_inputs((2,), 150, 140, 130, 2, 3, seed=14, radius=1.0)
    calls: list[tuple[int, int]] = []
    res = compute.tensor_attention(
        q, k1, k2, v1, v2, method="polynomial", eps=1e-3, progress=lambda a, b: calls.append((a, b))
    )
    assert res.plan.compute_dtype == "float32" and len(calls) > 4
    ref = brute_force(q, k1, k2, v1, v2, 1 / math.sqrt(2))
    assert res.error_bound is not None
    assert float((res.output.to(F64) - ref).abs().max()) <= res.error_bound


def test_grad_requiring_and_non_contiguous_inputs() -> None:
    q, k1, k2, v1, v2 = make_inputs((2,), 6, 5, 7, 4, 3, dtype=F64, seed=15, radius=1.0)
    qt = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, non-contiguous
    assert not qt.is_contiguous()
    k1g = k1.clone().requires_grad_(True)
    ref = brute_force(q, k1, k2, v1, v2, 0.5)
    for method in ("exact", "polynomial"):
        res = compute.tensor_attention(qt, k1g, k2, v1, v2, method=method)
        assert not res.output.requires_grad
        bound = 1e-12 if res.error_bound is None else res.error_bound
        assert float((res.output - ref).abs().max()) <= bound


@pytest.mark.parametrize("dt", ["fp32", "fp64"])
@pytest.mark.parametrize("magnitude", [1e-30, 1e-6, 1e6, 1e15])
def test_value_magnitudes_within_bound(dt: str, magnitude: float) -> None:
    """Tiny and huge values (normalised by powers of two inside): still within the bound."""
    dtype = F64 if dt == "fp64" else torch.float32
    q, k1, k2, v1, v2 = make_inputs((), 9, 8, 7, 3, 2, dtype=F64, seed=16, radius=1.0)
    v1 = v1 * magnitude
    v1[:, 1] *= 1e-3  # columns of different scales
    q, k1, k2, v1, v2 = (x.to(dtype) for x in (q, k1, k2, v1, v2))
    res = compute.tensor_attention(q, k1, k2, v1, v2, method="polynomial", eps=1e-3)
    ref = brute_force(q, k1, k2, v1, v2, 1 / math.sqrt(3))
    assert res.error_bound is not None
    assert float((res.output.to(F64) - ref).abs().max()) <= res.error_bound


# ----------------------------------------------------- fused statistics and the fused forward


@pytest.mark.parametrize("lengths", [(6, 6, 6), (4, 5, 7)], ids=["equal", "unequal"])
@pytest.mark.parametrize("name", ["q", "k1", "k2", "v1", "v2"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["last", "first"])
def test_non_finite_entry_is_named(
    lengths: tuple[int, int, int], name: str, bad: float, where: str, route: str
) -> None:
    """Finiteness comes from the statistics' reductions: any NaN/Inf anywhere is caught."""
    n, n1, n2 = lengths
    q, k1, k2, v1, v2 = make_inputs((2,), n, n1, n2, 3, 2, dtype=torch.float32, seed=21)
    args = {"q": q, "k1": k1, "k2": k2, "v1": v1, "v2": v2}
    t = args[name]
    if where == "last":
        t[1, t.shape[1] - 1, t.shape[2] - 1] = bad  # last slice, last row, last column
    else:
        t[0, 0, 0] = bad  # first entry (the starting value of the column extremes)
    with pytest.raises(compute.InvalidInputError) as info:
        compute.tensor_attention(**args)  # type: ignore[arg-type]
    assert info.value.argument == name


@pytest.mark.parametrize("lengths", [(9, 9, 9), (5, 8, 11)], ids=["equal", "unequal"])
@pytest.mark.parametrize("dt", ["fp32", "fp64"])
def test_statistics_match_the_separate_helpers(
    lengths: tuple[int, int, int], dt: str, route: str
) -> None:
    """``statistics`` gives what ``tensor_radius``, the value extremes and the exponents give
    one by one (the documented rules written out again)."""
    dtype = F64 if dt == "fp64" else torch.float32
    n, n1, n2 = lengths
    q, k1, k2, v1, v2 = make_inputs((3,), n, n1, n2, 4, 3, dtype=dtype, seed=22)
    v1[1, :, 2] = 0.0  # an all-zero column
    v2[2] *= 1e-20  # small values
    st = ta_stats.statistics(q, k1, k2, v1, v2, 0.7, ta_native.reductions)
    r3 = tensor_radius(q, k1, k2, 0.7)
    assert r3 <= st.radius <= r3 * (1 + 1e-13)
    assert st.maxima == [float(x.abs().max()) for x in (q, k1, k2)]
    # range and largest magnitude of v1 ⊘ v2 per slice and column: the extremes of a product
    # over a product set are among the four products of the extremes, inflated by 4 u64
    a, b = v1.double(), v2.double()
    corners = torch.stack(
        [x * y for x in (a.amax(1), a.amin(1)) for y in (b.amax(1), b.amin(1))]
    )  # [4, B, dv]
    top, bottom = corners.amax(dim=0), corners.amin(dim=0)
    infl = 4.0 * 2.0**-53
    vr = (top - bottom) * (1.0 + infl) + (top.abs() + bottom.abs()) * infl
    va = corners.abs().amax(dim=0) * (1.0 + infl)
    assert np.array_equal(st.value_range, vr.reshape(-1).numpy())
    assert np.array_equal(st.value_absmax, va.reshape(-1).numpy())
    assert torch.equal(st.e1, torch.frexp(v1.abs().amax(dim=1, keepdim=True).double())[1].long())
    assert torch.equal(st.e2, ta_balance.value_exponents(v2))
    scale = torch.exp2((st.e1 + st.e2).double()).reshape(-1)
    expected = torch.where(va.reshape(-1) > 0, scale, 0.0).numpy()
    assert np.array_equal(st.value_scale, expected)


def test_huge_finite_float64_inputs_are_not_rejected() -> None:
    """2-norms may overflow for finite float64 inputs: the radius is inf, the path exact."""
    q, k1, k2, v1, v2 = make_inputs((), 4, 5, 6, 3, 2, dtype=F64, seed=23)
    q[0, 0] = 1e300
    k1[0, 0] = 1e300
    res = compute.tensor_attention(q, k1, k2, v1, v2, method="auto", scale=1e-300)
    assert res.plan.method == "exact" and not math.isfinite(res.plan.radius)
    assert bool(torch.isfinite(res.output).all())


@pytest.mark.parametrize("e_shift", [-140, -60, 0, 60, 120])
def test_times_pow2_direct_equals_split(e_shift: int) -> None:
    """The one-multiplication float32 scaling rounds exactly like the two-step one."""
    gen = torch.Generator().manual_seed(24)
    x = torch.randn(2, 50, 3, generator=gen) * torch.tensor([1e-30, 1.0, 1e30])  # [2, 50, 3]
    e = torch.randint(-20, 20, (2, 1, 3), generator=gen) + e_shift  # [2, 1, 3]
    e = e.clamp(-200, 200)
    split = times_pow2(x, e)
    direct = times_pow2(x, e, direct=True)
    assert direct.dtype == torch.float32
    assert torch.equal(direct, split)


@pytest.mark.parametrize("n2", [32, 48, 40], ids=["fused-equal", "fused", "separate"])
def test_fused_moments_match_float64_polynomial(n2: int) -> None:
    """Both key moments in one batched product (chunk divides n1 and n2) or one by one."""
    q, k1, k2, v1, v2 = make_inputs((2,), 20, 32, n2, 3, 2, dtype=F64, seed=25, radius=1.0)
    approx = certified_best(1.0, 3)
    sc = 0.5
    out = ta_poly.polynomial_forward(
        *(x.float() for x in (q, k1, k2, v1, v2)), approx, sc, chunk=16
    )  # [2, 20, 2] float64
    s = torch.einsum("bil,bjl,bkl->bijk", q * sc, k1, k2)  # [2, 20, 32, n2]
    coeffs = torch.tensor(approx.coeffs, dtype=F64)
    p = sum(c * s**m for m, c in enumerate(coeffs))  # [2, 20, 32, n2]
    ref = torch.einsum("bijk,bjc,bkc->bic", p, v1, v2) / p.sum((-2, -1))[..., None]
    assert float((out - ref).abs().max()) <= 1e-5


@pytest.mark.parametrize("shift", [0, 140], ids=["one-multiply", "split"])
@pytest.mark.parametrize("out_dt", ["fp32", "fp64"])
def test_normalise_into_rounds_like_times_pow2(shift: int, out_dt: str) -> None:
    """Writing ``v * 2^-e`` into the value buffer rounds once, exactly like ``times_pow2``."""
    gen = torch.Generator().manual_seed(26)
    v = torch.randn(2, 40, 3, generator=gen) * torch.tensor([1e-30, 1.0, 1e30])  # [2, 40, 3]
    e = ta_balance.value_exponents(v) + shift  # [2, 1, 3]; +140: 2^-e is no normal float32
    dt = torch.float32 if out_dt == "fp32" else F64
    out = torch.empty(2, 40, 3, dtype=dt)
    ta_balance.normalise_into(out, v, e, direct=True)
    assert torch.equal(out, times_pow2(v.to(dt), -e, direct=True))


def test_planned_bound_is_the_rounding_bound() -> None:
    """The planner's fast bound evaluation equals ``tensor_rounding_bound`` for its choice."""
    q, k1, k2, v1, v2 = make_inputs(
        (2,), 64, 48, 40, 4, 3, dtype=torch.float32, seed=27, radius=1.0
    )
    res = compute.tensor_attention(q, k1, k2, v1, v2, method="polynomial", eps=1e-3)
    sc = 1.0 / math.sqrt(4)
    st = ta_stats.statistics(q, k1, k2, v1, v2, sc, ta_native.reductions)
    _, scale_b, entry_max = ta_balance.balance_shifts(st.maxima, sc, torch.float32)
    approx = certified_best(st.radius, res.plan.degree)
    assert res.plan.family == approx.family
    bound = ta_bound.tensor_rounding_bound(
        approx,
        features=res.plan.features,
        n1=48,
        n2=40,
        compute_dtype=getattr(torch, res.plan.compute_dtype),
        out_dtype=torch.float32,
        weight_max=weight_max(approx, scale_b),
        entry_max=entry_max,
        value_range=st.value_range,
        value_absmax=st.value_absmax,
        chunk=res.plan.extra["chunk"],
        value_scale=st.value_scale,
    )
    assert res.error_bound == bound.total
    assert res.plan.extra["bound_parts"] == bound.to_dict()


# ---------------------------------------------------------------------------- compiled kernel


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler on this machine")
def test_compiled_kernel_builds_where_a_compiler_exists() -> None:
    """CI machines have a C compiler: the fast path must really be the compiled one there."""
    assert ta_native.tensor_poly() is not None, ta_native.status()
    assert ta_native.status().startswith("native ("), ta_native.status()
    kern = ta_native.tensor_poly()
    assert kern is not None and ta_native.self_test(kern)  # and it computes what PyTorch does
    assert ta_native.kernel() is kern
    assert kernel_status() == ta_native.status()  # the worker logs this at start-up


def test_kernel_that_fails_its_self_test_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ta_native, "_CHECKED", {})
    monkeypatch.setattr(ta_native, "self_test", lambda kern: False)
    assert ta_native.kernel() is None
    assert ta_native.kernel_status() == "PyTorch route: the compiled kernel failed its self-test"
    q, k1, k2, v1, v2 = make_inputs((2,), 20, 30, 25, 3, 2, seed=34, radius=1.0)
    calls: list[tuple[int, int]] = []
    res = compute.tensor_attention(
        q, k1, k2, v1, v2, method="polynomial", progress=lambda a, b: calls.append((a, b))
    )
    assert len(calls) == 4  # the PyTorch route: moments and readout blocks per slice
    ref = brute_force(q, k1, k2, v1, v2, 1 / math.sqrt(3))
    assert res.error_bound is not None
    assert float((res.output.to(F64) - ref).abs().max()) <= res.error_bound


def test_compiled_kernel_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COMPUTE_NATIVE", "0")
    assert core_native.build(ta_native.SOURCE) == "disabled by COMPUTE_NATIVE=0"


def test_failed_build_is_reported_and_not_cached(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A compiler that fails leaves no library behind and says why; the call still works."""
    monkeypatch.setenv("COMPUTE_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # exits 1
    got = core_native.build(ta_native.SOURCE)
    assert isinstance(got, str) and "failed" in got
    assert not list(tmp_path.glob("*.so"))
    monkeypatch.setattr(ta_native, "tensor_poly", lambda: None)  # as on a machine without cc
    q, k1, k2, v1, v2 = make_inputs((), 30, 20, 25, 3, 2, seed=30, radius=1.0)
    res = compute.tensor_attention(q, k1, k2, v1, v2, method="polynomial")
    ref = brute_force(q, k1, k2, v1, v2, 1 / math.sqrt(3))
    assert res.error_bound is not None
    assert float((res.output.to(F64) - ref).abs().max()) <= res.error_bound


KERNEL_CASES = [
    # lead, n, n1, n2, d, dv, radius, eps, chunk: many lanes/segments, column groups (dv + 1 > 9),
    # partial query blocks, one key, d = 1, degree 0/1 (no lower-degree rows), unequal lengths
    ((2,), 70, 1000, 517, 3, 10, 1.0, 1e-3, 16),
    ((), 33, 300, 290, 8, 2, 1.0, 1e-3, 64),
    ((3,), 5, 17, 40, 2, 1, 0.5, 1e-2, 512),
    ((), 1, 1, 1, 4, 3, 0.5, 1e-3, 128),
    ((), 40, 50, 60, 1, 4, 1.5, 1e-3, 32),
    ((2,), 9, 20, 20, 5, 9, 0.01, 0.3, 16),
    ((), 20, 40, 33, 70, 3, 0.2, 1e-2, 32),  # d > 64: nothing in the kernel depends on d
]


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler on this machine")
@pytest.mark.parametrize(
    ("lead", "n", "n1", "n2", "d", "dv", "radius", "eps", "chunk"),
    KERNEL_CASES,
    ids=[case_id(*c[:6], f"chunk{c[8]}") for c in KERNEL_CASES],
)
def test_compiled_kernel_matches_pytorch_route_within_bound(
    monkeypatch: pytest.MonkeyPatch,
    lead: tuple[int, ...],
    n: int,
    n1: int,
    n2: int,
    d: int,
    dv: int,
    radius: float,
    eps: float,
    chunk: int,
) -> None:
    """Same plan, same bound; both outputs within the rounding part of the exact polynomial."""
    monkeypatch.setattr(ta_plan, "FLOAT32_CHUNKS", (chunk,))  # the planner may only use this
    q, k1, k2, v1, v2 = make_inputs(lead, n, n1, n2, d, dv, seed=31, radius=radius)
    v1, v2 = v1.abs() + 0.5, v2.abs() + 0.5  # one sign: rounding errors cannot cancel
    res = {}
    for native in (True, False):
        monkeypatch.setattr(ta_native, "NATIVE", native)
        res[native] = compute.tensor_attention(q, k1, k2, v1, v2, method="polynomial", eps=eps)
    a, b = res[True], res[False]
    plan_a, plan_b = a.plan.to_dict(), b.plan.to_dict()
    cost_a, cost_b = plan_a.pop("cost_polynomial"), plan_b.pop("cost_polynomial")
    # the reasons say the same but for the predicted time of each route
    reason_a, reason_b = plan_a.pop("reason"), plan_b.pop("reason")
    assert reason_a.split("; predicted")[0] == reason_b.split("; predicted")[0]
    if d > 8:  # the float64 sums of d squares in another order: R3 may differ in the last bits
        for key in ("radius", "rho"):
            assert plan_a.pop(key) == pytest.approx(plan_b.pop(key), rel=1e-13)
    assert plan_a == plan_b and a.error_bound == b.error_bound
    # each route's predicted time: the kernel's calibrated rate, or the PyTorch cost model
    slices = math.prod(lead)
    work = slices * (n + n1 + n2) * a.plan.features * (dv + 1)
    assert cost_a == pytest.approx(work / ta_native.native_rate(), rel=1e-12)
    assert cost_b != cost_a
    assert a.plan.extra["chunk"] == chunk and a.plan.compute_dtype == "float32"
    assert a.output.dtype == torch.float32 and a.output.shape == (*lead, n, dv)
    sc = 1 / math.sqrt(d)
    approx = certified_best(a.plan.radius, a.plan.degree)
    exact_poly = brute_force(q, k1, k2, v1, v2, sc, poly=approx.coeffs)
    exact = brute_force(q, k1, k2, v1, v2, sc)
    rounding = a.plan.extra["bound_parts"]["rounding"]
    for r in (a, b):
        assert float((r.output.to(F64) - exact_poly).abs().max()) <= rounding
        assert r.error_bound is not None
        assert float((r.output.to(F64) - exact).abs().max()) <= r.error_bound
    scale_out = float((v1.amax(-2) * v2.amax(-2)).max())
    assert float((a.output - b.output).abs().max()) <= 1e-5 * scale_out


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler on this machine")
@pytest.mark.parametrize("lengths", [(9, 9, 9), (5, 300, 11)], ids=["equal", "unequal"])
def test_compiled_statistics_equal_pytorch_statistics(
    monkeypatch: pytest.MonkeyPatch, lengths: tuple[int, int, int]
) -> None:
    n, n1, n2 = lengths
    q, k1, k2, v1, v2 = make_inputs((3,), n, n1, n2, 6, 4, seed=32)
    v1[0] = -v1[0].abs() - 1  # all-negative columns: the maximum is below zero
    stats = {}
    for native in (True, False):
        monkeypatch.setattr(ta_native, "NATIVE", native)
        stats[native] = ta_stats.statistics(q, k1, k2, v1, v2, -0.3, ta_native.reductions)
    a, b = stats[True], stats[False]
    assert torch.equal(a.xt, b.xt) and a.maxima == b.maxima
    assert abs(a.radius - b.radius) <= 1e-15 * b.radius
    for name in ("value_range", "value_absmax", "value_scale"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.e1, b.e1) and torch.equal(a.e2, b.e2)


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler on this machine")
def test_compiled_path_half_precision_output_and_progress() -> None:
    """float16 inputs: statistics by PyTorch, the compiled core, one rounding to float16."""
    x = make_inputs((3,), 12, 10, 14, 4, 3, dtype=torch.float16, seed=33, radius=1.0)
    q, k1, k2, v1, v2 = x
    calls: list[tuple[int, int]] = []
    res = compute.tensor_attention(
        q, k1, k2, v1, v2, method="polynomial", eps=1e-2, progress=lambda a, b: calls.append((a, b))
    )
    assert res.plan.compute_dtype == "float32" and res.output.dtype == torch.float16
    assert calls == [(1, 3), (2, 3), (3, 3)]  # one block per slice
    ref = brute_force(q, k1, k2, v1, v2, 0.5)
    assert res.error_bound is not None
    assert float((res.output.to(F64) - ref).abs().max()) <= res.error_bound
