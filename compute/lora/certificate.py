"""The a-posteriori certificate of LoRA's polynomial gradient (docs/lora_bound.md; the section
and equation numbers in the comments are that document's).

``prepare`` (§2): float64 projections, centred keys and values, and the norms the bound needs.
``constants`` (§3, §5, §6, §A): the relative errors of the surrogate weights and the rounding
terms. ``row_bound`` / ``col_bound`` (§4): per-row bounds from the run's own residuals and
factored sums of non-negative weights, computed alongside the backward passes. ``certify``
(§7): through ``|X|^T``, ``|B|^T``, ``|A|^T`` to the adapters, and the meaning of eps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.monomials import feature_count
from ..core.polynomials import Approximation, abs_sum, derivative, tv_factor
from ..core.radius import column_midrange, matrix_radius
from ..core.rounding import U64, gamma, unit_roundoff
from .inputs import ADAPTER_NAMES, Inputs

__all__ = [
    "EPS_MODES",
    "ESTIMATORS",
    "Certificate",
    "Consts",
    "Prepared",
    "certify",
    "col_bound",
    "constants",
    "prepare",
    "rounding_bounds",
    "row_bound",
    "weight_errors",
]

ESTIMATORS = ("reverse", "chained")  # polynomial.py's reverse mode; chained.py (§10)
BOUND_INFLATE = 1.0 + 1e-6  # covers float64 rounding in evaluating the bound itself
SCALE_DEFLATE = 1.0 - 1e-6  # the same for the lower bound of the natural scale (§7b)
UNDERFLOW_GUARD = 1e-280  # absolute: covers gradual underflow (docs/lora_bound.md §6)


@dataclass(frozen=True)
class Prepared:
    """Centred float64 projections and the data summaries the bound needs (docs/lora_bound.md
    §2)."""

    q: torch.Tensor  # [nb, L, dh]
    kc: torch.Tensor  # [nb, L, dh]  K - c_K
    vc: torch.Tensor  # [nb, L, dh]  V - c_V
    yc: torch.Tensor  # [nb, L, dh]  Y - c_V
    x: torch.Tensor  # [nb, L, dm]
    radius: float  # R: bounds |S| of exact and computed scores and the absolute-value sums
    sigma: float  # score perturbation by projection rounding
    e_q: float
    e_kc: float
    e_vc: float
    e_yc: float
    kinf: torch.Tensor  # [nb, dh]  max_j |K_c[j, l]| (+ error)
    q1: torch.Tensor  # [nb, dh]  mean_i |Q[i, l]| (+ error)
    nu: torch.Tensor  # [nb]  max_j ||V_c[j]||_2 (+ error)
    ebar: torch.Tensor  # [nb]  max_i ||Y_c[i]||_2 (+ error) + nu
    vrange: torch.Tensor  # [nb, dh]  max_j Vc[j, k] - min_j Vc[j, k] (computed values)
    kmax: torch.Tensor  # [nb, dh]  max_j |Kc[j, l]| (computed values)
    vrange_lo: torch.Tensor  # [nb, dh]  lower bound of the exact centred values' range (§7b)


def prepare(inp: Inputs) -> Prepared:
    """float64 projections, centring and the norms of docs/lora_bound.md §2 (O(L d_model d))."""
    f64 = torch.float64
    x = inp.x.to(f64)  # [nb, L, dm]
    ax = x.abs()
    dm = x.shape[-1]
    dh = inp.y.shape[-1]
    proj: dict[str, torch.Tensor] = {}
    errs: dict[str, float] = {}
    for mu in ADAPTER_NAMES:
        wstar = inp.w[mu].to(f64)  # [dm, dh]
        if mu in inp.adapters:
            a, b = (t.to(f64) for t in inp.adapters[mu])
            s = inp.alpha / a.shape[0]
            w = wstar + s * (b @ a)  # [dm, dh]
            wabs = w.abs() + wstar.abs() + abs(s) * (b.abs() @ a.abs())
            coef = gamma(dm) + gamma(a.shape[0] + 2)
        else:
            w = wstar
            wabs = wstar.abs()
            coef = gamma(dm)
        proj[mu] = x @ w  # [nb, L, dh]
        errs[mu] = coef * float((ax @ wabs).amax()) * BOUND_INFLATE
    q, k, v = proj["q"], proj["k"], proj["v"]
    ck = column_midrange(k)  # [nb, 1, dh]
    cv = column_midrange(v)
    kc, vc = k - ck, v - cv
    yc = inp.y.to(f64) - cv
    e_q = errs["q"]
    g1 = gamma(1)
    e_kc = errs["k"] + g1 * float(kc.abs().amax())
    e_vc = errs["v"] + g1 * float(vc.abs().amax())
    e_yc = g1 * float(yc.abs().amax())
    aq = q.abs() + e_q  # [nb, L, dh]
    ak = kc.abs() + e_kc
    radius = matrix_radius(aq, ak, inp.scale)
    sigma = (
        abs(inp.scale)
        * (e_q * float(ak.sum(-1).amax()) + e_kc * float(aq.sum(-1).amax()))
        * BOUND_INFLATE
    )
    kinf = ak.amax(dim=1)  # [nb, dh]
    q1 = aq.mean(dim=1) * BOUND_INFLATE  # [nb, dh]
    sq = math.sqrt(dh)
    nu = (vc.norm(dim=-1).amax(dim=1) + sq * e_vc) * BOUND_INFLATE  # [nb]
    ebar = (yc.norm(dim=-1).amax(dim=1) + sq * e_yc) * BOUND_INFLATE + nu  # [nb]
    vrange = (vc.amax(dim=1) - vc.amin(dim=1)) * (1 + 2 * U64)  # [nb, dh]  (one rounding)
    kmax = kc.abs().amax(dim=1)  # [nb, dh]  exact
    # §7b: range_k(V) >= range_k(V^c) - 2 e_Vc (each entry within e_Vc), the difference
    # rounded once
    vrange_lo = ((vc.amax(dim=1) - vc.amin(dim=1)) * (1 - 2 * U64) - 2 * e_vc).clamp(min=0.0)
    del dm
    return Prepared(
        q=q, kc=kc, vc=vc, yc=yc, x=x, radius=radius, sigma=sigma, e_q=e_q, e_kc=e_kc,
        e_vc=e_vc, e_yc=e_yc, kinf=kinf, q1=q1, nu=nu, ebar=ebar, vrange=vrange, kmax=kmax,
        vrange_lo=vrange_lo,
    )  # fmt: skip


def _ratio_range(x0: float, x1: float, y0: float, y1: float) -> tuple[float, float]:
    """Range of ``x / y`` for ``x in [x0, x1]``, ``y in [y0, y1]``, ``y0 > 0``."""
    lo = min(x0 / y0, x0 / y1)
    hi = max(x1 / y0, x1 / y1)
    return lo, hi


def weight_errors(approx: Approximation, sigma: float) -> tuple[float, ...]:
    """§3: ``(a1, b1, theta, eta, omega, lam)`` of the weights for scores perturbed by sigma."""
    a0, b0 = approx.dmin, approx.dmax
    ad, bd = approx.derivative_range()
    es, ems = math.exp(sigma), math.exp(-sigma)
    a1, b1 = (1 + a0) * ems - 1, (1 + b0) * es - 1
    if a1 <= -1.0:
        inf = math.inf
        return a1, b1, inf, inf, inf, inf
    a1d = (1 + ad) * (ems if 1 + ad >= 0 else es) - 1
    b1d = (1 + bd) * (es if 1 + bd >= 0 else ems) - 1
    th_lo, th_hi = _ratio_range(1 + a1, 1 + b1, 1 + a1, 1 + b1)
    theta = max(abs(th_lo - 1), abs(th_hi - 1))  # |F~/F - 1|
    et_lo, et_hi = _ratio_range(1 + a1d, 1 + b1d, 1 + a1, 1 + b1)
    eta = max(abs(et_lo - 1), abs(et_hi - 1))  # |F'~/F - 1|
    lam = max(abs(et_lo), abs(et_hi))  # |F'~/F|
    omega = (1 + b1) / (1 + a1)  # F <= omega F~
    return a1, b1, theta, eta, omega, lam


@dataclass(frozen=True)
class Consts:
    """Constants of the a-posteriori bound for one approximation (docs/lora_bound.md §3-§6).

    Scalars are per approximation; tensors are per slice ``[nb]`` or per slice and column
    ``[nb, d]``.
    """

    omega: float  # §3: F_ij <= omega F~_ij
    theta: float  # §3: |F~_ij / F_ij - 1| <= theta
    eta: float  # §3: |F'~_ij / F_ij - 1| <= eta
    c1: float  # §A: factored sum bound T~ <= c1 |T^| + c2 zmax
    c2: float
    c1_lo: float  # §7b: T~ >= c1_lo T^ - c2 zmax
    e_ehat: torch.Tensor  # [nb]     §5: |E^_ik - E~_ik| <= e_ehat
    e_o: torch.Tensor  # [nb, d]  §4.1: |O~_ik - O_ik| <= e_o[k]
    e_e: torch.Tensor  # [nb, d]  §4.2: |E~_ik - E_ik| <= e_e[k]
    vrange: torch.Tensor  # [nb, d]  column range of the computed centred values
    vrange_lo: torch.Tensor  # [nb, d]  lower bound of the exact values' column range (§7b)
    kmax: torch.Tensor  # [nb, d]  max_j |K^c_jl|
    e_q: float
    e_kc: float
    e_vc: float
    round_q: torch.Tensor  # [nb, d]  §6: input perturbation + term rounding of dQ (per column)
    round_k: torch.Tensor  # [nb, d]
    round_v: torch.Tensor  # [nb, d]


def constants(
    prep: Prepared,
    approx: Approximation,
    *,
    L: int,
    dh: int,
    scale: float,
    blocking: tuple[int, int],
    estimator: str = "reverse",
) -> Consts | str:
    """The constants of docs/lora_bound.md §3, §5, §6, §A; a string says why none certify.

    ``blocking``: rows per block and number of blocks of the polynomial passes (§5 counts
    the additions of the blocked sums). ``estimator="chained"`` (docs/lora_bound.md §10): the
    backward weights are ``F~`` instead of ``F'~``, so ``eta := theta``, ``lam := 1 + theta``
    and ``kappa' := kappa`` (§10.2, §10.3); everything else is shared.
    """
    beta = abs(scale)
    R = prep.radius
    g = approx.degree
    r = feature_count(dh, g)
    sq = math.sqrt(dh)
    u = U64
    # §5: roundings along any term's path; a sum over keys (queries) is blocked: at most blk
    # additions inside one block's GEMM and one per later block's accumulation
    blk, nblocks = blocking
    n_chain = 3 * g + 16 + blk + nblocks + r + 2 * dh + 2
    gam = gamma(n_chain)
    # §3: relative error ranges of P and P' on |s| <= R, widened by the score perturbation sigma
    a1, b1, theta, eta, omega, lam = weight_errors(approx, prep.sigma)
    if a1 <= -1.0:
        return "the polynomial's relative error reaches -1 (P may vanish)"
    t1 = tv_factor(a1, b1)
    # §5: rounding of the factored sums
    kappa = math.exp(R) * abs_sum(approx.coeffs, R)
    kappa_d = math.exp(R) * abs_sum(derivative(approx.coeffs), R)
    if estimator == "chained":
        # §10.2-10.3: the chained backward weighs by F~ (P, not P'): |F~ / F - 1| <= theta,
        # |F~ / F| <= 1 + theta, and its terms sum to P^abs, not P'^abs
        eta, lam, kappa_d = theta, 1.0 + theta, kappa
    zeta = gam * kappa / (1 + a1)
    if not math.isfinite(zeta) or zeta >= 0.5:
        return "float64 rounding of the factored sums is not certifiably small"
    tau = (u + zeta) / (1 - zeta)
    e2r = math.exp(2 * R)
    nu, ebar = prep.nu, prep.ebar  # [nb]
    e_ohat = nu * (tau + gam * kappa * (1 + u) / ((1 + a1) * (1 - zeta)))  # [nb]
    ehat = (ebar + sq * e_ohat) * (1 + u)
    nu_o = nu + sq * e_ohat
    e_ehat = sq * e_ohat + u * ehat  # [nb]  |E^_ik - E~_ik| <= ||E^_i - E~_i||
    gdv = gamma(dh)
    dbar = ehat * nu_o * (1 + gdv)
    e_d = e_ehat * nu_o + ebar * sq * e_ohat + gdv * ehat * nu_o
    psi = nu * (e_ehat + ehat * tau) + (e_d + dbar * tau)  # §5: den * |C^ - C~| terms
    r_qk = gam * kappa_d * (1 + u) * (ehat * nu + dbar) / ((1 + a1) * (1 - zeta))  # §6
    r_v = gam * kappa * ehat * (1 + u) / ((1 + a1) * (1 - zeta))
    kinf, q1 = prep.kinf, prep.q1  # [nb, dh]
    # §6: per-column input perturbation and term rounding of the backward
    round_q = beta * kinf * (lam * psi + r_qk)[:, None]
    round_k = beta * q1 * (e2r * lam * psi + r_qk)[:, None]
    round_v = ((1 + theta) * e2r * (e_ehat + ehat * tau) + r_v)[:, None].expand(-1, dh)
    # §4.1-4.2: per-column error of the surrogate output and residual
    e_o = t1 * prep.vrange + prep.e_vc  # [nb, dh]
    e_e = e_o + prep.e_yc
    # §A: factored sums of non-negative weights
    c1 = (1 + zeta) / (1 - u)
    c2 = gam * kappa * (1 + zeta) * (1 + u) / ((1 + a1) * (1 - zeta) * (1 - u))
    c1_lo = (1 - zeta) / (1 + u)  # §7b
    return Consts(
        omega=omega, theta=theta, eta=eta, c1=c1, c2=c2, c1_lo=c1_lo, e_ehat=e_ehat, e_o=e_o,
        e_e=e_e, vrange=prep.vrange, vrange_lo=prep.vrange_lo, kmax=prep.kmax, e_q=prep.e_q,
        e_kc=prep.e_kc, e_vc=prep.e_vc,
        round_q=round_q, round_k=round_k, round_v=round_v.contiguous(),
    )  # fmt: skip


def _lo(x: torch.Tensor) -> torch.Tensor:
    """A computed non-negative quantity deflated by its float64 evaluation error (§7b)."""
    return x.clamp(min=0.0) * SCALE_DEFLATE


def row_bound(
    cert: Consts, tk_hat: torch.Tensor, e_hat: torch.Tensor, q: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query row (docs/lora_bound.md §4.3-§4.5, §7b): the z weights, the dQ bound and the
    lower bound of the natural scale ``N_Q``.

    ``tk_hat: [nb, b, d]`` computed ``sum_j F~_ij |Kc_jl|``; ``e_hat, q: [nb, b, d]``.
    Returns ``z = [a |Q|, b, |E^|, 1, h_lo (|Q| - e_Q)+]`` ``[nb, b, 3d+2]``, ``err_q`` and
    ``nq_lo`` ``[nb, b, d]``.
    """
    vr = cert.vrange[:, None, :]  # [nb, 1, d]
    e_e = cert.e_e[:, None, :]  # [nb, 1, d]
    e_o = cert.e_o[:, None, :]
    ae = e_hat.abs() + cert.e_ehat[:, None, None]  # [nb, b, d]  >= |E~_ik|        (§4.3)
    hq = (ae * vr).sum(-1, keepdim=True)  # [nb, b, 1]   >= |H~_ij|                   (4.3a)
    e_h = (e_e * vr).sum(-1, keepdim=True) + ((ae + e_e) * (cert.e_vc + e_o)).sum(
        -1, keepdim=True
    )  # [nb, b, 1]  >= |H~_ij - H_ij|                            (4.3b)
    a = cert.eta * hq + e_h  # [nb, b, 1]  |dS~ - dS| <= F a                            (4.4)
    b = hq + e_h  # [nb, b, 1]            |dS| <= F b
    tk = cert.c1 * tk_hat.abs() + cert.c2 * cert.kmax[:, None, :]  # >= sum_j F~|K|  (A.1)
    err_q = beta * (a * cert.omega * tk + b * cert.e_kc) + cert.round_q[:, None, :]  # (4.5)
    # §7b: h_i = sum_k |E_ik| range_k(V) >= h_lo (|E_ik| >= |E^_ik| - e_E^ - e_E,k), and
    # sum_j F_ij |K_jl - c_l| >= (c1_lo T^_i - c2 kmax_l) / omega - e_Kc          (7.4), (7.5)
    ae_lo = _lo(e_hat.abs() - (cert.e_ehat[:, None, None] + e_e) * BOUND_INFLATE)
    h_lo = _lo((ae_lo * cert.vrange_lo[:, None, :]).sum(-1, keepdim=True))  # [nb, b, 1]
    tk_lo = _lo(
        (cert.c1_lo * tk_hat - cert.c2 * cert.kmax[:, None, :] * BOUND_INFLATE) / cert.omega
        - cert.e_kc * BOUND_INFLATE
    )
    nq_lo = _lo(beta * h_lo * tk_lo)  # [nb, b, d]                                     (7.6)
    ones = torch.ones_like(a)
    q_lo = _lo(q.abs() - cert.e_q * BOUND_INFLATE)  # <= |Q_il|
    z = torch.cat([a * q.abs(), b, e_hat.abs(), ones, h_lo * q_lo], dim=-1)  # [nb, b, 3d+2]
    return z, err_q, nq_lo


def col_bound(
    cert: Consts, t_hat: torch.Tensor, zmax: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per key row (docs/lora_bound.md §4.6-§4.7, §7b) from computed column sums
    ``[nb, b, 3d+2]``: ``err_k, err_v`` and the natural-scale lower bounds ``nk_lo, nv_lo``."""
    d = cert.vrange.shape[-1]
    t = cert.c1 * t_hat.abs() + cert.c2 * zmax  # [nb, b, 3d+2]  >= sum_i F~_ij z_i  (A.2)
    err_k = beta * cert.omega * (t[..., :d] + cert.e_q * t[..., d : d + 1])  # (4.6)
    err_k = err_k + cert.round_k[:, None, :]
    tau_e, tau_1 = t[..., d + 1 : 2 * d + 1], t[..., 2 * d + 1 : 2 * d + 2]
    e_e = cert.e_e[:, None, :]
    err_v = cert.omega * (
        cert.theta * tau_e + (cert.theta * cert.e_ehat[:, None, None] + e_e) * tau_1
    )  # (4.7)
    # §7b: lower bounds of sum_i F~_ij z_i (A.3), then F >= F~ / omega
    t_lo = cert.c1_lo * t_hat - cert.c2 * zmax * BOUND_INFLATE  # [nb, b, 3d+2]
    nk_lo = _lo(beta * _lo(t_lo[..., 2 * d + 2 :]) / cert.omega)  # (7.7)
    e_lo = (cert.e_ehat[:, None, None] + e_e) * BOUND_INFLATE  # [nb, 1, d]
    nv_lo = _lo((t_lo[..., d + 1 : 2 * d + 1] - e_lo * tau_1 * BOUND_INFLATE) / cert.omega)  # (7.8)
    return err_k, err_v + cert.round_v[:, None, :], nk_lo, nv_lo


EPS_MODES = ("scale", "strict")


@dataclass(frozen=True)
class Certificate:
    """A-posteriori certificate of one polynomial run (docs/lora_bound.md §7, §7b)."""

    bounds: dict[str, tuple[float, float]]  # max-abs error bound of (dA, dB) per adapter
    maxabs: dict[str, tuple[float, float]]  # max |computed dA|, max |computed dB|
    ratios: dict[str, tuple[float, float]]  # strict: b / (max|G~| - b) (inf when max|G~| <= b)
    scales: dict[str, tuple[float, float]]  # certified lower bound of max N(G) (§7b)
    scale_ratios: dict[str, tuple[float, float]]  # scale: b / N_lo (inf when N_lo = 0)

    def of(self, mode: str) -> dict[str, tuple[float, float]]:
        """The ratios eps bounds in ``mode`` (scale: b / N_lo; strict: b / (max|G~| - b))."""
        return self.scale_ratios if mode == "scale" else self.ratios

    def worst(self, mode: str = "strict") -> float:
        return max((x for pair in self.of(mode).values() for x in pair), default=0.0)

    def worst_raw(self) -> float:
        """Largest ``b / max|G~|`` (finite even where ``b >= max|G~|``; for the retry)."""
        out = 0.0
        for mu, pair in self.bounds.items():
            for b, m in zip(pair, self.maxabs[mu], strict=True):
                out = max(out, b / m if m > 0 else math.inf)
        return out

    def conditioning(self) -> dict[str, tuple[float, float]]:
        """``kappa_G = max N(G) / max|G~|`` with the certified lower bound of ``max N`` (§7b)."""
        return {
            mu: tuple(  # type: ignore[misc]
                n / m if m > 0 else (math.nan if n == 0 else math.inf)
                for n, m in zip(self.scales[mu], self.maxabs[mu], strict=True)
            )
            for mu in self.scales
        }


def _relative(b: float, m: float) -> float:
    """``b / (m - b)``: certified bound relative to the lower bound ``m - b`` of max|G|."""
    if b == 0.0:
        return 0.0  # a gradient that is exactly 0, computed exactly (below)
    if not math.isfinite(b) or m - b <= 0:
        return math.inf
    return b / (m - b)


def _scale_lo(n: float, m: float, b: float) -> float:
    """Lower bound of max N(G): the computed one, or max|G~| - b (since N >= |G|)      (7.10)"""
    return max(n if math.isfinite(n) else 0.0, m - b if math.isfinite(b) else 0.0, 0.0)


def _over(b: float, n: float) -> float:
    """``b / n`` (inf when ``n`` is 0 or ``b`` is not finite; 0 when ``b`` is)."""
    if b == 0.0:
        return 0.0
    if not math.isfinite(b) or n <= 0:
        return math.inf
    return b / n


def certify(
    inp: Inputs,
    x: torch.Tensor,
    errs: tuple[torch.Tensor, ...],
    d_hat: dict[str, torch.Tensor],
    dw: dict[str, torch.Tensor],
    grads: dict[str, tuple[torch.Tensor, torch.Tensor]],
) -> Certificate:
    """§7: per-row bounds -> dW -> dA, dB, and the relative bounds (O(L d_model d_head));
    §7b: the per-row lower bounds of the natural scale -> N(dA), N(dB)."""
    err_of = {"q": errs[0], "k": errs[1], "v": errs[2]}
    n_of = {"q": errs[3], "k": errs[4], "v": errs[5]}
    nb, L, dm = x.shape
    ax = x.abs().reshape(-1, dm)  # [nb*L, dm]
    g_rows = gamma(nb * L)
    bounds, maxabs, ratios, scales, scale_ratios = {}, {}, {}, {}, {}
    for mu, (a, b) in inp.adapters.items():
        dh = a.shape[1]
        err = err_of[mu].reshape(-1, dh)  # [nb*L, dh]
        # (7.1): |dW^ - dW| <= |X|^T err + gamma_{nb L} |X|^T |d^|
        ew = (ax.T @ err + g_rows * (ax.T @ d_hat[mu].abs().reshape(-1, dh))) * BOUND_INFLATE
        s = abs(inp.alpha / a.shape[0])
        abs_a = a.to(torch.float64).abs()  # [r, dh]
        abs_b = b.to(torch.float64).abs()  # [dm, r]
        awh = dw[mu].abs()  # [dm, dh]  |dW^|
        # (7.2): dA = s B^T dW (inner length dm, one multiply), dB = s dW A^T (inner length dh)
        ea = s * (abs_b.T @ ew) + gamma(dm + 1) * s * (abs_b.T @ awh)  # [r, dh]
        eb = s * (ew @ abs_a.T) + gamma(dh + 1) * s * (awh @ abs_a.T)  # [dm, r]
        ga, gb = grads[mu]
        # (7.3): the cast to the adapter's dtype rounds once: |fl(x) - x| <= u_out |x| + tiny
        # and |x| <= |fl(x)| / (1 - u_out)
        for t, e_t in ((ga, ea), (gb, eb)):
            if t.dtype != torch.float64:
                u_out = unit_roundoff(t.dtype)
                tiny = float(torch.finfo(t.dtype).tiny)  # covers gradual underflow of the cast
                e_t.add_(u_out / (1 - u_out) * t.to(torch.float64).abs() + tiny)
        ba = float(ea.amax()) * BOUND_INFLATE + UNDERFLOW_GUARD
        bb = float(eb.amax()) * BOUND_INFLATE + UNDERFLOW_GUARD
        # (7.2'): a zero factor (B = 0, LoRA's usual initialisation, or A = 0) makes the exact
        # gradient and the computed one exactly 0 (every product term is 0): no error at all
        if not bool(abs_b.any()):
            ba = 0.0
        if not bool(abs_a.any()):
            bb = 0.0
        ma = float(ga.abs().amax()) if ga.numel() else 0.0
        mb = float(gb.abs().amax()) if gb.numel() else 0.0
        bounds[mu] = (ba if math.isfinite(ba) else math.inf, bb if math.isfinite(bb) else math.inf)
        maxabs[mu] = (ma, mb)
        ratios[mu] = (_relative(bounds[mu][0], ma), _relative(bounds[mu][1], mb))
        # (7.9): N(dW) = |X|^T N_mu, N(dA) = |s| |B|^T N(dW), N(dB) = |s| N(dW) |A|^T: products
        # of non-negative float64 terms, each deflated by its rounding; and max N(G) >= max|G|
        # >= max|G~| - b                                                              (7.10)
        nw = (ax.T @ n_of[mu].reshape(-1, dh)) * SCALE_DEFLATE  # [dm, dh]
        na = float((abs_b.T @ nw).amax()) * s * SCALE_DEFLATE**2 if ga.numel() else 0.0
        nb_ = float((nw @ abs_a.T).amax()) * s * SCALE_DEFLATE**2 if gb.numel() else 0.0
        scales[mu] = (_scale_lo(na, ma, bounds[mu][0]), _scale_lo(nb_, mb, bounds[mu][1]))
        scale_ratios[mu] = (
            _over(bounds[mu][0], scales[mu][0]),
            _over(bounds[mu][1], scales[mu][1]),
        )
    return Certificate(bounds, maxabs, ratios, scales, scale_ratios)


def rounding_bounds(
    inp: Inputs,
    prep: Prepared,
    approx: Approximation,
    blocking: tuple[int, int],
    estimator: str = "reverse",
) -> dict[str, tuple[float, float]]:
    """The part of the §7 bound that the a-priori float64 rounding terms of §5-§6 contribute:
    ``round_mu`` (per slice and column, the same for every row) through (7.1)-(7.2). Used to
    predict other degrees (§8; not a certificate); inf everywhere if nothing certifies."""
    L, dh = prep.q.shape[1:]
    cert = constants(
        prep, approx, L=L, dh=dh, scale=inp.scale, blocking=blocking, estimator=estimator
    )
    if isinstance(cert, str):
        return {mu: (math.inf, math.inf) for mu in inp.adapters}
    colsum = prep.x.abs().sum(dim=1)  # [nb, dm]  sum_i |X_ip| per slice
    rnd = {"q": cert.round_q, "k": cert.round_k, "v": cert.round_v}  # [nb, dh]
    out = {}
    for mu, (a, b) in inp.adapters.items():
        ew = colsum.T @ rnd[mu]  # [dm, dh]
        s = abs(inp.alpha / a.shape[0])
        ea = s * (b.to(torch.float64).abs().T @ ew)
        eb = s * (ew @ a.to(torch.float64).abs().T)
        out[mu] = (
            float(ea.amax()) if ea.numel() else 0.0,
            float(eb.amax()) if eb.numel() else 0.0,
        )
    return out
