"""Polynomials for ``exp`` on ``[-R, R]`` with a certified relative error.

Every approximation carries ``dmin, dmax`` with ``P(s) = e^s (1 + delta(s))`` and
``delta(s) in [dmin, dmax]`` for all ``|s| <= R``, for the float64 coefficients actually used:
a dense grid made rigorous by a guard, intersected with the closed-form truncation bound of the
exact series plus the exactly computed distance of the float64 coefficients from it. Three
families (truncated Taylor and Chebyshev series, a relative-error minimax fit); every operation
takes the one with the smallest total-variation factor ``t`` (``certified_best``). The
derivation is in docs/attention.md, "Certified polynomial ranges".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property, lru_cache

import numpy as np
from numpy.polynomial import chebyshev as npcheb

__all__ = [
    "MAX_CERTIFIED_RADIUS",
    "Approximation",
    "abs_sum",
    "approximation",
    "bessel_i",
    "best",
    "candidates",
    "certified_best",
    "chebyshev_coeffs",
    "derivative",
    "exp_up",
    "grid_radius",
    "minimax",
    "relative_error_range",
    "taylor_coeffs",
    "tv_factor",
]

GRID_POINTS = 4097
# Radii above this are never certified (``approximation`` reports dmin = -1 there): the Bessel
# series stay finite and e^R far inside float64. The planners stop earlier (planner.MAX_RADIUS).
MAX_CERTIFIED_RADIUS = 64.0
# Slack for float64 evaluation of the polynomial and exp on the grid (relative to kappa).
_EVAL_SLACK = 64 * np.finfo(np.float64).eps


def exp_up(x: float) -> float:
    """``math.exp`` that returns inf instead of raising OverflowError (radii beyond ~709)."""
    return math.exp(x) if x < 709.0 else math.inf


def _bessel_series(k: int, x: float) -> tuple[float, int]:
    """``I_k(x)`` summed in float64 and the number of terms after the first (x >= 0)."""
    half = x / 2.0
    term = half**k / math.factorial(k)
    total = term
    j = 0
    while True:
        j += 1
        term *= half * half / (j * (j + k))
        total += term
        if term <= total * 1e-17 or j > 500:
            return total, j


def bessel_i(k: int, x: float) -> float:
    """Modified Bessel function of the first kind ``I_k(x)`` by its power series (x >= 0)."""
    return _bessel_series(k, x)[0]


@lru_cache(maxsize=1024)
def _bessel_exact(k: int, x: float) -> tuple[Fraction, float]:
    """A partial sum ``B`` of the series of ``I_k(x)`` in exact rational arithmetic and a bound
    on the rest, ``0 <= I_k(x) - B <= tail`` (``x >= 0`` a float, so a binary fraction).

    Terms ``(x/2)^(2j+k) / (j! (j+k)!)`` are added until one is below ``1e-30`` of the sum
    with ratio ``(x/2)^2 / ((j+1)(j+1+k)) <= 1/2`` to the next; the ratio only decreases from
    there, so the rest is at most twice the next term.
    """
    half = Fraction(x) / 2
    h2 = half * half
    term = half**k / math.factorial(k)
    total = term
    j = 0
    while True:
        ratio = h2 / ((j + 1) * (j + 1 + k))
        nxt = term * ratio
        if ratio <= Fraction(1, 2) and nxt <= total * Fraction(1, 10**30):
            return total, 2.0 * float(nxt) * (1.0 + 1e-12)
        term = nxt
        total += term
        j += 1


def taylor_coeffs(g: int) -> np.ndarray:
    """Monomial coefficients ``c_m = 1/m!`` of the degree-``g`` Taylor polynomial of exp."""
    return np.array([1.0 / math.factorial(m) for m in range(g + 1)], dtype=np.float64)


def chebyshev_coeffs(g: int, R: float) -> np.ndarray:
    """Monomial coefficients in ``x`` of the truncated Chebyshev series of ``e^x`` on [-R, R]."""
    if R == 0.0:
        return taylor_coeffs(g)
    cheb = np.array([bessel_i(0, R)] + [2.0 * bessel_i(k, R) for k in range(1, g + 1)])
    in_t = npcheb.cheb2poly(cheb)  # coefficients of t^m, t = x / R
    out = np.zeros(g + 1, dtype=np.float64)
    out[: len(in_t)] = in_t
    with np.errstate(divide="ignore", invalid="ignore", under="ignore"):
        scaled = out / R ** np.arange(g + 1, dtype=np.float64)
    # a tiny R underflows both the t^m coefficient and R^m (0 / 0): the series is Taylor's there
    # (I_m(R) ~ (R/2)^m / m!); the certificate is computed for whatever coefficients are used
    bad = ~np.isfinite(scaled)
    if bad.any():
        scaled[bad] = taylor_coeffs(g)[bad]
    return scaled


def abs_sum(coeffs: np.ndarray, s: float) -> float:
    """``sum_m |c_m| s^m`` (``s >= 0``): bounds ``|P(x)|`` for ``|x| <= s``; inf beyond float64."""
    with np.errstate(over="ignore"):
        return float(np.sum(np.abs(coeffs) * s ** np.arange(len(coeffs), dtype=np.float64)))


def derivative(coeffs: np.ndarray) -> np.ndarray:
    """Coefficients of ``P'``."""
    if len(coeffs) <= 1:
        return np.zeros(1, dtype=np.float64)
    return coeffs[1:] * np.arange(1, len(coeffs), dtype=np.float64)


def _chebyshev_t(g: int) -> list[list[int]]:
    """Integer monomial coefficients of the Chebyshev polynomials ``T_0 .. T_g``."""
    rows = [[1], [0, 1]]
    for k in range(2, g + 1):
        prev, prev2 = rows[k - 1], rows[k - 2]
        row = [0] * (k + 1)
        for m, c in enumerate(prev):
            row[m + 1] += 2 * c
        for m, c in enumerate(prev2):
            row[m] -= c
        rows.append(row)
    return rows[: g + 1]


def _coefficient_error(family: str, g: int, R: float, coeffs: np.ndarray) -> float:
    """A bound on ``max_{|s| <= R} |P(s) - S_g(s)|`` for the float64 coefficients ``coeffs`` of
    P and the exact truncated series ``S_g`` whose truncation error ``_analytic_bound`` bounds.

    Measured, not estimated: ``S_g`` is written in monomials in exact rational arithmetic
    (Taylor: ``1/m!``; Chebyshev: ``sum_k b_k T_k(s/R)`` with the Bessel coefficients
    ``b_k`` as exact partial sums of their series, ``_bessel_exact``, and ``T_k``'s integer
    coefficients, divided by ``R^m`` exactly), and ``sum_m |c_m - c_m^exact| R^m`` is summed
    exactly; the Chebyshev coefficients' series tails (``|T_k| <= 1`` on the interval) are
    added. This is what the float64 route (Bessel series in float64, ``cheb2poly`` and the
    division by ``R^m``, with their cancellation at high degree) adds to the truncation error.
    """
    Rf = Fraction(R)
    extra = 0.0
    if family == "taylor" or R == 0.0:
        exact = [Fraction(1, math.factorial(m)) for m in range(g + 1)]
    else:
        in_t = [Fraction(0)] * (g + 1)
        for k, row in enumerate(_chebyshev_t(g)):
            b, tail = _bessel_exact(k, R)
            weight = 1 if k == 0 else 2
            extra += weight * tail
            for m, c in enumerate(row):
                if c:
                    in_t[m] += b * (weight * c)
        exact = [in_t[m] / Rf**m for m in range(g + 1)]
    dist = sum(
        (
            abs(Fraction(float(c)) - e) * Rf**m
            for m, (c, e) in enumerate(zip(coeffs, exact, strict=True))
        ),
        start=Fraction(0),
    )
    return (float(dist) + extra) * (1.0 + 1e-12)


def _truncation_bound(family: str, g: int, R: float) -> float:
    """Closed-form bound on ``|S_g(s) e^-s - 1|`` for the *exact* truncated series ``S_g``
    (docs/attention.md, "Certified polynomial ranges"), rounded up."""
    if family == "taylor":
        return exp_up(R) * R ** (g + 1) / math.factorial(g + 1) * (1.0 + 1e-12)
    tail = 0.0
    k = g + 1
    while True:
        term = bessel_i(k, R)
        tail += term
        if term <= tail * 1e-17 or k > g + 400:
            break
        k += 1
    # the tail sum is summed to relative 1e-17 after terms decay geometrically: inflate slightly
    return 2.0 * exp_up(R) * tail * (1.0 + 1e-11)


def _analytic_bound(family: str, g: int, R: float, coeffs: np.ndarray | None = None) -> float:
    """Closed-form certified bound on ``|delta|`` for the float64 coefficients ``coeffs``.

    The truncation bound holds for the exact series; the float64 coefficients ``coeffs``
    (default: those of :func:`taylor_coeffs` / :func:`chebyshev_coeffs`) differ from it by at most
    ``_coefficient_error`` on ``[-R, R]``, which is at most ``e^R`` times that relative to ``e^s``.
    """
    if coeffs is None:
        coeffs = taylor_coeffs(g) if family == "taylor" else chebyshev_coeffs(g, R)
    rounding = exp_up(R) * _coefficient_error(family, g, R, coeffs)
    return (_truncation_bound(family, g, R) + rounding) * (1.0 + 1e-12)


def relative_error_range(coeffs: np.ndarray, R: float) -> tuple[float, float]:
    """Certified ``[dmin, dmax]`` of ``P(s) e^{-s} - 1`` over ``|s| <= R`` (grid + guard).

    Every ``|s| <= R`` is within ``h/2`` of a grid point ``s_i``; two rigorous guards, the
    better one kept: first order, ``max |delta'| h/2`` with ``|delta'| <= e^R sum |c'_m - c_m|
    R^m``; second order, ``|delta'(s_i)| h/2 + max |delta''| h^2/8`` (``delta'`` on the grid,
    ``|delta''| <= e^R sum |c''_m - 2 c'_m + c_m| R^m``), which is tight at the extremes where
    ``delta'`` vanishes. Both add the float64 evaluation slack.

    ``(-inf, inf)`` (not certified) beyond ``MAX_CERTIFIED_RADIUS``, where ``e^R`` leaves
    float64 soon, or for coefficients that are not finite.
    """
    if R == 0.0:
        d = float(coeffs[0]) - 1.0
        return d, d
    if not (0.0 < R <= MAX_CERTIFIED_RADIUS and np.isfinite(coeffs).all()):
        return -math.inf, math.inf
    # coefficients near float64's top overflow below (inf, or NaN from inf - inf): by design,
    # such a polynomial is simply not certified
    with np.errstate(over="ignore", invalid="ignore"):
        lo, hi = _error_range(coeffs, R)
    if math.isnan(lo) or math.isnan(hi):
        return -math.inf, math.inf
    return lo, hi


def _error_range(coeffs: np.ndarray, R: float) -> tuple[float, float]:
    """``relative_error_range``'s grid and derivative bounds for ``0 < R``, finite coefficients."""
    s = np.linspace(-R, R, GRID_POINTS)
    ex = np.exp(-s)
    delta = np.polynomial.polynomial.polyval(s, coeffs) * ex - 1.0
    half = R / (GRID_POINTS - 1) * (1.0 + 1e-9)  # every |s| <= R is this close to a grid point
    dp = derivative(coeffs)
    diff = np.zeros(max(len(dp), len(coeffs)))  # P' - P: delta' = (P' - P) e^-s
    diff[: len(dp)] += dp
    diff[: len(coeffs)] -= coeffs
    dd = derivative(diff)  # delta'' = (P'' - 2P' + P) e^-s
    diff2 = np.zeros(max(len(dd), len(diff)))
    diff2[: len(dd)] += dd
    diff2[: len(diff)] -= diff

    def bound(c: np.ndarray) -> float:  # e^R sum |c_m| R^m >= max |(sum c_m s^m) e^-s|
        return exp_up(R) * abs_sum(c, R)

    kappa, lipschitz, curvature = bound(coeffs), bound(diff), bound(diff2)
    slack = _EVAL_SLACK * (kappa + 1.0)
    # first order: |delta(s) - delta(s_i)| <= max |delta'| h / 2
    lo1 = float(delta.min()) - lipschitz * half - slack
    hi1 = float(delta.max()) + lipschitz * half + slack
    # second order (tight near the extremes, where delta' vanishes): |delta(s) - delta(s_i)|
    # <= |delta'(s_i)| h / 2 + max |delta''| h^2 / 8, with delta'(s_i) evaluated like delta
    slope = np.abs(np.polynomial.polynomial.polyval(s, diff) * ex)
    spread = slope * half + curvature * half * half / 2.0
    slack2 = slack + _EVAL_SLACK * (lipschitz + 1.0) * half
    lo2 = float((delta - spread).min()) - slack2
    hi2 = float((delta + spread).max()) + slack2
    return max(lo1, lo2), min(hi1, hi2)


def tv_factor(dmin: float, dmax: float) -> float:
    """The total-variation factor ``t(dmin, dmax)``: output error <= t * column range of V when
    every weight is off by a factor in ``[1 + dmin, 1 + dmax]`` (docs/attention.md, "The bound").

    Evaluated as ``(dmax - dmin) / (sqrt(1 + dmax) + sqrt(1 + dmin))^2`` (the same number:
    multiply ``a - b`` and ``a + b``), which has no cancellation: the textbook form
    ``(a - b) / (a + b)`` rounds to 0 once ``dmax - dmin`` is below the float64 spacing of 1.
    The few roundings are covered by the factor ``1 + 2^-48``; rounded up, never down.
    """
    if dmin <= -1.0 or not math.isfinite(dmax):
        return math.inf
    if dmax <= dmin:
        return 0.0 if dmax == dmin else math.inf
    a, b = math.sqrt(1.0 + dmax), math.sqrt(1.0 + dmin)
    return (dmax - dmin) / ((a + b) * (a + b)) * (1.0 + 2.0**-48)


@dataclass(frozen=True)
class Approximation:
    """A polynomial for ``exp`` on ``[-radius, radius]`` with its certified relative error.

    Immutable; ``t``, ``kappa`` and ``abs_sum`` are computed once per object (the planners ask
    for them on every call and the objects are cached).
    """

    family: str  # "chebyshev" | "taylor"
    degree: int
    radius: float
    coeffs: np.ndarray  # float64 monomial coefficients c_0..c_g (in the score s)
    dmin: float
    dmax: float

    @cached_property
    def t(self) -> float:
        """Total-variation factor (``tv_factor``)."""
        return tv_factor(self.dmin, self.dmax)

    @property
    def max_abs_delta(self) -> float:
        return max(abs(self.dmin), abs(self.dmax))

    @cached_property
    def kappa(self) -> float:
        """Rounding amplification ``e^R sum_m |c_m| R^m`` (docs/attention.md, "The bound")."""
        return exp_up(self.radius) * self.abs_sum

    @cached_property
    def abs_sum(self) -> float:
        """``sum_m |c_m| R^m``: bounds ``sum_alpha |w_alpha q^alpha k^alpha|`` when ``R`` does."""
        return abs_sum(self.coeffs, self.radius)

    def derivative_range(self) -> tuple[float, float]:
        """Certified range of ``P'(s) e^{-s} - 1`` on ``[-R, R]`` (for autograd through P)."""
        return relative_error_range(derivative(self.coeffs), self.radius)


@lru_cache(maxsize=4096)
def approximation(family: str, g: int, R: float) -> Approximation:
    """The degree-``g`` Chebyshev or Taylor polynomial for ``exp`` on ``[-R, R]``, certified
    (cached). Beyond ``MAX_CERTIFIED_RADIUS``: Taylor coefficients, ``dmin = -1`` (not
    certified)."""
    if not R <= MAX_CERTIFIED_RADIUS:
        # Far past any certifiable radius (no degree <= 24 stays positive beyond R ~ 12), and
        # the series below would overflow: report "not certified" (dmin = -1, t = inf).
        return Approximation(family, g, R, taylor_coeffs(g), -1.0, math.inf)
    coeffs = taylor_coeffs(g) if family == "taylor" else chebyshev_coeffs(g, R)
    dmin, dmax = relative_error_range(coeffs, R)
    # the closed form (>= the truncation bound) can only narrow a grid range wider than that;
    # the exact-arithmetic coefficient check it needs is skipped where it cannot help
    if _truncation_bound(family, g, R) < max(-dmin, dmax):
        # floored: at tiny R the true error underflows float64, a bound of 0 would round down
        bound = max(_analytic_bound(family, g, R, coeffs), 2.0**-1000)
        dmin, dmax = max(dmin, -bound), min(dmax, bound)
        if dmin > dmax:  # cannot happen for a correct guard; keep the safe side
            dmin, dmax = -bound, bound
    return Approximation(family, g, R, coeffs, dmin, dmax)


def best(R: float, g: int) -> Approximation:
    """The better certified family (smaller t) at degree g on ``[-R, R]`` (cached)."""
    return min((approximation(f, g, float(R)) for f in ("chebyshev", "taylor")), key=lambda a: a.t)


def candidates(R: float, max_degree: int = 24) -> list[Approximation]:
    """For each degree 0..max_degree, the better certified family (smaller t), by degree.

    Both families are certified; Chebyshev is usually 1–6 degrees better than Taylor. Callers
    that stop at the first degree that suffices can use :func:`best` degree by degree instead.
    """
    return [best(R, g) for g in range(max_degree + 1)]


# --- Relative-error minimax fits ----------------------------------------------------------------

MINIMAX_MAX_DEGREE = 7  # above this the truncated Chebyshev series is as good or better


@lru_cache(maxsize=512)
def minimax(g: int, radius: float) -> Approximation | None:
    """Near-minimax relative-error polynomial for ``exp`` on ``[-radius, radius]``, certified.

    Fitted by Lawson's iteratively reweighted least squares on the relative error
    ``P(s) e^-s - 1`` (Chebyshev basis in ``s / radius``, Chebyshev nodes), then certified
    exactly like the other families: :func:`relative_error_range` (dense grid plus a rigorous
    guard) gives ``[dmin, dmax]`` whatever the fit's quality. For degrees <= 7 it has 1.1–8x
    smaller ``t`` than the truncated Chebyshev series, often one degree less (``r`` 2.6x smaller
    at d = 8, g = 5 -> 4). None when the fit is not positive on the interval.
    """
    if g < 1 or not 0.0 < radius <= MAX_CERTIFIED_RADIUS:
        return None
    nodes = np.cos(np.linspace(0.0, np.pi, 8 * (g + 1) + 1))  # [N] in [-1, 1]
    basis = npcheb.chebvander(nodes, g) * np.exp(-radius * nodes)[:, None]  # [N, g+1]
    weight = np.full(len(nodes), 1.0 / len(nodes))
    coef = np.zeros(g + 1)
    for _ in range(25):
        sw = np.sqrt(weight)
        coef = np.linalg.lstsq(basis * sw[:, None], sw, rcond=None)[0]
        err = np.abs(basis @ coef - 1.0)
        total = float((weight * err).sum())
        if not total > 0.0:
            break
        weight = weight * err / total
    monomial = np.zeros(g + 1)
    in_t = npcheb.cheb2poly(coef)
    monomial[: len(in_t)] = in_t
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # tiny radii: not finite
        coeffs = monomial / radius ** np.arange(g + 1, dtype=np.float64)
    dmin, dmax = relative_error_range(coeffs, radius)
    if not (np.isfinite(dmin) and np.isfinite(dmax)) or dmin <= -1.0:
        return None
    return Approximation("minimax", g, radius, coeffs, dmin, dmax)


def grid_radius(radius: float) -> float:
    """``radius`` rounded up to the grid ``2^(k/32)`` (so fits are cached and reused)."""
    if radius <= 0.0:
        return 0.0
    k = math.ceil(32.0 * math.log2(radius) - 1e-9)
    out = 2.0 ** (k / 32.0)
    return out if out >= radius else 2.0 ** ((k + 1) / 32.0)


@lru_cache(maxsize=4096)
def _certified_best_at(grid: float, g: int) -> Approximation:
    options = [best(grid, g)]
    if g <= MINIMAX_MAX_DEGREE:
        mm = minimax(g, grid)
        if mm is not None:
            options.append(mm)
    return min(options, key=lambda a: a.t)


def certified_best(R: float, g: int) -> Approximation:
    """Degree-g certified polynomial with the smallest ``t``: Chebyshev, Taylor or minimax.

    Built on ``[-R', R']`` with ``R' = grid_radius(R) >= R`` (valid on the smaller interval,
    cached across inputs; ``approx.radius`` is ``R'``, conservative wherever the radius enters a
    bound). Radii above ``MAX_CERTIFIED_RADIUS`` are never certified.
    """
    if not R <= MAX_CERTIFIED_RADIUS:
        return approximation("chebyshev", g, float(R))
    return _certified_best_at(grid_radius(float(R)), g)
