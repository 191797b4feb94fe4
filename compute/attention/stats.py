"""The data-dependent numbers of one ``attention`` call, from one host sync.

Finiteness, the centred keys, the certified radius R (docs/attention.md, step 2) and the value
statistics the bound needs, from one set of reductions per tensor whose results cross to the
host together.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from ..core.errors import InvalidInputError
from ..core.radius import midrange, radius_from
from ..core.rounding import subnormal_spacing

__all__ = ["Extremes", "Reductions", "Stats", "statistics", "torch_reductions"]

# a compiled route of the reductions (``attention.native.reductions``): the host numbers and
# the key midranges, or None where it does not run
Reductions = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, float],
    "tuple[np.ndarray, torch.Tensor, np.ndarray] | None",
]


@dataclass(frozen=True)
class Extremes:
    """Column extremes reduced once by ``statistics`` (exact values, input compute dtype)."""

    q_absmax: torch.Tensor | None  # [L, d] max |q| per slice and column (None: reduce again)
    k_absmax: torch.Tensor  # [L, d] max |centre(k)| per slice and column
    v_hi: torch.Tensor  # [L, dv] max v per slice and column
    v_lo: torch.Tensor  # [L, dv] min v
    # from statistics' one sync (None: balance / normalise_values reduce and sync themselves)
    balance: tuple[np.ndarray, np.ndarray] | None = None  # q_absmax, k_absmax on the host
    value_exp: np.ndarray | None = None  # [L, 1, dv] float64: normalisation exponents (host)


@dataclass(frozen=True)
class Stats:
    """The data-dependent numbers of one call (see ``statistics``)."""

    k: torch.Tensor  # [L, m, d] the keys as given (compute dtype)
    mid: torch.Tensor  # [L, d] the midrange of every key column (as core.radius.midrange)
    radius: float  # as matrix_radius(q, centre(k), scale), up to the radius' inflation
    value_range: float  # max over slices and columns of max v - min v (float64, exact)
    value_absmax: float  # max |v| (exact)
    q_absmax_host: np.ndarray  # [L, d] float64: max |q| per slice and column (exact)
    # builds ``extremes`` on first use (the exact path of a usual input never needs them)
    make_extremes: Callable[[], Extremes] = field(repr=False, compare=False)
    q_peak: float = 0.0  # max |q| (exact)
    k_peak: float = 0.0  # max |k| of the uncentred keys (exact)

    @cached_property
    def extremes(self) -> Extremes:
        """The column extremes (``Extremes``), formed on first use."""
        return self.make_extremes()

    @cached_property
    def kc(self) -> torch.Tensor:
        """``[L, m, d]`` centre(k), bit for bit; formed on first use (the exact path of a
        usual input never needs it)."""
        return self.k - self.mid.unsqueeze(1)


_INPUT_NAMES = ("q", "k", "v")


def _radius(
    host: np.ndarray, qa_h: np.ndarray, ka_h: np.ndarray, L: int, d: int, s: float
) -> float:
    """``matrix_radius`` from the host numbers (``radius_from``, guards included)."""
    at = 3 + 2 * L * d
    qn, kn, hs = (host[at + i * L : at + (i + 1) * L] for i in range(3))
    qt, kt = qa_h.max(axis=1), ka_h.max(axis=1)  # [L]: largest |q|, |kc| per slice
    # as matrix_radius (also float64 inputs whose squares or products under- or overflow)
    return radius_from(qn, kn, hs, qt, kt, d, s)


def torch_reductions(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[np.ndarray, torch.Tensor, tuple[torch.Tensor, ...]]:
    """The reductions of ``statistics`` as torch ops: the host numbers (one sync), the key
    midranges ``[L, d]`` and the column extremes ``(max|q|, max|kc|, max v, min v)`` on the
    device."""
    f64 = torch.float64
    q_hi, q_lo = q.max(dim=1).values, q.min(dim=1).values  # [L, d] (max/min: see centre)
    k_hi, k_lo = k.max(dim=1).values, k.min(dim=1).values  # [L, d]
    v_hi, v_lo = v.max(dim=1).values, v.min(dim=1).values  # [L, dv]
    mid = midrange(k_hi, k_lo)  # [L, d], as centre()
    kc = k - mid.unsqueeze(1)  # [L, m, d]
    qa = torch.maximum(q_hi.abs(), q_lo.abs())  # [L, d] max |q|
    ka = torch.maximum((k_hi - mid).abs(), (k_lo - mid).abs())  # [L, d] max |kc|, exact
    q_two = torch.linalg.vector_norm(q, dim=-1, dtype=f64).amax(dim=-1)  # [L]
    k_two = torch.linalg.vector_norm(kc, dim=-1, dtype=f64).amax(dim=-1)  # [L]
    holder = (q.abs().double().mul_(ka.double().unsqueeze(1))).sum(dim=-1).amax(dim=-1)  # [L]
    # (q.abs() is a fresh tensor in either dtype, so the in-place product never touches q)
    peaks = torch.stack(
        [
            qa.amax(),
            torch.maximum(k_hi.abs(), k_lo.abs()).amax(),
            torch.maximum(v_hi.abs(), v_lo.abs()).amax(),
        ]
    ).double()  # [3]: NaN or Inf exactly when the tensor has one
    host = (
        torch.cat(
            [
                peaks,
                qa.double().reshape(-1),
                ka.double().reshape(-1),
                q_two,
                k_two,
                holder,
                v_hi.double().reshape(-1),
                v_lo.double().reshape(-1),
            ]
        )
        .cpu()
        .numpy()
    )  # the one host sync
    return host, mid, (qa, ka, v_hi, v_lo)


def statistics(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    reductions: Reductions | None = None,
) -> Stats:
    """Finiteness, centred keys, the certified radius and the value statistics, one host sync.

    ``q: [L, n, d]``, ``k: [L, m, d]``, ``v: [L, m, dv]``, all in the compute dtype. On the
    device: the column extremes of q, k and v (``[L, d]``, ``[L, dv]``; exact), the key
    midranges (the centred keys ``kc = k - midrange(hi, lo)`` exactly as
    :func:`compute.core.radius.centre`, formed on first use), and the three per-slice factors
    of :func:`compute.core.radius.matrix_radius` (largest row 2-norm of q and of kc,
    accumulated in float64 without a float64 copy; largest Hölder sum
    ``sum_l |q_il| max_j |kc_jl|`` in float64). ``max_j |kc_jl|`` needs no pass over kc:
    ``x -> fl(x - c)`` is monotone, so the column extremes of kc are ``fl(hi - c)`` and
    ``fl(lo - c)``. These ``3 L + 2 L dv + 3`` numbers cross to the host once; the radius is
    then the same float64 arithmetic as ``matrix_radius`` (so equal bit for bit), the value
    range and ``max |v|`` the same as ``attention`` computed before.

    ``reductions`` (``attention.native.reductions``): the same numbers from compiled code in
    one pass per tensor where it runs (float32 on the CPU; None elsewhere): the extremes and
    midranges identical, the float64 norms and Hölder sums summed in another order (a few
    ulps, inside the radius' inflation of 1e-12).

    Finiteness comes from the same reductions: max/min propagate NaN and an infinite entry
    makes a column extreme infinite, so a tensor is finite exactly when its extremes are.
    Raises ``InvalidInputError`` naming the first non-finite tensor (q, k, v order).
    """
    L, dv = q.shape[0], v.shape[2]
    d = q.shape[-1]
    got = None if reductions is None else reductions(q, k, v, scale)
    if got is None:
        host, mid, (qa, ka, v_hi, v_lo) = torch_reductions(q, k, v)
        info = None
    else:
        host, mid, info = got
    peaks = host[:3].tolist()  # max |q|, max |k|, max |v| (floats)
    for name, peak in zip(_INPUT_NAMES, peaks, strict=True):
        if not math.isfinite(peak):
            raise InvalidInputError(name, "contains NaN or Inf")
    qa_h = host[3 : 3 + L * d].reshape(L, d)  # exact
    ka_h = host[3 + L * d : 3 + 2 * L * d].reshape(L, d)
    at = 3 + 2 * L * d
    if info is not None:  # the compiled route: its host arithmetic, the extremes from the host
        radius, value_range, value_absmax = info[:3].tolist()
        value_exp: np.ndarray | None = info[3:].reshape(L, 1, dv)
        if not math.isfinite(radius):  # one of radius_from's guards applies
            radius = _radius(host, qa_h, ka_h, L, d, scale)
        make = _host_extremes(host, q.dtype, L, d, dv, (qa_h, ka_h), value_exp)
    else:
        hi = host[at + 3 * L : at + 3 * L + L * dv]  # [L dv] float64, exact
        lo = host[at + 3 * L + L * dv :]  # [L dv]
        radius = _radius(host, qa_h, ka_h, L, d, scale)
        with np.errstate(over="ignore"):  # float64 values near the top: range inf, path exact
            spans = hi - lo  # [L dv]
            value_range = float(spans.max())
        value_exp = None
        if math.isfinite(value_range):
            # max |v - c| <= (hi - lo)/2 (1 + 2u) + the centre's rounding (half a subnormal
            # spacing) < 2^e, e the exponent of the column's range (plus two spacings):
            # 2^e <= 2 range (+4 spacings), within the widened range the bound uses; 0 (factor
            # 1) for a constant column
            sig = 2.0 * subnormal_spacing(q.dtype)
            raw = np.frexp(spans * (1.0 + 2.0**-20) + sig)[1].astype(np.float64)
            value_exp = np.where(spans > 0.0, raw, 0.0).reshape(L, 1, dv)
        value_absmax = float(np.maximum(np.abs(hi), np.abs(lo)).max())
        ex = Extremes(
            q_absmax=qa,
            k_absmax=ka,
            v_hi=v_hi,
            v_lo=v_lo,
            balance=(qa_h, ka_h),
            value_exp=value_exp,
        )

        def make() -> Extremes:
            return ex

    return Stats(
        k=k,
        mid=mid,
        radius=radius,
        value_range=value_range,
        value_absmax=value_absmax,
        q_absmax_host=qa_h,
        make_extremes=make,
        q_peak=peaks[0],
        k_peak=peaks[1],
    )


def _host_extremes(
    host: np.ndarray,
    dtype: torch.dtype,
    L: int,
    d: int,
    dv: int,
    balance: tuple[np.ndarray, np.ndarray],
    value_exp: np.ndarray | None,
) -> Callable[[], Extremes]:
    """``Extremes`` from the compiled route's host numbers, formed when first asked for: one
    cast of the host buffer to ``dtype`` (exact for the extremes, which are values of the
    inputs or, for the centred keys, of ``fl(hi - c)``)."""

    def make() -> Extremes:
        at = 3 + 2 * L * d
        hv = torch.from_numpy(host).to(dtype)
        return Extremes(
            q_absmax=hv[3 : 3 + L * d].view(L, d),
            k_absmax=hv[3 + L * d : at].view(L, d),
            v_hi=hv[at + 3 * L : at + 3 * L + L * dv].view(L, dv),
            v_lo=hv[at + 3 * L + L * dv :].view(L, dv),
            balance=balance,
            value_exp=value_exp,
        )

    return make
