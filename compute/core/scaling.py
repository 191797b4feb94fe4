"""Exact scaling by powers of two, in steps that stay normal numbers.

Multiplying by a power of two is exact unless the result leaves the normal range, so the
operations rescale their inputs with it (balancing queries and keys, normalising value columns)
and scale results back. A factor outside a dtype's normal range is applied as several factors
that are normal numbers of that dtype (docs/attention.md, step 4).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["POW2_STEP", "mul_pow2_", "pow2_factors", "times_pow2"]

# powers of two that one multiplication may apply in each dtype (normal numbers, with margin)
POW2_STEP = {torch.float32: 120, torch.float64: 1000}


def pow2_factors(e: np.ndarray, dtype: torch.dtype) -> list[np.ndarray]:
    """``2^e`` (``e`` integer-valued float64, on the host) as float64 factors each of which is a
    normal power of two of ``dtype`` (so each multiplication by one is exact but for underflow);
    one factor in the usual case. The product of the factors is ``2^e`` exactly."""
    lim = POW2_STEP.get(dtype, 120)
    if e.size and -lim <= e.min() and e.max() <= lim:  # the usual case: one factor
        return [np.ldexp(1.0, e.astype(np.int64))]
    out = []
    rest = e
    while True:
        step = np.clip(rest, -lim, lim)
        out.append(np.ldexp(1.0, step.astype(np.int64)))
        rest = rest - step
        if not rest.any():
            return out


def mul_pow2_(x: torch.Tensor, sh: int) -> None:
    """``x *= 2^sh`` in place, in steps whose factors are normal numbers of ``x.dtype``: exact
    but for underflow, where each step rounds once (at most twice the subnormal spacing in all
    when scaling down, the later steps shrinking the earlier errors; nothing underflows when
    scaling up). One step, the same multiplication as before, whenever it fits."""
    lim = POW2_STEP.get(x.dtype, 120)
    while sh != 0:
        step = max(-lim, min(lim, sh))
        x.mul_(2.0**step)
        sh -= step


def times_pow2(x: torch.Tensor, e: torch.Tensor, *, direct: bool = False) -> torch.Tensor:
    """``x * 2^e`` as two multiplications by normal powers of two (exact but for underflow).

    Any exponent of a float's range splits into two halves whose powers of two are normal
    numbers, so neither factor over- or underflows (``2^e`` itself is inf for float64 values
    near the largest finite). ``direct=True`` (the caller guarantees ``|e| <= 1000``, as for
    exponents of float32 data and their sums) multiplies once in float64 and rounds once to
    ``x.dtype``: the same single rounding, fewer operations.
    """
    if direct:
        # 2^e is a normal float64 and x 2^e exact in float64 but for underflow: one rounding
        return (x.double() * torch.exp2(e.double())).to(x.dtype)
    half = torch.div(e, 2, rounding_mode="floor")
    return x * torch.exp2(half.to(x.dtype)) * torch.exp2((e - half).to(x.dtype))
