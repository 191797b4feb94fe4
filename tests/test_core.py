"""The shared core (compute/core): polynomials, monomials, radii, rounding, the planner's
shared pieces, and attention's bound parts."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from compute.attention.bound import certified_bound
from compute.core import planner
from compute.core.monomials import (
    FeatureBuilder,
    derivative_table,
    feature_count,
    features,
    monomial_table,
    weights,
)
from compute.core.polynomials import approximation, best, candidates, tv_factor
from compute.core.radius import centre, matrix_radius, tensor_radius, tensor_radius_from
from compute.core.rounding import gamma

FAMILIES = ("chebyshev", "taylor")


def _poly_eval(coeffs: np.ndarray, s: np.ndarray) -> np.ndarray:
    return np.polynomial.polynomial.polyval(s, coeffs)


# ---- features -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("d", "g"), [(1, 0), (1, 4), (2, 3), (3, 5), (8, 4), (16, 3)])
def test_feature_counts_are_binomial(d: int, g: int) -> None:
    r = math.comb(d + g, g)
    assert feature_count(d, g) == r
    plan = monomial_table(d, g)
    assert plan.r == r
    expo = plan.exponents()
    assert len({tuple(e) for e in expo}) == r  # every monomial exactly once
    assert (expo.sum(axis=1) == plan.degree).all()
    multinomial = [
        math.factorial(int(e.sum())) / math.prod(math.factorial(int(a)) for a in e) for e in expo
    ]
    np.testing.assert_allclose(plan.multinomial, multinomial, rtol=1e-15)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("d", "g"), [(1, 3), (3, 4), (5, 5), (8, 3)])
def test_feature_identity_is_the_polynomial_of_the_score(family: str, d: int, g: int) -> None:
    """phi(q) . psi(k) == P(scale <q, k>) in float64 (weights on the query side)."""
    gen = torch.Generator().manual_seed(d * 10 + g)
    q = torch.randn(7, d, generator=gen, dtype=torch.float64)
    k = torch.randn(9, d, generator=gen, dtype=torch.float64)
    scale = 0.7
    a = approximation(family, g, 1.5)
    want = _poly_eval(a.coeffs, (scale * q @ k.T).numpy())  # [7, 9]
    plan = monomial_table(d, g)
    w = torch.from_numpy(weights(a.coeffs, plan, scale))  # [r]
    u1 = features(q.T.contiguous(), plan) * w[:, None]  # [r, 7]
    u2 = features(k.T.contiguous(), plan)  # [r, 9]
    np.testing.assert_allclose((u1.T @ u2).numpy(), want, rtol=1e-12, atol=1e-12)
    # the weights written out: c_|a| scale^|a| |a|! / a!
    expo = plan.exponents()
    mult = [
        math.factorial(int(e.sum())) / math.prod(math.factorial(int(x)) for x in e) for e in expo
    ]
    want_w = [
        a.coeffs[int(e.sum())] * scale ** int(e.sum()) * m for e, m in zip(expo, mult, strict=True)
    ]
    np.testing.assert_allclose(w.numpy(), want_w, rtol=1e-14)


def test_feature_builder_matches_function_and_batches() -> None:
    plan = monomial_table(4, 3)
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64)  # [.., d, B]
    out = torch.zeros(2, 3, plan.r + 5, 6, dtype=torch.float64)
    builder = FeatureBuilder(plan, x, out)
    got = builder.build()
    want = features(x, plan)
    assert torch.equal(got[..., : plan.r, :], want)
    assert torch.equal(got[..., plan.r :, :], torch.zeros_like(got[..., plan.r :, :]))
    x.mul_(2.0)  # refilled inputs: the same builder builds the new block
    assert torch.equal(builder.build()[..., : plan.r, :], features(x, plan))
    with pytest.raises(ValueError):
        FeatureBuilder(plan, x[..., :3, :], out)


@pytest.mark.parametrize(("d", "g"), [(1, 3), (3, 1), (3, 4), (5, 3)])
def test_derivative_table_is_the_gradient_of_the_features(d: int, g: int) -> None:
    """d x^(beta + e_l) / d x_l = factor[beta, l] x^beta, beta of degree <= g - 1."""
    plan = monomial_table(d, g)
    child, factor = derivative_table(d, g)
    expo = plan.exponents()
    assert child.shape == factor.shape == (plan.offsets[g], d)
    for b in range(child.shape[0]):
        for lv in range(d):
            up = expo[b].copy()
            up[lv] += 1
            assert (expo[child[b, lv]] == up).all() and factor[b, lv] == up[lv]


@pytest.mark.parametrize(("d", "g"), [(1, 4), (2, 2), (3, 5), (8, 4)])
def test_graded_features_multinomial_identity(d: int, g: int) -> None:
    """sum over |alpha| = m of mult * x^alpha = (sum x)^m, and r = C(d + g, g)."""
    tables = monomial_table(d, g)
    assert tables.r == math.comb(d + g, g)
    x = torch.randn(d, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(d * 10 + g))
    f = features(x, tables)
    for m in range(g + 1):
        rows = slice(tables.offsets[m], tables.offsets[m + 1])
        lhs = (torch.from_numpy(tables.multinomial)[rows, None] * f[rows]).sum(0)
        assert torch.allclose(lhs, x.sum(0) ** m, rtol=1e-12, atol=1e-12)
    # the rows are the monomials x^alpha, |alpha| <= g, each once (compared as sorted rows)
    want = torch.stack(
        [
            x[list(alpha)].prod(dim=0)
            for m in range(g + 1)
            for alpha in itertools.combinations_with_replacement(range(d), m)
        ]
    )  # [r, 11]
    assert want.shape == f.shape
    assert torch.allclose(f[f[:, 0].argsort()], want[want[:, 0].argsort()], rtol=1e-12, atol=0)


# ---- polynomials --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("R", [0.25, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("g", [1, 3, 5, 8])
def test_certified_range_contains_the_true_relative_error(family: str, R: float, g: int) -> None:
    """[dmin, dmax] contains P(s) e^-s - 1 on a grid 50x finer than the one that built it."""
    a = approximation(family, g, R)
    s = np.linspace(-R, R, 200_001)
    delta = _poly_eval(a.coeffs, s) * np.exp(-s) - 1.0
    assert a.dmin <= delta.min() + 1e-15
    assert a.dmax >= delta.max() - 1e-15
    # and useful: the Lipschitz guard and the closed form are first order in the grid step, so
    # allow half the range (the containment above is the safety property)
    slack = 0.5 * (delta.max() - delta.min()) + 1e-13
    assert a.dmax - delta.max() <= slack and delta.min() - a.dmin <= slack


def test_closed_form_taylor_bound_holds() -> None:
    for R in (0.5, 1.0, 3.0):
        for g in (2, 4, 7):
            a = approximation("taylor", g, R)
            assert a.max_abs_delta <= math.exp(R) * R ** (g + 1) / math.factorial(g + 1) * (
                1 + 1e-9
            )


@pytest.mark.parametrize(
    ("eps", "R", "g_cheb", "g_taylor"),
    [
        (1e-2, 0.5, 2, 3),
        (1e-2, 1.0, 4, 5),
        (1e-3, 0.5, 3, 4),
        (1e-3, 1.0, 5, 6),
        (1e-3, 2.0, 7, 10),
        (1e-6, 1.0, 7, 9),
    ],
)
def test_theory_table_of_degrees(eps: float, R: float, g_cheb: int, g_taylor: int) -> None:
    """The table of docs/theory.md §2: the smallest degree with certified max |delta| <= eps,
    per family."""

    def smallest(family: str) -> int:
        return next(g for g in range(25) if approximation(family, g, R).max_abs_delta <= eps)

    assert smallest("chebyshev") == g_cheb
    assert smallest("taylor") == g_taylor


def test_candidates_pick_the_better_family_per_degree() -> None:
    cands = candidates(1.0, 8)
    assert [a.degree for a in cands] == list(range(9))
    for a in cands:
        other = [approximation(f, a.degree, 1.0) for f in FAMILIES]
        assert a.t == min(o.t for o in other)
        assert best(1.0, a.degree) is a


def test_tv_factor_formula_and_tightness() -> None:
    """t(dmin, dmax) is the worst two-set error of docs/theory.md §1.4, and
    eps/(1+sqrt(1-eps^2))."""
    for eps in (0.3, 1e-2, 1e-5):
        assert tv_factor(-eps, eps) == pytest.approx(eps / (1 + math.sqrt(1 - eps**2)), rel=1e-9)
    for dmin, dmax in ((-0.2, 0.1), (-1e-3, 5e-3), (0.0, 0.4)):
        # mass p on the keys that get factor 1+dmax, 1-p on those that get 1+dmin
        p = np.linspace(0, 1, 200_001)
        err = p * (1 + dmax) / (p * (1 + dmax) + (1 - p) * (1 + dmin)) - p
        t = tv_factor(dmin, dmax)
        assert err.max() <= t * (1 + 1e-12)
        assert err.max() >= t * (1 - 1e-6)
    assert tv_factor(-1.0, 0.1) == math.inf


# ---- radius -------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_radius_bounds_every_centred_score(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(3, 40, 6, generator=gen, dtype=torch.float64) * (seed + 1)
    k = torch.randn(3, 50, 6, generator=gen, dtype=torch.float64) + 3.0  # off-centre keys
    scale = -0.4 if seed % 2 else 0.4
    kc = centre(k)
    R = matrix_radius(q, kc, scale)
    s = scale * q @ kc.transpose(1, 2)
    assert float(s.abs().max()) <= R
    # R also bounds |scale| sum_l |q_l| |k_l| (what the rounding model needs)
    absdot = abs(scale) * (q.abs() @ kc.abs().transpose(1, 2))
    assert float(absdot.max()) <= R
    # centring by the midrange shrinks the largest key entry
    assert float(kc.abs().max()) <= float((k - k.mean(dim=1, keepdim=True)).abs().max()) + 1e-12


@pytest.mark.parametrize("seed", range(3))
def test_tensor_radius_bounds_every_triple_score(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    q, k1, k2 = (torch.randn(2, n, 4, generator=gen, dtype=torch.float64) for n in (5, 6, 7))
    R3 = tensor_radius(q, k1, k2, -0.6)
    s = 0.6 * torch.einsum("bil,bjl,bkl->bijk", q.abs(), k1.abs(), k2.abs())
    assert float(s.max()) <= R3
    # the usual case and the guarded one (mantissas and exponents) give the same number
    two = np.array([[3.0, 5.0, 7.0]])
    top = np.array([[1.5, 2.5, 0.75]])
    usual = tensor_radius_from(two, top, 4, 0.5)
    assert usual == tensor_radius_from(two * 2.0**-250, top * 2.0**-250, 4, 0.5 * 2.0**750)
    assert usual == min(3 * 5 * 0.75, 3 * 2.5 * 7, 1.5 * 5 * 7) * 0.5 * (1 + 1e-12)


def test_rho_is_the_radius_over_the_log_of_the_mean_length() -> None:
    """One convention for every operation: rho = R / ln n_eff, n_eff the geometric mean of the
    lengths the scores range over, at least 2."""
    assert planner.rho(1.5, 1000) == 1.5 / math.log(1000)
    assert planner.rho(1.5, 8, 27, 125) == 1.5 / ((math.log(8) + math.log(27) + math.log(125)) / 3)
    assert planner.rho(1.5, 1) == planner.rho(1.5, 2) == 1.5 / math.log(2)
    assert planner.rho(1.5, 1, 1, 3) == 1.5 / math.log(2)  # n_eff = 3^(1/3) < 2
    assert planner.rho(0.0, 1) == 0.0


# ---- bound --------------------------------------------------------------------------------------


def test_certified_bound_parts() -> None:
    a = best(1.0, 5)
    kw = {"features": 128, "block": 256, "value_range": 2.0, "value_absmax": 1.0}
    b64 = certified_bound(a, compute_dtype=torch.float64, out_dtype=torch.float64, **kw)
    b32 = certified_bound(a, compute_dtype=torch.float32, out_dtype=torch.float32, **kw)
    assert b64.polynomial == pytest.approx(2.0 * a.t, rel=1e-9)
    assert b64.rounding < 1e-11 < b32.rounding
    assert b32.total >= b32.polynomial + b32.rounding
    longer = certified_bound(
        a, compute_dtype=torch.float32, out_dtype=torch.float32, float64_terms=10**6, **kw
    )
    assert longer.total >= b32.total
    bf16 = certified_bound(a, compute_dtype=torch.float32, out_dtype=torch.bfloat16, **kw)
    assert bf16.rounding >= 2.0**-9  # the output cast alone
    assert gamma(10, 0.1) == math.inf


@pytest.mark.parametrize(
    "coeffs",
    [[1.0, 1e308, 1e308], [1.0, 1.7e308, -1.7e308], [1.0, 1e300, 1e300, 1e300, 1e300]],
)
def test_polynomials_beyond_float64_are_not_certified_quietly(coeffs: list[float]) -> None:
    """Coefficients near float64's top overflow in the derivative bounds: the range is
    (-inf, inf) or at least as wide as the coefficients, never NaN (which a min/max could let
    through) and never a RuntimeWarning."""
    import warnings

    from compute.core.polynomials import relative_error_range

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for R in (1e-3, 0.5, 1.0):
            lo, hi = relative_error_range(np.array(coeffs), R)
            assert not (math.isnan(lo) or math.isnan(hi))
            assert max(-lo, hi) > 1e200
