"""The operation registry: for each operation, what it takes, what it gives, its shape rule and
how to run and plan it — the one table the service derives its routes, request models,
``/v1/plan``, queue streams, worker dispatch and documentation from.

Adding an operation: its package (the algorithm, its naive reference, its docs) and one
:func:`register` call; nothing in the service, the worker, the client or the CLI changes
(docs/architecture.md walks through it). Shape rules look at shapes only (no data), so the
service checks a request before anything is queued, with the same rule and the same message the
library applies to tensors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .attention import attention, plan_attention
from .attention.shapes import check_shapes as attention_rule
from .core.errors import InvalidInputError
from .core.progress import Progress
from .core.result import Plan
from .lora import lora_gradient, plan_lora_gradient
from .lora.shapes import ADAPTER_NAMES as LORA_ADAPTERS
from .lora.shapes import check_shapes as lora_rule
from .radii import Radius, attention_radius, lora_radius, tensor_attention_radius
from .tensor_attention import plan_tensor_attention, tensor_attention
from .tensor_attention.shapes import check_shapes as tensor_attention_rule

__all__ = [
    "OPERATIONS",
    "REQUIRED",
    "Operation",
    "Progress",
    "Scalar",
    "TensorArg",
    "radius",
    "register",
]

Shapes = Mapping[str, Sequence[int]]
Runner = Callable[
    [Mapping[str, torch.Tensor], Mapping[str, Any], Progress | None],
    tuple[dict[str, torch.Tensor], dict[str, Any]],
]
RadiusOf = Callable[[Mapping[str, torch.Tensor], Mapping[str, Any]], Radius]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class TensorArg:
    """An input tensor. Dotted names nest in JSON (``adapters.q.a`` is
    ``{"adapters": {"q": {"a": T}}}``); a group whose tensors are all optional may be left out,
    and is then complete or absent."""

    name: str
    shape: str  # for the docs, e.g. "(..., n, d)"
    required: bool = True


@dataclass(frozen=True)
class Scalar:
    """A scalar parameter, with the constraints the service validates before queueing."""

    name: str
    type: type  # float, int, bool or str
    default: Any = REQUIRED
    doc: str = ""
    choices: tuple[str, ...] | None = None
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    nullable: bool = False


@dataclass(frozen=True)
class Operation:
    """One operation: ``run`` takes the named input tensors (on the device to compute on) and
    the validated parameters and returns the named output tensors and a JSON-ready summary;
    ``check_shapes`` raises :class:`InvalidInputError` naming the tensor (``k.shape``);
    ``radius`` (optional) takes the same tensors and parameters and returns their certified
    radius and the arguments of ``plan`` for them (``compute.radius``, ``POST /v1/plan``)."""

    name: str  # the route /v1/{name}, the stream, the CLI's and client's operation name
    summary: str  # one line
    tensors: tuple[TensorArg, ...]
    params: tuple[Scalar, ...]
    outputs: str  # what the outputs are, for the docs
    check_shapes: Callable[[Shapes], None]
    run: Runner
    plan: Callable[..., Plan]
    plan_params: tuple[Scalar, ...]
    radius: RadiusOf | None = None


OPERATIONS: dict[str, Operation] = {}


def register(op: Operation) -> Operation:
    """Add an operation (its name must be new)."""
    if op.name in OPERATIONS:
        raise ValueError(f"operation {op.name!r} is already registered")
    OPERATIONS[op.name] = op
    return op


def radius(
    op: str, tensors: Mapping[str, torch.Tensor], params: Mapping[str, Any] | None = None
) -> Radius:
    """The certified radius of a registered operation's inputs (``compute.radius``):
    ``tensors`` by the names its job takes (``OPERATIONS[op].tensors``: ``q``, ``k``, ``v``;
    ``adapters.q.a`` ...) and its parameters (``scale``, ``causal``, ``alpha``; others are
    ignored). Raises ``InvalidInputError`` naming a missing tensor or a bad value, ``KeyError``
    for an unknown operation."""
    if op not in OPERATIONS:
        raise KeyError(f"unknown operation {op!r}; one of {sorted(OPERATIONS)}")
    entry = OPERATIONS[op]
    for t in entry.tensors:
        if t.required and t.name not in tensors:
            raise InvalidInputError(t.name, "missing tensor")
    if entry.radius is None:
        raise InvalidInputError("op", f"operation {op!r} has no certified radius")
    return entry.radius(tensors, dict(params or {}))


# ------------------------------------------------------------------------------ shape rules
def _wire(name: str) -> str:
    """The service names a tensor's shape ``k.shape``; a whole group stays ``adapters``."""
    return f"{name}.shape"


def attention_shapes(shapes: Shapes) -> None:
    attention_rule(shapes, label=_wire)


def tensor_attention_shapes(shapes: Shapes) -> None:
    tensor_attention_rule(shapes, label=_wire)


def lora_shapes(shapes: Shapes) -> None:
    lora_rule(shapes, label=_wire)


# ------------------------------------------------------------------------------ runners
def _run_attention(
    t: Mapping[str, torch.Tensor], p: Mapping[str, Any], progress: Progress | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    res = attention(t["q"], t["k"], t["v"], progress=progress, **p)
    return {"output": res.output}, res.summary()


def _run_tensor_attention(
    t: Mapping[str, torch.Tensor], p: Mapping[str, Any], progress: Progress | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    res = tensor_attention(t["q"], t["k1"], t["k2"], t["v1"], t["v2"], progress=progress, **p)
    return {"output": res.output}, res.summary()


def _run_lora(
    t: Mapping[str, torch.Tensor], p: Mapping[str, Any], progress: Progress | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    adapters = {
        m: (t[f"adapters.{m}.a"], t[f"adapters.{m}.b"])
        for m in LORA_ADAPTERS
        if f"adapters.{m}.a" in t
    }
    res = lora_gradient(
        t["x"],
        t["y"],
        w_q=t["w_q"],
        w_k=t["w_k"],
        w_v=t["w_v"],
        adapters=adapters,
        progress=progress,
        **p,
    )
    outputs = {"loss": torch.tensor(float(res.loss), dtype=torch.float64)}
    for m, (d_a, d_b) in res.grads.items():
        outputs[f"adapters.{m}.a"], outputs[f"adapters.{m}.b"] = d_a, d_b
    summary = dict(res.summary())
    summary.setdefault("loss", float(res.loss))
    return outputs, summary


# ------------------------------------------------------------------------------ radii
def _with_dv(r: Radius, dv: int) -> Radius:
    return dataclasses.replace(r, plan_args={**r.plan_args, "dv": dv})


def _attention_radius(t: Mapping[str, torch.Tensor], p: Mapping[str, Any]) -> Radius:
    r = attention_radius(t["q"], t["k"], scale=p.get("scale"), causal=p.get("causal", False))
    return _with_dv(r, int(t["v"].shape[-1])) if "v" in t else r


def _tensor_attention_radius(t: Mapping[str, torch.Tensor], p: Mapping[str, Any]) -> Radius:
    r = tensor_attention_radius(t["q"], t["k1"], t["k2"], scale=p.get("scale"))
    return _with_dv(r, int(t["v1"].shape[-1])) if "v1" in t else r


def _lora_radius(t: Mapping[str, torch.Tensor], p: Mapping[str, Any]) -> Radius:
    adapters = {
        m: (t[f"adapters.{m}.a"], t[f"adapters.{m}.b"])
        for m in LORA_ADAPTERS
        if f"adapters.{m}.a" in t and f"adapters.{m}.b" in t
    }
    return lora_radius(
        t["x"],
        t["y"],
        w_q=t["w_q"],
        w_k=t["w_k"],
        w_v=t["w_v"],
        adapters=adapters,
        alpha=p.get("alpha", REQUIRED),
        scale=p.get("scale"),
    )


# ------------------------------------------------------------------------------ the entries
_COMMON = (
    Scalar(
        "method",
        str,
        "auto",
        "exact, polynomial, or auto (the planner picks)",
        choices=("auto", "exact", "polynomial"),
    ),
    Scalar(
        "eps",
        float,
        1e-3,
        "target error bound, a fraction of the output's natural scale",
        gt=0,
        lt=1,
    ),
    Scalar("scale", float, None, "score scale; null: 1/sqrt(d)", nullable=True),
)
_SAMPLE_ROWS = Scalar(
    "sample_rows", int, 0, "rows recomputed exactly to report a measured error", ge=0, le=65_536
)
_PLAN_COMMON = (
    Scalar("n", int, doc="sequence length", ge=1, le=1 << 31),
    Scalar("d", int, doc="head dimension", ge=1, le=1 << 16),
    Scalar("radius", float, doc="certified radius R of the scores", ge=0, le=1e4),
    Scalar("eps", float, 1e-3, gt=0, lt=1),
    Scalar("method", str, "auto", choices=("auto", "exact", "polynomial")),
    Scalar("batch", int, 1, "leading (batch x heads) slices", ge=1, le=1 << 20),
    Scalar("dtype", str, "float32", choices=("float16", "bfloat16", "float32", "float64")),
)
_EPS_MODE = Scalar(
    "eps_mode",
    str,
    "scale",
    "scale: bound <= eps * the gradient's natural scale max N(G) (N >= |G|, no cancellation); "
    "strict: bound <= eps * max|G| (docs/lora.md, 'Meaning of eps')",
    choices=("scale", "strict"),
)
_ESTIMATOR = Scalar(
    "estimator",
    str,
    "auto",
    "polynomial path: auto (the cheaper certified one per plan), reverse (reverse mode through "
    "the factored forward) or chained (the exact softmax backward on the surrogate weights; "
    "docs/lora.md, 'Two estimators')",
    choices=("auto", "reverse", "chained"),
)
_DV = Scalar("dv", int, None, "value dimension (default d)", ge=1, le=1 << 16, nullable=True)

register(
    Operation(
        name="attention",
        summary="softmax(scale q kᵀ) v, exact or by the polynomial method, with a certified bound",
        tensors=(
            TensorArg("q", "(..., n, d)"),
            TensorArg("k", "(..., m, d)"),
            TensorArg("v", "(..., m, dv)"),
        ),
        params=(
            *_COMMON,
            Scalar("causal", bool, False, "causal mask (query i sees keys <= i)"),
            _SAMPLE_ROWS,
        ),
        outputs="output (..., n, dv), dtype of v",
        check_shapes=attention_shapes,
        run=_run_attention,
        plan=plan_attention,
        plan_params=(*_PLAN_COMMON, Scalar("causal", bool, False), _DV),
        radius=_attention_radius,
    )
)
register(
    Operation(
        name="tensor-attention",
        summary="triple-wise attention softmax(q (k1 ⊘ k2)ᵀ) (v1 ⊘ v2), with a certified bound",
        tensors=(
            TensorArg("q", "(..., n, d)"),
            TensorArg("k1", "(..., n1, d)"),
            TensorArg("k2", "(..., n2, d)"),
            TensorArg("v1", "(..., n1, dv)"),
            TensorArg("v2", "(..., n2, dv)"),
        ),
        params=(*_COMMON, _SAMPLE_ROWS),
        outputs="output (..., n, dv)",
        check_shapes=tensor_attention_shapes,
        run=_run_tensor_attention,
        plan=plan_tensor_attention,
        plan_params=(*_PLAN_COMMON, _DV),
        radius=_tensor_attention_radius,
    )
)
register(
    Operation(
        name="lora-gradient",
        summary="LoRA adapter gradients of an attention layer (partial: q, v; full: q, k, v)",
        tensors=(
            TensorArg("x", "(..., L, d_model)"),
            TensorArg("y", "(..., L, d_head)"),
            TensorArg("w_q", "(d_model, d_head)"),
            TensorArg("w_k", "(d_model, d_head)"),
            TensorArg("w_v", "(d_model, d_head)"),
            *(
                TensorArg(f"adapters.{m}.{part}", shape, required=m != "k")
                for m in LORA_ADAPTERS
                for part, shape in (("a", "(r, d_head)"), ("b", "(d_model, r)"))
            ),
        ),
        params=(
            *_COMMON,
            Scalar("alpha", float, doc="LoRA scaling numerator (s = alpha / rank)", gt=0),
            _EPS_MODE,
            _ESTIMATOR,
        ),
        outputs="loss (0-d, FP64) and adapters.{m}.a, adapters.{m}.b: the gradients of A_m, B_m",
        check_shapes=lora_shapes,
        run=_run_lora,
        plan=plan_lora_gradient,
        plan_params=(
            *_PLAN_COMMON,
            Scalar("rank", int, 4, "adapter rank r", ge=1, le=4096),
            Scalar("full", bool, False, "full adaptation (q, k, v) instead of partial (q, v)"),
            _EPS_MODE,
            _ESTIMATOR,
            Scalar(
                "kappa",
                float,
                None,
                "strict mode: the gradient's conditioning max N / max|G| (e.g. kappa_max of an "
                "earlier result); null: the a-priori model",
                ge=1,
                le=1e300,
                nullable=True,
            ),
        ),
        radius=_lora_radius,
    )
)
