"""Responses the API builds in more than one place: error bodies (one mapping from
exceptions, via ``app.jobs.errors.error_table``) and the public view of a job."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import redis
from fastapi.responses import JSONResponse

from app.api.models import JobPublic
from app.jobs import metrics
from app.jobs.errors import (
    error_body,
    http_status,
)

__all__ = [
    "error_response",
    "job_public",
    "redis_message",
]

log = logging.getLogger("app")


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat() if ts is not None else None


def job_public(job: dict[str, Any]) -> dict[str, Any]:
    view = {k: job.get(k) for k in JobPublic.model_fields}
    for k in ("created_at", "started_at", "finished_at"):
        view[k] = _iso(job.get(k))
    return JobPublic.model_validate(view).model_dump(mode="json")


def redis_message(exc: redis.RedisError) -> str:
    """A message for a Redis failure that never echoes Redis's own text (commands, keys)."""
    if isinstance(exc, redis.exceptions.OutOfMemoryError) or str(exc).startswith("OOM"):
        return "the job queue's storage is full; retry later"
    return "the job queue (Redis) is unavailable; retry shortly"


def error_response(exc: BaseException) -> JSONResponse:
    status, code = http_status(exc)
    if isinstance(exc, redis.RedisError):
        metrics.REDIS_ERRORS.labels("api", type(exc).__name__).inc()
        log.warning("Redis error: %s: %s", type(exc).__name__, exc)
        message = redis_message(exc)
    else:
        message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    if status >= 500 and code == "internal_error":
        log.error("unhandled error", exc_info=exc)
        message = "internal error"
    headers: dict[str, str] = {}
    if status in (429, 503):
        headers["Retry-After"] = "5" if status == 503 else "2"
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="certified-attention"'
    return JSONResponse(error_body(code, message), status_code=status, headers=headers or None)
