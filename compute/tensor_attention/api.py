"""``compute.tensor_attention``: check, measure, plan, run, and report
(docs/tensor_attention.md)."""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from ..core import validate
from ..core.progress import Progress
from ..core.result import AttentionResult
from ..core.scaling import mul_pow2_, times_pow2
from . import native, shapes
from .balance import balance_shifts, normalise_into
from .exact import check_output_range, dtype_max, exact_wide, run_exact
from .plan import Problem, make_plan
from .polynomial import poly_core
from .stats import NAMES, statistics

__all__ = ["check_inputs", "sample_indices", "tensor_attention"]


def check_inputs(
    q: object, k1: object, k2: object, v1: object, v2: object
) -> tuple[torch.Tensor, ...]:
    """Five tensors: ``q [..., n, d]``, ``k1 [..., n1, d]``, ``k2 [..., n2, d]``, ``v1 [..., n1,
    dv]``, ``v2 [..., n2, dv]``, one device, equal leading dimensions."""
    ts = [
        validate.check_tensor(nm, x, finite=False)
        for nm, x in zip(NAMES, (q, k1, k2, v1, v2), strict=True)
    ]
    shapes.check_shapes({n: t.shape for n, t in zip(NAMES, ts, strict=True)})
    validate.check_same_device(NAMES, ts)
    tq, ta, tb, va, vb = ts
    return tq, ta, tb, va, vb


def sample_indices(n: int, rows: int, device: torch.device) -> torch.Tensor:
    """``min(rows, n)`` evenly spaced query rows, first and last included, the same in every
    slice (attention draws random rows over all slices: docs/contract.md says why)."""
    m = min(rows, n)
    if m >= n:
        return torch.arange(n, device=device)
    idx = torch.linspace(0, n - 1, steps=m, dtype=torch.float64).round().to(torch.int64)
    return torch.unique(idx).to(device)


@torch.no_grad()
def tensor_attention(
    q: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
    v1: torch.Tensor,
    v2: torch.Tensor,
    *,
    method: str = "auto",
    eps: float = 1e-3,
    scale: float | None = None,
    sample_rows: int = 0,
    progress: Progress | None = None,
) -> AttentionResult:
    """Tensor (triple-wise) softmax attention with a certified error bound.

    Arguments (any number of leading batch/head dimensions ``...``, equal on all five):

    * ``q: (..., n, d)`` queries; ``k1: (..., n1, d)``, ``k2: (..., n2, d)`` the two key sets;
      ``v1: (..., n1, dv)`` pairs with ``k1`` and ``v2: (..., n2, dv)`` with ``k2`` (``n1``
      and ``n2`` may differ; ``v1`` and ``v2`` share ``dv``).
    * ``scale``: multiplies the trilinear score; default ``1 / sqrt(d)`` (as
      ``compute.attention``; Alman–Song use ``1/d``, pass it explicitly for that convention).
    * ``method``: ``"exact"`` (blocked, cubic), ``"polynomial"`` (certified polynomial method;
      ``CertificationError`` if no polynomial of degree <= 24 certifies ``eps``) or ``"auto"``
      (polynomial when certified and predicted faster by the calibrated cost model, else exact;
      ``plan.reason`` says why, with the numbers).
    * ``eps``: allowed error relative to ``max |v1 ⊘ v2|`` (largest ``|v1[j1,k] v2[j2,k]|``):
      the polynomial path guarantees ``max |output - exact| <= error_bound <= eps *
      max|v1 ⊘ v2|``.
    * ``sample_rows``: when > 0, that many evenly spaced query rows (the same in every slice)
      are recomputed exactly in float64 and ``measured_error`` is the largest absolute
      difference.
    * ``progress(done, total)``: called after each block; an exception it raises propagates
      (``compute.Cancelled`` cancels).

    Output ``(..., n, dv)``, row i::

        out[i] = sum_{j1, j2} softmax_{(j1, j2)}(scale * sum_l q[i,l] k1[j1,l] k2[j2,l])
                 * (v1[j1] * v2[j2])

    No autograd graph is built (the output does not require grad), and inputs may be
    non-contiguous views. Dtypes: float16/bfloat16/float32 are computed in float32 (the
    polynomial path switches to float64 when float32 rounding cannot be certified below eps),
    float64 in float64; the output has the promoted input dtype. ``plan.radius`` is R3 (keys
    not centred) and ``plan.rho = R3 / ln(n_eff)`` with ``n_eff = (n n1 n2)^(1/3)``, at least
    2. ``compute.tensor_attention.naive`` is the float64 definition.

    Raises ``InvalidInputError`` (naming the argument) for non-tensors, unsupported dtypes,
    empty or non-finite tensors, fewer than 2 dimensions, mismatched leading dimensions,
    devices, ``d``, row counts (``v1``/``k1``, ``v2``/``k2``) or ``dv``, and bad ``method``,
    ``eps``, ``scale``, ``sample_rows`` or ``progress``.
    """
    start = time.perf_counter()
    tq, ta, tb, va, vb = check_inputs(q, k1, k2, v1, v2)
    method = validate.check_method(method)
    eps = validate.check_eps(eps)
    sample_rows = validate.check_sample_rows(sample_rows)
    progress = validate.check_progress(progress)
    lead = tuple(tq.shape[:-2])
    n, d = tq.shape[-2:]
    n1, n2, dv = ta.shape[-2], tb.shape[-2], va.shape[-1]
    sc = validate.check_scale(scale, d)
    batch = math.prod(lead)
    exact_dtype = validate.compute_dtype_of(tq, ta, tb, va, vb)
    out_dtype = validate.output_dtype_of(tq, ta, tb, va, vb)
    dev = tq.device

    def flat(x: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        return x.reshape(batch, x.shape[-2], x.shape[-1]).to(dt)

    fq, fa, fb, fv1, fv2 = (flat(x, exact_dtype) for x in (tq, ta, tb, va, vb))
    stats = statistics(fq, fa, fb, fv1, fv2, sc, native.reductions)  # raises for NaN/Inf
    e1, e2 = stats.e1, stats.e2  # [B, 1, dv] each
    top = float(stats.value_absmax.max()) if stats.value_absmax.size else 0.0
    target = eps * top
    shifts, scale_b, entry_max = balance_shifts(stats.maxima, sc, exact_dtype)
    problem = Problem(
        n=n,
        n1=n1,
        n2=n2,
        d=d,
        dv=dv,
        batch=batch,
        radius=stats.radius,
        eps=eps,
        value_max=top,
        target=target,
        scale=scale_b,
        entry_max=entry_max,
        value_range=stats.value_range,
        value_absmax=stats.value_absmax,
        value_scale=stats.value_scale,
        exact_dtype=exact_dtype,
        out_dtype=out_dtype,
        device=dev,
    )
    plan, choice = make_plan(problem, method)
    if choice is None:
        out, bound = run_exact(fq, fa, fb, fv1, fv2, sc, stats, progress, out_dtype)
        out = out.to(out_dtype)
        # the exact path's bound is a-priori too (from the statistics, before the kernel runs)
        plan = dataclasses.replace(plan, predicted_bound=bound)
    elif (kern := native.run_ok(choice.dtype, stats.xt, fv1, fv2)) is not None:
        out = native.run_native(
            kern,
            stats,
            shifts,
            fv1,
            fv2,
            n,
            n1,
            choice.approx,
            choice.chunk,
            scale_b,
            out_dtype,
            progress,
        )
        bound = choice.bound.total
    else:
        cd = choice.dtype
        xt = stats.xt.to(cd)  # [d, B, n+n1+n2]: [q | k1 | k2] transposed
        if shifts is not None:  # balance by powers of two: exact
            spans = ((0, n), (n, n + n1), (n + n1, n + n1 + n2))
            for (lo, hi), sh in zip(spans, shifts, strict=True):
                if sh != 0:
                    mul_pow2_(xt[:, :, lo:hi], sh)
        ve = torch.empty(batch, n1 + n2, dv + 1, dtype=cd, device=dev)  # [v1; v2 | 1]
        ve[..., dv].fill_(1.0)
        small = exact_dtype == torch.float32  # exponents of float32 data: |e1 + e2| <= 300
        for v, ex, lo, hi in ((fv1, e1, 0, n1), (fv2, e2, n1, n1 + n2)):
            normalise_into(ve[:, lo:hi, :dv], v, ex, direct=small)  # |v'| < 1
        t64 = poly_core(
            xt, ve, n, n1, choice.approx, scale_b, chunk=choice.chunk, progress=progress
        )  # [B, n, dv] float64
        out = times_pow2(t64, e1 + e2, direct=small).to(out_dtype)  # exact in float64
        bound = choice.bound.total
    if top * (1.0 + 1e-6) + (bound or 0.0) >= dtype_max(out_dtype):
        check_output_range(out, top)  # the output may not fit its dtype: say so, never inf
    measured = None
    if sample_rows > 0:
        rows = sample_indices(n, sample_rows, dev)
        ref = exact_wide(
            flat(tq, torch.float64)[:, rows],
            flat(ta, torch.float64),
            flat(tb, torch.float64),
            flat(va, torch.float64),
            flat(vb, torch.float64),
            sc,
            torch.float64,
        )  # [B, rows, dv]
        measured = float((out[:, rows].double() - ref).abs().max())
    return AttentionResult(
        output=out.reshape(*lead, n, dv),
        error_bound=bound,
        plan=plan,
        measured_error=measured,
        seconds=time.perf_counter() - start,
    )
