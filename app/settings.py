"""One settings object, read from the environment, shared by the API and the workers.

The variable names are fixed by ``docs/contract.md``; ``WORKER_BLOCK_DELAY_MS`` is an extra
diagnostic knob (tests of cancel and recovery use it to make a small job slow).
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "get_settings"]


class Settings(BaseSettings):
    """Service settings; every field maps to the upper-case environment variable of its name."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    redis_url: str = "redis://127.0.0.1:6379/0"
    embedded: bool = False
    api_key: str = ""
    max_body_bytes: int = Field(default=268_435_456, ge=1)
    max_elements: int = Field(default=67_108_864, ge=1)
    result_ttl_seconds: int = Field(default=86_400, ge=1)
    lease_seconds: float = Field(default=15.0, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    worker_device: str = "auto"
    worker_ops: str = "attention,tensor-attention,lora-gradient"
    metrics_port: int = Field(default=9100, ge=0, le=65535)
    log_level: str = "INFO"
    # Diagnostic (tests of cancel and recovery): the worker sleeps this long before each job and
    # after each block, checking for cancel while it waits. 0 in production.
    worker_block_delay_ms: int = Field(default=0, ge=0)

    @property
    def ops(self) -> list[str]:
        """The operations a worker consumes, from ``WORKER_OPS``."""
        return [op.strip() for op in self.worker_ops.split(",") if op.strip()]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, built once from the environment."""
    return Settings()
