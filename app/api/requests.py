"""The three operations as the API sees them: request models, tensor names, up-front checks.

A request becomes ``(params, tensors)``: params a JSON-safe dict for the compute call, tensors a
``{name: RawTensor}`` map (nested LoRA adapters named ``adapters.q.a``). Shapes are checked here,
before anything is queued, so bad input is a 422 and never a failed job.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from app.api.models import (
    AttentionParams,
    AttentionRequest,
    LoraGradientParams,
    LoraGradientRequest,
    TensorAttentionParams,
    TensorAttentionRequest,
    TensorJSON,
)
from app.jobs.codec import RawTensor, check_shape, from_json
from app.jobs.errors import BadRequest, InvalidInput

__all__ = [
    "OPS",
    "OpSpec",
    "parse_binary",
    "parse_json",
    "validation_message",
]

Tensors = dict[str, RawTensor]


@dataclass(frozen=True)
class OpSpec:
    name: str
    request: type[BaseModel]
    params: type[BaseModel]
    fixed_tensors: tuple[str, ...]
    check: Callable[[Tensors], None]


def _dims(name: str, t: RawTensor, *, exact: int | None = None) -> tuple[int, ...]:
    if exact is not None and len(t.shape) != exact:
        raise InvalidInput(
            f"expected {exact} dimensions, got {list(t.shape)}", field=f"{name}.shape"
        )
    if len(t.shape) < 2:
        raise InvalidInput(
            f"expected at least 2 dimensions (..., rows, cols), got {list(t.shape)}",
            field=f"{name}.shape",
        )
    if 0 in t.shape:
        raise InvalidInput(f"empty tensor (shape {list(t.shape)})", field=f"{name}.shape")
    return t.shape


def _same(names: list[str], values: list[Any], what: str) -> None:
    for name, value in zip(names[1:], values[1:], strict=True):
        if value != values[0]:
            raise InvalidInput(
                f"{what} {value} does not match {names[0]}'s {values[0]}", field=f"{name}.shape"
            )


def _check_attention(t: Tensors) -> None:
    q, k, v = (_dims(n, t[n]) for n in ("q", "k", "v"))
    _same(["q", "k", "v"], [list(x[:-2]) for x in (q, k, v)], "leading dimensions")
    _same(["q", "k"], [q[-1], k[-1]], "head dimension")
    _same(["k", "v"], [k[-2], v[-2]], "key count")


def _check_tensor_attention(t: Tensors) -> None:
    names = ["q", "k1", "k2", "v1", "v2"]
    s = {n: _dims(n, t[n]) for n in names}
    _same(names, [list(s[n][:-2]) for n in names], "leading dimensions")
    _same(["q", "k1", "k2"], [s[n][-1] for n in ("q", "k1", "k2")], "head dimension")
    _same(["k1", "k2", "v1", "v2"], [s[n][-2] for n in ("k1", "k2", "v1", "v2")], "key count")
    _same(["v1", "v2"], [s["v1"][-1], s["v2"][-1]], "value dimension")


def _check_lora(t: Tensors) -> None:
    x, y = _dims("x", t["x"]), _dims("y", t["y"])
    w = {m: _dims(f"w_{m}", t[f"w_{m}"], exact=2) for m in "qkv"}
    _same(["x", "y"], [list(x[:-1]), list(y[:-1])], "leading dimensions")
    for m in "qkv":
        if w[m][0] != x[-1]:
            raise InvalidInput(
                f"rows {w[m][0]} do not match x's feature dimension {x[-1]}", field=f"w_{m}.shape"
            )
    _same(["w_q", "w_k"], [w["q"][1], w["k"][1]], "column count")
    if w["v"][1] != y[-1]:
        raise InvalidInput(
            f"y's last dimension {y[-1]} != w_v's columns {w['v'][1]}", field="y.shape"
        )
    adapters = sorted({n.split(".")[1] for n in t if n.startswith("adapters.")})
    for m in adapters:
        if m not in ("q", "k", "v"):
            raise InvalidInput(f"unknown adapter {m!r}; use q, k or v", field="adapters")
    for m in ("q", "v"):
        if m not in adapters:
            raise InvalidInput(
                f"missing {m!r}: partial adaptation needs 'q' and 'v', full adds 'k'",
                field="adapters",
            )
        for part in ("a", "b"):
            if f"adapters.{m}.{part}" not in t:
                raise InvalidInput("missing", field=f"adapters.{m}.{part}")
        a = _dims(f"adapters.{m}.a", t[f"adapters.{m}.a"], exact=2)
        b = _dims(f"adapters.{m}.b", t[f"adapters.{m}.b"], exact=2)
        if b[1] != a[0]:
            raise InvalidInput(
                f"B's columns {b[1]} != A's rank (rows) {a[0]}", field=f"adapters.{m}.b.shape"
            )
        if (b[0], a[1]) != tuple(w[m]):
            raise InvalidInput(
                f"B @ A has shape {[b[0], a[1]]} but w_{m} is {list(w[m])}",
                field=f"adapters.{m}.a.shape",
            )


OPS: dict[str, OpSpec] = {
    "attention": OpSpec(
        "attention", AttentionRequest, AttentionParams, ("q", "k", "v"), _check_attention
    ),
    "tensor-attention": OpSpec(
        "tensor-attention",
        TensorAttentionRequest,
        TensorAttentionParams,
        ("q", "k1", "k2", "v1", "v2"),
        _check_tensor_attention,
    ),
    "lora-gradient": OpSpec(
        "lora-gradient",
        LoraGradientRequest,
        LoraGradientParams,
        ("x", "y", "w_q", "w_k", "w_v"),
        _check_lora,
    ),
}


def validation_message(exc: ValidationError) -> str:
    """``field.path: message`` for the first error, plus a count of the others."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"] if p not in ("body",))
    msg = f"{loc}: {first['msg']}" if loc else str(first["msg"])
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more)"
    return msg


# `"name": {"shape": [..]` or a bare `"shape": [..]`: the declared shapes, found with a linear
# scan before any list of numbers is built.
_SHAPE = re.compile(rb'"shape"\s*:\s*\[([^\[\]{}"]{0,1000})\]')
_OWNER = re.compile(rb'"([A-Za-z0-9_.]{1,64})"\s*:\s*\{\s*$')
_INT = re.compile(rb"\s*(\d{1,30})\s*$")


def prescan_shapes(body: bytes | bytearray, *, max_elements: int) -> None:
    """Refuse a JSON body whose declared shapes exceed ``max_elements`` before it is parsed.

    Parsing builds every ``data`` list as Python floats (several times the body's size); a shape
    over the limit is known from a few bytes. Shapes this scan cannot read are left to the full
    validation that follows, which checks every shape again.
    """
    for m in _SHAPE.finditer(body):
        dims = [_INT.match(p) for p in m.group(1).split(b",")] if m.group(1).strip() else []
        if not all(dims):
            continue
        owner = _OWNER.search(body, max(m.start() - 100, 0), m.start())
        name = owner.group(1).decode() if owner else "tensor"
        check_shape(name, [int(d.group(1)) for d in dims if d], max_elements)


def parse_json(
    spec: OpSpec, body: bytes | bytearray, *, max_elements: int
) -> tuple[dict[str, Any], Tensors]:
    """Validate a JSON body (400 when it is not JSON, 422 when a field is wrong)."""
    prescan_shapes(body, max_elements=max_elements)
    try:
        req = spec.request.model_validate_json(body, strict=True)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            raise BadRequest(f"malformed JSON: {exc.errors()[0]['msg']}") from None
        if any(e["type"] == "model_type" and not e["loc"] for e in exc.errors()):
            raise BadRequest("the body must be a JSON object") from None
        raise InvalidInput(validation_message(exc)) from None
    params = req.model_dump(include=set(spec.params.model_fields))
    tensors: Tensors = {}

    def add(name: str, tj: TensorJSON) -> None:
        tensors[name] = from_json(name, tj.shape, tj.datatype, tj.data, max_elements=max_elements)

    for name in spec.fixed_tensors:
        add(name, getattr(req, name))
    if isinstance(req, LoraGradientRequest):
        for m, ad in sorted(req.adapters.items()):
            add(f"adapters.{m}.a", ad.a)
            add(f"adapters.{m}.b", ad.b)
    spec.check(tensors)
    return params, tensors


def _meta_params(metadata: Mapping[str, str]) -> dict[str, Any]:
    return {k: v for k, v in metadata.items() if v.strip().lower() not in ("", "null", "none")}


def parse_binary(
    spec: OpSpec, tensors: Tensors, metadata: Mapping[str, str]
) -> tuple[dict[str, Any], Tensors]:
    """Validate a decoded safetensors body: tensor names as the JSON fields, params in metadata."""
    try:
        params = spec.params.model_validate(_meta_params(metadata)).model_dump()
    except ValidationError as exc:
        raise InvalidInput(validation_message(exc)) from None
    allowed = set(spec.fixed_tensors)
    if spec.name == "lora-gradient":
        allowed |= {f"adapters.{m}.{p}" for m in "qkv" for p in "ab"}
    for name in sorted(set(tensors) - allowed):
        raise InvalidInput(f"unexpected tensor; expected {sorted(allowed)}", field=name)
    for name in spec.fixed_tensors:
        if name not in tensors:
            raise InvalidInput("missing tensor", field=name)
    spec.check(tensors)
    return params, tensors
