"""Pydantic models, named by role: the tensor on the wire, public views of jobs, results, plans,
errors. The request and parameter models of each operation are built from the registry
(``app.api.requests``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

__all__ = [
    "ErrorBody",
    "ErrorDetail",
    "HealthPublic",
    "JobPublic",
    "JobStatus",
    "PlanPublic",
    "ProgressPublic",
    "ResultPublic",
    "TensorJSON",
]

Datatype = Literal["FP32", "FP64", "FP16", "BF16"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class TensorJSON(BaseModel):
    """KServe v2 style tensor: flat row-major ``data`` of ``prod(shape)`` finite numbers."""

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={"example": {"shape": [2, 2], "datatype": "FP32", "data": [1, 0, 0, 1]}},
    )

    shape: list[int]
    datatype: Datatype
    data: list[float]


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class ProgressPublic(BaseModel):
    done: int
    total: int


class JobPublic(BaseModel):
    id: str
    op: str
    status: JobStatus
    attempts: int
    progress: ProgressPublic | None = None
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    error: ErrorDetail | None = None
    summary: dict[str, Any] | None = None
    cancel_requested: bool = False


class ResultPublic(BaseModel):
    id: str
    outputs: dict[str, TensorJSON]
    summary: dict[str, Any] | None


class PlanPublic(BaseModel):
    op: str
    inputs: dict[str, Any]
    plan: dict[str, Any]
    radius: dict[str, Any] | None = None  # POST /v1/plan: R and rho computed from the tensors


class HealthPublic(BaseModel):
    status: Literal["ok", "unavailable"]
    redis: bool | None = None
    workers: int | None = None
