"""Prometheus metrics of the API and the workers (one definition, used by both)."""

from __future__ import annotations

from typing import Any, TypeVar

from prometheus_client import Counter, Gauge, Histogram

from app.jobs.records import QueueStatus

__all__ = [
    "BYTES_STORED",
    "ERROR_BOUND",
    "FAILURES",
    "GROUPS",
    "GROUPS_RECREATED",
    "HTTP_RESPONSES",
    "JOBS",
    "JOBS_SUBMITTED",
    "JOBS_VANISHED",
    "JOB_SECONDS",
    "LEASE_RENEWALS",
    "OLDEST_AGE",
    "QUEUE_DEPTH",
    "RECLAIMED",
    "REDIS_ERRORS",
    "REJECTED",
    "RETRIES",
    "WORKER_JOBS",
    "WORKER_STAGE",
    "child",
    "set_from_status",
]

QUEUE_DEPTH = Gauge("attn_queue_depth", "Jobs waiting in the operation's stream", ["op"])
JOBS = Gauge(
    "attn_jobs",
    "Jobs by status: queued/running now; succeeded/failed/cancelled since the Redis was created",
    ["op", "status"],
)
OLDEST_AGE = Gauge(
    "attn_oldest_job_age_seconds",
    "Age of the operation's oldest unfinished queue entry (0 when there is none)",
    ["op"],
)
GROUPS = Gauge(
    "attn_queue_group_present", "1 when the operation's consumer group exists in Redis", ["op"]
)
JOBS_SUBMITTED = Counter(
    "attn_jobs_submitted_total", "Jobs accepted by this API", ["op", "transport"]
)
REJECTED = Counter(
    "attn_submits_rejected_total",
    "Submits refused by backpressure (429): queued jobs, queued bytes, Redis memory, uploads",
    ["reason"],
)
HTTP_RESPONSES = Counter(
    "attn_http_responses_total",
    "HTTP responses of the API by route and status",
    ["route", "status"],
)
WORKER_JOBS = Counter(
    "attn_worker_jobs_total", "Attempts ended by this worker, by outcome", ["op", "status"]
)
RETRIES = Counter(
    "attn_job_retries_total", "Attempts that ended with the job queued again", ["op", "reason"]
)
FAILURES = Counter(
    "attn_job_failures_total", "Jobs this worker ended as failed, by error code", ["op", "reason"]
)
JOBS_VANISHED = Counter(
    "attn_jobs_vanished_total",
    "Queue entries whose job record was missing (Redis lost data: flush, failover, eviction)",
    ["op"],
)
JOB_SECONDS = Histogram(
    "attn_job_seconds",
    "Compute time per job",
    ["op", "method"],
    buckets=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100, 300, 1000),
)
WORKER_STAGE = Histogram(
    "attn_worker_stage_seconds",
    "A worker's time per job by stage: start (attempt begun, inputs read), decode, compute, "
    "encode, write (result stored, next entry read)",
    ["op", "stage"],
    buckets=(5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 100),
)
ERROR_BOUND = Histogram(
    "attn_error_bound",
    "Certified error bound per job (every method; exact: its rounding bound)",
    ["op", "method"],
    buckets=(1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1),
)
RECLAIMED = Counter(
    "attn_reclaimed_total",
    "Jobs put back on the queue by reclaim: worker_lost (lease lapsed) or orphan",
    ["reason"],
)
LEASE_RENEWALS = Counter("attn_lease_renewals_total", "Worker lease renewals")
BYTES_STORED = Counter("attn_bytes_stored_total", "Tensor bytes written to Redis", ["kind"])
REDIS_ERRORS = Counter(
    "attn_redis_errors_total",
    "Redis calls that failed, by component and kind",
    ["component", "kind"],
)
GROUPS_RECREATED = Counter(
    "attn_groups_recreated_total",
    "Consumer groups created again after Redis lost them (NOGROUP)",
    ["component"],
)


M = TypeVar("M", Counter, Gauge, Histogram)
_CHILDREN: dict[tuple[int, tuple[str, ...]], Any] = {}


def child(metric: M, *labels: str) -> M:
    """``metric.labels(*labels)``, kept: a labelled child is looked up once per label set
    (``labels()`` takes a lock and builds its key on every call, ~3 us, several times per
    job). The label values are the same bounded sets the metric itself stores."""
    key = (id(metric), labels)
    found = _CHILDREN.get(key)
    if found is None:
        found = _CHILDREN[key] = metric.labels(*labels)
    return found


def set_from_status(st: QueueStatus) -> None:
    """Set the cluster-wide gauges (queue depth, jobs by status, oldest age) from Redis."""
    for op in st.waiting:
        waiting, held = st.waiting.get(op, 0), st.held.get(op, 0)
        QUEUE_DEPTH.labels(op).set(waiting)
        JOBS.labels(op, "queued").set(waiting)
        JOBS.labels(op, "running").set(held)
        OLDEST_AGE.labels(op).set(st.oldest_age.get(op, 0.0))
        GROUPS.labels(op).set(1 if st.groups.get(op) else 0)
        for status in ("succeeded", "failed", "cancelled"):
            JOBS.labels(op, status).set(st.stats.get(f"{op}:{status}", 0))
