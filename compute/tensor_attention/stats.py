"""The data-dependent numbers of one ``tensor_attention`` call, from one host sync.

Finiteness, R3 (docs/tensor_attention.md, "Radius and rho"), the balancing maxima, the value
statistics of ``v1 ⊘ v2`` and the normalisation exponents, from ``6 B + 4 B dv`` reductions that
cross to the host together. The reductions run in PyTorch (``reductions_torch``) or in the
compiled kernel (``native.reductions``); the numbers are then the same float64 arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..core.errors import InvalidInputError
from ..core.radius import tensor_radius_from
from ..core.rounding import U64

__all__ = ["NAMES", "Reductions", "Stats", "reductions_torch", "statistics"]

NAMES = ("q", "k1", "k2", "v1", "v2")
# the reductions of statistics: (q, k1, k2, v1, v2) -> (xt [d, B, n+n1+n2], host numbers)
Reductions = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    tuple[torch.Tensor, np.ndarray],
]


@dataclass(frozen=True)
class Stats:
    """The data-dependent numbers of one call (see ``statistics``)."""

    radius: float  # R3, as ``core.radius.tensor_radius``
    maxima: list[float]  # max |q|, max |k1|, max |k2| (over every slice)
    value_range: np.ndarray  # [B*dv] float64
    value_absmax: np.ndarray  # [B*dv] float64
    value_scale: np.ndarray  # [B*dv] float64: 2^(e1+e2), 0 for all-zero columns
    e1: torch.Tensor  # [B, 1, dv] int64: max |v1| in [2^(e1-1), 2^e1) per column
    e2: torch.Tensor  # [B, 1, dv] int64
    xt: torch.Tensor  # [d, B, n+n1+n2]: [q | k1 | k2] transposed, in the input dtype


def reductions_torch(
    q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor
) -> tuple[torch.Tensor, np.ndarray]:
    """``xt: [d, B, n+n1+n2]`` and the ``6 B + 4 B dv`` reductions of ``statistics`` (torch)."""
    B, n, _ = q.shape
    n1, n2 = k1.shape[1], k2.shape[1]
    xt = torch.cat([q, k1, k2], dim=1).permute(2, 0, 1).contiguous()  # [d, B, n+n1+n2]
    sq = xt.double().square().sum(dim=0)  # [B, n+n1+n2] squared row 2-norms
    peaks = xt.abs().amax(dim=0).double()  # [B, n+n1+n2], exact
    row = torch.stack([sq, peaks], dim=1)  # [B, 2, n+n1+n2]
    if n == n1 == n2:
        seg = row.view(B, 2, 3, n).amax(dim=-1)  # [B, 2, 3]: (|.|_2^2, |.|_inf) of q, k1, k2
    else:
        seg = torch.stack(
            [row[..., :n].amax(-1), row[..., n : n + n1].amax(-1), row[..., n + n1 :].amax(-1)],
            dim=-1,
        )  # [B, 2, 3]
    lo1, hi1 = torch.aminmax(v1, dim=1)  # [B, dv]
    lo2, hi2 = torch.aminmax(v2, dim=1)  # [B, dv]
    ext = torch.stack([hi1, lo1, hi2, lo2]).double()  # [4, B, dv], exact
    host = torch.cat([seg.reshape(-1), ext.reshape(-1)]).cpu().numpy()  # the one host sync
    return xt, host


def statistics(
    q: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
    v1: torch.Tensor,
    v2: torch.Tensor,
    scale: float,
    reductions: Reductions = reductions_torch,
) -> Stats:
    """Finiteness, R3, the balancing maxima and the value statistics from one host sync.

    ``q: [B, n, d]``, ``k1: [B, n1, d]``, ``k2: [B, n2, d]``, ``v1: [B, n1, dv]``,
    ``v2: [B, n2, dv]``, all in one dtype. On the device: ``[q; k1; k2]`` is transposed once
    to ``xt: [d, B, n+n1+n2]`` (returned: the polynomial path's degree-1 features), so every
    row's squared 2-norm (float64; squares of float32 entries are exact there) and largest
    magnitude are element-wise reductions over ``d`` rows, reduced per slice and tensor to
    ``[B, 2, 3]``; one ``aminmax`` per value tensor gives the column extremes ``[B, dv]``
    (exact). ``reductions`` computes them: ``reductions_torch``, or ``native.reductions``,
    which runs the compiled ``ta_stats`` for float32 inputs on the CPU (the same ``xt`` and the
    same numbers in one pass; the float64 sums of squares in another order: the radius may
    differ in the last bits, well inside its ``1 + 1e-12`` inflation). These ``6 B + 4 B dv``
    numbers cross to the host once; the rest is float64 numpy on them: R3 as ``tensor_radius``
    (``tensor_radius_from``; the largest 2-norm is the square root of the largest squared norm,
    square roots being monotone), the value statistics as
    the range and largest magnitude of ``v1 ⊘ v2`` per slice and column (the extremes of a
    product over a product set are among the four products of the extremes; inflated by
    ``4 u64`` to stay upper bounds) and the exponents as ``balance.value_exponents``
    (``max |v| = max(hi, -lo)``).

    Finiteness comes from the same reductions: ``amax``/``aminmax`` propagate NaN and an
    infinite entry makes its row maximum (or a column extreme) infinite, so a tensor is finite
    exactly when those reductions are (the norms are not used for this: they may overflow
    for finite float64 inputs). Raises ``InvalidInputError`` naming the first non-finite
    tensor (q, k1, k2, v1, v2 order).
    """
    B, dv = q.shape[0], v1.shape[-1]
    xt, host = reductions(q, k1, k2, v1, v2)
    sq_max, top_abs = host[: 6 * B].reshape(B, 2, 3).transpose(1, 0, 2)  # [B, 3] each
    h1, l1, h2, l2 = host[6 * B :].reshape(4, B, dv)  # [B, dv] each
    if not np.isfinite(host).all():
        finite = [
            *(bool(np.isfinite(top_abs[:, j]).all()) for j in range(3)),
            bool(np.isfinite(h1).all() and np.isfinite(l1).all()),
            bool(np.isfinite(h2).all() and np.isfinite(l2).all()),
        ]
        for name, ok in zip(NAMES, finite, strict=True):
            if not ok:
                raise InvalidInputError(name, "contains NaN or Inf")
    two = np.sqrt(sq_max)  # [B, 3]: largest row 2-norm of q, k1, k2
    radius = tensor_radius_from(two, top_abs, q.shape[-1], scale)
    with np.errstate(over="ignore", invalid="ignore"):  # products beyond float64: inf
        corners = np.stack([h1 * h2, h1 * l2, l1 * h2, l1 * l2])  # [4, B, dv]
        top, bottom = corners.max(axis=0), corners.min(axis=0)
        infl = 4.0 * U64
        value_range = (top - bottom) * (1.0 + infl) + (np.abs(top) + np.abs(bottom)) * infl
        value_absmax = np.abs(corners).max(axis=0) * (1.0 + infl)  # [B, dv]
        e1 = np.frexp(np.maximum(h1, -l1))[1].astype(np.int64)  # [B, dv]
        e2 = np.frexp(np.maximum(h2, -l2))[1].astype(np.int64)  # [B, dv]
        value_scale = np.where(
            value_absmax > 0, np.maximum(np.ldexp(1.0, e1 + e2), 5e-324), 0.0
        )  # [B, dv]: 2^(e1+e2), never rounded down to 0 for a nonzero column
    return Stats(
        radius=radius if math.isfinite(radius) else math.inf,
        maxima=[float(m) for m in top_abs.max(axis=0)],
        value_range=value_range.reshape(-1),
        value_absmax=value_absmax.reshape(-1),
        value_scale=value_scale.reshape(-1),
        e1=torch.from_numpy(e1).reshape(B, 1, dv).to(q.device),
        e2=torch.from_numpy(e2).reshape(B, 1, dv).to(q.device),
        xt=xt,
    )
