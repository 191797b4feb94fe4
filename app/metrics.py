"""Prometheus metrics of the API and the workers (one definition, used by both)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from app.queue import OPS, Queue

__all__ = [
    "BYTES_STORED",
    "ERROR_BOUND",
    "JOBS",
    "JOBS_SUBMITTED",
    "JOB_SECONDS",
    "LEASE_RENEWALS",
    "QUEUE_DEPTH",
    "RECLAIMED",
    "WORKER_JOBS",
    "refresh_from_redis",
]

QUEUE_DEPTH = Gauge("attn_queue_depth", "Jobs waiting in the operation's stream", ["op"])
JOBS = Gauge(
    "attn_jobs",
    "Jobs by status: queued/running now; succeeded/failed/cancelled since the Redis was created",
    ["op", "status"],
)
JOBS_SUBMITTED = Counter(
    "attn_jobs_submitted_total", "Jobs accepted by this API", ["op", "transport"]
)
WORKER_JOBS = Counter(
    "attn_worker_jobs_total", "Attempts ended by this worker, by outcome", ["op", "status"]
)
JOB_SECONDS = Histogram(
    "attn_job_seconds",
    "Compute time per job",
    ["op", "method"],
    buckets=(0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100, 300, 1000),
)
ERROR_BOUND = Histogram(
    "attn_error_bound",
    "Certified error bound per job (polynomial method)",
    ["op", "method"],
    buckets=(1e-9, 1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1),
)
RECLAIMED = Counter("attn_reclaimed_total", "Jobs reclaimed from workers whose lease expired")
LEASE_RENEWALS = Counter("attn_lease_renewals_total", "Worker lease renewals")
BYTES_STORED = Counter("attn_bytes_stored_total", "Tensor bytes written to Redis", ["kind"])


def refresh_from_redis(queue: Queue) -> None:
    """Set the cluster-wide gauges (queue depth, jobs by status) from Redis, at scrape time."""
    stats = queue.stats()
    for op in OPS:
        waiting, held = queue.depth(op)
        QUEUE_DEPTH.labels(op).set(waiting)
        JOBS.labels(op, "queued").set(waiting)
        JOBS.labels(op, "running").set(held)
        for status in ("succeeded", "failed", "cancelled"):
            JOBS.labels(op, status).set(stats.get(f"{op}:{status}", 0))
