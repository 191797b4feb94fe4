"""Certified score radii in O(n d) (theory §1.3 and §3).

All radii bound ``|scale| * sum_l |q_l| |k_l|`` (and so ``|s|``), which is also what the
floating-point rounding analysis needs. They are computed in float64 and inflated by a few ulps
so that they stay upper bounds of the exact quantities.
"""

from __future__ import annotations

import torch

__all__ = ["centre", "matrix_radius", "tensor_radius"]

_INFLATE = 1.0 + 1e-12


def centre(x: torch.Tensor) -> torch.Tensor:
    """``x - xbar`` with ``xbar`` the per-column midrange over the sequence axis (dim -2).

    Softmax is invariant to ``k -> k - kbar`` (theory §1.3); the midrange minimises the largest
    entry, which is what the Hölder radius sees.
    """
    hi = x.max(dim=-2, keepdim=True).values  # (max/min .values: several times faster than
    lo = x.min(dim=-2, keepdim=True).values  # amax/amin over a strided axis on CPU)
    return x - (hi + lo) / 2


def matrix_radius(q: torch.Tensor, k: torch.Tensor, scale: float) -> float:
    """``min(Cauchy–Schwarz, Hölder)`` radius, per leading slice, then the max over slices.

    ``q: [..., n, d]``, ``k: [..., m, d]`` (already centred if wanted). Returns a float >= 0.
    """
    q64, k64 = q.double().abs(), k.double().abs()
    cs = q64.norm(dim=-1).amax(dim=-1) * k64.norm(dim=-1).amax(dim=-1)  # [...]
    m = k64.max(dim=-2).values  # [..., d]
    holder = (q64 * m.unsqueeze(-2)).sum(dim=-1).amax(dim=-1)  # [...]
    r = torch.minimum(cs, holder) * abs(scale)
    return float(r.max()) * _INFLATE if r.numel() else 0.0


def tensor_radius(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, scale: float) -> float:
    """R3 of theory §3: the best of the three Hölder splittings, per slice, max over slices.

    Bounds ``|scale| * sum_l |q_l k1_l k2_l|`` for every triple (i, j1, j2).
    """
    q64, a64, b64 = q.double().abs(), k1.double().abs(), k2.double().abs()

    def two(x: torch.Tensor) -> torch.Tensor:
        return x.norm(dim=-1).amax(dim=-1)

    def inf(x: torch.Tensor) -> torch.Tensor:
        return x.amax(dim=(-2, -1))

    options = torch.stack(
        [
            two(q64) * two(a64) * inf(b64),
            two(q64) * inf(a64) * two(b64),
            inf(q64) * two(a64) * two(b64),
        ]
    )
    r = options.amin(dim=0) * abs(scale)
    return float(r.max()) * _INFLATE if r.numel() else 0.0
