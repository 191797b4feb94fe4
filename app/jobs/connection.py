"""The Redis clients of the process: a real server from ``REDIS_URL`` or, embedded, fakeredis.

Two clients, one per side:

- ``connect`` (workers, tests): synchronous. Its socket timeout leaves room for the worker's
  blocking stream read (1 s) and for large results; errors are retried by the worker loop.
- ``connect_async`` (the API): ``redis.asyncio``, so no Redis call ever blocks the event loop;
  short socket and connect timeouts (``REDIS_TIMEOUT_SECONDS``) and one quick retry, so that a
  down or hung Redis turns into a 503 within about two seconds while ``/health/live`` answers.

Both use binary-safe clients (``decode_responses=False``).
"""

from __future__ import annotations

import threading
from typing import Any

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from app.jobs.settings import Settings

__all__ = ["connect", "connect_async"]

_lock = threading.Lock()
_fake_server: Any = None


def _fake() -> Any:
    import fakeredis  # only the embedded mode needs it

    global _fake_server
    with _lock:
        if _fake_server is None:
            _fake_server = fakeredis.FakeServer()
    return _fake_server


def connect(settings: Settings) -> redis.Redis:
    """The synchronous client with a thread-safe pool."""
    if settings.embedded:
        import fakeredis

        return fakeredis.FakeRedis(server=_fake())
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=max(10.0, 4 * settings.redis_timeout_seconds),
        socket_connect_timeout=max(2.0, settings.redis_timeout_seconds),
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
    )


def connect_async(settings: Settings) -> Any:
    """The asyncio client of the API."""
    if settings.embedded:
        import fakeredis

        return fakeredis.FakeAsyncRedis(server=_fake())
    timeout = settings.redis_timeout_seconds
    return redis.asyncio.Redis.from_url(
        settings.redis_url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=30,
        retry=AsyncRetry(ExponentialBackoff(cap=0.1, base=0.02), retries=1),
    )
