"""The Redis client of the process: a real server from ``REDIS_URL`` or, embedded, fakeredis."""

from __future__ import annotations

import threading
from typing import Any

import redis

from app.settings import Settings

__all__ = ["connect"]

_lock = threading.Lock()
_fake_server: Any = None


def connect(settings: Settings) -> redis.Redis:
    """A binary-safe client (``decode_responses=False``) with a thread-safe pool."""
    if settings.embedded:
        import fakeredis  # only the embedded mode needs it

        global _fake_server
        with _lock:
            if _fake_server is None:
                _fake_server = fakeredis.FakeServer()
        return fakeredis.FakeRedis(server=_fake_server)
    return redis.Redis.from_url(
        settings.redis_url,
        socket_timeout=30,
        socket_connect_timeout=5,
        health_check_interval=30,
    )
