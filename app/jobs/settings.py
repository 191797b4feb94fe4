"""One settings object, read from the environment, shared by the API and the workers.

The variable names are fixed by ``docs/contract.md``; ``WORKER_BLOCK_DELAY_MS`` is an extra
diagnostic knob (tests of cancel and recovery use it to make a small job slow).
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "get_settings"]


class Settings(BaseSettings):
    """Service settings; every field maps to the upper-case environment variable of its name."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    embedded: bool = False
    # One key, or several separated by commas (each caller sees only the jobs of its own key).
    api_key: str = ""
    # Serve without API_KEY on a non-loopback address (refused otherwise).
    allow_open: bool = False
    # With API_KEY set, also require it for /metrics and for /docs + /openapi.json.
    protect_metrics: bool = False
    protect_docs: bool = False
    # `python -m app`: where the API listens.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    max_body_bytes: int = Field(default=268_435_456, ge=1)
    # JSON bodies cost ~7x their size while parsed: a smaller limit (binary for big tensors).
    max_json_body_bytes: int = Field(default=16_777_216, ge=1)
    max_elements: int = Field(default=67_108_864, ge=1)
    # Uploads read and parsed at once; a request waits up to UPLOAD_WAIT_SECONDS for a slot.
    max_concurrent_uploads: int = Field(default=8, ge=1)
    upload_wait_seconds: float = Field(default=2.0, ge=0)
    # Backpressure (429 + Retry-After): unfinished jobs and their input bytes, and the share of
    # Redis's maxmemory kept free for leases, progress and results.
    max_queued_jobs: int = Field(default=10_000, ge=1)
    max_queued_bytes: int = Field(default=1_073_741_824, ge=1)
    redis_memory_reserve: float = Field(default=0.25, ge=0, lt=1)
    # The API's Redis calls: socket timeout and the deadline of one request's Redis work.
    redis_timeout_seconds: float = Field(default=1.0, gt=0)
    result_ttl_seconds: int = Field(default=86_400, ge=1)
    lease_seconds: float = Field(default=15.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    # Per-job time limit (seconds); JOB_TIMEOUTS overrides it per operation: "attention=600,...".
    job_timeout_seconds: float = Field(default=3600.0, gt=0)
    job_timeouts: str = ""
    # On SIGTERM, how long a worker keeps retrying the hand-back while Redis is unreachable.
    worker_stop_grace_seconds: float = Field(default=30.0, ge=0)
    worker_device: str = "auto"
    # PyTorch threads of a worker; 0 = the host's cores divided by the workers running on it
    # (counted by host name in Redis, so set it under compose, where each container has its own).
    worker_threads: int = Field(default=0, ge=0)
    # operations a worker consumes, comma-separated; empty: every registered operation
    worker_ops: str = ""
    # Worker's /metrics and /health port; 0 = a free port (logged).
    metrics_port: int = Field(default=9100, ge=0, le=65535)
    log_level: str = "INFO"
    # Diagnostic (tests of cancel and recovery): the worker sleeps this long before each job and
    # after each block, checking for cancel while it waits. 0 in production.
    worker_block_delay_ms: int = Field(default=0, ge=0)

    @field_validator("job_timeouts")
    @classmethod
    def _check_timeouts(cls, value: str) -> str:
        _parse_timeouts(value)
        return value

    @property
    def api_keys(self) -> list[str]:
        """The accepted API keys (empty: open)."""
        return [k.strip() for k in self.api_key.split(",") if k.strip()]

    def job_timeout(self, op: str) -> float:
        """The time limit of one attempt at a job of ``op``."""
        return _parse_timeouts(self.job_timeouts).get(op, self.job_timeout_seconds)

    @property
    def ops(self) -> list[str]:
        """The operations a worker consumes: ``WORKER_OPS``, or every registered operation."""
        named = [op.strip() for op in self.worker_ops.split(",") if op.strip()]
        if named:
            return named
        from compute.registry import OPERATIONS

        return list(OPERATIONS)


def _parse_timeouts(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        op, sep, value = part.partition("=")
        try:
            seconds = float(value)
        except ValueError:
            seconds = float("nan")
        if not sep or not op.strip() or not seconds > 0 or seconds == float("inf"):
            raise ValueError(f"JOB_TIMEOUTS: expected op=seconds (> 0), got {part.strip()!r}")
        out[op.strip()] = seconds
    return out


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, built once from the environment."""
    return Settings()
