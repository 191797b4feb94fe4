"""The certified a-priori rounding bound of LoRA's exact path (docs/lora_bound.md, "The exact
path's bound"; steps X1-X10 below refer to it).

``exact_bounds`` follows the blocked closed form of ``compute/lora/exact.py`` operation by
operation in the dtype it ran in (unit roundoff ``u``): the effective weights, the projections,
the scores, the softmax, ``O``, ``E``, ``D``, ``G``, the score gradient, ``dQ``, ``dK``, ``dV``,
``dW`` and the adapter gradients, each with Higham's ``gamma_k`` per product or sum of ``k``
terms (any order), a ``tiny`` (smallest normal number) per underflowing result, and ``exp``
within ``EXP_ULPS`` ulps (``compute/core/exact_bound.py``). Data-dependent sizes come from
the computed quantities (maxima of the projections, the column sums of the computed softmax,
``|X|^T |dQ|``, ``|B|^T |dW|``), which makes the bound a posteriori in its sizes but a
worst case in its roundings.
"""

from __future__ import annotations

import math

import torch

from ..core.device import float32_matmul_is_ieee
from ..core.exact_bound import TF32_UNIT_ROUNDOFF, exp_log_error, tiny
from ..core.radius import matrix_radius
from ..core.rounding import gamma, round_bound_up, unit_roundoff
from .exact import exact_blocks
from .inputs import Inputs

__all__ = ["exact_bounds"]

F64 = torch.float64


def _max(x: torch.Tensor) -> float:
    return float(x.abs().max()) if x.numel() else 0.0


def exact_bounds(
    inp: Inputs,
    dw: dict[str, torch.Tensor],
    grads: dict[str, tuple[torch.Tensor, torch.Tensor]],
    parts: dict[str, torch.Tensor],
) -> dict[str, tuple[float | None, float | None]]:
    """Certified ``(bound_dA, bound_dB)`` per adapter for the exact path's result.

    ``dw``: the computed ``dW_mu`` ([dm, dh], in the dtype the exact pass ran in); ``grads``:
    the returned adapter gradients; ``parts``: what ``exact_gradients`` collected (``q, k, v,
    dq, dk, dv`` in that dtype, ``colsum`` the float64 column sums of the computed softmax).
    A bound that overflows float64 is None (reported as null).
    """
    q, k, v = parts["q"], parts["k"], parts["v"]
    dt = q.dtype
    nb, L, dh = q.shape
    dm = inp.x.shape[-1]
    u = unit_roundoff(dt)
    if dt == torch.float32 and not float32_matmul_is_ieee():
        u = TF32_UNIT_ROUNDOFF  # (a coarse but safe unit for every operation)
    t = tiny(dt)
    beta = abs(inp.scale)
    x64 = inp.x.to(dt).to(F64).abs()  # [nb, L, dm]: the inputs as the pass saw them
    # X1: effective weights W = W* + s B A and projections X W in float64 (inner r, the product
    # by s, the sum: gamma_{r+2}(u64) relative to W^abs = |W*| + |s| |B| |A|; inner dm:
    # gamma_dm(u64)), rounded once to dt: |Q~ - Q| <= u |Q~| / (1 - u) + c64 |X| W^abs + tiny
    u64 = 2.0**-53
    x_abs = inp.x.to(F64).abs()
    errs: dict[str, float] = {}
    for mu, proj_dt in (("q", q), ("k", k), ("v", v)):
        wabs = inp.w[mu].to(F64).abs()
        c64 = gamma(dm, u64)
        if mu in inp.adapters:
            a, b = (z.to(F64).abs() for z in inp.adapters[mu])
            s = abs(inp.alpha / a.shape[0])
            wabs = wabs + s * (b @ a)
            r = a.shape[0]
            c64 = gamma(dm, u64) * (1.0 + gamma(r + 2, u64)) + gamma(r + 2, u64)
        proj = x_abs @ wabs  # [nb, L, dh]
        big = float(proj.max()) if proj.numel() else 0.0
        errs[mu] = u * _max(proj_dt) / (1.0 - u) + c64 * big * (1.0 + 1e-12) + t
    e_q, e_k, e_v = errs["q"], errs["k"], errs["v"]
    qa, ka = q.to(F64).abs() + e_q, k.to(F64).abs() + e_k
    qmax, kmax = float(qa.max()), float(ka.max())
    v64 = v.to(F64)
    vcol = v64.abs().amax(dim=(0, 1)) + e_v  # [dh] column maxima (over every slice)
    nuc = float(torch.linalg.vector_norm(vcol)) * (1.0 + 1e-12)  # the column maxima's norm
    rd = math.sqrt(dh)
    # >= every |V_j|, |V~_j| and, by convexity, |O_i| and |sum_j F_ij |V_j||
    nu = float(torch.linalg.vector_norm(v64, dim=-1).max()) * (1.0 + 1e-12) + rd * e_v
    mid = 0.5 * v64.amax(dim=1, keepdim=True) + 0.5 * v64.amin(dim=1, keepdim=True)
    rho_v = float(torch.linalg.vector_norm(v64 - mid, dim=-1).max()) * (1.0 + 1e-12)
    ev2 = rd * e_v  # |V~_j - V_j| (2-norm)
    y2 = float(torch.linalg.vector_norm(inp.y.to(dt).to(F64), dim=-1).max()) * (1.0 + 1e-12)
    # X2: scores S = (beta q) k^T: gamma_{d+1} of R_abs = |beta| sum (|Q~| + e_Q)(|K~| + e_K),
    # plus the projections' errors, plus underflowing products
    r_abs = matrix_radius(qa, ka, inp.scale)
    k1 = float(k.to(F64).abs().sum(dim=-1).max())
    q1 = float(qa.sum(dim=-1).max())
    sigma = (
        gamma(dh + 1, u) * r_abs
        + beta * (e_q * k1 + e_k * q1) * (1.0 + 1e-12)
        + (dh + 1) * t * (1.0 + beta) * (kmax + 1.0)
    )
    if not math.isfinite(sigma) or 2.0 * sigma > 700.0:
        return {mu: (None, None) for mu in inp.adapters}
    # X3: softmax: arguments x = S~ - max (|x| <= 2 R', one rounding), exp (EXP_ULPS), the row
    # sum (gamma_L; at least 1: exp(0) = 1), the division: F~ = F (1 + theta), |theta| <= th,
    # plus at most tau = 4 tiny where exp underflows
    r2 = 2.0 * r_abs * (1.0 + gamma(dh + 1, u))
    d_e = exp_log_error(u)
    ratio = math.exp(4.0 * u * r2 + 2.0 * d_e) * (1.0 + u) / (1.0 - gamma(L, u))
    th = math.exp(2.0 * sigma) * ratio - 1.0
    tau = 4.0 * t
    if not th < 0.5:
        return {mu: (None, None) for mu in inp.adapters}
    g_l = gamma(L, u)
    # X4: O = F V (inner L), 2-norms per row
    e_o = th * nu + L * tau * nuc + g_l * ((1.0 + th) * nu + L * tau * nuc) + ev2 + rd * L * t
    # X5: E = O - Y; the computed row norms |E~_i| (enorm) bound the exact ones up to e_e
    e_e = e_o + u * (nu + e_o + y2) + rd * t
    en_hat = parts["enorm"].reshape(-1)  # [N] computed |E~_i|
    en = en_hat + e_e  # >= |E_i|
    # X6: H_ij = E_i.(V_j - O_i) = G_ij - D_i: |H_ij| <= h_i; G = E V^T, D = rowsum(E o O)
    # (inner d each)
    g_d = gamma(dh, u)
    h = 2.0 * en * (rho_v + ev2)  # [N]
    e_g = e_e * nu + en * ev2 + g_d * en_hat * nu + dh * t
    e_d = e_e * (nu + e_o) + en * e_o + g_d * en_hat * (nu + e_o) + dh * t
    # X7: dS = beta F (G - D), three roundings: |dS~ - dS| <= beta F_ij a_i + b0_i
    h1 = h + e_g + e_d
    g3 = gamma(3, u)
    a = th * h1 + e_g + e_d + g3 * (1.0 + th) * h1  # [N]
    b0 = beta * tau * h1 * (1.0 + g3) + 3.0 * t  # [N]
    b0_top = float(b0.max())
    # X8: dQ = dS K (inner L; rows of F sum to 1), per query row; dK = dS^T Q and dV = F^T E
    # (inner L in blocks: gamma_{L + blocks}), per key, with the column sums of F (from the
    # computed softmax: F <= (F~ + tau) / (1 - theta))
    nblk = -(-L // exact_blocks(nb, L))
    g_lb = gamma(L + nblk, u)
    # colsum: per block of bq rows a sum of non-negative terms in dt (|error| <= gamma_{bq-1}
    # of the true block sum, any order), the blocks added in float64 (the 1e-9)
    g_cs = gamma(exact_blocks(nb, L), u)
    cols = (parts["colsum"].reshape(-1) * (1.0 + 1e-9) / (1.0 - g_cs) + L * tau) / (1.0 - th)
    m_k = float((a * qmax + h * e_q + g_lb * (h + a) * qmax).max())
    m_v = float(((th + g_lb * (1.0 + th)) * en_hat + e_e).max())
    en_top = float(en_hat.max())
    e_dx = {
        "q": beta * a * kmax
        + L * b0 * kmax
        + beta * h * e_k
        + g_l * (beta * (h + a) * kmax + L * b0 * kmax)
        + L * t,
        "k": beta * cols * m_k + L * b0_top * qmax * (1.0 + g_lb) + L * t,
        "v": cols * m_v + L * tau * en_top * (1.0 + g_lb) + L * t,
    }  # [N] each: bounds of |dX~_il - dX_il| for every l of row i
    # X9: dW = X^T dX (inner N = slices * L): (|X|^T e_dX)_p + gamma_N (|X|^T |dX~|)_pl
    n_rows = nb * L
    xf = x64.reshape(-1, dm)
    out: dict[str, tuple[float | None, float | None]] = {}
    for mu, (a_mu, b_mu) in inp.adapters.items():
        dxt = parts["d" + mu].to(F64).abs().reshape(-1, dh)  # [N, dh]
        w_err = (
            (xf.T @ e_dx[mu]).unsqueeze(1) + gamma(n_rows, u) * (xf.T @ dxt) + n_rows * t
        )  # [dm, dh]
        dwa = dw[mu].to(F64).abs()  # [dm, dh]
        # X10: dA = s B^T dW (inner dm, the product by s), dB = s dW A^T (inner dh), the
        # casts to the adapters' dtypes
        s = abs(inp.alpha / a_mu.shape[0])
        ab, bb = a_mu.to(dt).to(F64).abs(), b_mu.to(dt).to(F64).abs()
        err_a = s * (bb.T @ w_err + gamma(dm + 1, u) * (bb.T @ dwa)) + (dm + 1) * t
        err_b = s * (w_err @ ab.T + gamma(dh + 1, u) * (dwa @ ab.T)) + (dh + 1) * t
        pair: list[float | None] = []
        for err, got in ((err_a, grads[mu][0]), (err_b, grads[mu][1])):
            total = float(err.max()) if err.numel() else 0.0
            if got.dtype != dt and got.numel():  # the cast to the adapter's dtype
                ua = unit_roundoff(got.dtype)
                total += ua * _max(got) * (1.0 + 2.0 * ua) + tiny(got.dtype)
            total = round_bound_up(total * (1.0 + 1e-9))
            pair.append(total if math.isfinite(total) else None)
        out[mu] = (pair[0], pair[1])
    return out
