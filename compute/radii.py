"""The certified radius of a user's tensors, per operation: will these inputs take the fast path?

Each planner decides from one number, the certified radius ``R`` of the scores (docs/theory.md
§1.3, docs/fast_path.md): below roughly ``R = 1..4`` a low-degree polynomial is certified, far
above it only the exact path is. These functions compute ``R`` and ``rho = R / ln n_eff`` from
the tensors exactly as the operation does (the same code, the same casts, bit for bit), without
computing the operation, and say what the data-free planner needs to plan it
(:attr:`Radius.plan_args`): ``compute.plan_attention(**r.plan_args, eps=...)``.

- :func:`attention_radius`: ``|scale| max_i,j sum_l |q_il| |k_jl - kbar_l|`` bounded by
  ``min(Cauchy-Schwarz, Hölder)`` per slice (keys centred by their per-column midrange, which
  softmax does not see);
- :func:`tensor_attention_radius`: R3, the bound on ``|scale| sum_l |q_l k1_l k2_l|``;
- :func:`lora_radius`: the radius of the centred scores of the adapted projections, with the
  projections' rounding errors (docs/lora_bound.md §2), as ``lora_gradient``'s planner uses it;
- ``compute.radius`` (``registry.radius``): any registered operation by name, from the tensors
  and parameters of its job (the service's ``POST /v1/plan``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .core import planner, validate
from .core.radius import centre, matrix_radius, tensor_radius
from .lora.certificate import prepare
from .lora.inputs import check_inputs

__all__ = ["Radius", "attention_radius", "lora_radius", "tensor_attention_radius"]


def _json_float(x: float) -> float | None:
    return x if math.isfinite(x) else None


@dataclass(frozen=True)
class Radius:
    """The certified radius of one operation's inputs.

    ``radius`` is R (inf when it does not fit in float64), ``rho = R / ln n_eff`` where the
    input sits on the phase-transition axis (``n_eff`` as the operation's plan reports it),
    ``lengths`` the sequence lengths it was computed over, ``d`` the head dimension, ``batch``
    the number of independent slices and ``dtype`` the inputs' dtype name. ``plan_args`` are
    the keyword arguments of the operation's data-free plan function for these inputs (add
    ``eps`` and ``method``).
    """

    op: str
    radius: float
    rho: float
    d: int
    batch: int
    dtype: str
    lengths: dict[str, int] = field(default_factory=dict)
    plan_args: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (a non-finite radius or rho is null)."""
        return {
            "op": self.op,
            "radius": _json_float(self.radius),
            "rho": _json_float(self.rho),
            "d": self.d,
            "batch": self.batch,
            "dtype": self.dtype,
            "lengths": dict(self.lengths),
            "plan_args": {
                k: _json_float(v) if isinstance(v, float) else v for k, v in self.plan_args.items()
            },
        }


def _finite(R: float) -> float:
    return R if math.isfinite(R) else math.inf


def attention_radius(
    q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None, causal: bool = False
) -> Radius:
    """R and rho of ``compute.attention(q, k, v, scale=scale, causal=causal)``, without v.

    ``q: (..., n, d)``, ``k: (..., m, d)``, equal leading dimensions (any floating dtype, one
    device). The radius is the one ``attention`` computes (``plan.radius``): in its compute
    dtype, keys centred, per slice, the largest over slices; with ``causal`` and ``m > n`` only
    the first ``n`` keys (the rest are never visible). ``rho = R / ln m``.
    """
    qt = validate.check_tensor("q", q)
    kt = validate.check_tensor("k", k)
    validate.check_match("k", "head dimension", kt.shape[-1], "q", qt.shape[-1])
    validate.check_same_leading(("q", "k"), {"q": qt.shape, "k": kt.shape})
    validate.check_same_device(("q", "k"), [qt, kt])
    causal = validate.check_flag("causal", causal)
    n, d = qt.shape[-2:]
    m = kt.shape[-2]
    s = validate.check_scale(scale, d)
    cd = validate.compute_dtype_of(qt, kt)
    q3 = qt.reshape(-1, n, d).to(cd)
    k3 = kt.reshape(-1, m, d).to(cd)
    if causal and m > n:
        k3, m = k3[:, :n], n
    with torch.no_grad():
        R = _finite(matrix_radius(q3, centre(k3), s))
    dtype = validate.dtype_name(validate.output_dtype_of(qt, kt))
    batch = q3.shape[0]
    return Radius(
        op="attention",
        radius=R,
        rho=planner.rho(R, m),
        d=d,
        batch=batch,
        dtype=dtype,
        lengths={"n": n, "m": m},
        plan_args={"n": m, "d": d, "radius": R, "batch": batch, "dtype": dtype, "causal": causal},
    )


def tensor_attention_radius(
    q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, *, scale: float | None = None
) -> Radius:
    """R3 and rho of ``compute.tensor_attention(q, k1, k2, v1, v2, scale=scale)``, without the
    values: ``q (..., n, d)``, ``k1 (..., n1, d)``, ``k2 (..., n2, d)``, equal leading
    dimensions. ``rho = R3 / ln (n n1 n2)^(1/3)``. The data-free planner takes one length:
    ``plan_args["n"]`` is the geometric mean of the three (the exact path's ``n n1 n2`` work)."""
    names = ("q", "k1", "k2")
    ts = [validate.check_tensor(nm, x) for nm, x in zip(names, (q, k1, k2), strict=True)]
    tq, ta, tb = ts
    for nm, t in (("k1", ta), ("k2", tb)):
        validate.check_match(nm, "head dimension", t.shape[-1], "q", tq.shape[-1])
    validate.check_same_leading(names, {nm: t.shape for nm, t in zip(names, ts, strict=True)})
    validate.check_same_device(names, ts)
    n, d = tq.shape[-2:]
    n1, n2 = ta.shape[-2], tb.shape[-2]
    s = validate.check_scale(scale, d)
    cd = validate.compute_dtype_of(*ts)
    fq, fa, fb = (t.reshape(-1, t.shape[-2], d).to(cd) for t in ts)
    with torch.no_grad():
        R = _finite(tensor_radius(fq, fa, fb, s))
    dtype = validate.dtype_name(validate.output_dtype_of(*ts))
    batch = fq.shape[0]
    n_eff = max(1, round((n * n1 * n2) ** (1.0 / 3.0)))
    return Radius(
        op="tensor-attention",
        radius=R,
        rho=planner.rho(R, n, n1, n2),
        d=d,
        batch=batch,
        dtype=dtype,
        lengths={"n": n, "n1": n1, "n2": n2},
        plan_args={"n": n_eff, "d": d, "radius": R, "batch": batch, "dtype": dtype},
    )


def lora_radius(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    w_q: torch.Tensor,
    w_k: torch.Tensor,
    w_v: torch.Tensor,
    adapters: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    alpha: float,
    scale: float | None = None,
) -> Radius:
    """R and rho of ``compute.lora_gradient`` with these arguments (the same ones): the
    certified radius of the centred scores of the adapted projections, including their
    rounding errors (docs/lora_bound.md §2), as the planner of ``method="auto"`` uses it.
    ``rho = R / ln L``."""
    inp = check_inputs(x, y, w_q, w_k, w_v, adapters, alpha, scale)
    with torch.no_grad():
        R = _finite(prepare(inp).radius)
    nb, L, dm = inp.x.shape
    dh = inp.y.shape[-1]
    full = "k" in inp.adapters
    rank = max(a.shape[0] for a, _ in inp.adapters.values())
    dtype = validate.dtype_name(inp.dtype)
    return Radius(
        op="lora-gradient",
        radius=R,
        rho=planner.rho(R, L),
        d=dh,
        batch=nb,
        dtype=dtype,
        lengths={"L": L},
        plan_args={
            "n": L, "d": dh, "radius": R, "batch": nb, "dtype": dtype, "d_model": dm,
            "rank": rank, "full": full,
        },
    )  # fmt: skip
