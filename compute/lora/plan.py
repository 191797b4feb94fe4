"""LoRA's planner: exact or polynomial and which degree, from a *predicted* bound (docs/lora.md,
"auto"; docs/lora_bound.md §8).

The certificate of the polynomial gradient is a posteriori (it needs the run's residuals), so
the planner predicts the relative bound of each degree and prices both paths; data-free, the
prediction is ``PREDICT_SCALE (eta + theta)`` for ``eps_mode="scale"`` (the bound relative to
the natural scale N) and ``factor L (eta + theta)`` (or ``PREDICT_SCALE (eta + theta) kappa``
with a given conditioning ``kappa``) for ``"strict"``; once a run has measured its bound, N and
max|G~| (``Measured``), those predict the other degrees. ``lora_gradient`` certifies every run
and, when the certificate fails, raises the degree or goes exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..core import planner
from ..core.cost import Rates, rates
from ..core.errors import InvalidInputError
from ..core.monomials import feature_count
from ..core.polynomials import Approximation, approximation
from ..core.result import Plan
from ..core.validate import check_count, check_flag, dtype_name
from .certificate import EPS_MODES, weight_errors
from .exact import EXACT_BLOCK_ELEMS
from .polynomial import POLY_BLOCK_ELEMS

__all__ = [
    "EPS_MODES",
    "MAX_DEGREE",
    "MAX_FEATURES",
    "PREDICT_FACTOR",
    "PREDICT_SCALE",
    "Choice",
    "Measured",
    "check_eps_mode",
    "choose",
    "plan_lora_gradient",
    "predict",
    "weight_level",
]

# Highest degree tried (planner.MAX_DEGREE, 24, is the a-priori planners'): every try is a full
# run with its a-posteriori certificate, and the backward's derivative tables grow with d (d + 1).
MAX_DEGREE = 16
MAX_FEATURES = 400_000  # larger feature maps are never predicted faster than exact
# strict, data-free: relative bound ~ factor L (eta + theta) (docs/lora_bound.md §8)
PREDICT_FACTOR = 5.0
# scale: bound / N ~ PREDICT_SCALE (eta + theta) (docs/lora_bound.md §8: measured b/N ~ 1.0-1.1
# (eta + theta) on the benchmark inputs and random ones)
PREDICT_SCALE = 1.25
LAUNCH_SECONDS = 1e-5  # per kernel: dispatch overhead the flop counts do not see
NAME = "R"  # the radius of the centred scores, as the reason names it
WHAT_EXACT = "the blocked closed-form gradient"
RELATIVE_TO = "max|G| of each adapter gradient"
RELATIVE_TO_SCALE = "the natural scale max N(G) of each adapter gradient"
# a predictor: degree-g approximation -> (predicted ratio, its float64 rounding part)
Predictor = Callable[[Approximation], tuple[float, float]]


def check_eps_mode(eps_mode: object) -> str:
    """``"scale"`` (bound <= eps max N(G)) or ``"strict"`` (bound <= eps max|G|)."""
    if eps_mode not in EPS_MODES:
        raise InvalidInputError(
            "eps_mode", f"unknown eps_mode {eps_mode!r}; use one of {EPS_MODES}"
        )
    return str(eps_mode)


def relative_to(mode: str) -> str:
    return RELATIVE_TO_SCALE if mode == "scale" else RELATIVE_TO


@dataclass(frozen=True)
class Measured:
    """What one certified run measured (docs/lora_bound.md §8): per gradient the bound ``b``,
    its a-priori float64 rounding part, the lower bound of max N and max|G~|, and the run's
    ``eta + theta``. The approximation part of ``b`` scales with ``eta + theta``; N does not
    depend on the degree; max|G~| estimates max|G| (its actual error is far below b)."""

    level: float
    bounds: dict[str, tuple[float, float]]
    rounding: dict[str, tuple[float, float]]
    scales: dict[str, tuple[float, float]]
    maxabs: dict[str, tuple[float, float]]

    def predictor(
        self, mode: str, rounding: Callable[[Approximation], dict[str, tuple[float, float]]]
    ) -> Predictor:
        """Predicted worst ratio of another degree: ``b_g = (b - rnd) lvl_g / lvl + rnd_g``."""

        def pred(approx: Approximation) -> tuple[float, float]:
            lvl = weight_level(approx)
            rnd = rounding(approx)
            worst, worst_rnd = 0.0, 0.0
            for mu, pair in self.bounds.items():
                for i, b in enumerate(pair):
                    r_old = self.rounding.get(mu, (0.0, 0.0))[i]
                    r_new = rnd.get(mu, (math.inf, math.inf))[i]
                    b_g = max(b - r_old, 0.0) * (lvl / self.level) + r_new
                    den = self.scales[mu][i] if mode == "scale" else self.maxabs[mu][i] - b_g
                    den_r = self.scales[mu][i] if mode == "scale" else self.maxabs[mu][i]
                    ratio = 0.0 if b_g == 0 else (b_g / den if den > 0 else math.inf)
                    worst = max(worst, ratio if math.isfinite(ratio) else math.inf)
                    rr = 0.0 if r_new == 0 else (r_new / den_r if den_r > 0 else math.inf)
                    worst_rnd = max(worst_rnd, rr)
            return worst, worst_rnd

        return pred


def data_free(mode: str, n: int, factor: float | None, kappa: float | None) -> Predictor:
    """The a-priori prediction (docs/lora_bound.md §8): scale ``PREDICT_SCALE lvl``; strict
    ``PREDICT_SCALE lvl kappa`` with a known conditioning, else ``factor n lvl``."""

    def pred(approx: Approximation) -> tuple[float, float]:
        lvl = weight_level(approx)
        if mode == "scale":
            return PREDICT_SCALE * lvl, 0.0
        if kappa is not None:
            return PREDICT_SCALE * lvl * kappa, 0.0
        return predict(approx, n, factor), 0.0

    return pred


def cost_exact(rt: Rates, *, batch: int, n: int, d: int, full: bool) -> float:
    """Per pair: six ``[b, L] x d`` GEMMs (5 for partial) and the passes over the score block.

    The block (``EXACT_BLOCK_ELEMS`` elements, far beyond the caches) is streamed through
    memory: ``exact.exact_qkv_grads`` writes it or reads-modifies-writes it 8 times (scores, scale,
    shift, exp, normalise, ``E V^T``, ``- D``, ``* F``) and only reads it 6 times (max, sum and
    the four ``[b, L] x [L, d]`` products, counted as half a pass each: 11 passes in all; 10.5
    for partial adaptation, without ``dK``), at the calibrated ``rt.stream`` rate.
    """
    pairs = float(batch) * n * n
    gemms = 6.0 if full else 5.0
    passes = 11.0 if full else 10.5
    blocks = -(-batch * n * n // EXACT_BLOCK_ELEMS)
    overhead = LAUNCH_SECONDS * (10 + 14 * blocks)
    return pairs * (2.0 * gemms * d / rt.gemm + passes / rt.stream) + overhead


def cost_polynomial(rt64: Rates, *, batch: int, n: int, d: int, g: int, full: bool) -> float:
    """float64: features in three passes, four ``[r, 2d+2]``-ish GEMMs (the bound's and the
    natural scale's extra columns included) and one (partial) or two (full) ``[r', d (d+1)]``
    derivative GEMMs per row, ``r' = C(d + g - 1, g - 1)``."""
    r, r_low = feature_count(d, g), feature_count(d, g - 1)
    feats = float(batch) * 3.0 * n * r
    deriv = (2.0 if full else 1.0) * 2.0 * r_low * d * (d + 1)
    flops = float(batch) * n * (2.0 * r * (2 * d + 1 + 4 * d + 3 + 4 * d + 2) + deriv)
    blocks = -(-batch * n * r // POLY_BLOCK_ELEMS)
    overhead = LAUNCH_SECONDS * (40 + (8 * g + 30) * 3 * blocks)
    return feats / rt64.elems + flops / rt64.skinny + overhead


def families(radius: float, g: int) -> list[Approximation]:
    """The Chebyshev and Taylor approximations of degree ``g`` on ``[-R, R]`` (both certified)."""
    return [approximation(family, g, float(radius)) for family in ("chebyshev", "taylor")]


def weight_level(approx: Approximation) -> float:
    """``eta + theta`` at sigma = 0: the size of the weights' relative errors
    (docs/lora_bound.md §3)."""
    a1, _, theta, eta, _, _ = weight_errors(approx, 0.0)
    return math.inf if a1 <= -1.0 else eta + theta


def predict(approx: Approximation, n: int, factor: float | None = None) -> float:
    """Predicted relative bound (docs/lora_bound.md §8): ``factor n (eta + theta)``.

    A heuristic for choosing the degree, not a certificate: the a-posteriori bound of
    docs/lora_bound.md §7 is what is checked. ``factor`` is calibrated on random inputs and
    refined at run time.
    """
    f = PREDICT_FACTOR if factor is None else factor
    return f * n * weight_level(approx)


@dataclass(frozen=True)
class Choice:
    plan: Plan
    approx: Approximation | None


def choose(
    *,
    method: str,
    eps: float,
    n: int,
    d: int,
    batch: int,
    full: bool,
    radius: float,
    device: torch.device,
    dtype: torch.dtype,
    factor: float | None = None,
    min_degree: int = 1,
    mode: str = "scale",
    predictor: Predictor | None = None,
    kappa: float | None = None,
    basis: str = "",
) -> Choice:
    """Pick exact or polynomial (and the degree) from the predicted relative bound.

    ``predictor`` (default: the data-free one of ``mode``) maps an approximation to its
    predicted ratio in ``mode`` and that ratio's rounding part; every degree from ``min_degree``
    up is tried until one is predicted to certify or (``auto``) is predicted slower than exact.
    ``basis`` says what the prediction rests on, for the reason.
    """
    rho = planner.rho(radius, n)
    rt = rates(device, dtype)
    rt64 = rates(device, torch.float64)
    c_exact = cost_exact(rt, batch=batch, n=n, d=d, full=full)
    base: dict[str, Any] = dict(
        op="lora-gradient", radius=radius, rho=rho, n=n, d=d, eps=eps, cost_exact=c_exact,
        compute_dtype=dtype_name(dtype), extra={"eps_mode": mode},
    )  # fmt: skip
    if method == "exact":
        return Choice(
            Plan(method="exact", reason=planner.exact_requested(WHAT_EXACT), **base), None
        )
    pred_of = predictor if predictor is not None else data_free(mode, n, factor, kappa)
    where = planner.where(NAME, radius, rho, d, eps) + f" (eps_mode={mode!r})"
    if basis:
        where += f" ({basis})"
    found: Approximation | None = None
    last_why = "no polynomial was tried"
    best: tuple[float, float, int] | None = None  # (predicted, its rounding part, degree)
    for g in range(max(1, min_degree), MAX_DEGREE + 1):
        if feature_count(d, g) > MAX_FEATURES:
            last_why = f"degree {g} would need more than {MAX_FEATURES:.3g} features"
            break
        c_g = cost_polynomial(rt64, batch=batch, n=n, d=d, g=g, full=full)
        if method == "auto" and not planner.polynomial_wins(c_g, c_exact):
            claim = (
                f"{where}: no degree below {g} is predicted to certify it, and degree {g} has "
                f"r = {feature_count(d, g)} features"
            )
            reason = planner.exact_instead(claim, c_g, c_exact)
            return Choice(Plan(method="exact", reason=reason, **base), None)
        # the gradient needs P and P': keep the family whose weights err least
        # (docs/lora_bound.md §3)
        approx = min(families(radius, g), key=weight_level)
        pred, rnd = pred_of(approx)
        if best is None or pred < best[0]:
            best = (pred, rnd, g)
        if pred <= eps:
            found = approx
            break
        last_why = f"degree {g} predicts a relative bound {pred:.2e}"
    if found is None:
        why = f"no polynomial of degree <= {MAX_DEGREE} is predicted to certify it ({last_why})"
        if best is not None and best[1] > eps:
            why += (
                f"; the float64 rounding part of the bound alone is predicted at "
                f"{best[1]:.2e} > eps at degree {best[2]} (the rounding floor)"
            )
        if method == "polynomial":
            raise planner.uncertified_error(eps, relative_to(mode), where, why)
        return Choice(Plan(method="exact", reason=planner.uncertified(where, why), **base), None)
    r = feature_count(d, found.degree)
    c_poly = cost_polynomial(rt64, batch=batch, n=n, d=d, g=found.degree, full=full)
    pred = pred_of(found)[0]
    common: dict[str, Any] = dict(family=found.family, degree=found.degree, features=r,
                                  cost_polynomial=c_poly, predicted_bound=pred)  # fmt: skip
    claim = (
        f"{where} is predicted to be certified by "
        f"{planner.polynomial_phrase(found.degree, found.family, r, torch.float64)} "
        f"(predicted relative gradient bound {pred:.2e})"
    )
    costs = planner.costs_phrase(c_poly, c_exact)
    if method == "polynomial" or planner.polynomial_wins(c_poly, c_exact):
        base["compute_dtype"] = "float64"  # the polynomial path always runs in float64
        reason = planner.chosen(method, claim, costs)
        return Choice(Plan(method="polynomial", reason=reason, **base, **common), found)
    reason = planner.exact_instead(claim, c_poly, c_exact)
    return Choice(Plan(method="exact", reason=reason, **base, **common), None)


def plan_lora_gradient(
    *,
    n: int,
    d: int,
    radius: float,
    eps: float = 1e-3,
    d_model: int | None = None,
    rank: int = 4,
    full: bool = False,
    batch: int = 1,
    dtype: str = "float32",
    method: str = "auto",
    device: str | torch.device | None = None,
    eps_mode: str = "scale",
    kappa: float | None = None,
) -> Plan:
    """What :func:`compute.lora_gradient` would first try for ``L = n``, ``d_head = d``,
    radius R, priced with the calibrated rates of ``device`` (default
    :func:`compute.default_device`).

    Data-free (docs/lora_bound.md §8): the degree is the lowest whose *predicted* relative
    bound is at most ``eps``: ``PREDICT_SCALE (eta + theta)`` for ``eps_mode="scale"``;
    for ``"strict"`` ``PREDICT_SCALE (eta + theta) kappa`` when the conditioning ``kappa``
    (``max N / max|G|``, e.g. ``plan.extra["kappa_max"]`` of an earlier result) is given, else
    the a-priori ``PREDICT_FACTOR n (eta + theta)`` (which over-predicts: ``lora_gradient``
    measures kappa with a pilot run instead). ``plan.predicted_bound`` is that prediction.
    ``lora_gradient`` certifies the result a posteriori and raises the degree (or goes exact)
    when the certificate fails. ``d_model`` and ``rank`` are validated but do not enter it.
    """
    args = planner.check_plan_args(
        method=method, eps=eps, n=n, d=d, batch=batch, radius=radius, dtype=dtype, device=device
    )
    check_count("rank", rank)
    if d_model is not None:
        check_count("d_model", d_model)
    full = check_flag("full", full)
    mode = check_eps_mode(eps_mode)
    if kappa is not None:
        if isinstance(kappa, bool) or not isinstance(kappa, int | float):
            raise InvalidInputError("kappa", f"expected a number >= 1 or None, got {kappa!r}")
        if not (math.isfinite(float(kappa)) and float(kappa) >= 1.0):
            raise InvalidInputError("kappa", f"must be a finite number >= 1, got {kappa!r}")
        kappa = float(kappa)
    basis = ""
    if mode == "strict":
        basis = (
            f"conditioning kappa = {kappa:.3g} given"
            if kappa is not None
            else f"a-priori conditioning model {PREDICT_FACTOR:g} L"
        )
    return choose(
        method=args.method, eps=args.eps, n=args.n, d=args.d, batch=args.batch, full=full,
        radius=args.radius, device=args.device, dtype=args.compute_dtype, mode=mode,
        kappa=kappa, basis=basis,
    ).plan  # fmt: skip
