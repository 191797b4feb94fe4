"""The naive reference: the LoRA loss and adapter gradients by autograd through softmax
attention with the whole score matrix materialised (small inputs only)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from ..attention.naive import naive_attention

__all__ = ["naive_lora_gradient"]


def naive_lora_gradient(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    adapters: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    alpha: float,
    scale: float | None = None,
    poly: np.ndarray | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[float, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """``loss = 1/2 sum ||softmax(scale (x W_q)(x W_k)^T)(x W_v) - y||^2`` and its gradients with
    respect to every adapter ``(A, B)``, by autograd, in ``dtype`` (float64: the reference).

    ``W_mu = W*_mu + (alpha / r) B_mu A_mu``; shapes as :func:`compute.lora_gradient`. With
    ``poly`` the softmax weights are those of the polynomial (``naive_attention``'s ``poly``).
    """
    leaves = {
        mu: (a.detach().to(dtype).requires_grad_(), b.detach().to(dtype).requires_grad_())
        for mu, (a, b) in adapters.items()
    }
    xd, yd = x.detach().to(dtype), y.detach().to(dtype)
    w = {}
    for mu, wm in (("q", w_q), ("k", w_k), ("v", w_v)):
        wd = wm.detach().to(dtype)
        if mu in leaves:
            a, b = leaves[mu]
            wd = wd + alpha / a.shape[0] * (b @ a)
        w[mu] = wd
    sc = 1.0 / math.sqrt(y.shape[-1]) if scale is None else scale
    out = naive_attention(xd @ w["q"], xd @ w["k"], xd @ w["v"], sc, poly=poly, dtype=dtype)
    loss = 0.5 * (out - yd).square().sum()
    params = [t for pair in leaves.values() for t in pair]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    full = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]
    return float(loss.detach()), {mu: (full[2 * i], full[2 * i + 1]) for i, mu in enumerate(leaves)}
