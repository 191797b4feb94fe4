"""Completion notifications: requests that wait for a job to end are woken by Redis, not a timer.

Every way a job ends (``finish`` in ``app.scripts``) publishes its id on ``attn:done`` inside the
same atomic script. The API holds one subscription for all waiting requests and sets the event of
each waiter of that id. Pub/sub is fire-and-forget, so a message sent while the subscription is
down would be missed: whenever the subscription is (re)established, every waiter is woken and
re-reads its job, and a waiter always re-reads the job once its own time is up. A lost message
thus costs a waiter at most its wait, never a wrong answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from app.jobs.records import DONE_CHANNEL

__all__ = ["Completions"]

log = logging.getLogger("app.notify")


class Completions:
    """One pub/sub subscription to ``attn:done``, fanned out to per-job waiters."""

    def __init__(self, client: Any) -> None:
        self.r = client
        self.connected = False
        self._waiters: dict[str, set[asyncio.Event]] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="completions")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    @contextlib.contextmanager
    def waiter(self, job_id: str) -> Iterator[asyncio.Event]:
        """An event set when ``job_id`` may have ended (register before reading the job)."""
        event = asyncio.Event()
        self._waiters.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            group = self._waiters.get(job_id)
            if group is not None:
                group.discard(event)
                if not group:
                    del self._waiters[job_id]

    def _wake_all(self) -> None:
        for group in self._waiters.values():
            for event in group:
                event.set()

    async def _run(self) -> None:
        pause = 0.05
        while True:
            pubsub = self.r.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(DONE_CHANNEL)
                self.connected = True
                self._wake_all()  # anything that ended while unsubscribed is re-read
                pause = 0.05
                while True:
                    msg = await pubsub.get_message(timeout=5.0)
                    if msg is None or msg.get("type") != "message":
                        continue
                    data = msg["data"]
                    job_id = data.decode() if isinstance(data, bytes) else str(data)
                    for event in self._waiters.get(job_id, ()):
                        event.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis down or restarted: resubscribe with backoff
                if self.connected:
                    log.warning("completion subscription lost (%s); resubscribing", exc)
                self.connected = False
                self._wake_all()
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
