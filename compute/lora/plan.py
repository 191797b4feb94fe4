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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..core import planner
from ..core.calibration import calibrated
from ..core.cost import Rates, best_time, rates
from ..core.errors import InvalidInputError
from ..core.monomials import feature_count
from ..core.polynomials import Approximation, approximation
from ..core.result import Plan
from ..core.validate import check_count, check_flag, dtype_name
from .certificate import EPS_MODES, ESTIMATORS, weight_errors
from .exact import EXACT_BLOCK_ELEMS, exact_qkv_grads
from .polynomial import POLY_BLOCK_ELEMS

__all__ = [
    "CHAINED_LEVEL",
    "EPS_MODES",
    "ESTIMATORS",
    "ESTIMATOR_CHOICES",
    "MAX_DEGREE",
    "MAX_FEATURES",
    "PREDICT_FACTOR",
    "PREDICT_SCALE",
    "Choice",
    "Measured",
    "check_eps_mode",
    "check_estimator",
    "choose",
    "cost_chained",
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
ESTIMATOR_CHOICES = ("auto", *ESTIMATORS)  # auto: the cheaper certified one per plan
NAME = "R"  # the radius of the centred scores, as the reason names it
WHAT_EXACT = "the blocked closed-form gradient"
RELATIVE_TO = "max|G| of each adapter gradient"
RELATIVE_TO_SCALE = "the natural scale max N(G) of each adapter gradient"
# the chained estimator's bound relative to N is ~CHAINED_LEVEL theta (docs/lora_bound.md §10.5:
# measured 3.6 theta (L = 2048) and 5.0 theta (L = 16384, R = 0.5 and 1) on the benchmark inputs:
# the output error t1 range of (4.3b) adds 2.6-4 theta, data-dependent, to the theta of (10.4));
# reverse mode's is ~1.05 (eta + theta)
CHAINED_LEVEL = 5.0
# a predictor: (degree-g approximation, estimator) -> (predicted ratio, its rounding part)
Predictor = Callable[[Approximation, str], tuple[float, float]]


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
        self,
        mode: str,
        rounding: Callable[[Approximation, str], dict[str, tuple[float, float]]],
    ) -> Predictor:
        """Predicted worst ratio of another degree or estimator:
        ``b_g = (b - rnd) lvl_g / lvl + rnd_g`` (``level`` is the run's own, of its estimator:
        both levels are in units of ``b / N``, §10.5)."""

        def pred(approx: Approximation, estimator: str = "reverse") -> tuple[float, float]:
            lvl = weight_level(approx, estimator)
            rnd = rounding(approx, estimator)
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
    """The a-priori prediction (docs/lora_bound.md §8, §10.5): scale ``PREDICT_SCALE lvl``;
    strict ``PREDICT_SCALE lvl kappa`` with a known conditioning, else ``factor n lvl``, with
    ``lvl = weight_level(approx, estimator)``."""

    def pred(approx: Approximation, estimator: str = "reverse") -> tuple[float, float]:
        lvl = weight_level(approx, estimator)
        if mode == "scale":
            return PREDICT_SCALE * lvl, 0.0
        if kappa is not None:
            return PREDICT_SCALE * lvl * kappa, 0.0
        return predict(approx, n, factor, estimator), 0.0

    return pred


def cost_exact(rt: Rates, *, batch: int, n: int, d: int, full: bool, factor: float = 1.0) -> float:
    """The exact path's predicted seconds: :func:`_cost_exact_model` times ``factor`` (the
    machine's measured over modelled time, :func:`exact_factor`)."""
    return factor * _cost_exact_model(rt, batch=batch, n=n, d=d, full=full)


def _cost_exact_model(rt: Rates, *, batch: int, n: int, d: int, full: bool) -> float:
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


EXACT_CAL_L, EXACT_CAL_D = 2048, 8  # the exact path's calibration problem: one full block


def _measure_exact(dev: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """One timing of ``exact.exact_qkv_grads`` (with the bound's column sums and row norms) on
    ``[1, EXACT_CAL_L, EXACT_CAL_D]`` inputs: the exact path's own kernels, in its own shapes."""
    gen = torch.Generator().manual_seed(3)
    q, k, v, y = (
        torch.randn(1, EXACT_CAL_L, EXACT_CAL_D, generator=gen, dtype=torch.float64).to(dev, dtype)
        for _ in range(4)
    )
    colsum = torch.zeros(1, EXACT_CAL_L, dtype=torch.float64, device=dev)
    enorm = torch.zeros(1, EXACT_CAL_L, dtype=torch.float64, device=dev)

    def run() -> None:
        exact_qkv_grads(q, k, v, y, 0.3, None, True, colsum, enorm)

    return {"calls": 1.0 / best_time(run, dev, reps=3)}


def exact_factor(device: torch.device, dtype: torch.dtype) -> float:
    """Measured time of the exact path's kernels over :func:`cost_exact`'s model on the
    calibration problem, both calibrated once per machine (``core.calibration``), clamped to
    [0.1, 10]. The model's GEMM term assumes the square-GEMM rate; the exact path's products are
    ``[b, L] x [L, d]`` with ``d`` = 8-16, which some BLASes run 5-10x slower (measured: 14
    against 180 GFLOP/s on an AMD EPYC with PyTorch 2.13's CPU build), so auto's choice used
    to run exact where the polynomial path was 3x faster."""
    dev = torch.device(device)
    got = calibrated("lora-exact", dev, dtype, lambda: _measure_exact(dev, dtype), names=("calls",))
    model = _cost_exact_model(rates(dev, dtype), batch=1, n=EXACT_CAL_L, d=EXACT_CAL_D, full=True)
    return min(10.0, max(0.1, (1.0 / got["calls"]) / model))


def cost_polynomial(rt64: Rates, *, batch: int, n: int, d: int, g: int, full: bool) -> float:
    """float64: features in three passes, four ``[r, 2d+2]``-ish GEMMs (the bound's and the
    natural scale's extra columns included) and one (partial) or two (full) ``[r', d (d+1)]``
    derivative GEMMs per row, ``r' = C(d + g - 1, g - 1)``."""
    r_low = feature_count(d, g - 1)
    deriv = (2.0 if full else 1.0) * 2.0 * r_low * d * (d + 1)
    return _factored_cost(rt64, batch=batch, n=n, d=d, g=g, table_flops=deriv)


def cost_chained(rt64: Rates, *, batch: int, n: int, d: int, g: int, full: bool) -> float:
    """float64 chained estimator (docs/lora.md, "Two estimators"): the same passes and bound
    columns as :func:`cost_polynomial`, but its dQ (and dK) tables have all ``r`` features and
    ``d (d + 1)`` columns on both sides: two ``[r, d (d+1)]`` GEMMs per row for dQ (pass 1
    accumulation, pass 2 product), two more for dK (full adaptation)."""
    r = feature_count(d, g)
    tables = (4.0 if full else 2.0) * 2.0 * r * d * (d + 1)
    return _factored_cost(rt64, batch=batch, n=n, d=d, g=g, table_flops=tables)


def _factored_cost(rt64: Rates, *, batch: int, n: int, d: int, g: int, table_flops: float) -> float:
    """What both estimators pay: ``r`` features per row in three passes, the forward's and the
    bound's ``[r, ·]`` GEMMs, their launches; plus ``table_flops`` per row for the estimator's
    own dQ/dK tables."""
    r = feature_count(d, g)
    feats = float(batch) * 3.0 * n * r
    flops = float(batch) * n * (2.0 * r * (2 * d + 1 + 4 * d + 3 + 4 * d + 2) + table_flops)
    blocks = -(-batch * n * r // POLY_BLOCK_ELEMS)
    overhead = LAUNCH_SECONDS * (40 + (8 * g + 30) * 3 * blocks)
    return feats / rt64.elems + flops / rt64.skinny + overhead


def estimator_cost(
    estimator: str, rt64: Rates, *, batch: int, n: int, d: int, g: int, full: bool
) -> float:
    fn = cost_chained if estimator == "chained" else cost_polynomial
    return fn(rt64, batch=batch, n=n, d=d, g=g, full=full)


def families(radius: float, g: int) -> list[Approximation]:
    """The Chebyshev and Taylor approximations of degree ``g`` on ``[-R, R]`` (both certified)."""
    return [approximation(family, g, float(radius)) for family in ("chebyshev", "taylor")]


def weight_level(approx: Approximation, estimator: str = "reverse") -> float:
    """The size of the weights' relative errors at sigma = 0 (docs/lora_bound.md §3, §10.5):
    ``eta + theta`` for reverse mode (it weighs by ``P'``), ``CHAINED_LEVEL theta`` for the
    chained estimator (it weighs by ``P``; the factor puts both on the scale of ``b / N``)."""
    a1, _, theta, eta, _, _ = weight_errors(approx, 0.0)
    if a1 <= -1.0:
        return math.inf
    return CHAINED_LEVEL * theta if estimator == "chained" else eta + theta


def predict(
    approx: Approximation, n: int, factor: float | None = None, estimator: str = "reverse"
) -> float:
    """Predicted relative bound (docs/lora_bound.md §8): ``factor n (eta + theta)``.

    A heuristic for choosing the degree, not a certificate: the a-posteriori bound of
    docs/lora_bound.md §7 is what is checked. ``factor`` is calibrated on random inputs and
    refined at run time.
    """
    f = PREDICT_FACTOR if factor is None else factor
    return f * n * weight_level(approx, estimator)


@dataclass(frozen=True)
class Choice:
    plan: Plan
    approx: Approximation | None
    estimator: str = "reverse"


def check_estimator(estimator: object) -> str:
    """``"auto"`` (the cheaper certified one per plan), ``"reverse"`` or ``"chained"``."""
    if estimator not in ESTIMATOR_CHOICES:
        raise InvalidInputError(
            "estimator", f"unknown estimator {estimator!r}; use one of {ESTIMATOR_CHOICES}"
        )
    return str(estimator)


@dataclass(frozen=True)
class _Search:
    """The lowest degree of one estimator predicted to certify (or why none is)."""

    estimator: str
    approx: Approximation | None = None
    cost: float = math.inf
    pred: float = math.inf
    why: str = "no polynomial was tried"
    slower_at: int | None = None  # auto: the degree at which it became slower than exact
    best: tuple[float, float, int] | None = None  # (predicted, its rounding part, degree)


def _search(
    est: str, *, method: str, eps: float, n: int, d: int, batch: int, full: bool,
    radius: float, rt64: Rates, c_exact: float, pred_of: Predictor, min_degree: int,
) -> _Search:  # fmt: skip
    best: tuple[float, float, int] | None = None
    why = "no polynomial was tried"
    for g in range(max(1, min_degree), MAX_DEGREE + 1):
        if feature_count(d, g) > MAX_FEATURES:
            why = f"degree {g} would need more than {MAX_FEATURES:.3g} features"
            break
        c_g = estimator_cost(est, rt64, batch=batch, n=n, d=d, g=g, full=full)
        if method == "auto" and not planner.polynomial_wins(c_g, c_exact):
            return _Search(est, cost=c_g, why=why, slower_at=g, best=best)
        # keep the family whose weights (P and P' for reverse mode, P for chained) err least
        # (docs/lora_bound.md §3, §10)
        approx = min(families(radius, g), key=lambda a: weight_level(a, est))
        pred, rnd = pred_of(approx, est)
        if best is None or pred < best[0]:
            best = (pred, rnd, g)
        if pred <= eps:
            return _Search(est, approx=approx, cost=c_g, pred=pred, why=why, best=best)
        why = f"degree {g} predicts a relative bound {pred:.2e}"
    return _Search(est, why=why, best=best)


def _describe(s: _Search, d: int) -> dict[str, Any]:
    if s.approx is None:
        return {"certified": False, "why": s.why, "slower_than_exact_at": s.slower_at}
    return {
        "certified": True, "degree": s.approx.degree, "family": s.approx.family,
        "features": feature_count(d, s.approx.degree), "cost": s.cost, "predicted_bound": s.pred,
    }  # fmt: skip


def _which(s: _Search, d: int) -> str:
    if s.approx is None:
        return f"{s.estimator}: none predicted to certify ({s.why})"
    r = feature_count(d, s.approx.degree)
    return (
        f"{s.estimator}: degree {s.approx.degree} (r = {r}), predicted bound {s.pred:.2e}, "
        f"{planner.format_seconds(s.cost)}"
    )


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
    min_degree: int | Mapping[str, int] = 1,
    mode: str = "scale",
    predictor: Predictor | None = None,
    kappa: float | None = None,
    basis: str = "",
    estimator: str = "auto",
) -> Choice:
    """Pick exact or polynomial (the estimator and the degree) from the predicted bound.

    ``predictor`` (default: the data-free one of ``mode``) maps an approximation and an
    estimator to its predicted ratio in ``mode`` and that ratio's rounding part. For each
    estimator (both for ``estimator="auto"``), every degree from ``min_degree`` (one per
    estimator, or one for both) up is tried until one is predicted to certify or (``auto``) is
    predicted slower than exact; of the certified ones the cheaper runs (docs/lora_bound.md
    §10.5). ``basis`` says what the prediction rests on, for the reason.
    """
    rho = planner.rho(radius, n)
    rt = rates(device, dtype)
    rt64 = rates(device, torch.float64)
    c_exact = cost_exact(rt, batch=batch, n=n, d=d, full=full, factor=exact_factor(device, dtype))
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
    ests = ESTIMATORS if estimator == "auto" else (estimator,)
    mins = min_degree if isinstance(min_degree, Mapping) else dict.fromkeys(ests, min_degree)
    common_args: dict[str, Any] = dict(
        method=method, eps=eps, n=n, d=d, batch=batch, full=full, radius=radius, rt64=rt64,
        c_exact=c_exact, pred_of=pred_of,
    )  # fmt: skip
    searches = [_search(est, min_degree=mins.get(est, 1), **common_args) for est in ests]
    certified = [s for s in searches if s.approx is not None]
    compared = {s.estimator: _describe(s, d) for s in searches}
    base["extra"] = {"eps_mode": mode, "estimators": compared}
    if not certified:
        slower = [s for s in searches if s.slower_at is not None]
        if method == "auto" and len(slower) == len(searches):
            s = min(slower, key=lambda t: t.cost)
            assert s.slower_at is not None
            claim = (
                f"{where}: no degree below {s.slower_at} is predicted to certify it with either "
                f"estimator ({', '.join(ests)}), and degree {s.slower_at} has "
                f"r = {feature_count(d, s.slower_at)} features"
            )
            reason = planner.exact_instead(claim, s.cost, c_exact)
            return Choice(Plan(method="exact", reason=reason, **base), None)
        why = f"no polynomial of degree <= {MAX_DEGREE} is predicted to certify it"
        why += " (" + "; ".join(_which(s, d) for s in searches) + ")"
        bests = [s.best for s in searches if s.best is not None]
        if bests and all(b[1] > eps for b in bests):
            b = min(bests)
            why += (
                f"; the float64 rounding part of the bound alone is predicted at "
                f"{b[1]:.2e} > eps at degree {b[2]} (the rounding floor)"
            )
        if method == "polynomial":
            raise planner.uncertified_error(eps, relative_to(mode), where, why)
        return Choice(Plan(method="exact", reason=planner.uncertified(where, why), **base), None)
    pick = min(certified, key=lambda t: t.cost)
    found = pick.approx
    assert found is not None
    r = feature_count(d, found.degree)
    c_poly = pick.cost
    pred = pick.pred
    if len(searches) > 1:
        why_est = (
            f"{pick.estimator} is the cheaper certified estimator ("
            + "; ".join(_which(s, d) for s in searches)
            + ")"
        )
    else:
        why_est = f"estimator={pick.estimator!r} requested"
    base["extra"] = {**base["extra"], "estimator": pick.estimator, "estimator_reason": why_est}
    common: dict[str, Any] = dict(family=found.family, degree=found.degree, features=r,
                                  cost_polynomial=c_poly, predicted_bound=pred)  # fmt: skip
    claim = (
        f"{where} is predicted to be certified by "
        f"{planner.polynomial_phrase(found.degree, found.family, r, torch.float64)} "
        f"with the {pick.estimator} estimator (predicted relative gradient bound {pred:.2e}; "
        f"{why_est})"
    )
    costs = planner.costs_phrase(c_poly, c_exact)
    if method == "polynomial" or planner.polynomial_wins(c_poly, c_exact):
        base["compute_dtype"] = "float64"  # the polynomial path always runs in float64
        reason = planner.chosen(method, claim, costs)
        return Choice(
            Plan(method="polynomial", reason=reason, **base, **common), found, pick.estimator
        )
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
    estimator: str = "auto",
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

    ``estimator`` (docs/lora_bound.md §10): ``"auto"`` prices reverse mode and the chained
    estimator, each at its own lowest predicted degree, and keeps the cheaper
    (``plan.extra["estimator"]``, why in ``plan.extra["estimator_reason"]``, both candidates
    in ``plan.extra["estimators"]``); ``"reverse"`` or ``"chained"`` forces one.
    """
    args = planner.check_plan_args(
        method=method, eps=eps, n=n, d=d, batch=batch, radius=radius, dtype=dtype, device=device
    )
    check_count("rank", rank)
    if d_model is not None:
        check_count("d_model", d_model)
    full = check_flag("full", full)
    mode = check_eps_mode(eps_mode)
    est = check_estimator(estimator)
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
        kappa=kappa, basis=basis, estimator=est,
    ).plan  # fmt: skip
