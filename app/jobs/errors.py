# ruff: noqa: N818  (HTTP-style names, as httpx/starlette: BadRequest, JobNotFound)
"""One exception hierarchy for the service and ONE table mapping errors to answers: the API's
HTTP status and code, and a failed job's error code (the worker retries what maps to 5xx).

Every error the API returns has the body ``{"error": {"code": ..., "message": ...}}``; the
message names the offending field (``q.data``, ``adapters.q.a.shape``) where there is one.
The table names compute's and redis's exceptions, so it is built on first use: importing this
module (as the client and the CLI do, through the codec) loads neither torch nor redis.
"""

from __future__ import annotations

from functools import cache

__all__ = [
    "BadRequest",
    "Forbidden",
    "IdempotencyConflict",
    "InvalidInput",
    "JobNotFinished",
    "JobNotFound",
    "NoResult",
    "NotAcceptable",
    "OpenAccessRefused",
    "PayloadTooLarge",
    "QueueFull",
    "QueueUnavailable",
    "ServiceError",
    "StaleAttempt",
    "UnsupportedMediaType",
    "error_body",
    "error_table",
    "http_status",
    "job_error",
]


class ServiceError(Exception):
    """Base class; ``code`` is the stable machine-readable error code."""

    code = "error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        self.message = f"{field}: {message}" if field else message
        super().__init__(self.message)


class BadRequest(ServiceError):
    """The body cannot be parsed at all (malformed JSON or safetensors)."""

    code = "malformed_body"


class InvalidInput(ServiceError):
    """The body parses but a field is wrong (shape, datatype, NaN, range...)."""

    code = "invalid_input"


class PayloadTooLarge(ServiceError):
    code = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    code = "unsupported_media_type"


class NotAcceptable(ServiceError):
    code = "not_acceptable"


class Forbidden(ServiceError):
    """No or a wrong API key (401 with ``WWW-Authenticate: Bearer``)."""

    code = "unauthorized"


class OpenAccessRefused(ServiceError):
    """No API key is set and the request came over a non-loopback address (ALLOW_OPEN unset)."""

    code = "open_access_refused"


class IdempotencyConflict(ServiceError):
    """An Idempotency-Key reused with a different body."""

    code = "idempotency_key_reused"


class QueueFull(ServiceError):
    """Backpressure: the submit budget (jobs, bytes, Redis memory or uploads) is spent."""

    code = "queue_full"


class JobNotFound(ServiceError):
    code = "not_found"


class JobNotFinished(ServiceError):
    code = "not_finished"


class NoResult(ServiceError):
    """The job ended without a result (failed or cancelled)."""

    code = "no_result"


class QueueUnavailable(ServiceError):
    code = "queue_unavailable"


class StaleAttempt(ServiceError):
    """A worker tried to write with a fencing token that is no longer the job's current one."""

    code = "stale_attempt"


@cache
def error_table() -> dict[type[BaseException], tuple[int, str]]:
    """The one table: exception type -> (HTTP status, error code), looked up along the MRO."""
    import redis

    import compute

    return {
        BadRequest: (400, BadRequest.code),
        Forbidden: (401, Forbidden.code),
        OpenAccessRefused: (403, OpenAccessRefused.code),
        JobNotFound: (404, JobNotFound.code),
        NotAcceptable: (406, NotAcceptable.code),
        JobNotFinished: (409, JobNotFinished.code),
        NoResult: (409, NoResult.code),
        PayloadTooLarge: (413, PayloadTooLarge.code),
        UnsupportedMediaType: (415, UnsupportedMediaType.code),
        InvalidInput: (422, InvalidInput.code),
        IdempotencyConflict: (422, IdempotencyConflict.code),
        QueueFull: (429, QueueFull.code),
        compute.InvalidInputError: (422, "invalid_input"),
        compute.CertificationError: (422, "certification_failed"),
        compute.Cancelled: (409, "cancelled"),
        QueueUnavailable: (503, QueueUnavailable.code),
        redis.RedisError: (503, QueueUnavailable.code),
        StaleAttempt: (409, StaleAttempt.code),
    }


def http_status(exc: BaseException) -> tuple[int, str]:
    """(status, code) for an exception; 500/internal_error for anything not in the table."""
    table = error_table()
    for klass in type(exc).__mro__:
        if klass in table:
            return table[klass]
    return 500, "internal_error"


def job_error(exc: BaseException) -> tuple[str, bool]:
    """A failed attempt's (error code, retry?): what the table maps to 4xx fails the job at once
    (it would fail again); anything else is retried. compute refuses arguments with ValueError or
    TypeError, so on the worker side those are invalid input too."""
    status, code = http_status(exc)
    if status < 500:
        return code, False
    if isinstance(exc, ValueError | TypeError):
        return "invalid_input", False
    return code, True


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}
