"""Exact power-of-two rescaling of tensor attention's inputs (docs/tensor_attention.md,
"Certified bound").

q, k1 and k2 are balanced as whole tensors (their largest entries made equal, the product of
the three factors folded into the scale) and value columns normalised to ``max |v'|`` in
``[1/2, 1)``; the output is scaled back by ``2^(e1 + e2)`` in float64 (``core.scaling``).
"""

from __future__ import annotations

import math

import torch

from ..core.scaling import times_pow2

__all__ = ["balance_shifts", "normalise_into", "value_exponents"]


def balance_shifts(
    maxima: list[float], scale: float, dtype: torch.dtype
) -> tuple[list[int] | None, float, float]:
    """Powers of two for ``q, k1, k2`` that make their largest entries equal (``< 2^t``).

    Scores are unchanged (the product of the three factors is folded into ``scale'``) and, with
    ``|scale| max|q| max|k1| max|k2| <= R3``, ``2^t <= (16 R3)^(1/3)`` and ``|scale'| in
    [1/2, 4)``: features of degree g stay below ``entry_max^g``. Returns
    ``(shifts, scale', entry_max)`` with ``entry_max >= max(1, every balanced |entry|)``;
    ``shifts`` is None (inputs left as they are, ``scale' = scale``) when an input is all
    zeros, ``scale`` is 0, or the balanced entries ``2^t`` would not fit ``dtype`` (scores far
    beyond its range: nothing can be planned there). Shifts of any size are applied exactly by
    ``core.scaling.mul_pow2_``.
    """
    plain = max(1.0, *maxima)
    if scale == 0.0 or min(maxima) == 0.0:
        return None, scale, plain
    exps = [math.frexp(m)[1] for m in maxima]  # m = f 2^e, f in [1/2, 1)
    big = math.frexp(abs(scale))[1] + sum(exps)
    t = big // 3
    if t >= math.frexp(float(torch.finfo(dtype).max))[1] - 2:
        return None, scale, plain
    shifts = [t - e for e in exps]
    return shifts, math.ldexp(scale, -sum(shifts)), max(1.0, math.ldexp(1.0, t))


def value_exponents(v: torch.Tensor) -> torch.Tensor:
    """Per slice and column, ``e`` with ``max |v| in [2^(e-1), 2^e)``.

    ``v: [B, m, dv]`` -> ``[B, 1, dv]`` int64; an all-zero column gets 0.
    """
    _, e = torch.frexp(v.abs().amax(dim=1, keepdim=True).double())  # [B, 1, dv]
    return e.to(torch.int64)


def normalise_into(out: torch.Tensor, v: torch.Tensor, e: torch.Tensor, *, direct: bool) -> None:
    """``out[...] = v * 2^-e`` rounded once to ``out.dtype`` (as ``times_pow2``).

    ``v: [B, m, dv]``, ``e: [B, 1, dv]`` int64. When every ``2^-e`` is a normal number of
    ``out.dtype`` (the usual case) this is one multiplication written in place; a product by a
    power of two is exact but for underflow, where it rounds once, like the float64 route.
    """
    lim = 125 if out.dtype == torch.float32 else 1021
    if bool((e.abs() <= lim).all()):
        torch.mul(v, torch.exp2(-e.to(out.dtype)), out=out)
    else:
        out.copy_(times_pow2(v.to(out.dtype), -e, direct=direct))
