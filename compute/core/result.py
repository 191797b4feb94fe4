"""Result and plan types shared by every operation."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch

__all__ = ["AttentionResult", "LoraResult", "Plan"]


def _json_float(x: float | None) -> float | None:
    if x is None:
        return None
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class Plan:
    """What an operation did (or would do) and why (docs/contract.md, "Conventions").

    ``rho = radius / ln n_eff`` places the input on the phase-transition axis: near 0 is the
    near-linear regime, of order 1 the SETH-hard regime where only the exact path is certified.
    """

    op: str  # "attention" | "tensor-attention" | "lora-gradient"
    method: str  # "exact" | "polynomial"
    reason: str  # one plain sentence
    radius: float  # certified score radius R
    rho: float  # R / ln n_eff (core.planner.rho)
    n: int
    d: int
    eps: float
    family: str | None = None  # "chebyshev" | "taylor" | "minimax"
    degree: int | None = None
    features: int | None = None  # r
    cost_exact: float | None = None  # predicted seconds
    cost_polynomial: float | None = None  # predicted seconds
    compute_dtype: str | None = None
    predicted_bound: float | None = None  # certified bound the plan expects (output units)
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self, seconds: float | None) -> dict[str, Any]:
        """The part of a result's JSON-safe summary that comes from its plan."""
        return {
            "degree": self.degree,
            "features": self.features,
            "radius": _json_float(self.radius),
            "rho": _json_float(self.rho),
            "reason": self.reason,
            "seconds": seconds,
            "plan": self.to_dict(),
        }

    def to_dict(self) -> dict[str, Any]:
        # dataclasses.asdict's result, field by field: every field but ``extra`` is a scalar,
        # and asdict's recursion cost more than the rest of a small job's summary
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["extra"] = copy.deepcopy(self.extra)
        for key in ("radius", "rho", "cost_exact", "cost_polynomial", "predicted_bound", "eps"):
            out[key] = _json_float(out[key])
        return out


@dataclass(frozen=True)
class AttentionResult:
    """Output of ``attention`` / ``tensor_attention``.

    ``error_bound`` is a certified bound on ``max |output - exact|`` in output units, for every
    method (the exact path's is the rounding bound of its blocked softmax, docs/attention.md,
    "The exact path's bound"; inf, reported as null, only where the values' own range is beyond
    float64); ``measured_error`` is the max abs error on ``sample_rows`` query rows
    recomputed exactly in float64 (None when ``sample_rows == 0``).
    """

    output: torch.Tensor
    error_bound: float | None
    plan: Plan
    measured_error: float | None = None
    seconds: float | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-safe: the method, the bound and the measured error, then the plan's summary."""
        return {
            "method": self.plan.method,
            "error_bound": _json_float(self.error_bound),
            "measured_error": _json_float(self.measured_error),
            **self.plan.summary(self.seconds),
        }


Pairs = dict[str, tuple[float | None, float | None]]


def _pairs_json(d: Pairs | None) -> dict[str, dict[str, float | None]] | None:
    if d is None:
        return None
    return {name: {"a": _json_float(x), "b": _json_float(y)} for name, (x, y) in d.items()}


@dataclass(frozen=True)
class LoraResult:
    """Output of ``lora_gradient``: loss, adapter gradients and their certified bounds.

    Per adapter ``(dA, dB)`` (docs/lora.md, "Meaning of eps"): ``error_bounds`` the certified
    max-abs error bounds (None for exact); ``scales`` a certified lower bound of the natural
    scale ``max N(G)``; ``conditioning`` ``kappa_G = scales / max|G~|``; ``strict_ratios``
    ``bound / (max|G~| - bound)`` (None where the bound reaches max|G~|). ``scales`` and
    ``conditioning`` are None when no polynomial run measured N (``method="exact"``).
    """

    loss: float
    grads: dict[str, tuple[torch.Tensor, torch.Tensor]]
    error_bounds: Pairs | None
    plan: Plan
    seconds: float | None = None
    scales: Pairs | None = None
    conditioning: Pairs | None = None
    strict_ratios: Pairs | None = None

    def summary(self) -> dict[str, Any]:
        p = self.plan
        return {
            "method": p.method,
            "loss": self.loss,
            "error_bounds": _pairs_json(self.error_bounds),
            "eps_mode": p.extra.get("eps_mode"),
            "scales": _pairs_json(self.scales),
            "conditioning": _pairs_json(self.conditioning),
            "strict_ratios": _pairs_json(self.strict_ratios),
            **p.summary(self.seconds),
        }
