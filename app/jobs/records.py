"""The job records without any I/O: Redis key names, the records' public view, and each
script call as data (a :class:`Call`: script name, arguments, reply decoder) that the synchronous
and the asyncio client both run (``app.jobs.queue``)."""

from __future__ import annotations

import hashlib
import json
import math
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from app.jobs.codec import RawTensor
from app.jobs.errors import (
    IdempotencyConflict,
    JobNotFinished,
    JobNotFound,
    NoResult,
    QueueFull,
    StaleAttempt,
)

__all__ = [
    "BUDGET_KEY",
    "DONE_CHANNEL",
    "GROUP",
    "PREFIX",
    "STATS_KEY",
    "TERMINAL",
    "WORKERS_KEY",
    "Attempt",
    "Call",
    "QueueStatus",
    "Submitted",
    "body_digest",
    "cancel_call",
    "checked",
    "flat_record",
    "get_call",
    "idem_key",
    "input_key",
    "job_key",
    "lease_key",
    "operation_names",
    "output_key",
    "outputs_of",
    "public_record",
    "retry_after",
    "status_call",
    "stream_key",
    "submit_call",
    "text",
    "valid_id",
]

PREFIX = "attn"
GROUP = "workers"


def operation_names() -> tuple[str, ...]:
    """The registered operations (``compute.registry``): one stream and group each. Read at call
    time, so an operation registered after start-up (a test's toy one) is served too."""
    from compute.registry import OPERATIONS

    return tuple(OPERATIONS)


TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
WORKERS_KEY = f"{PREFIX}:workers"
STATS_KEY = f"{PREFIX}:stats"
BUDGET_KEY = f"{PREFIX}:budget"
DONE_CHANNEL = f"{PREFIX}:done"

T = TypeVar("T")


def job_key(job_id: str) -> str:
    return f"{PREFIX}:job:{job_id}"


def input_key(job_id: str, name: str) -> str:
    return f"{PREFIX}:in:{job_id}:{name}"


def output_key(job_id: str, name: str) -> str:
    return f"{PREFIX}:out:{job_id}:{name}"


def stream_key(op: str) -> str:
    return f"{PREFIX}:stream:{op}"


def lease_key(worker_id: str) -> str:
    return f"{PREFIX}:lease:{worker_id}"


def idem_key(owner: str, key: str) -> str:
    return f"{PREFIX}:idem:{owner or '-'}:{hashlib.sha256(key.encode()).hexdigest()[:32]}"


def text(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def valid_id(job_id: str) -> bool:
    return len(job_id) == 32 and all(c in "0123456789abcdef" for c in job_id)


@dataclass
class Attempt:
    """One attempt at a job, held by one worker; ``token`` fences every write it makes."""

    job_id: str
    op: str
    entry_id: str
    token: int
    attempt: int
    params: dict[str, Any]
    inputs: dict[str, dict[str, Any]]
    worker_id: str
    tensors: dict[str, RawTensor] = field(default_factory=dict)
    last_progress_write: float = field(default=0.0)
    # (done, total) as the compute last reported it; the result's write records it
    progress: tuple[int, int] = field(default=(0, 0))


@dataclass(frozen=True)
class Submitted:
    """A submit's answer: the job record, and whether an Idempotency-Key replayed an earlier one."""

    job: dict[str, Any]
    replayed: bool = False


@dataclass(frozen=True)
class QueueStatus:
    """Cluster-wide figures for readiness and metrics, read in one script call."""

    stats: dict[str, int]
    waiting: dict[str, int]
    held: dict[str, int]
    oldest_age: dict[str, float]  # seconds since the oldest unfinished entry was added; 0 = none
    groups: dict[str, bool]  # the consumer group exists
    workers: list[str]  # live workers (lease current)


@dataclass(frozen=True)
class Call(Generic[T]):
    """One script call, independent of the client that runs it (sync or asyncio)."""

    script: str
    args: list[Any]
    decode: Callable[[Any], T]


# ---------------------------------------------------------------------------------- decoding
def flat_record(flat: list[Any]) -> dict[str, str]:
    return {text(flat[i]) or "": text(flat[i + 1]) or "" for i in range(0, len(flat), 2)}


def public_record(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The job as the API shows it (timestamps as floats; the API formats them)."""

    def ts(name: str) -> float | None:
        v = raw.get(name)
        return float(v) if v not in (None, "") else None

    done, total = raw.get("progress_done"), raw.get("progress_total")
    error = None
    if raw.get("status") in ("failed", "cancelled") and raw.get("error_code"):
        error = {"code": raw["error_code"], "message": raw.get("error_message") or ""}
    elif raw.get("status") == "cancelled":
        error = {"code": "cancelled", "message": "the job was cancelled"}
    summary = raw.get("summary")
    return {
        "id": raw.get("id"),
        "op": raw.get("op"),
        "status": raw.get("status"),
        "attempts": int(raw.get("attempts") or 0),
        "progress": (
            {"done": int(done), "total": int(total)}
            if done not in (None, "") and total not in (None, "") and int(total) > 0
            else None
        ),
        "created_at": ts("created_at"),
        "started_at": ts("started_at"),
        "finished_at": ts("finished_at"),
        "error": error,
        "summary": json.loads(summary) if summary else None,
        "outputs": json.loads(raw["outputs"]) if raw.get("outputs") else {},
        "cancel_requested": raw.get("cancel") == "1",
        "worker": raw.get("worker") or None,
    }


def checked(reply: list[Any], what: str) -> list[Any]:
    """A fenced script's reply, or StaleAttempt when the attempt is no longer current."""
    if text(reply[0]) == "stale":
        raise StaleAttempt(f"{what} was superseded (current token {text(reply[1]) or 'none'})")
    return reply


# ---------------------------------------------------------------------------------- calls
def submit_call(
    op: str,
    params: Mapping[str, Any],
    tensors: Mapping[str, RawTensor],
    *,
    max_jobs: int,
    max_bytes: int,
    idempotency_key: str | None,
    digest: str,
    owner: str,
    job_id: str | None = None,
) -> Call[tuple[str, str, dict[str, Any]]]:
    job_id = job_id or uuid.uuid4().hex
    names = sorted(tensors)
    size = sum(len(tensors[n].data) for n in names)
    now = repr(time.time())
    inputs_meta = json.dumps({n: tensors[n].meta() for n in names})
    fresh = public_record({"id": job_id, "op": op, "status": "queued", "created_at": now})
    args: list[Any] = [
        now,
        job_id,
        op,
        json.dumps(dict(params)),
        inputs_meta,
        " ".join(names),
        str(size),
        str(max_jobs),
        str(max_bytes),
        idem_key(owner, idempotency_key) if idempotency_key else "",
        digest,
        owner,
        *(tensors[n].data for n in names),
    ]

    def decode(reply: list[Any]) -> tuple[str, str, dict[str, Any]]:
        outcome, value = text(reply[0]) or "", text(reply[1]) or ""
        if outcome == "conflict":
            raise IdempotencyConflict(
                f"Idempotency-Key was already used for job {value} with a different body"
            )
        if outcome == "busy_jobs":
            raise QueueFull(
                f"the queue holds {value} unfinished jobs, its limit (MAX_QUEUED_JOBS); "
                "retry after a while"
            )
        if outcome == "busy_bytes":
            raise QueueFull(
                f"unfinished jobs hold {value} bytes of inputs; this job's {size} bytes would pass "
                f"the limit of {max_bytes} (MAX_QUEUED_BYTES); retry after a while"
            )
        return outcome, value, fresh

    return Call("submit", args, decode)


def get_call(job_id: str, owner: str, *, outputs: bool) -> Call[dict[str, Any]]:
    def decode(reply: list[Any]) -> dict[str, Any]:
        if not reply:
            raise JobNotFound(f"job {job_id} is unknown or expired")
        job = public_record(flat_record(reply[0]))
        if outputs:
            blobs = {text(reply[1][i]) or "": reply[1][i + 1] for i in range(0, len(reply[1]), 2)}
            job["_blobs"] = blobs
            job["_outputs_missing"] = text(reply[2]) == "1"
        return job

    if not valid_id(job_id):
        return Call("get", ["-", owner, "0"], decode)
    return Call("get", [job_id, owner, "1" if outputs else "0"], decode)


def outputs_of(job: dict[str, Any]) -> tuple[dict[str, Any], dict[str, RawTensor]]:
    job_id = job["id"]
    blobs = job.pop("_blobs", {})
    missing = job.pop("_outputs_missing", False)
    if job["status"] != "succeeded":
        if job["status"] in TERMINAL:
            raise NoResult(f"job {job_id} {job['status']}; it has no result")
        raise JobNotFinished(f"job {job_id} is {job['status']}")
    if missing:
        raise JobNotFound(f"the result of job {job_id} expired")
    meta: dict[str, dict[str, Any]] = job["outputs"]
    outputs = {
        n: RawTensor(m["datatype"], tuple(m["shape"]), bytes(blobs[n])) for n, m in meta.items()
    }
    return job, outputs


def cancel_call(job_id: str, owner: str, ttl: int) -> Call[None]:
    def decode(reply: list[Any]) -> None:
        if text(reply[0]) == "missing":
            raise JobNotFound(f"job {job_id} is unknown or expired")

    if not valid_id(job_id):
        return Call("cancel", ["-", owner, "0", str(ttl)], decode)
    return Call("cancel", [job_id, owner, repr(time.time()), str(ttl)], decode)


def status_call(ops: Iterable[str]) -> Call[QueueStatus]:
    ops = list(ops)

    def decode(reply: list[Any]) -> QueueStatus:
        stats = {k: int(v) for k, v in flat_record(reply[0]).items()}
        per = dict(zip(ops, reply[1], strict=True))
        return QueueStatus(
            stats=stats,
            waiting={op: max(int(p[0]) - int(p[1]), 0) for op, p in per.items()},
            held={op: int(p[1]) for op, p in per.items()},
            oldest_age={op: max(int(p[2]), 0) / 1000.0 for op, p in per.items()},
            groups={op: bool(int(p[3])) for op, p in per.items()},
            workers=sorted(text(w) or "" for w in reply[2]),
        )

    return Call("status", [str(int(time.time() * 1000)), *ops], decode)


def body_digest(*parts: bytes | str) -> str:
    """The digest an Idempotency-Key is bound to (operation, content type, body)."""
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def retry_after(job: Mapping[str, Any]) -> int:
    """Seconds a client should wait before polling again (1 s floor, grows with elapsed time)."""
    created = job.get("created_at") or time.time()
    return max(1, min(30, math.ceil((time.time() - created) / 4)))
