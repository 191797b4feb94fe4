"""Predicted seconds of attention's two paths on this machine (docs/attention.md, "Planner and
cost model").

The exact path's model (``core.cost.predict_exact_attention``) counts the unfused loop; the
non-causal exact path runs PyTorch's fused kernel, whose constant is measured here (once per
machine, ``core.calibration``). The polynomial path's features are priced at the feature
builder's measured rate.
"""

from __future__ import annotations

import torch

from ..core.calibration import calibrated
from ..core.cost import (
    best_time,
    feature_rate,
    predict_exact_attention,
    predict_polynomial_attention,
    rates,
)
from .polynomial import CAUSAL_BLOCK, Config

__all__ = ["predict_exact", "predict_polynomial"]


FUSED_N, FUSED_D = 1024, 16  # the fused kernel's calibration problem: n queries and keys, d = dv


def _measure_fused(dev: torch.device, dtype: torch.dtype) -> dict[str, float]:
    x = torch.rand((1, 1, FUSED_N, FUSED_D), device=dev, dtype=dtype)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    return {"calls": 1.0 / best_time(lambda: sdpa(x, x, x), dev, reps=3)}


def _fused_exact_factor(device: str, dtype: torch.dtype) -> float:
    """Measured time of the fused SDPA kernel over the exact prediction (1024^2, d=16), both
    calibrated once per machine."""
    dev = torch.device(device)
    got = calibrated("fused-sdpa", dev, dtype, lambda: _measure_fused(dev, dtype), names=("calls",))
    best = 1.0 / got["calls"]
    model = predict_exact_attention(
        rates(dev, dtype), batch=1, n_q=FUSED_N, n_k=FUSED_N, d=FUSED_D, dv=FUSED_D
    )
    return min(10.0, max(0.1, best / model))


def predict_exact(
    device: torch.device,
    dtype: torch.dtype,
    *,
    batch: int,
    n_q: int,
    n_k: int,
    d: int,
    dv: int,
    causal: bool,
) -> float:
    """Predicted seconds of the exact path (the fused kernel's constant where it runs)."""
    cost = predict_exact_attention(
        rates(device, dtype), batch=batch, n_q=n_q, n_k=n_k, d=d, dv=dv, causal=causal
    )
    if not causal:  # the non-causal exact path runs the fused kernel (see exact_forward)
        cost *= _fused_exact_factor(str(device), dtype)
    return cost


def predict_polynomial(
    device: torch.device,
    cfg: Config,
    *,
    batch: int,
    n_q: int,
    n_k: int,
    d: int,
    dv: int,
    causal: bool,
) -> float:
    """Predicted seconds: features on both sides, the skinny products, per-block overhead.

    Uses ``core.cost.rates`` for the products (``predict_polynomial_attention`` with the feature
    term replaced by the feature builder's measured rate) and about 4 us per launched op.
    """
    rt = rates(device, cfg.dtype)
    r = cfg.features
    rate = feature_rate(str(device), cfg.dtype)
    feats = float(batch) * (n_q + n_k) * r / rate
    flops = (
        predict_polynomial_attention(rt, batch=batch, n_q=n_q, n_k=n_k, r=r, dv=dv, causal=causal)
        - float(batch) * (n_q + n_k) * r / rt.elems
    )
    blocks = batch * (-(-n_q // cfg.block) + -(-n_k // cfg.block))
    ops = blocks * (cfg.approx.degree * d + 8) * 4e-6  # one multiply per (degree, variable)
    prep = 2e-4 + float(batch) * (n_q + n_k) * (d + dv) * 16 / rate
    t = feats + flops + ops + prep  # prep: checks, centring, radius, balancing (~16 passes)
    if causal:  # diagonal sub-blocks: pairwise polynomial (inner r) and its product with V
        t += float(batch) * n_q * CAUSAL_BLOCK * 2.0 * (r + dv + 1) / rt.skinny
    return t
