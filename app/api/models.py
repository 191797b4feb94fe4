"""Pydantic models, named by role: requests, parameters, public views of jobs, plans, errors."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "AdapterJSON",
    "AttentionParams",
    "AttentionRequest",
    "ErrorBody",
    "ErrorDetail",
    "HealthPublic",
    "JobPublic",
    "JobStatus",
    "LoraGradientParams",
    "LoraGradientRequest",
    "Method",
    "PlanPublic",
    "ProgressPublic",
    "ResultPublic",
    "TensorAttentionParams",
    "TensorAttentionRequest",
    "TensorJSON",
]

Method = Literal["auto", "exact", "polynomial"]
Datatype = Literal["FP32", "FP64", "FP16", "BF16"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)


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


class _CommonParams(BaseModel):
    model_config = _STRICT

    method: Method = "auto"
    eps: float = Field(default=1e-3, gt=0, lt=1, description="target relative error bound")
    scale: float | None = Field(default=None, description="score scale; None: 1/sqrt(d)")


class AttentionParams(_CommonParams):
    causal: bool = False
    sample_rows: int = Field(default=0, ge=0, le=65_536, description="rows for measured error")


class TensorAttentionParams(_CommonParams):
    sample_rows: int = Field(default=0, ge=0, le=65_536, description="rows for measured error")


class LoraGradientParams(_CommonParams):
    alpha: float = Field(gt=0, description="LoRA scaling numerator (s = alpha / rank)")


class AttentionRequest(AttentionParams):
    """``softmax(scale * q k^T) v``; q ``(..., n, d)``, k ``(..., m, d)``, v ``(..., m, dv)``."""

    q: TensorJSON
    k: TensorJSON
    v: TensorJSON


class TensorAttentionRequest(TensorAttentionParams):
    """Triple-wise attention; q ``(..., n, d)``, k1/k2 ``(..., m, d)``, v1/v2 ``(..., m, dv)``."""

    q: TensorJSON
    k1: TensorJSON
    k2: TensorJSON
    v1: TensorJSON
    v2: TensorJSON


class AdapterJSON(BaseModel):
    model_config = _STRICT

    a: TensorJSON = Field(description="A, (rank, d_in)")
    b: TensorJSON = Field(description="B, (d_out, rank)")


class LoraGradientRequest(LoraGradientParams):
    """Adapter gradients of ``1/2 ||softmax(Q K^T / tau) V - Y||^2`` with Q = X W_Q etc."""

    x: TensorJSON
    y: TensorJSON
    w_q: TensorJSON
    w_k: TensorJSON
    w_v: TensorJSON
    adapters: dict[Literal["q", "k", "v"], AdapterJSON] = Field(min_length=1)


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


class HealthPublic(BaseModel):
    status: Literal["ok", "unavailable"]
    redis: bool | None = None
    workers: int | None = None
