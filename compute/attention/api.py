"""``compute.attention``: check, measure, plan, run, and report (docs/attention.md)."""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch

from ..core import validate
from ..core.errors import CertificationError, InvalidInputError
from ..core.progress import Progress
from ..core.radius import centre
from ..core.result import AttentionResult
from ..core.rounding import subnormal_spacing, unit_roundoff
from . import native as native_route
from . import shapes
from .exact import exact_route, exact_wide, run_exact
from .plan import make_plan
from .polynomial import run_polynomial
from .stats import statistics

__all__ = ["SAMPLE_SEED", "attention", "check_shapes", "sample_error"]

SAMPLE_SEED = 0  # torch.Generator seed for sample_rows (reproducible)
NAMES = shapes.NAMES


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """The shape rule (``attention.shapes``, the service's too) and one device."""
    shapes.check_shapes({n: t.shape for n, t in zip(NAMES, (q, k, v), strict=True)})
    validate.check_same_device(NAMES, (q, k, v))


def sample_error(
    out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    causal: bool,
    rows: int,
) -> float:
    """Max abs error of ``out`` on ``rows`` random (slice, query) rows recomputed in float64.

    ``out, q: [L, n, .]``, ``k, v: [L, m, .]``. Rows are drawn without replacement over all
    slices by a CPU ``torch.Generator`` seeded with ``SAMPLE_SEED`` (reproducible); all rows
    when ``rows >= L n``. (Tensor attention samples evenly spaced rows per slice: docs/contract.md
    says why the two differ.)
    """
    L, n = q.shape[0], q.shape[1]
    gen = torch.Generator(device="cpu").manual_seed(SAMPLE_SEED)
    total = L * n
    flat = torch.randperm(total, generator=gen)[: min(rows, total)]
    worst = 0.0
    for sl in torch.unique(flat // n).tolist():
        idx = (flat[flat // n == sl] % n).to(q.device)  # [s]
        exact = exact_wide(
            q[sl : sl + 1, idx].double(),
            centre(k[sl : sl + 1].double()),  # shift invariance: scores that fit float64
            v[sl : sl + 1].double(),
            scale,
            causal=causal,
            dtype=torch.float64,
            positions=idx,
        )  # [1, s, dv]
        diff = (out[sl : sl + 1, idx].double() - exact).abs().max()
        worst = max(worst, float(diff))
    return worst


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    method: str = "auto",
    eps: float = 1e-3,
    scale: float | None = None,
    causal: bool = False,
    sample_rows: int = 0,
    progress: Progress | None = None,
) -> AttentionResult:
    """Softmax attention, exact or by the polynomial method, with a certified error bound.

    Reference semantics: ``torch.nn.functional.scaled_dot_product_attention(q, k, v,
    scale=scale, is_causal=causal)`` (``compute.attention.naive`` is the float64 definition).

    Args:
        q: ``(..., n, d)`` queries; any leading batch/head dims.
        k: ``(..., m, d)`` keys; same leading dims as q.
        v: ``(..., m, dv)`` values; ``dv`` may differ from d.
            float32 and float64 are computed in their own precision; float16 and bfloat16 are
            computed in float32. All on one device (CPU or CUDA; computed there).
        method: ``"exact"`` (blocked online softmax, never an n x m matrix), ``"polynomial"``
            (must certify ``eps`` or raises :class:`CertificationError`), or ``"auto"``
            (polynomial only where it is certified and predicted faster).
        eps: requested bound on ``max |output - exact|`` as a fraction of ``max |v|``, in (0, 1).
        scale: scores are ``scale * q k^T``; default ``1 / sqrt(d)``.
        causal: SDPA's ``is_causal=True``: query i sees keys ``j <= i`` (top-left aligned also
            when n != m).
        sample_rows: if > 0, that many random query rows (over all leading dims) are recomputed
            exactly in float64 and ``measured_error`` is their max abs error.
        progress: ``progress(done, total)`` after each block; an exception stops the work and
            propagates (raise :class:`compute.Cancelled` to cancel).

    Returns:
        :class:`AttentionResult`: ``output`` ``(..., n, dv)`` in the inputs' promoted dtype;
        ``error_bound``, the certified bound on ``max |output - exact|`` in output units
        (rounding included; for the exact method the rounding bound of the blocked softmax,
        docs/attention.md, "The exact path's bound"); ``plan`` (method, degree, features r,
        radius R, rho = R / ln m, predicted costs, reason); ``measured_error``.

    Raises:
        InvalidInputError: mismatched shapes or devices, non-finite values, unsupported dtype,
            empty tensors, eps outside (0, 1), unknown method, bad scale or sample_rows.
        CertificationError: ``method="polynomial"`` and no polynomial certifies ``eps``.
    """
    t0 = time.perf_counter()
    method = validate.check_method(method)
    eps = validate.check_eps(eps)
    # finiteness is read off statistics' reductions below
    q = validate.check_tensor("q", q, finite=False)
    k = validate.check_tensor("k", k, finite=False)
    v = validate.check_tensor("v", v, finite=False)
    if not _usual_shapes(q, k, v):
        check_shapes(q, k, v)  # raises, naming the tensor and the problem
    causal = validate.check_flag("causal", causal)
    sample_rows = validate.check_sample_rows(sample_rows)
    progress = validate.check_progress(progress)
    qs = q.shape
    d, dv = qs[-1], v.shape[-1]
    n, m = qs[-2], k.shape[-2]
    s = validate.check_scale(scale, d)
    lead = tuple(qs[:-2])
    device = q.device
    in_dtype = q.dtype
    if in_dtype == k.dtype == v.dtype:  # (the usual case of the two rules below)
        out_dtype = in_dtype
        cd = torch.float64 if in_dtype == torch.float64 else torch.float32
    else:
        cd = validate.compute_dtype_of(q, k, v)
        out_dtype = validate.output_dtype_of(q, k, v)
    q3 = _as3(q, n, d, cd)  # [L, n, d]
    k3 = _as3(k, m, d, cd)  # [L, m, d]
    v3 = _as3(v, m, dv, cd)  # [L, m, dv]
    L = q3.shape[0]
    if causal and m > n:  # keys beyond the last query are never visible (top-left mask)
        for name, x in (("k", k3[:, n:]), ("v", v3[:, n:])):  # statistics sees rows < n only
            if not bool(torch.isfinite(x).all()):
                raise InvalidInputError(name, "contains NaN or Inf")
        k3, v3, m = k3[:, :n], v3[:, :n], n
    # raises InvalidInputError on NaN/Inf; float32 CPU inputs: compiled, one pass per tensor
    stats = statistics(q3, k3, v3, s, native_route.reductions)
    R = stats.radius  # matrix_radius(q3, centre(k3), s)
    value_range = stats.value_range  # exact in float64
    value_absmax = stats.value_absmax
    # the computed midrange c may miss the true one by u |c| (plus half the subnormal spacing
    # when (hi + lo) / 2 underflows): widen the range accordingly
    value_range += 4.0 * unit_roundoff(cd) * value_absmax + 2.0 * subnormal_spacing(cd)
    # the exact path's route and certified bound, from the statistics alone (a few float64
    # operations): reported by an exact plan (not needed before a polynomial run)
    route = (
        None
        if method == "polynomial"
        else exact_route(
            q3,
            k3,
            stats,
            s,
            causal=causal,
            value_range=value_range,
            value_absmax=value_absmax,
            out_dtype=out_dtype,
        )
    )
    plan, cfg = make_plan(
        method=method,
        R=R,
        n_q=n,
        n_k=m,
        d=d,
        dv=dv,
        batch=L,
        eps=eps,
        value_range=value_range,
        value_absmax=value_absmax,
        compute_dtype=cd,
        out_dtype=out_dtype,
        causal=causal,
        device=device,
        exact_bound=None if route is None or not route.in_range else route.bound,
    )
    bound: float | None = None
    if cfg is not None:
        kern = native_route.kernel() if native_route.route_ok(cfg.dtype, device, causal) else None
        out3 = run_polynomial(
            q3,
            stats.k,  # [L, m, d]: centred as fl(k - mid) where loaded (shift invariance)
            v3,
            cfg,
            s,
            causal=causal,
            progress=progress,
            extremes=stats.extremes,
            native=native_route.bound_core(kern),
            key_mid=stats.mid,
        )
        bound = float(cfg.bound.total)
        if not _all_finite(out3):
            # overflow outside the model (extreme inputs)
            if method == "polynomial":
                raise CertificationError(
                    "method='polynomial': an intermediate overflowed for these inputs (extreme "
                    "entries); use method='exact' or 'auto'"
                )
            cfg, bound = None, None
            plan = dataclasses.replace(
                plan,
                method="exact",
                reason=plan.reason.rstrip(".") + "; an intermediate overflowed, so exact was run.",
                predicted_bound=None,
            )
        elif value_absmax + bound > float(torch.finfo(out_dtype).max) / 2.0:
            # near the top of the output dtype: clamp to the column's value range, where the
            # exact output lies (never increases the error; keeps the rounded output finite)
            ex = stats.extremes
            lo = ex.v_lo.to(out3.dtype).unsqueeze(1)  # [L, 1, dv]
            hi = ex.v_hi.to(out3.dtype).unsqueeze(1)
            out3 = torch.minimum(torch.maximum(out3, lo), hi)
    if cfg is None:
        out3, bound = run_exact(
            q3,
            k3,
            v3,
            stats,
            s,
            causal=causal,
            progress=progress,
            value_range=value_range,
            value_absmax=value_absmax,
            out_dtype=out_dtype,
            route=route,
        )
        # the exact path's bound is a-priori too (from the statistics, before the kernel runs)
        if plan.predicted_bound != bound:  # (the polynomial path overflowed: now known)
            plan = dataclasses.replace(plan, predicted_bound=bound)
    measured = None
    if sample_rows > 0:
        measured = sample_error(out3.to(out_dtype), q3, k3, v3, s, causal, sample_rows)
    if out3.dtype != out_dtype:
        out3 = out3.to(out_dtype)
    return AttentionResult(
        output=out3.reshape(*lead, n, dv),
        error_bound=bound,
        plan=plan,
        measured_error=measured,
        seconds=time.perf_counter() - t0,
    )


def _all_finite(x: torch.Tensor) -> bool:
    """Whether every entry of ``x`` is finite: exactly when both global extremes are (NaN
    propagates through min and max). On the CPU by numpy in the calling thread (a torch
    reduction of more than 32768 entries wakes torch's thread pool, which on a loaded machine
    cost milliseconds: docs/attention.md, "Small r against the floor"); elsewhere one
    ``aminmax`` and one sync."""
    if x.is_cpu and x.dtype in (torch.float32, torch.float64):
        a = x.detach().numpy()
        return a.size == 0 or bool(np.isfinite(a.min()) and np.isfinite(a.max()))
    return all(math.isfinite(t) for t in torch.stack(torch.aminmax(x)).tolist())


def _usual_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether ``check_shapes`` passes, decided from the shapes in a few comparisons (the
    usual case; otherwise ``check_shapes`` says what is wrong). ``check_tensor`` has already
    made every tensor at least 2-D and non-empty."""
    qs, ks, vs = q.shape, k.shape, v.shape
    return (
        ks[-1] == qs[-1]
        and vs[-2] == ks[-2]
        and qs[:-2] == ks[:-2] == vs[:-2]
        and ((q.is_cpu and k.is_cpu and v.is_cpu) or q.device == k.device == v.device)
    )


def _as3(x: torch.Tensor, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as ``[L, rows, cols]`` in ``dtype`` (no copy when it already is)."""
    x = x.reshape(-1, rows, cols)
    return x if x.dtype == dtype else x.to(dtype)
