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
from .certificate import Certificate, prepare
from .exact import exact_gradients
from .inputs import Inputs, adapter_grads, check_inputs, effective_weights
from .polynomial import run_polynomial

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
      if any input is float64, else float32. ``error_bounds`` is None.
    * ``"polynomial"``: reverse mode through the factored polynomial attention, O(L r' d^2),
      computed in float64, with an a-posteriori certified bound. Raises
      :class:`CertificationError` if no degree (within the retries) certifies ``eps``.
      ``loss`` is then the surrogate (polynomial) loss.
    * ``"auto"``: polynomial when a degree is predicted to certify ``eps`` *and* predicted
      faster by the calibrated cost model, and its certificate then holds; else exact.
      ``plan.reason`` says which and why, with numbers.

    ``eps``: every gradient tensor ``G`` (each ``dA_mu``, ``dB_mu``) gets a certified bound
    ``b >= max |G_computed - G_exact|`` with ``b <= eps * max |G_exact|``, certified as
    ``b <= eps (max |G_computed| - b)`` (docs/lora.md, "Meaning of eps"; docs/lora_bound.md
    §7). The degree is first predicted (``plan_lora_gradient``); if the a-posteriori certificate
    fails, a higher degree is tried (at most ``MAX_TRIES`` runs; ``progress`` restarts at 0 for
    each), then ``auto`` goes exact with the failed ratio in ``plan.reason`` and ``polynomial``
    raises.

    Returns :class:`LoraResult` with ``loss`` (float), ``grads`` ({"q": (dA, dB), ...}),
    ``error_bounds`` ({"q": (bound_dA, bound_dB), ...} certified max-abs bounds; None for
    exact) and ``plan`` (method, final degree, features, radius R of the centred scores,
    rho = R/ln L, costs, reason; ``predicted_bound`` and ``extra["relative_bound"]`` the
    certified worst ``b / (max|G| - b)``, ``extra["relative_bounds"]`` per gradient,
    ``extra["tries"]`` every degree run). ``progress(done, total)`` is called after each
    block; if it raises, the computation stops and the exception propagates.
    """
    t0 = time.perf_counter()
    inp = check_inputs(x, y, w_q, w_k, w_v, adapters, alpha, scale)
    m = validate.check_method(method)
    e = validate.check_eps(eps)
    progress = validate.check_progress(progress)
    nb, L, _ = inp.x.shape
    dh = inp.y.shape[-1]
    full = "k" in inp.adapters
    device = inp.x.device
    prep = prepare(inp) if m != "exact" else None
    radius = prep.radius if prep is not None else radius_only(inp)
    kw: dict[str, Any] = dict(
        method=m, eps=e, n=L, d=dh, batch=nb, full=full, radius=radius, device=device,
        dtype=inp.dtype,
    )  # fmt: skip
    factor = lora_plan.PREDICT_FACTOR
    choice = lora_plan.choose(**kw, factor=factor)
    plan = choice.plan
    approx = choice.approx
    tries: list[dict[str, Any]] = []
    while approx is not None and prep is not None:
        loss, grads, cert = run_polynomial(inp, prep, approx, progress)
        worst = cert.worst() if isinstance(cert, Certificate) else math.inf
        tries.append({
            "degree": approx.degree, "family": approx.family,
            "relative_bound": worst if math.isfinite(worst) else None,  # None: b >= max|G~|
        })  # fmt: skip
        if isinstance(cert, Certificate) and worst <= e:
            return _poly_result(m, plan, approx, cert, tries, inp, loss, grads, dh, t0)
        why = (
            f"certified relative bound {worst:.2e} > eps = {e:g}"
            if isinstance(cert, Certificate)
            else str(cert)
        )
        level = lora_plan.weight_level(approx)
        raw = cert.worst_raw() if isinstance(cert, Certificate) else math.inf
        if math.isfinite(raw) and level > 0:
            # refine the prediction factor from what the certificate achieved
            # (docs/lora_bound.md §8)
            factor = max(factor, raw / (L * level))
        nxt: lora_plan.Choice | None = None
        if len(tries) < MAX_TRIES:
            try:
                nxt = lora_plan.choose(**kw, factor=factor, min_degree=approx.degree + 1)
            except CertificationError:
                nxt = None
        failed = (
            f"the a-posteriori certificate failed for the degree-{approx.degree} "
            f"{approx.family} polynomial ({why}; tried degrees "
            f"{[t['degree'] for t in tries]})"
        )
        if nxt is None or nxt.approx is None:
            where = planner.where(lora_plan.NAME, plan.radius, plan.rho, dh, e)
            if m == "polynomial":
                raise planner.uncertified_error(e, lora_plan.RELATIVE_TO, where, failed)
            extra_reason = "" if nxt is None else " " + nxt.plan.reason
            plan = dataclasses.replace(
                plan, method="exact", reason=planner.uncertified(where, failed) + extra_reason,
                compute_dtype=validate.dtype_name(inp.dtype),
                extra={"tries": tries},
            )  # fmt: skip
            approx = None
            break
        plan, approx = nxt.plan, nxt.approx
    loss, dw = exact_gradients(inp, progress)
    grads = adapter_grads(inp, dw)
    used = next(iter(dw.values())).dtype
    if used != inp.dtype:  # the compute dtype's pass overflowed: say so
        plan = dataclasses.replace(
            plan,
            compute_dtype=validate.dtype_name(used),
            reason=plan.reason + " The exact pass overflowed in "
            f"{validate.dtype_name(inp.dtype)} and was repeated in float64.",
        )
    if tries:
        plan = dataclasses.replace(plan, extra={**plan.extra, "tries": tries})
    return LoraResult(loss, grads, None, plan, time.perf_counter() - t0)


def _poly_result(
    method: str,
    plan: Plan,
    approx: Approximation,
    cert: Certificate,
    tries: list[dict[str, Any]],
    inp: Inputs,
    loss: float,
    grads: dict[str, tuple[torch.Tensor, torch.Tensor]],
    dh: int,
    t0: float,
) -> LoraResult:
    worst = cert.worst()
    r = feature_count(dh, approx.degree)
    extra = {
        "relative_bound": worst,
        "relative_bounds": {mu: {"a": ra, "b": rb} for mu, (ra, rb) in cert.ratios.items()},
        "max_abs": {mu: {"a": ma, "b": mb} for mu, (ma, mb) in cert.maxabs.items()},
        "tries": tries,
        "adapted": sorted(inp.adapters),
        "route": "reverse mode through the factored forward (uses P and P')",
        "eps_meaning": "bound <= eps * (max|G computed| - bound) <= eps * max|G exact|",
    }
    where = planner.where(lora_plan.NAME, plan.radius, plan.rho, dh, plan.eps)
    after = f" after {len(tries)} tries" if len(tries) > 1 else ""
    claim = (
        f"{where} is certified a posteriori by "
        f"{planner.polynomial_phrase(approx.degree, approx.family, r, torch.float64)} "
        f"(relative gradient bound {worst:.2e}, worst over dA and dB{after})"
    )
    costs = planner.costs_phrase(plan.cost_polynomial or 0.0, plan.cost_exact or 0.0)
    reason = planner.chosen(method, claim, costs)
    plan = dataclasses.replace(
        plan, method="polynomial", reason=reason, family=approx.family, degree=approx.degree,
        features=r, predicted_bound=worst, compute_dtype="float64", extra=extra,
    )  # fmt: skip
    bounds: dict[str, tuple[float | None, float | None]] = {
        mu: tuple(v if math.isfinite(v) else None for v in pair)  # type: ignore[misc]
        for mu, pair in cert.bounds.items()
    }
    return LoraResult(loss, grads, bounds, plan, time.perf_counter() - t0)


def radius_only(inp: Inputs) -> float:
    """Radius of the centred scores (reported in the plan of the exact path)."""
    w = effective_weights(inp, torch.float64)
    x = inp.x.to(torch.float64)
    q, k = x @ w["q"], x @ w["k"]
    return matrix_radius(q, centre(k), inp.scale)
