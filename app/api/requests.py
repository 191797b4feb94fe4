"""Requests as the API sees them, derived from the operation registry (``compute.registry``):
the JSON request and parameter models, the tensor names, and the up-front checks.

A request becomes ``(params, tensors)``: params a JSON-safe dict for the compute call, tensors a
``{name: RawTensor}`` map (nested names such as ``adapters.q.a``). Shapes are checked with the
operation's own shape rule before anything is queued, so bad input is a 422, never a failed job.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from app.api.models import TensorJSON
from app.jobs.codec import RawTensor, check_shape, from_json
from app.jobs.errors import BadRequest, InvalidInput
from compute.registry import OPERATIONS, REQUIRED, Operation, Scalar

__all__ = [
    "OpSpec",
    "parse_binary",
    "parse_json",
    "plan_model",
    "plan_model_of_all",
    "specs",
    "validation_message",
]

Tensors = dict[str, RawTensor]

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


def _camel(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"[-_.]", name) if part)


def _field(s: Scalar, *, optional: bool = False) -> tuple[Any, Any]:
    """A pydantic field for a scalar; ``optional``: never required, None when absent."""
    tp: Any = Literal[s.choices] if s.choices else s.type
    if s.nullable or optional:
        tp = tp | None
    default = (None if optional else ...) if s.default is REQUIRED else s.default
    return tp, Field(default, description=s.doc or None, gt=s.gt, ge=s.ge, lt=s.lt, le=s.le)


def _params_model(op: Operation) -> type[BaseModel]:
    fields: dict[str, Any] = {s.name: _field(s) for s in op.params}
    return create_model(f"{_camel(op.name)}Params", __config__=_STRICT, **fields)


def plan_model(op: Operation) -> type[BaseModel]:
    """``/v1/plan``'s query for ``op`` (strings converted; other operations' names ignored)."""
    fields: dict[str, Any] = {s.name: _field(s) for s in op.plan_params}
    config = ConfigDict(extra="ignore", allow_inf_nan=False)
    return create_model(f"{_camel(op.name)}PlanQuery", __config__=config, **fields)


def plan_model_of_all(ops: Iterable[Operation]) -> type[BaseModel]:
    """Every operation's planner arguments, each optional: a query's arguments are checked for
    their type and range whichever operation they belong to (a malformed one is never ignored)."""
    fields: dict[str, Any] = {}
    for op in ops:
        for s in op.plan_params:
            fields.setdefault(s.name, _field(s, optional=True))
    config = ConfigDict(extra="ignore", allow_inf_nan=False)
    return create_model("PlanQuery", __config__=config, **fields)


def _request_model(op: Operation, params: type[BaseModel]) -> type[BaseModel]:
    """The JSON body: the parameters and the tensors, dotted names nested. A group whose tensors
    are all optional may be omitted; when present, all of it is required."""
    tree: dict[str, Any] = {}
    for t in op.tensors:
        node = tree
        *path, leaf = t.name.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[leaf] = t

    def build(node: dict[str, Any], prefix: str) -> tuple[type[BaseModel], bool]:
        fields: dict[str, Any] = {}
        required_any = False
        for key, child in node.items():
            if isinstance(child, dict):
                model, required = build(child, f"{prefix}.{key}" if prefix else key)
                fields[key] = (model, ...) if required else (model | None, None)
            else:
                required = child.required
                fields[key] = (
                    TensorJSON,
                    Field(..., description=f"{child.name} {child.shape}"),
                )
            required_any = required_any or required
        name = f"{_camel(op.name)}{_camel(prefix)}"
        return create_model(name, __config__=_STRICT, **fields), required_any

    fields: dict[str, Any] = {}
    for key, child in tree.items():
        if isinstance(child, dict):
            model, required = build(child, key)
            fields[key] = (model, ...) if required else (model | None, None)
        else:
            fields[key] = (
                TensorJSON,
                Field(...) if child.required else Field(None),
            )
    return create_model(f"{_camel(op.name)}Request", __base__=params, __doc__=op.summary, **fields)


@dataclass(frozen=True)
class OpSpec:
    """An operation as the API handles it (built from its registry entry)."""

    op: Operation
    request: type[BaseModel]
    params: type[BaseModel]

    @property
    def name(self) -> str:
        return self.op.name

    @property
    def tensor_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.op.tensors)

    def check(self, tensors: Tensors) -> None:
        """The operation's shape rule (raises ``compute.InvalidInputError``: a 422)."""
        self.op.check_shapes({n: t.shape for n, t in tensors.items()})


_SPECS: dict[str, tuple[Operation, OpSpec]] = {}


def specs() -> dict[str, OpSpec]:
    """The registered operations as API specs (built once per registry entry)."""
    out: dict[str, OpSpec] = {}
    for name, op in OPERATIONS.items():
        cached = _SPECS.get(name)
        if cached is None or cached[0] is not op:
            params = _params_model(op)
            cached = (op, OpSpec(op, _request_model(op, params), params))
            _SPECS[name] = cached
        out[name] = cached[1]
    return out


def validation_message(exc: ValidationError) -> str:
    """``field.path: message`` for the first error, plus a count of the others."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"] if p not in ("body",))
    msg = f"{loc}: {first['msg']}" if loc else str(first["msg"])
    path = [p for p in first["loc"] if not isinstance(p, int)]
    if path and path[-1] == "data" and len(first["loc"]) > len(path):
        msg += " (data is one flat list of numbers in row-major order; shape gives the dimensions)"
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
    for name in spec.tensor_names:
        node: Any = req
        for part in name.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if isinstance(node, TensorJSON):
            tensors[name] = from_json(
                name, node.shape, node.datatype, node.data, max_elements=max_elements
            )
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
    allowed = set(spec.tensor_names)
    for name in sorted(set(tensors) - allowed):
        raise InvalidInput(f"unexpected tensor; expected {sorted(allowed)}", field=name)
    for t in spec.op.tensors:
        if t.required and t.name not in tensors:
            raise InvalidInput("missing tensor", field=t.name)
    spec.check(tensors)
    return params, tensors
