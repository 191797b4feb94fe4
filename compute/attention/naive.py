"""The naive reference: softmax attention with the whole score matrix materialised.

What every fast path of this package is tested against (O(n m) memory: small inputs only).
Plain PyTorch, differentiable, no blocking, no centring, no rescaling: the definition.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["naive_attention"]


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    causal: bool = False,
    *,
    poly: np.ndarray | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``softmax(scale q k^T) v`` computed in ``dtype`` (float64: the reference).

    ``q: [..., n, d]``, ``k: [..., m, d]``, ``v: [..., m, dv]`` -> ``[..., n, dv]``; ``scale``
    defaults to ``1/sqrt(d)``; ``causal``: query i sees keys ``j <= i`` (top-left, as SDPA's
    ``is_causal``). With ``poly`` (monomial coefficients ``c_0..c_g``) ``exp`` is replaced by
    that polynomial ``P``: ``P(S) v / P(S) 1``, what the polynomial path computes in exact
    arithmetic (for the keys it is given: centre them first to compare with it).
    """
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * sc  # [..., n, m]
    n, m = s.shape[-2:]
    hidden = ~torch.ones(n, m, dtype=torch.bool, device=s.device).tril() if causal else None
    if poly is None:
        if hidden is not None:
            s = s.masked_fill(hidden, -math.inf)
        return torch.softmax(s, dim=-1) @ v
    p = sum(float(c) * s**j for j, c in enumerate(poly))  # [..., n, m]
    assert isinstance(p, torch.Tensor)
    if hidden is not None:
        p = p.masked_fill(hidden, 0.0)
    return (p @ v) / p.sum(dim=-1, keepdim=True)
