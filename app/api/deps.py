"""Dependencies of the routes: the queue and settings of the app, the caller (API key ->
owner), and the deadline every request's Redis work runs under."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import Awaitable, MutableMapping
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request

from app.jobs import metrics
from app.jobs.errors import (
    Forbidden,
    QueueUnavailable,
)
from app.jobs.queue import AsyncQueue
from app.jobs.settings import Settings

__all__ = [
    "QueueDep",
    "SettingsDep",
    "authorize",
    "context",
    "deadline",
    "owner_of",
    "within",
]


T = TypeVar("T")


async def get_queue(request: Request) -> AsyncQueue:
    queue: AsyncQueue = request.app.state.queue
    return queue


async def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


QueueDep = Annotated[AsyncQueue, Depends(get_queue)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def owner_of(key: str) -> str:
    """The owner id a key's jobs are stored under (a digest: the key itself is never stored)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def authorize(headers: MutableMapping[str, str] | Any, settings: Settings) -> str:
    """The caller's owner id ('' when the service is open); Forbidden on a missing/wrong key."""
    keys = settings.api_keys
    if not keys:
        return ""
    given = headers.get("authorization", "")
    for key in keys:
        if hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            return owner_of(key)
    raise Forbidden("missing or wrong API key (Authorization: Bearer <key>)")


def context(request: Request) -> tuple[AsyncQueue, Settings, str]:
    """(queue, settings, owner) of a ``/v1`` request. The owner was set by the access check of
    every ``/v1`` path (``app.api.guard.Guard``). Read directly rather than as FastAPI
    dependencies: those are resolved anew on every request, and on the small-job path that
    resolution cost about as much CPU as the route's own work (docs/service.md)."""
    state = request.app.state
    return state.queue, state.settings, request.state.owner


async def within(seconds: float, work: Awaitable[T]) -> T:
    """``await work`` under a deadline; a Redis that does not answer in time is a 503."""
    try:
        async with asyncio.timeout(seconds):
            return await work
    except TimeoutError:
        metrics.REDIS_ERRORS.labels("api", "deadline").inc()
        raise QueueUnavailable(
            f"the job queue (Redis) did not answer within {seconds:g} s; retry shortly"
        ) from None


def deadline(settings: Settings, nbytes: int = 0) -> float:
    """The time one request's Redis work may take: 1.5x the socket timeout, plus transfer."""
    return 1.5 * settings.redis_timeout_seconds + nbytes / 100e6
