"""``compute.lora_gradient``: check, predict, run, certify, and report (docs/lora.md)."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from typing import Any

import torch

from ..core import planner, validate
from ..core.errors import CertificationError
from ..core.monomials import feature_count
from ..core.polynomials import Approximation
from ..core.progress import Progress
from ..core.radius import centre, matrix_radius
from ..core.result import LoraResult, Plan
from . import plan as lora_plan
from .certificate import Certificate, Prepared, prepare, rounding_bounds
from .chained import run_chained
from .exact import exact_gradients
from .exact_bound import exact_bounds
from .inputs import Inputs, adapter_grads, check_inputs, effective_weights
from .polynomial import poly_blocking, run_polynomial

__all__ = ["MAX_TRIES", "lora_gradient", "radius_only"]

MAX_TRIES = 3  # polynomial runs before giving up (the certificate is a posteriori)


def lora_gradient(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    adapters: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    alpha: float,
    method: str = "auto",
    eps: float = 1e-3,
    scale: float | None = None,
    progress: Progress | None = None,
    eps_mode: str = "scale",
    estimator: str = "auto",
) -> LoraResult:
    """Loss and adapter gradients of one LoRA-adapted attention head, with certified bounds.

    Arguments (all tensors on one device; any floating dtype)::

        x: [..., L, d_model]        layer input; leading dims are independent slices
        y: [..., L, d_head]         target of the head's output
        w_q, w_k, w_v: [d_model, d_head]   frozen weights W*
        adapters: {"q": (A, B), "v": (A, B)}           partial adaptation, or
                  {"q": ..., "k": ..., "v": ...}         full adaptation
                  A: [r, d_head], B: [d_model, r]  (r may differ per adapter)
        alpha: LoRA scaling; W_mu = W*_mu + (alpha / r) B @ A
        scale: score scale (default 1/sqrt(d_head)); F = softmax(scale * Q K^T), no mask

    Loss: ``1/2 * ||softmax(scale (x W_q)(x W_k)^T) (x W_v) - y||_F^2`` summed over the leading
    dims. Gradients: ``dA = (alpha/r) B^T dW`` [r, d_head], ``dB = (alpha/r) dW A^T``
    [d_model, r], ``dW = sum_slices x^T dQ`` (resp. dK, dV), returned in A's and B's dtypes.

    ``method``:

    * ``"exact"``: blocked closed form, O(L^2 d) time, O(L * block) memory, computed in float64
      if any input is float64, else float32. ``error_bounds``: its certified rounding bound
      (docs/lora_bound.md, "The exact path's bound").
    * ``"polynomial"``: the factored polynomial attention in float64 with an a-posteriori
      certified bound, by one of two estimators (``estimator``; docs/lora_bound.md §10):
      ``"reverse"`` (reverse mode through the surrogate, O(L r' d^2), error follows ``P'``) or
      ``"chained"`` (the exact softmax backward on the surrogate weights, O(L r d^2), error
      follows ``P``, so often a lower degree); ``"auto"`` (default) runs the one predicted
      cheaper at its own certified degree and ``plan.extra["estimator"]`` says which. Raises
      :class:`CertificationError` if no degree (within the retries) certifies ``eps``.
      ``loss`` is then the surrogate (polynomial) loss.
    * ``"auto"``: polynomial when a degree is predicted to certify ``eps`` *and* predicted
      faster by the calibrated cost model, and its certificate then holds; else exact.
      ``plan.reason`` says which and why, with numbers.

    ``eps`` and ``eps_mode``: every gradient tensor ``G`` (each ``dA_mu``, ``dB_mu``) gets a
    certified bound ``b >= max |G_computed - G_exact|`` with

    * ``eps_mode="scale"`` (default): ``b <= eps * max N(G)``, ``N(G) >= |G|`` entrywise the
      gradient's cancellation-free natural scale, certified against a lower bound of it
      computed alongside the passes (docs/lora_bound.md §7b);
    * ``eps_mode="strict"``: ``b <= eps * max |G_exact|``, certified as
      ``b <= eps (max |G_computed| - b)`` (docs/lora_bound.md §7).

    The degree is first predicted (``plan_lora_gradient``; in strict mode after a pilot run at
    the scale-mode degree that measures the conditioning); if the a-posteriori certificate
    fails, a higher degree is tried (at most ``MAX_TRIES`` runs, one more in strict mode;
    ``progress`` restarts at 0 for each), then ``auto`` goes exact with the failed ratio in
    ``plan.reason`` and ``polynomial`` raises.

    Returns :class:`LoraResult` with ``loss`` (float), ``grads`` ({"q": (dA, dB), ...}),
    ``error_bounds`` ({"q": (bound_dA, bound_dB), ...} certified max-abs bounds, for both
    methods: the exact path's is its rounding bound, docs/lora_bound.md, "The exact path's
    bound"), ``scales`` (certified lower bounds of max N(G)), ``conditioning``
    (``kappa_G = N / max|G~|``), ``strict_ratios`` (``b / (max|G~| - b)``) and ``plan``
    (method, final degree, features, radius R of the centred scores, rho = R/ln L, costs,
    reason; ``predicted_bound`` and ``extra["relative_bound"]`` the certified worst ratio of
    the mode, ``extra["relative_bounds"]`` per gradient, ``extra["kappa"]``,
    ``extra["strict_ratios"]``, ``extra["tries"]`` every degree run). ``progress(done,
    total)`` is called after each block; if it raises, the computation stops and the
    exception propagates.
    """
    t0 = time.perf_counter()
    inp = check_inputs(x, y, w_q, w_k, w_v, adapters, alpha, scale)
    m = validate.check_method(method)
    e = validate.check_eps(eps)
    mode = lora_plan.check_eps_mode(eps_mode)
    est = lora_plan.check_estimator(estimator)
    progress = validate.check_progress(progress)
    nb, L, _ = inp.x.shape
    dh = inp.y.shape[-1]
    full = "k" in inp.adapters
    device = inp.x.device
    prep = prepare(inp) if m != "exact" else None
    radius = prep.radius if prep is not None else radius_only(inp)
    kw: dict[str, Any] = dict(
        method=m, eps=e, n=L, d=dh, batch=nb, full=full, radius=radius, device=device,
        dtype=inp.dtype, mode=mode, estimator=est,
    )  # fmt: skip
    # strict: the first run is a pilot at the degree eps_mode="scale" predicts; it measures N
    # and max|G~|, i.e. the conditioning, from which the strict degree is predicted
    # (docs/lora_bound.md §8)
    first = lora_plan.data_free("scale", L, None, None) if mode == "strict" else None
    basis = "first a pilot at the degree eps_mode='scale' predicts" if mode == "strict" else ""
    choice = lora_plan.choose(**kw, predictor=first, basis=basis)
    plan = choice.plan
    approx = choice.approx
    which = choice.estimator
    mins: dict[str, int] = {}  # per estimator: the lowest degree not yet failed
    tries: list[dict[str, Any]] = []
    last: Certificate | None = None
    max_tries = MAX_TRIES + (1 if mode == "strict" else 0)  # the pilot is one more run
    factor = lora_plan.PREDICT_FACTOR
    while approx is not None and prep is not None:
        runner = run_chained if which == "chained" else run_polynomial
        loss, grads, cert = runner(inp, prep, approx, progress)
        worst = cert.worst(mode) if isinstance(cert, Certificate) else math.inf
        tries.append({
            "degree": approx.degree, "family": approx.family, "estimator": which,
            "relative_bound": _finite(worst),  # None: not certified at all (b >= the scale)
            "scale_ratio": _finite(cert.worst("scale")) if isinstance(cert, Certificate) else None,
            "strict_ratio": (
                _finite(cert.worst("strict")) if isinstance(cert, Certificate) else None
            ),
        })  # fmt: skip
        if isinstance(cert, Certificate):
            last = cert
            if worst <= e:
                return _poly_result(
                    m, mode, plan, approx, cert, tries, inp, loss, grads, dh, t0, which
                )
        why = (
            f"certified relative bound {worst:.2e} > eps = {e:g}"
            if isinstance(cert, Certificate)
            else str(cert)
        )
        level = lora_plan.weight_level(approx, which)
        mins[which] = approx.degree + 1
        predictor: lora_plan.Predictor | None = None
        basis = ""
        if isinstance(cert, Certificate) and math.isfinite(level) and level > 0:
            # predict the other degrees from what this run measured (docs/lora_bound.md §8)
            measured = lora_plan.Measured(
                level=level, bounds=cert.bounds, rounding=_rounding(inp, prep, approx, which),
                scales=cert.scales, maxabs=cert.maxabs,
            )  # fmt: skip
            predictor = measured.predictor(mode, lambda a, e: _rounding(inp, prep, a, e))
            kap = _kappa_max(cert.conditioning())
            basis = (
                f"predicted from the degree-{approx.degree} {which} run, kappa_G up to {kap:.3g}"
            )
        else:
            raw = cert.worst_raw() if isinstance(cert, Certificate) else math.inf
            if math.isfinite(raw) and level > 0:
                factor = max(factor, raw / (L * level))  # refine the data-free model
        nxt: lora_plan.Choice | None = None
        if len(tries) < max_tries:
            try:
                nxt = lora_plan.choose(
                    **kw, factor=factor, min_degree=mins, predictor=predictor, basis=basis,
                )  # fmt: skip
            except CertificationError:
                if m == "polynomial" and predictor is not None:
                    raise  # its message says why no degree is predicted to certify
                nxt = None
        failed = (
            f"the a-posteriori certificate failed for the degree-{approx.degree} "
            f"{approx.family} polynomial with the {which} estimator ({why}; tried "
            f"{[(t['estimator'], t['degree']) for t in tries]})"
        )
        if nxt is None or nxt.approx is None:
            where = planner.where(lora_plan.NAME, plan.radius, plan.rho, dh, e)
            where += f" (eps_mode={mode!r})"
            if m == "polynomial":
                extra_reason = "" if nxt is None else " " + nxt.plan.reason
                raise planner.uncertified_error(
                    e, lora_plan.relative_to(mode), where, failed + extra_reason
                )
            extra_reason = "" if nxt is None else " " + nxt.plan.reason
            plan = dataclasses.replace(
                plan, method="exact", reason=planner.uncertified(where, failed) + extra_reason,
                compute_dtype=validate.dtype_name(inp.dtype), family=None, degree=None,
                features=None, cost_polynomial=None, predicted_bound=None,
                extra={"eps_mode": mode, "tries": tries},
            )  # fmt: skip
            approx = None
            break
        plan, approx, which = nxt.plan, nxt.approx, nxt.estimator
    parts: dict[str, torch.Tensor] = {}
    loss, dw = exact_gradients(inp, progress, parts)
    grads = adapter_grads(inp, dw)
    bounds = exact_bounds(inp, dw, grads, parts)  # the exact path's rounding bound
    used = next(iter(dw.values())).dtype
    if used != inp.dtype:  # the compute dtype's pass overflowed: say so
        plan = dataclasses.replace(
            plan,
            compute_dtype=validate.dtype_name(used),
            reason=plan.reason + " The exact pass overflowed in "
            f"{validate.dtype_name(inp.dtype)} and was repeated in float64.",
        )
    extra: dict[str, Any] = {**plan.extra, "eps_mode": mode}
    if tries:
        extra["tries"] = tries
    scales: dict[str, tuple[float | None, float | None]] | None = None
    conditioning: dict[str, tuple[float | None, float | None]] | None = None
    if last is not None:
        # N does not depend on the degree: a polynomial run's certified lower bound of max N
        # gives the exact gradient's conditioning too (docs/lora_bound.md §7b)
        scales = _pairs(last.scales)
        conditioning = {mu: _kappa(last.scales[mu], _maxabs(grads[mu])) for mu in last.scales}
        extra.update(scales=_ab(scales), kappa=_ab(conditioning), kappa_max=_kmax(conditioning))
    plan = dataclasses.replace(plan, extra=extra)
    return LoraResult(
        loss, grads, bounds, plan, time.perf_counter() - t0, scales=scales,
        conditioning=conditioning,
    )  # fmt: skip


ROUTES = {
    "reverse": "reverse mode through the factored forward (uses P and P')",
    "chained": "the exact softmax backward on the factored surrogate weights (uses P only; "
    "docs/lora_bound.md §10)",
}
KAPPA_NOTE = 10.0  # kappa_G above which the reason says what the scale certificate means


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _pairs(d: dict[str, tuple[float, float]]) -> dict[str, tuple[float | None, float | None]]:
    return {mu: (_finite(a), _finite(b)) for mu, (a, b) in d.items()}


def _ab(d: Mapping[str, tuple[float | None, float | None]]) -> dict[str, dict[str, Any]]:
    return {mu: {"a": a, "b": b} for mu, (a, b) in d.items()}


def _kappa(n: tuple[float, float], m: tuple[float, float]) -> tuple[float | None, float | None]:
    """``max N / max|G~|`` per gradient (None for a zero gradient)."""
    return (
        _finite(n[0] / m[0]) if m[0] > 0 else None,
        _finite(n[1] / m[1]) if m[1] > 0 else None,
    )


def _kmax(d: Mapping[str, tuple[float | None, float | None]]) -> float | None:
    # None: a gradient that is exactly 0 (with B = 0 or A = 0 also N = 0): left out
    return max((v for pair in d.values() for v in pair if v is not None), default=None)


def _kappa_max(d: dict[str, tuple[float, float]]) -> float:
    """The largest kappa_G, ignoring gradients that are exactly 0 with N = 0 (nan)."""
    return max((v for pair in d.values() for v in pair if not math.isnan(v)), default=1.0)


def _maxabs(pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float]:
    return tuple(float(t.abs().amax()) if t.numel() else 0.0 for t in pair)  # type: ignore[return-value]


def _rounding(
    inp: Inputs, prep: Prepared, approx: Approximation, estimator: str
) -> dict[str, tuple[float, float]]:
    nb, L, _ = prep.q.shape
    blocking = poly_blocking(nb, L, feature_count(prep.q.shape[-1], approx.degree))
    return rounding_bounds(inp, prep, approx, blocking, estimator)


def _poly_result(
    method: str,
    mode: str,
    plan: Plan,
    approx: Approximation,
    cert: Certificate,
    tries: list[dict[str, Any]],
    inp: Inputs,
    loss: float,
    grads: dict[str, tuple[torch.Tensor, torch.Tensor]],
    dh: int,
    t0: float,
    estimator: str,
) -> LoraResult:
    worst = cert.worst(mode)
    strict = cert.worst("strict")
    r = feature_count(dh, approx.degree)
    cond = cert.conditioning()
    kappa = _pairs(cond)
    kmax = _kappa_max(cond)
    extra = {
        "eps_mode": mode,
        "relative_bound": worst,
        "relative_bounds": _ab(_pairs(cert.of(mode))),
        "scale_ratios": _ab(_pairs(cert.scale_ratios)),
        "strict_ratios": _ab(_pairs(cert.ratios)),
        "strict_ratio": _finite(strict),
        "scales": _ab(_pairs(cert.scales)),
        "kappa": _ab(kappa),
        "kappa_max": _finite(kmax),
        "max_abs": {mu: {"a": ma, "b": mb} for mu, (ma, mb) in cert.maxabs.items()},
        "tries": tries,
        "adapted": sorted(inp.adapters),
        **{k: v for k, v in plan.extra.items() if k in ("estimators", "estimator_reason")},
        "estimator": estimator,
        "route": ROUTES[estimator],
        "eps_meaning": (
            "bound <= eps * N_lo <= eps * max N(G), N(G) >= |G| entrywise (docs/lora_bound.md §7b)"
            if mode == "scale"
            else "bound <= eps * (max|G computed| - bound) <= eps * max|G exact|"
        ),
    }
    where = planner.where(lora_plan.NAME, plan.radius, plan.rho, dh, plan.eps)
    where += f" (eps_mode={mode!r})"
    after = f" after {len(tries)} tries" if len(tries) > 1 else ""
    what = "the natural scale max N(G)" if mode == "scale" else "max|G|"
    claim = (
        f"{where} is certified a posteriori by "
        f"{planner.polynomial_phrase(approx.degree, approx.family, r, torch.float64)} "
        f"with the {estimator} estimator "
        f"(gradient bound {worst:.2e} relative to {what}, worst over dA and dB{after})"
    )
    costs = planner.costs_phrase(plan.cost_polynomial or 0.0, plan.cost_exact or 0.0)
    reason = planner.chosen(method, claim, costs)
    if mode == "scale" and kmax >= KAPPA_NOTE:
        rel = f"{strict:.2e}" if math.isfinite(strict) else "not bounded (bound >= max|G~|)"
        reason += (
            f" The certificate bounds the error on the gradient's scale N; the gradient itself "
            f"is up to kappa_G = {kmax:.3g}x smaller, so the bound relative to max|G| is {rel} "
            f"(eps_mode='strict' certifies that instead)."
        )
    plan = dataclasses.replace(
        plan, method="polynomial", reason=reason, family=approx.family, degree=approx.degree,
        features=r, predicted_bound=worst, compute_dtype="float64", extra=extra,
    )  # fmt: skip
    bounds: dict[str, tuple[float | None, float | None]] = {
        mu: tuple(v if math.isfinite(v) else None for v in pair)  # type: ignore[misc]
        for mu, pair in cert.bounds.items()
    }
    return LoraResult(
        loss, grads, bounds, plan, time.perf_counter() - t0, scales=_pairs(cert.scales),
        conditioning=kappa, strict_ratios=_pairs(cert.ratios),
    )  # fmt: skip


def radius_only(inp: Inputs) -> float:
    """Radius of the centred scores (reported in the plan of the exact path)."""
    w = effective_weights(inp, torch.float64)
    x = inp.x.to(torch.float64)
    q, k = x @ w["q"], x @ w["k"]
    return matrix_radius(q, centre(k), inp.scale)
