"""The naive reference: tensor attention with all ``n * n1 * n2`` scores materialised.

What every fast path of this package is tested against (small inputs only). Plain PyTorch,
differentiable, no blocking, no rescaling: the definition of docs/tensor_attention.md.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["naive_tensor_attention"]


def naive_tensor_attention(
    q: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
    v1: torch.Tensor,
    v2: torch.Tensor,
    scale: float | None = None,
    *,
    poly: np.ndarray | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``out[i] = sum_{j1,j2} softmax_{(j1,j2)}(scale sum_l q_il k1_j1l k2_j2l) v1_j1 * v2_j2``.

    ``q: [..., n, d]``, ``k1: [..., n1, d]``, ``k2: [..., n2, d]``, ``v1: [..., n1, dv]``,
    ``v2: [..., n2, dv]`` -> ``[..., n, dv]``, computed in ``dtype`` (float64: the reference)
    with the ``[..., n, n1 * n2]`` scores; ``scale`` defaults to ``1/sqrt(d)``. With ``poly``
    (monomial coefficients) ``exp`` is replaced by that polynomial: the output the polynomial
    path computes in exact arithmetic.
    """
    q, k1, k2, v1, v2 = (x.to(dtype) for x in (q, k1, k2, v1, v2))
    sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    kk = (k1.unsqueeze(-2) * k2.unsqueeze(-3)).flatten(-3, -2)  # [..., n1*n2, d]
    vv = (v1.unsqueeze(-2) * v2.unsqueeze(-3)).flatten(-3, -2)  # [..., n1*n2, dv]
    s = sc * q @ kk.transpose(-1, -2)  # [..., n, n1*n2]
    if poly is None:
        w = torch.softmax(s, dim=-1)
    else:
        p = sum(float(c) * s**m for m, c in enumerate(poly))
        assert isinstance(p, torch.Tensor)
        w = p / p.sum(dim=-1, keepdim=True)
    return w @ vv  # [..., n, dv]
