"""LoRA's planner: exact or polynomial and which degree, from a *predicted* bound (docs/lora.md,
"auto"; docs/lora_bound.md §8).

The certificate of the polynomial gradient is a posteriori (it needs the run's residuals), so
the planner predicts the relative bound of each degree (``predict``: ``factor L (eta + theta)``)
and prices both paths; ``lora_gradient`` then certifies the run and, when the certificate
fails, raises the degree or goes exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..core import planner
from ..core.cost import Rates, rates
from ..core.monomials import feature_count
from ..core.polynomials import Approximation, approximation
from ..core.result import Plan
from ..core.validate import check_count, check_flag, dtype_name
from .certificate import weight_errors
from .exact import EXACT_BLOCK_ELEMS
from .polynomial import POLY_BLOCK_ELEMS

__all__ = [
    "MAX_DEGREE",
    "MAX_FEATURES",
    "PREDICT_FACTOR",
    "Choice",
    "choose",
    "plan_lora_gradient",
    "predict",
    "weight_level",
]

# Highest degree tried (planner.MAX_DEGREE, 24, is the a-priori planners'): every try is a full
# run with its a-posteriori certificate, and the backward's derivative tables grow with d (d + 1).
MAX_DEGREE = 16
MAX_FEATURES = 400_000  # larger feature maps are never predicted faster than exact
PREDICT_FACTOR = 5.0  # relative bound ~ factor L (eta + theta), calibrated (docs/lora_bound.md §8)
LAUNCH_SECONDS = 1e-5  # per kernel: dispatch overhead the flop counts do not see
NAME = "R"  # the radius of the centred scores, as the reason names it
WHAT_EXACT = "the blocked closed-form gradient"
RELATIVE_TO = "max|G| of each adapter gradient"


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
    """float64: features in three passes, four ``[r, 2d+2]``-ish GEMMs (the bound's extra
    columns included) and one (partial) or two (full) ``[r', d (d+1)]`` derivative GEMMs per
    row, ``r' = C(d + g - 1, g - 1)``."""
    r, r_low = feature_count(d, g), feature_count(d, g - 1)
    feats = float(batch) * 3.0 * n * r
    deriv = (2.0 if full else 1.0) * 2.0 * r_low * d * (d + 1)
    flops = float(batch) * n * (2.0 * r * (2 * d + 1 + 3 * d + 3 + 3 * d + 2) + deriv)
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
) -> Choice:
    """Pick exact or polynomial (and the degree) from the predicted relative bound."""
    rho = planner.rho(radius, n)
    rt = rates(device, dtype)
    rt64 = rates(device, torch.float64)
    c_exact = cost_exact(rt, batch=batch, n=n, d=d, full=full)
    base: dict[str, Any] = dict(
        op="lora-gradient", radius=radius, rho=rho, n=n, d=d, eps=eps, cost_exact=c_exact,
        compute_dtype=dtype_name(dtype),
    )  # fmt: skip
    if method == "exact":
        return Choice(
            Plan(method="exact", reason=planner.exact_requested(WHAT_EXACT), **base), None
        )
    where = planner.where(NAME, radius, rho, d, eps)
    found: Approximation | None = None
    last_why = "no polynomial was tried"
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
        pred = predict(approx, n, factor)
        if pred <= eps:
            found = approx
            break
        last_why = f"degree {g} predicts a relative bound {pred:.2e}"
    if found is None:
        why = f"no polynomial of degree <= {MAX_DEGREE} is predicted to certify it ({last_why})"
        if method == "polynomial":
            raise planner.uncertified_error(eps, RELATIVE_TO, where, why)
        return Choice(Plan(method="exact", reason=planner.uncertified(where, why), **base), None)
    r = feature_count(d, found.degree)
    c_poly = cost_polynomial(rt64, batch=batch, n=n, d=d, g=found.degree, full=full)
    pred = predict(found, n, factor)
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
) -> Plan:
    """What :func:`compute.lora_gradient` would first try for ``L = n``, ``d_head = d``,
    radius R, priced with the calibrated rates of ``device`` (default
    :func:`compute.default_device`).

    Data-free: the degree is the lowest whose *predicted* relative bound
    ``PREDICT_FACTOR n (eta + theta)`` (docs/lora_bound.md §8) is at most ``eps``;
    ``plan.predicted_bound`` is that prediction. ``lora_gradient`` certifies the result
    a posteriori and raises the degree (or goes exact) when the certificate fails.
    ``d_model`` and ``rank`` are validated but do not enter the prediction.
    """
    args = planner.check_plan_args(
        method=method, eps=eps, n=n, d=d, batch=batch, radius=radius, dtype=dtype, device=device
    )
    check_count("rank", rank)
    if d_model is not None:
        check_count("d_model", d_model)
    full = check_flag("full", full)
    return choose(
        method=args.method, eps=args.eps, n=args.n, d=args.d, batch=args.batch, full=full,
        radius=args.radius, device=args.device, dtype=args.compute_dtype,
    ).plan  # fmt: skip
