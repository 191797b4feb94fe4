"""Floating-point rounding: unit roundoff, subnormal spacing, Higham's gamma, bound parts.

The certified bounds of every operation count roundings with these (docs/attention.md, "The
rounding model, step by step"): a product or a sum of k terms carries relative error at most
``gamma_k(u)``; a result in the subnormal range errs by up to half the subnormal spacing in
absolute terms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

__all__ = [
    "U64",
    "BoundParts",
    "gamma",
    "round_bound_up",
    "subnormal_spacing",
    "unit_roundoff",
]

U64 = 2.0**-53  # unit roundoff of float64


@lru_cache(maxsize=16)
def unit_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff u of a floating dtype (half the machine epsilon)."""
    return float(torch.finfo(dtype).eps) / 2.0


@lru_cache(maxsize=16)
def subnormal_spacing(dtype: torch.dtype) -> float:
    """The smallest positive subnormal of ``dtype`` (the spacing of its subnormal range).

    A power of two, exact in float64 for all four supported dtypes (2^-1074 for float64).
    """
    fi = torch.finfo(dtype)
    return float(fi.tiny) * float(fi.eps)


def gamma(k: float, u: float = U64) -> float:
    """Higham's ``gamma_k = k u / (1 - k u)``; inf when ``k u >= 1``."""
    ku = k * u
    return math.inf if ku >= 1.0 else ku / (1.0 - ku)


def round_bound_up(total: float) -> float:
    """A computed bound made safe against its own float64 arithmetic: times ``1 + 1e-9``, and
    where it is itself near float64's subnormal range (values near the underflow threshold)
    four subnormal spacings more, which cover the few operations that formed it."""
    total = total * (1.0 + 1e-9)
    if total < 2.0**-1000:
        total += 4.0 * subnormal_spacing(torch.float64)
    return total


@dataclass(frozen=True)
class BoundParts:
    """A certified a-priori bound: the polynomial's part, the rounding's part and the total."""

    polynomial: float  # t(dmin', dmax') * range: the approximation itself
    rounding: float  # everything floating point adds
    total: float

    def to_dict(self) -> dict[str, float]:
        return {"polynomial": self.polynomial, "rounding": self.rounding, "total": self.total}
