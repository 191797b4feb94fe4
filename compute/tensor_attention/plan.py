"""Tensor attention's planner: exact or polynomial, which degree, dtype and chunk, and why
(docs/tensor_attention.md, "method=auto").

``first_certified`` walks the degrees from 0 up (``core.planner.polynomials``) and, per degree,
the chunk lengths, longest first, and returns the first whose certified bound
(``bound.bound_parts``) meets ``eps * max|v1 ⊘ v2|``; ``choose`` tries float32 and float64
(``core.planner.certifiable_dtypes``) and keeps the cheaper; ``make_plan`` prices it against
the exact path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..core import planner
from ..core.cost import predict_exact_attention, predict_polynomial_attention, rates
from ..core.monomials import feature_count, weight_max
from ..core.polynomials import Approximation
from ..core.result import Plan
from ..core.rounding import BoundParts
from ..core.validate import check_count, dtype_name
from . import native, polynomial
from .bound import bound_parts, overflow_safe, rounding_coefficients

__all__ = [
    "FLOAT32_CHUNKS",
    "FLOAT64_CHUNK",
    "MAX_FEATURES",
    "Choice",
    "Problem",
    "make_plan",
    "plan_tensor_attention",
]

MAX_FEATURES = 1 << 22  # larger feature maps are never planned (memory of one feature block)
# Inner lengths of the compute-dtype dot products of the polynomial path. The partial sums are
# added in float64, so the worst-case rounding (gamma_K) sees these, not n or r. float32 takes
# the longest chunk that still certifies eps (fewer, larger products); float64 one fixed length.
FLOAT32_CHUNKS = (512, 256, 128, 64, 32, 16)
FLOAT64_CHUNK = 4096
NAME = "R3"  # the radius, as the reason names it
WHAT_EXACT = "blocked exact tensor attention"


@dataclass(frozen=True)
class Choice:
    """One certified way to run the polynomial path."""

    approx: Approximation
    dtype: torch.dtype
    features: int
    chunk: int
    bound: BoundParts
    cost: float


@dataclass(frozen=True)
class Problem:
    """Everything the planner needs; from real inputs or from ``plan_tensor_attention``."""

    n: int
    n1: int
    n2: int
    d: int
    dv: int
    batch: int
    radius: float
    eps: float
    value_max: float  # max |v1 ⊘ v2|: eps is relative to it
    target: float  # absolute error allowed: eps * value_max
    scale: float  # balanced scale'
    entry_max: float
    value_range: np.ndarray  # [B*dv] float64
    value_absmax: np.ndarray  # [B*dv] float64
    value_scale: np.ndarray  # [B*dv] float64: 2^(e1+e2), 0 for all-zero columns
    exact_dtype: torch.dtype
    out_dtype: torch.dtype
    device: torch.device


def chunk_options(dtype: torch.dtype, features: int) -> tuple[int, ...]:
    """Chunk lengths to try, longest first; ``features * chunk`` fits one feature block."""
    cap = max(1, polynomial.FEATURE_BLOCK // max(1, features))
    if dtype == torch.float32:
        return tuple(c for c in FLOAT32_CHUNKS if c <= cap)
    return (1 << (min(FLOAT64_CHUNK, cap).bit_length() - 1),)


def first_certified(
    p: Problem, dtype: torch.dtype, max_degree: int = planner.MAX_DEGREE
) -> Choice | None:
    """Lowest degree whose certified bound meets ``p.target`` in ``dtype`` (None if none)."""
    range_max = float(p.value_range.max()) if p.value_range.size else 0.0
    vavs = np.stack([p.value_absmax, p.value_scale])  # [2, B*dv]
    for approx in planner.polynomials(p.radius, max_degree):
        if approx.t * range_max > p.target:
            continue  # the approximation term alone is too large
        r = feature_count(p.d, approx.degree)
        if r > MAX_FEATURES:
            return None
        if approx.dmin <= -1.0:
            continue
        w_max = weight_max(approx, p.scale)
        if not overflow_safe(
            degree=approx.degree,
            features=r,
            n1=p.n1,
            n2=p.n2,
            weight_max=w_max,
            entry_max=p.entry_max,
            dtype=dtype,
        ):
            continue
        for chunk in chunk_options(dtype, r):  # longest first: fewest products
            coef = rounding_coefficients(
                approx,
                features=r,
                n1=p.n1,
                n2=p.n2,
                compute_dtype=dtype,
                out_dtype=p.out_dtype,
                weight_max=w_max,
                entry_max=p.entry_max,
                chunk=chunk,
            )
            bound = bound_parts(approx.t, coef, p.value_range, vavs)  # = tensor_rounding_bound
            if bound.total <= p.target:
                return Choice(approx, dtype, r, chunk, bound, poly_cost(p, dtype, r))
    return None


def poly_cost(p: Problem, dtype: torch.dtype, r: int) -> float:
    """Predicted seconds of the polynomial path: the compiled kernel's calibrated rate where it
    will run (float32 on the CPU), else the PyTorch route's cost model (``core.cost``)."""
    if native.route_ok(dtype, p.device):
        rate = native.native_rate()
        if rate > 0.0:
            return p.batch * (p.n + p.n1 + p.n2) * r * (p.dv + 1) / rate
    return predict_polynomial_attention(
        rates(p.device, dtype), batch=p.batch, n_q=p.n, n_k=p.n1 + p.n2, r=r, dv=p.dv
    )


def choose(p: Problem) -> Choice | None:
    """Cheapest certified (degree, compute dtype); float32 first, float64 when it helps."""
    dtypes = planner.certifiable_dtypes(p.exact_dtype)
    if dtypes == (torch.float64,):
        return first_certified(p, torch.float64)
    c32 = first_certified(p, torch.float32)
    if c32 is not None and c32.approx.degree <= 1:
        return c32
    top = planner.MAX_DEGREE if c32 is None else c32.approx.degree - 1
    c64 = first_certified(p, torch.float64, top)  # only a lower degree can beat float32
    options = [c for c in (c32, c64) if c is not None]
    return min(options, key=lambda c: c.cost) if options else None


def make_plan(p: Problem, method: str) -> tuple[Plan, Choice | None]:
    """The plan and, when the polynomial path runs, its choice."""
    rho = planner.rho(p.radius, p.n, p.n1, p.n2)
    cost_exact = predict_exact_attention(
        rates(p.device, p.exact_dtype), batch=p.batch, n_q=p.n * p.n1, n_k=p.n2, d=p.d, dv=p.dv
    )
    choice = None if method == "exact" else choose(p)
    where = planner.where(NAME, p.radius, rho, p.d, p.eps)
    if method == "exact":
        reason = planner.exact_requested(WHAT_EXACT)
    elif choice is None:
        if not p.radius <= planner.MAX_RADIUS:
            why = planner.beyond_regime(NAME, p.radius)
        else:
            why = (
                f"no polynomial of degree <= {planner.MAX_DEGREE} with at most "
                f"{MAX_FEATURES:.3g} features certifies it"
            )
        if method == "polynomial":
            raise planner.uncertified_error(p.eps, "max|v1 ⊘ v2|", where, why)
        reason = planner.uncertified(where, why)
    else:
        a = choice.approx
        rel = choice.bound.total / p.value_max if p.value_max > 0 else 0.0
        claim = (
            f"{where} is certified by "
            f"{planner.polynomial_phrase(a.degree, a.family, choice.features, choice.dtype)} "
            f"(bound {rel:.2g} of max|v1 ⊘ v2|)"
        )
        costs = planner.costs_phrase(choice.cost, cost_exact)
        if method == "polynomial" or planner.polynomial_wins(choice.cost, cost_exact):
            reason = planner.chosen(method, claim, costs)
        else:
            reason = planner.exact_instead(claim, choice.cost, cost_exact)
            choice = None
    extra: dict[str, Any] = {
        "n1": p.n1,
        "n2": p.n2,
        "dv": p.dv,
        "batch": p.batch,
        "scale_balanced": p.scale,
    }
    base: dict[str, Any] = {
        "op": "tensor-attention",
        "reason": reason,
        "radius": p.radius,
        "rho": rho,
        "n": p.n,
        "d": p.d,
        "eps": p.eps,
        "cost_exact": cost_exact,
        "extra": extra,
    }
    if choice is None:
        return Plan(method="exact", compute_dtype=dtype_name(p.exact_dtype), **base), None
    extra["bound_parts"] = choice.bound.to_dict()
    extra["chunk"] = choice.chunk
    a = choice.approx
    plan = Plan(
        method="polynomial",
        family=a.family,
        degree=a.degree,
        features=choice.features,
        cost_polynomial=choice.cost,
        compute_dtype=dtype_name(choice.dtype),
        predicted_bound=choice.bound.total,
        **base,
    )
    return plan, choice


def plan_tensor_attention(
    *,
    n: int,
    d: int,
    radius: float,
    eps: float = 1e-3,
    dv: int | None = None,
    batch: int = 1,
    dtype: str = "float32",
    method: str = "auto",
    device: str | torch.device | None = None,
) -> Plan:
    """The plan :func:`compute.tensor_attention` would make, without inputs and without computing.

    ``n`` is the length of each of q, k1, k2 (v1, v2); ``d`` the head dimension; ``radius`` a
    certified bound R3 on ``|scale| sum_l |q_l k1_l k2_l|``; ``dv`` the value dimension
    (default ``d``); ``batch`` the number of leading slices; ``dtype`` the input dtype name;
    ``device`` whose calibrated rates price the paths (default :func:`compute.default_device`).
    The values are unknown, so the worst case ``range(v1 ⊘ v2) = 2 max|v1 ⊘ v2|`` is assumed,
    and balanced entries (``<= (16 R3)^(1/3)``, ``|scale'| < 4``); a plan made from real inputs
    can only pick an equal or lower degree. Raises ``CertificationError`` for
    ``method="polynomial"`` when no polynomial certifies ``eps``.
    """
    args = planner.check_plan_args(
        method=method, eps=eps, n=n, d=d, batch=batch, radius=radius, dtype=dtype, device=device
    )
    dv = args.d if dv is None else check_count("dv", dv)
    problem = Problem(
        n=args.n,
        n1=args.n,
        n2=args.n,
        d=args.d,
        dv=dv,
        batch=args.batch,
        radius=args.radius,
        eps=args.eps,
        value_max=1.0,
        target=args.eps,
        scale=4.0,
        entry_max=max(1.0, (16.0 * args.radius) ** (1.0 / 3.0)),
        value_range=np.full(1, 2.0),
        value_absmax=np.ones(1),
        value_scale=np.full(1, 4.0),
        exact_dtype=args.compute_dtype,
        out_dtype=args.in_dtype,
        device=args.device,
    )
    return make_plan(problem, args.method)[0]
