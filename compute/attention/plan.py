"""Attention's planner: exact or polynomial, which degree, dtype and chunking, and why
(docs/attention.md, "Planner and cost model").

``select`` walks the degrees from 0 up (``core.planner.polynomials``) and, per degree, the
certifiable dtypes and float32 chunkings, and returns the first whose certified bound
(``bound.certified_bound``) meets ``eps * max|v|``; ``make_plan`` prices it against the exact
path. ``attention`` and ``plan_attention`` share both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..core import planner
from ..core.monomials import feature_count
from ..core.result import Plan
from ..core.rounding import unit_roundoff
from ..core.validate import check_count, check_flag, dtype_name
from .bound import certified_bound
from .cost import polynomial_floor, predict_exact, predict_polynomial
from .polynomial import CAUSAL_BLOCK, Config, geometry

__all__ = ["FLOAT32_CHUNKS", "MAX_FEATURES", "MAX_STATE_BYTES", "make_plan", "plan_attention"]

# r cap: the feature block and the float64 key state r (dv + 1) must stay small
MAX_FEATURES = 500_000
MAX_STATE_BYTES = 1 << 29  # cap on the float64 key state r * (dv + 1) * 8 bytes (512 MiB)
# float32 chunk lengths (key chunk, feature chunk), longest first; the first certified is used
FLOAT32_CHUNKS = ((512, 256), (256, 128), (128, 64), (64, 32))
NAME = "R"  # the radius, as the reason names it
WHAT_EXACT = "blocked exact attention"


@dataclass(frozen=True)
class Selection:
    config: Config | None
    why_not: str  # when config is None: one clause saying why no polynomial is usable
    degree_needed: int | None = None  # smallest certified degree even if infeasible
    features_needed: int | None = None


def float64_terms(n_k: int, rp: int, key_inner: int, feature_inner: int, causal: bool) -> int:
    """Longest chain of float64 roundings a term passes through (the rounding model's
    ``float64_terms``: block sums, chunk sums, weights)."""
    chain = -(-n_k // max(1, key_inner)) + -(-rp // max(1, feature_inner)) + 8
    return chain + (CAUSAL_BLOCK if causal else 0)


def select(
    *,
    R: float,
    d: int,
    dv: int,
    n_q: int,
    n_k: int,
    target: float,
    value_range: float,
    value_absmax: float,
    dtypes: tuple[torch.dtype, ...],
    out_dtype: torch.dtype,
    causal: bool,
    centring_dtype: torch.dtype,
) -> Selection:
    """Smallest certified degree, then the fastest certified dtype/chunking for it."""
    if not math.isfinite(R) or R > planner.MAX_RADIUS:
        return Selection(None, planner.beyond_regime(NAME, R))
    n_max = max(n_q, n_k)
    # the polynomial part of every bound below is at least t(approx) * value_range (rounding
    # only widens [dmin, dmax], and t grows with the interval): degrees whose own t already
    # misses the target are skipped without pricing any dtype or chunking (cached t table)
    start = planner.first_degree(R, target / value_range if value_range > 0.0 else math.inf)
    for approx in planner.polynomials(R, start=start):
        g = approx.degree
        r = feature_count(d, g)
        if not approx.t * value_range <= target * (1.0 + 1e-9):
            continue  # no dtype or chunking can certify this degree (see above)
        for dtype in dtypes:
            fp32 = dtype != torch.float64
            for ck_max, cr_max in FLOAT32_CHUNKS if fp32 else ((0, 0),):
                rr = min(r, MAX_FEATURES + 1)  # the geometry of an over-cap r is never used
                B, ck, cr, _, unit = geometry(
                    rr, n_max, fp32=fp32, key_chunk=ck_max, feature_chunk=cr_max, causal=causal
                )
                key_inner = unit if causal else (ck or B)  # inner lengths of the products
                feature_inner = cr or r
                f64_terms = float64_terms(n_k, r, key_inner, feature_inner, causal)
                if causal and n_q > n_k:
                    # rows >= n_k see every key and run the non-causal kernel with its own
                    # geometry (run_polynomial): certify the longer of the two inner lengths
                    B2, ck2, cr2, _, _ = geometry(
                        rr,
                        max(n_q - n_k, n_k),
                        fp32=fp32,
                        key_chunk=ck_max,
                        feature_chunk=cr_max,
                        causal=False,
                        block=B,
                    )
                    key_inner = max(key_inner, ck2 or B2)
                    feature_inner = max(feature_inner, cr2 or r)
                    f64_terms = max(f64_terms, float64_terms(n_k, r, ck2 or B2, cr2 or r, False))
                bound = certified_bound(
                    approx,
                    features=feature_inner,
                    block=key_inner,
                    compute_dtype=dtype,
                    out_dtype=out_dtype,
                    value_range=value_range,
                    value_absmax=value_absmax,
                    float64_terms=f64_terms,
                    centring_dtype=centring_dtype,
                    dimension=d,
                )
                if not bound.total <= target:  # (NaN-safe)
                    continue
                if r > MAX_FEATURES or r * (dv + 1) * 8 > MAX_STATE_BYTES:
                    return Selection(
                        None,
                        f"it needs degree {g} with r = {r:.3g} features, above the cap of "
                        f"{MAX_FEATURES:.3g}",
                        g,
                        r,
                    )
                cfg = Config(
                    approx,
                    dtype,
                    r,
                    B,
                    ck_max if fp32 else B,
                    cr_max if fp32 else r,
                    key_inner,
                    feature_inner,
                    f64_terms,
                    bound,
                )
                return Selection(cfg, "", g, r)
    u_out = unit_roundoff(out_dtype) if out_dtype in (torch.float16, torch.bfloat16) else 0.0
    if u_out * value_absmax > target:
        return Selection(
            None,
            f"rounding the output to {dtype_name(out_dtype)} alone (u = {u_out:.2g} of max|v|) "
            "exceeds it",
        )
    return Selection(
        None, f"no polynomial of degree <= {planner.MAX_DEGREE} certifies it at R = {R:.3g}"
    )


def make_plan(
    *,
    method: str,
    R: float,
    n_q: int,
    n_k: int,
    d: int,
    dv: int,
    batch: int,
    eps: float,
    value_range: float,
    value_absmax: float,
    compute_dtype: torch.dtype,
    out_dtype: torch.dtype,
    causal: bool,
    device: torch.device,
    exact_bound: float | None = None,
) -> tuple[Plan, Config | None]:
    """The plan and, when the polynomial path runs, its configuration. ``exact_bound``: the
    exact path's certified bound where the caller knows it (``attention``, from the
    statistics), reported as an exact plan's ``predicted_bound``."""
    rho = planner.rho(R, n_k)
    cost_exact = predict_exact(
        device, compute_dtype, batch=batch, n_q=n_q, n_k=n_k, d=d, dv=dv, causal=causal
    )
    base: dict[str, Any] = {
        "op": "attention",
        "radius": R,
        "rho": rho,
        "n": n_k,
        "d": d,
        "eps": eps,
        "cost_exact": cost_exact,
    }
    extra: dict[str, Any] = {"n_queries": n_q, "batch": batch, "dv": dv, "causal": causal}
    if method == "exact":
        reason = planner.exact_requested(WHAT_EXACT)
        plan = Plan(
            method="exact",
            reason=reason,
            compute_dtype=dtype_name(compute_dtype),
            predicted_bound=exact_bound,
            extra=extra,
            **base,
        )
        return plan, None
    target = eps * value_absmax
    dtypes = planner.certifiable_dtypes(compute_dtype)
    where = planner.where(NAME, R, rho, d, eps)
    if method == "auto" and R <= planner.MAX_RADIUS:
        # fast exit: no certified polynomial has fewer features than the first degree whose own
        # t meets the target, and none can beat exact when even that many features cost more
        # (polynomial_floor <= every prediction): exact, without pricing degrees and chunkings
        g0 = planner.first_degree(R, target / value_range if value_range > 0.0 else math.inf)
        r0 = feature_count(d, g0) if g0 <= planner.MAX_DEGREE else 0
        # (beyond the caps select says so in its own words)
        if 0 < r0 <= MAX_FEATURES and r0 * (dv + 1) * 8 <= MAX_STATE_BYTES:
            floor = polynomial_floor(
                device, dtypes, batch=batch, n_q=n_q, n_k=n_k, r=r0, d=d, dv=dv, causal=causal
            )
            if not planner.polynomial_wins(floor, cost_exact):  # nor does any prediction
                plan = Plan(
                    method="exact",
                    reason=planner.useless_polynomial(where, g0, r0, floor, cost_exact),
                    compute_dtype=dtype_name(compute_dtype),
                    # lower bounds here ("needs degree >= g0"): the family of that degree's best
                    family=planner.certified_best(R, g0).family,
                    degree=g0,
                    features=r0,
                    cost_polynomial=floor,
                    predicted_bound=exact_bound,
                    extra=extra,
                    **base,
                )
                return plan, None
    sel = select(
        R=R,
        d=d,
        dv=dv,
        n_q=n_q,
        n_k=n_k,
        target=target,
        value_range=value_range,
        value_absmax=value_absmax,
        dtypes=dtypes,
        out_dtype=out_dtype,
        causal=causal,
        centring_dtype=compute_dtype,
    )
    if sel.config is None:
        if method == "polynomial":
            raise planner.uncertified_error(eps, "max|v|", where, sel.why_not)
        plan = Plan(
            method="exact",
            reason=planner.uncertified(where, sel.why_not),
            compute_dtype=dtype_name(compute_dtype),
            degree=sel.degree_needed,
            features=sel.features_needed,
            predicted_bound=exact_bound,
            extra=extra,
            **base,
        )
        return plan, None
    cfg = sel.config
    a = cfg.approx
    cost_poly = predict_polynomial(
        device, cfg, batch=batch, n_q=n_q, n_k=n_k, d=d, dv=dv, causal=causal
    )
    rel = cfg.bound.total / value_absmax if value_absmax > 0 else 0.0
    claim = (
        f"{where} is certified by "
        f"{planner.polynomial_phrase(a.degree, a.family, cfg.features, cfg.dtype)} "
        f"(bound {rel:.2g} of max|v|)"
    )
    costs = planner.costs_phrase(cost_poly, cost_exact)
    extra.update(
        block=cfg.block,
        key_inner=cfg.key_inner,
        feature_inner=cfg.feature_inner,
        bound_polynomial=float(cfg.bound.polynomial),
        bound_rounding=float(cfg.bound.rounding),
    )
    fields: dict[str, Any] = {
        "family": a.family,
        "degree": a.degree,
        "features": cfg.features,
        "cost_polynomial": cost_poly,
        "compute_dtype": dtype_name(cfg.dtype),
        "predicted_bound": float(cfg.bound.total),
        "extra": extra,
    }
    if method == "polynomial" or planner.polynomial_wins(cost_poly, cost_exact):
        plan = Plan(
            method="polynomial", reason=planner.chosen(method, claim, costs), **fields, **base
        )
        return plan, cfg
    fields["compute_dtype"] = dtype_name(compute_dtype)
    fields["predicted_bound"] = exact_bound
    reason = planner.exact_instead(claim, cost_poly, cost_exact)
    plan = Plan(method="exact", reason=reason, **fields, **base)
    return plan, None


def plan_attention(
    *,
    n: int,
    d: int,
    radius: float,
    eps: float = 1e-3,
    causal: bool = False,
    dv: int | None = None,
    batch: int = 1,
    dtype: str = "float32",
    method: str = "auto",
    device: str | torch.device | None = None,
) -> Plan:
    """The plan :func:`compute.attention` would make, without data ("what would this cost").

    ``n`` queries and keys, head dimension ``d``, value dimension ``dv`` (default d), ``batch``
    independent slices (batch x heads), certified score radius ``radius`` (R, as
    ``attention`` would compute it), input ``dtype`` name, ``device`` whose calibrated rates
    price the paths (default :func:`compute.default_device`). Values are unknown, so the bound
    assumes the worst case ``value_range = 2 max|v|`` and reports ``predicted_bound`` as a
    fraction of ``max|v|``. ``method="polynomial"`` raises :class:`CertificationError` when no
    polynomial certifies ``eps``.
    """
    args = planner.check_plan_args(
        method=method, eps=eps, n=n, d=d, batch=batch, radius=radius, dtype=dtype, device=device
    )
    dv = args.d if dv is None else check_count("dv", dv)
    causal = check_flag("causal", causal)
    plan, _ = make_plan(
        method=args.method,
        R=args.radius,
        n_q=args.n,
        n_k=args.n,
        d=args.d,
        dv=dv,
        batch=args.batch,
        eps=args.eps,
        value_range=2.0 + 4.0 * unit_roundoff(args.compute_dtype),
        value_absmax=1.0,
        compute_dtype=args.compute_dtype,
        out_dtype=args.in_dtype,
        causal=causal,
        device=args.device,
    )
    return plan
