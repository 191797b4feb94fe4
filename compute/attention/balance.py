"""Exact power-of-two rescaling of attention's inputs (docs/attention.md, steps 4 and 4b).

``balance``: q and k per coordinate, with the scale's whole power of two, so that every
balanced entry is at most ``2 sqrt(R)`` (monomials neither overflow nor, for the coordinates
that matter, underflow, whatever the scale's exponent). ``normalise_values``: every centred value
column to ``max |V - c|`` in ``[1/2, 1)``, scaled back exactly at the end (``times_pow2``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..core.scaling import pow2_factors

__all__ = [
    "apply_factors",
    "balance",
    "balance_exponents",
    "balance_factors",
    "normalise_values",
    "value_exponents",
    "value_factors",
]


def _to_device(x: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(x).to(device=like.device, dtype=like.dtype)


def balance(
    q: torch.Tensor,
    kc: torch.Tensor,
    scale: float,
    q_absmax: torch.Tensor | None = None,
    k_absmax: torch.Tensor | None = None,
    known: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Exact power-of-two rescaling: ``scale <q, k> == s' <q', k'>`` with balanced q', k'.

    ``q: [L, n, d]``, ``kc: [L, m, d]``; returns ``q'`` and ``k'`` transposed, ``[L, d, n]`` and
    ``[L, d, m]`` contiguous (the layout of a feature block's input), and ``s' = sign(scale)
    mant`` (``|scale| = mant 2^E``, mant in [1/2, 1)): per slice and coordinate l, q is
    multiplied by ``2^a_l`` and k by ``2^(E - a_l)`` (``balance_exponents``). Entries far below
    the others may be flushed, by at most twice the subnormal spacing (docs/attention.md, step
    7 of the rounding model). A coordinate that is zero on one side contributes nothing to the
    scores and is zeroed on both (so the other side cannot overflow), as is everything when
    ``scale == 0``.
    ``q_absmax, k_absmax: [L, d]``: ``max |q|`` and ``max |kc|`` per slice and column when
    already known (``statistics``); ``known``: their host copies (float64) when ``statistics``
    transferred them; else they are reduced and transferred here (one host sync).
    """
    if known is None:  # one host sync: the column extremes
        qa = q.abs().max(dim=1).values if q_absmax is None else q_absmax  # [L, d]
        ka = kc.abs().max(dim=1).values if k_absmax is None else k_absmax  # [L, d]
        known = (qa.double().cpu().numpy(), ka.double().cpu().numpy())
    fq, fk, signed = balance_factors(*known, scale, q.dtype)
    return apply_factors(q, fq), apply_factors(kc, fk), signed


def balance_factors(
    qa: np.ndarray, ka: np.ndarray, scale: float, dtype: torch.dtype
) -> tuple[list[np.ndarray], list[np.ndarray], float]:
    """``balance``'s factors on the host, from ``max |q|`` and ``max |kc|`` (``[L, d]`` float64):
    the powers of two for q and for k (lists of ``[L, d]`` float64 arrays, each entry a normal
    number of ``dtype`` or 0 for a zeroed coordinate, applied in order: ``pow2_factors``) and
    ``s' = sign(scale) mant``."""
    mant = math.frexp(abs(scale))[0]
    a, b, zero = balance_exponents(qa, ka, scale)  # [L, d] each, on the host
    fq, fk = pow2_factors(a, dtype), pow2_factors(b, dtype)
    if zero.any():
        fq[0][zero] = 0.0
        fk[0][zero] = 0.0
    signed = math.copysign(mant, scale) if scale != 0.0 else 0.0
    return fq, fk, signed


def apply_factors(x: torch.Tensor, factors: list[np.ndarray]) -> torch.Tensor:
    """``x [L, n, d]`` times the per-column factors (``balance_factors``), one rounding per
    factor in order, written straight into the transposed layout the feature blocks load:
    ``[L, d, n]`` contiguous."""
    xt = torch.empty((x.shape[0], x.shape[2], x.shape[1]), dtype=x.dtype, device=x.device)
    torch.mul(x.transpose(1, 2), _to_device(factors[0], x).unsqueeze(2), out=xt)  # [L, d, n]
    for f in factors[1:]:
        xt.mul_(_to_device(f, x).unsqueeze(2))
    return xt


def balance_exponents(
    qa: np.ndarray, ka: np.ndarray, scale: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``balance``'s exponents from ``max |q|`` and ``max |kc|`` (``[L, d]`` float64, host):
    ``a_l = round((log2 max|k_l| - log2 max|q_l| + E) / 2)`` for q, ``b = E - a`` for k, and the
    coordinates to zero on both sides. The largest entries of ``q'_l`` and ``k'_l`` then meet at
    ``sqrt(2^E max|q_l| max|k_l|) <= sqrt(R)``, within a factor sqrt(2)."""
    expo = math.frexp(abs(scale))[1]
    ok = (qa > 0) & (ka > 0) & (scale != 0.0)
    lq = np.log2(np.where(ok, qa, 1.0))
    lk = np.log2(np.where(ok, ka, 1.0))
    a = np.round((lk - lq + expo) / 2)  # [L, d]
    return a, expo - a, ~ok


def normalise_values(
    vc: torch.Tensor, vmax: torch.Tensor, exps: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``vc * 2^-e`` per slice and column with ``max |vc| = vmax in [2^(e-1), 2^e)`` (in place)
    and ``e`` (float64, ``[L, 1, dv]``) to scale results back (``times_pow2``).

    ``vc: [L, m, dv]`` centred values, ``vmax: [L, 1, dv]`` their largest magnitude (0 for a
    constant column: factor 1). Exact but for underflow of entries far below their column's
    largest: value products then never underflow for the entries that matter.
    ``exps``: exponents with ``max |vc| < 2^e`` computed on the host by the caller (``[L, 1,
    dv]``, from the columns' ranges: ``max |vc|`` is then in ``[2^(e-2), 2^e)``), saving the
    reduction and its host sync.
    """
    if exps is None:  # one host sync
        exps = value_exponents(vmax)
    for f in pow2_factors(-exps, vc.dtype):
        vc.mul_(_to_device(f, vc))
    e = torch.from_numpy(exps).to(vc.device)
    return vc, e


def value_exponents(vmax: torch.Tensor) -> np.ndarray:
    """``normalise_values``' exponents ``e`` (``max |vc| = vmax in [2^(e-1), 2^e)``, 0 for a
    constant column) on the host, float64 ``[L, 1, dv]`` (one host sync)."""
    return torch.frexp(vmax.double())[1].double().cpu().numpy()


def value_factors(exps: np.ndarray, dtype: torch.dtype) -> list[np.ndarray]:
    """The factors ``normalise_values`` multiplies by, in order (``pow2_factors(-exps)``)."""
    return pow2_factors(-exps, dtype)
