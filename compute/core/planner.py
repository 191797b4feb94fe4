"""What the three planners share: limits, rho, the degree and dtype search, the plan functions'
arguments and the wording of the reason (docs/contract.md, "Conventions shared by every
operation").

Each operation's planner (``<op>/plan.py``) certifies its own bound and prices its own paths;
the steps they have in common are here, so that they are written once and read the same way:
the degree search walks :func:`polynomials` from degree 0 up, the dtype search tries
:func:`certifiable_dtypes`, and every plan's ``reason`` is one sentence built from the phrases
below ("R = 1 (rho = 0.144) at d = 8, eps = 0.001 is certified by a degree-4 minimax polynomial
with r = 495 features in float32 (bound 0.0008 of max|v|), predicted 1.2 ms versus 3.4 ms
exact.").

``method="auto"`` runs the polynomial path only when it is certified and predicted faster than
exact by more than ``MARGIN`` (:func:`polynomial_wins`): the cost model is calibrated on the
machine (``core.cost``, ``core.calibration``) but is a model, and predictions closer than the
margin are not told apart. Then exact runs, and the reason says the predictions were within the
margin (:func:`exact_instead`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import torch

from . import validate
from .device import float32_matmul_is_ieee, resolve_device
from .errors import CertificationError
from .polynomials import MAX_CERTIFIED_RADIUS, Approximation, certified_best, grid_radius

__all__ = [
    "MARGIN",
    "MAX_DEGREE",
    "MAX_RADIUS",
    "PlanArgs",
    "beyond_regime",
    "certifiable_dtypes",
    "certified_best",
    "check_plan_args",
    "chosen",
    "costs_phrase",
    "exact_cheaper",
    "exact_instead",
    "exact_requested",
    "first_degree",
    "format_seconds",
    "polynomial_phrase",
    "polynomial_wins",
    "polynomials",
    "rho",
    "uncertified",
    "uncertified_error",
    "useless_polynomial",
    "where",
    "within_margin",
]

# Highest degree the a-priori planners consider (attention, tensor attention; LoRA, whose
# certificate is a posteriori, stops at its own lower MAX_DEGREE).
MAX_DEGREE = 24
# Beyond this radius no polynomial of degree <= MAX_DEGREE certifies any eps < 1 (they stop
# being positive on [-R, R] near R = 12): the planners say so without evaluating any.
MAX_RADIUS = 32.0
# auto's margin: the polynomial path must be predicted faster than exact by more than this
# fraction (cost_polynomial * (1 + MARGIN) < cost_exact); closer predictions run exact.
MARGIN = 0.3


def rho(radius: float, *lengths: int) -> float:
    """``R / ln n_eff``: where an input sits on the phase-transition axis.

    ``n_eff`` is the geometric mean of the sequence lengths the scores range over (the keys of
    attention, ``n n1 n2`` for tensor attention, ``L`` for LoRA), at least 2 (so that a single
    key gives ``R / ln 2``, never a division by zero). Near 0: the near-linear regime; of
    order 1: the regime where only the exact path is certified.
    """
    log_n = sum(map(math.log, lengths)) / len(lengths)
    return radius / max(log_n, math.log(2.0))


def polynomials(
    radius: float, max_degree: int = MAX_DEGREE, start: int = 0
) -> Iterator[Approximation]:
    """The degree search: degree by degree from ``start`` (default 0; lazily), the certified
    polynomial with the smallest total-variation factor (``certified_best``); nothing beyond
    ``MAX_RADIUS``."""
    if not radius <= MAX_RADIUS:
        return
    for g in range(start, max_degree + 1):
        yield certified_best(radius, g)


# per grid radius (``polynomials.grid_radius``): the factors t of certified_best, degree by
# degree from 0, extended lazily as far as a search has needed them
_T_TABLES: dict[float, list[float]] = {}
_T_LOCK = threading.Lock()


def first_degree(radius: float, ratio: float, max_degree: int = MAX_DEGREE) -> int:
    """The smallest degree whose certified polynomial has ``t <= ratio`` (a necessary condition
    for any bound ``t' range + rounding <= target`` with ``ratio = target / range``, up to a
    relative slack of 1e-9), or ``max_degree + 1`` when none has: where the degree search may
    start. From a cached table of t per grid radius (``certified_best`` is built on the grid),
    so a repeated search costs a few comparisons."""
    if not radius <= MAX_RADIUS:
        return max_degree + 1
    key = grid_radius(float(radius)) if radius <= MAX_CERTIFIED_RADIUS else float(radius)
    table = _T_TABLES.get(key)
    if table is None:
        if len(_T_TABLES) > 4096:
            _T_TABLES.clear()
        table = _T_TABLES.setdefault(key, [])
    limit = ratio * (1.0 + 1e-9)
    for g, t in enumerate(table):  # the degrees tabulated so far
        if g > max_degree:
            return max_degree + 1
        if t <= limit:
            return g
    for g in range(len(table), max_degree + 1):
        if g >= len(table):
            t = certified_best(radius, g).t
            with _T_LOCK:  # (threads extend a table one degree at a time, in order)
                if g == len(table):
                    table.append(t)
        if table[g] <= limit:
            return g
    return max_degree + 1


def certifiable_dtypes(compute_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """The dtype search: the dtypes a polynomial path may be certified in, cheapest first.

    float32 only for inputs that are not float64 and only when float32 matrix products are
    IEEE float32 (no TF32/bf16 inside: ``float32_matmul_is_ieee``); float64 always.
    """
    if compute_dtype != torch.float64 and float32_matmul_is_ieee():
        return (torch.float32, torch.float64)
    return (torch.float64,)


@dataclass(frozen=True)
class PlanArgs:
    """The arguments every plan function takes, checked."""

    method: str
    eps: float
    n: int
    d: int
    batch: int
    radius: float
    in_dtype: torch.dtype  # the inputs' dtype
    compute_dtype: torch.dtype  # float64 for float64 inputs, else float32
    device: torch.device  # whose calibrated rates price the paths


def check_plan_args(
    *,
    method: object,
    eps: object,
    n: object,
    d: object,
    batch: object,
    radius: object,
    dtype: object,
    device: object,
) -> PlanArgs:
    """Check the arguments every plan function shares (each error names its argument)."""
    method = validate.check_method(method)
    eps = validate.check_eps(eps)
    n = validate.check_count("n", n)
    d = validate.check_count("d", d)
    batch = validate.check_count("batch", batch)
    radius = validate.check_radius(radius)
    in_dtype = validate.check_dtype_name(dtype)
    return PlanArgs(
        method=method,
        eps=eps,
        n=n,
        d=d,
        batch=batch,
        radius=radius,
        in_dtype=in_dtype,
        compute_dtype=validate.compute_dtype_for(in_dtype),
        device=resolve_device(device),  # type: ignore[arg-type]
    )


def format_seconds(x: float) -> str:
    """A predicted time for a reason: ``1.2 ms``, ``3.4 s``, ``56 us``."""
    if not math.isfinite(x):
        return "inf s"
    if x >= 1.0:
        return f"{x:.3g} s"
    if x >= 1e-3:
        return f"{x * 1e3:.3g} ms"
    return f"{x * 1e6:.3g} us"


# ---- the reason: one sentence, made of these phrases ----------------------------------------


def where(name: str, radius: float, rho: float, d: int, eps: float) -> str:
    """``R = 1 (rho = 0.144) at d = 8, eps = 0.001``: the input on the phase axis."""
    return f"{name} = {radius:.3g} (rho = {rho:.3g}) at d = {d}, eps = {eps:.2g}"


def polynomial_phrase(degree: int, family: str, features: int, dtype: torch.dtype) -> str:
    """``a degree-4 minimax polynomial with r = 495 features in float32``."""
    return (
        f"a degree-{degree} {family} polynomial with r = {features} features in "
        f"{validate.dtype_name(dtype)}"
    )


def costs_phrase(polynomial: float, exact: float) -> str:
    """``predicted 1.2 ms versus 3.4 ms exact``."""
    return f"predicted {format_seconds(polynomial)} versus {format_seconds(exact)} exact"


def beyond_regime(name: str, radius: float) -> str:
    """Why nothing was tried above ``MAX_RADIUS``."""
    return (
        f"{name} = {radius:.3g} is beyond the polynomial regime ({name} > {MAX_RADIUS:g}): "
        f"no polynomial of degree <= {MAX_DEGREE} certifies any eps there"
    )


def exact_requested(what: str) -> str:
    return f"method='exact' was requested: {what}, no approximation error to bound."


def useless_polynomial(where: str, degree: int, features: int, floor: float, exact: float) -> str:
    """``auto`` runs exact without pricing each polynomial: every certified one has at least
    degree ``degree`` and ``features`` features, predicted at least ``floor`` seconds, which
    does not beat ``exact`` by ``MARGIN``."""
    return f"{where}: {_useless_tail(degree, features, floor, exact)}"


@lru_cache(maxsize=1024)
def _useless_tail(degree: int, features: int, floor: float, exact: float) -> str:
    """The part of ``useless_polynomial`` after ``where`` (a pure function of the numbers, which
    repeat for a repeated shape: cached)."""
    return (
        f"a certified polynomial needs degree >= {degree} (r >= {features} features), "
        f"predicted at least {format_seconds(floor)} versus {format_seconds(exact)} exact, so "
        + (
            "exact is predicted to be faster."
            if floor >= exact
            else f"the polynomial path is at best within {MARGIN:.0%} of exact: exact runs."
        )
    )


def uncertified(where: str, why: str) -> str:
    """``auto`` runs exact because no polynomial is certified (``why``: one clause)."""
    return f"{where}: {why}; exact is the only certified path."


def uncertified_error(eps: float, relative_to: str, where: str, why: str) -> CertificationError:
    """The error of ``method="polynomial"`` when no polynomial is certified."""
    return CertificationError(
        f"method='polynomial' cannot certify eps = {eps:.3g} (relative to {relative_to}): "
        f"{where}: {why}. Use method='exact' or 'auto', or a larger eps."
    )


def chosen(method: str, claim: str, costs: str) -> str:
    """The polynomial path runs: requested, or certified and predicted faster."""
    if method == "polynomial":
        return f"method='polynomial': {claim}; {costs}."
    return f"{claim}, {costs}."


def exact_cheaper(claim: str, costs: str) -> str:
    """A polynomial is certified, but ``auto`` runs exact: exact is predicted to be faster."""
    return f"{claim}, but the polynomial path is {costs}, so exact is predicted to be faster."


def polynomial_wins(cost_polynomial: float, cost_exact: float) -> bool:
    """``auto``'s rule for a certified polynomial: run it only when it is predicted faster than
    exact by more than ``MARGIN`` (NaN-safe: an unknown cost never wins)."""
    return bool(cost_polynomial * (1.0 + MARGIN) < cost_exact)


def within_margin(a: float, b: float) -> bool:
    """Whether two predicted times are within ``MARGIN`` of each other."""
    return bool(max(a, b) <= (1.0 + MARGIN) * min(a, b))


def exact_instead(claim: str, cost_polynomial: float, cost_exact: float) -> str:
    """A polynomial is certified, but ``auto`` runs exact (``polynomial_wins`` is False): either
    exact is predicted to be faster, or the two predictions are within the margin."""
    if within_margin(cost_polynomial, cost_exact):
        return (
            f"{claim}, but predictions within {MARGIN:.0%}: "
            f"{format_seconds(cost_polynomial)} polynomial versus "
            f"{format_seconds(cost_exact)} exact, closer than the cost model tells apart, so "
            f"exact runs (the polynomial path needs to be predicted more than {MARGIN:.0%} "
            "faster)."
        )
    return exact_cheaper(claim, costs_phrase(cost_polynomial, cost_exact))
