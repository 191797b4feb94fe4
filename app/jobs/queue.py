"""The Redis layout and every operation on it; the one module that knows how jobs are stored.

Keys (all under ``attn:``)::

    attn:stream:{op}         stream per operation, consumer group "workers"; entries carry {id}
    attn:job:{id}            hash: the job record (status, attempts, token, entry, params, ...)
    attn:in:{id}:{name}      raw little-endian input tensor bytes (deleted when the job ends)
    attn:out:{id}:{name}     raw little-endian output tensor bytes (TTL from the job's end)
    attn:lease:{worker}      the worker's lease (PX = LEASE_SECONDS); its absence = worker dead
    attn:workers             set of worker ids seen (pruned when their lease is gone)
    attn:stats               hash "{op}:{status}" -> count of jobs that entered that status
    attn:budget              hash jobs/bytes: jobs not yet ended and their input bytes
    attn:idem:{owner}:{key}  hash job/digest for an Idempotency-Key (TTL from the job's end)

Every state change is one Lua script (``app.jobs.scripts``), atomic on the server. Recovery follows
worker liveness, never job age: a pending entry whose holder has no lease (or whose job moved on)
is put back on the stream. Every attempt gets a fencing token; a worker writes progress and
results only while its token is the job's current one and the job is running, so a stale attempt
can never overwrite a newer one's result. ``Queue`` is the synchronous client (workers, tests);
``AsyncQueue`` the API's, on ``redis.asyncio``, so that a slow Redis never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import redis

from app.jobs.codec import RawTensor
from app.jobs.connection import connect, connect_async
from app.jobs.records import (
    GROUP,
    WORKERS_KEY,
    Attempt,
    Call,
    QueueStatus,
    Submitted,
    cancel_call,
    checked,
    get_call,
    lease_key,
    operation_names,
    outputs_of,
    status_call,
    stream_key,
    submit_call,
    text,
)
from app.jobs.scripts import SCRIPTS
from app.jobs.settings import Settings

__all__ = [
    "AsyncQueue",
    "Queue",
]

T = TypeVar("T")


class _Settings:
    """What both queue clients take from the settings."""

    def __init__(
        self,
        *,
        ttl_seconds: int = 86_400,
        lease_seconds: float = 15.0,
        max_attempts: int = 3,
        max_queued_jobs: int = 10_000,
        max_queued_bytes: int = 1 << 30,
    ) -> None:
        self.ttl = int(ttl_seconds)
        self.lease_seconds = float(lease_seconds)
        self.max_attempts = int(max_attempts)
        self.max_queued_jobs = int(max_queued_jobs)
        self.max_queued_bytes = int(max_queued_bytes)

    @staticmethod
    def kwargs(settings: Settings) -> dict[str, Any]:
        return {
            "ttl_seconds": settings.result_ttl_seconds,
            "lease_seconds": settings.lease_seconds,
            "max_attempts": settings.max_attempts,
            "max_queued_jobs": settings.max_queued_jobs,
            "max_queued_bytes": settings.max_queued_bytes,
        }

    def submit_call(
        self,
        op: str,
        params: Mapping[str, Any],
        tensors: Mapping[str, RawTensor],
        idempotency_key: str | None,
        digest: str,
        owner: str,
        job_id: str | None = None,
    ) -> Call[tuple[str, str, dict[str, Any]]]:
        return submit_call(
            op,
            params,
            tensors,
            max_jobs=self.max_queued_jobs,
            max_bytes=self.max_queued_bytes,
            idempotency_key=idempotency_key,
            digest=digest,
            owner=owner,
            job_id=job_id,
        )


# ---------------------------------------------------------------------------------- sync client
class Queue(_Settings):
    """The synchronous client: the workers' side, and the API operations for tests and tools."""

    def __init__(self, client: redis.Redis, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.r: Any = client  # redis-py's annotations do not fit a binary-safe client
        self._scripts = {name: self.r.register_script(text) for name, text in SCRIPTS.items()}

    @classmethod
    def from_settings(cls, settings: Settings, client: redis.Redis | None = None) -> Queue:
        """The queue the settings describe, on ``client`` or a new connection (``connect``)."""
        return cls(
            client if client is not None else connect(settings), **_Settings.kwargs(settings)
        )

    def _run(self, call: Call[T]) -> T:
        return call.decode(self._scripts[call.script](keys=[], args=call.args))

    def _script(self, name: str, *args: Any) -> list[Any]:
        reply: list[Any] = self._scripts[name](keys=[], args=list(args))
        return reply

    # ------------------------------------------------------------------ setup and health
    def ensure_groups(self, ops: Iterable[str] | None = None) -> int:
        """Create the consumer groups that are missing; returns how many were created."""
        made = 0
        for op in operation_names() if ops is None else ops:
            try:
                self.r.xgroup_create(stream_key(op), GROUP, id="0", mkstream=True)
                made += 1
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        return made

    def ping(self) -> bool:
        try:
            return bool(self.r.ping())
        except redis.RedisError:
            return False

    def status(self, ops: Iterable[str] | None = None) -> QueueStatus:
        return self._run(status_call(operation_names() if ops is None else ops))

    def live_workers(self) -> list[str]:
        """Workers whose lease is current (members whose lease is gone are pruned)."""
        return self.status(()).workers

    def depth(self, op: str) -> tuple[int, int]:
        """(entries waiting, entries held by workers) on an operation's stream."""
        st = self.status((op,))
        return st.waiting[op], st.held[op]

    def stats(self) -> dict[str, int]:
        return self.status(()).stats

    # ------------------------------------------------------------------ API operations
    def submit(
        self,
        op: str,
        params: Mapping[str, Any],
        tensors: Mapping[str, RawTensor],
        *,
        idempotency_key: str | None = None,
        digest: str = "",
        owner: str = "",
        job_id: str | None = None,
    ) -> Submitted:
        outcome, created, fresh = self._run(
            self.submit_call(op, params, tensors, idempotency_key, digest, owner, job_id)
        )
        if outcome == "replay":
            return Submitted(self.get_job(created, owner=owner), replayed=True)
        return Submitted(fresh)

    def enqueue(
        self, op: str, params: Mapping[str, Any], tensors: Mapping[str, RawTensor]
    ) -> dict[str, Any]:
        """Store the job record and its inputs and queue its id (one script)."""
        return self.submit(op, params, tensors).job

    def get_job(self, job_id: str, *, owner: str = "") -> dict[str, Any]:
        return self._run(get_call(job_id, owner, outputs=False))

    def get_outputs(
        self, job_id: str, *, owner: str = ""
    ) -> tuple[dict[str, Any], dict[str, RawTensor]]:
        return outputs_of(self._run(get_call(job_id, owner, outputs=True)))

    def cancel(self, job_id: str, *, owner: str = "") -> dict[str, Any]:
        """Cancel: a queued job is cancelled now; a running one is flagged and stops at a block."""
        self._run(cancel_call(job_id, owner, self.ttl))
        return self.get_job(job_id, owner=owner)

    # ------------------------------------------------------------------ worker side: leases
    def renew_lease(self, worker_id: str) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.set(lease_key(worker_id), str(time.time()), px=int(self.lease_seconds * 1000))
        pipe.sadd(WORKERS_KEY, worker_id)
        pipe.execute()

    def drop_lease(self, worker_id: str) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.delete(lease_key(worker_id))
        pipe.srem(WORKERS_KEY, worker_id)
        pipe.execute()

    # ------------------------------------------------------------------ worker side: taking jobs
    def read_next(self, worker_id: str, ops: list[str], block_ms: int) -> tuple[str, str] | None:
        """Block up to ``block_ms`` for one new entry; returns (op, handle)."""
        streams = {stream_key(op): ">" for op in ops}
        got = self.r.xreadgroup(GROUP, worker_id, streams, count=1, block=block_ms or None)
        return self._one_entry(worker_id, got)

    def _one_entry(self, worker_id: str, got: Any) -> tuple[str, str] | None:
        """The first entry of an XREADGROUP reply, as (op, handle)."""
        entries: list[tuple[str, str]] = []
        for stream, items in got or []:
            op = (text(stream) or "").rsplit(":", 1)[-1]
            for entry_id, fields in items:
                entries.append((op, f"{text(entry_id)}|{text(fields.get(b'id')) or ''}"))
        if not entries:
            return None
        # One job at a time: entries read from other streams in the same call go back at once.
        for op, handle in entries[1:]:
            self._script("reclaim", op, handle.split("|", 1)[0], worker_id, worker_id, 0, 0)
        return entries[0]

    def reclaim(
        self, worker_id: str, ops: list[str], *, keep: Iterable[str] = ()
    ) -> dict[str, int]:
        """Look at every pending entry; put back the jobs of dead holders and orphaned entries.

        Called by a worker between jobs, so its own pending entries are leftovers of an
        interrupted attempt (e.g. Redis went away mid-job) and go back too, but for those in
        ``keep`` (read and about to start). Returns counts by
        outcome (``worker_lost``, ``orphan``, ``dropped``...).
        """
        counts: dict[str, int] = {}
        lease_ms = int(self.lease_seconds * 1000)
        for op in ops:
            try:
                pending = self.r.xpending_range(stream_key(op), GROUP, "-", "+", 1000)
            except redis.ResponseError as exc:
                if "NOGROUP" in str(exc):
                    continue
                raise
            held = set(keep)
            for p in pending:
                if text(p["message_id"]) in held and text(p["consumer"]) == worker_id:
                    continue  # read by this worker and about to start: not a leftover
                reply = self._script(
                    "reclaim",
                    op,
                    text(p["message_id"]),
                    text(p["consumer"]),
                    worker_id,
                    int(p["time_since_delivered"]),
                    lease_ms,
                )
                outcome = text(reply[0]) or ""
                key = text(reply[1]) or outcome if outcome == "requeued" else outcome
                counts[key] = counts.get(key, 0) + 1
        return counts

    def prune_consumers(self, worker_id: str, ops: list[str]) -> int:
        """Remove group consumers with no lease and nothing pending (dead workers)."""
        return sum(int(self._scripts["prune"](keys=[], args=[op, worker_id])) for op in ops)

    def start_attempt(self, worker_id: str, op: str, handle: str) -> Attempt | str:
        """Begin an attempt (inputs loaded), or end the entry when its job must not run.

        Returns the :class:`Attempt`, or the outcome when nothing runs: ``gone`` (the job record
        is missing: Redis lost it), ``ended``, ``duplicate``, ``cancelled``, ``failed``.
        """
        entry_id, job_id = handle.split("|", 1)
        reply = self._script(
            "start",
            op,
            entry_id,
            job_id,
            worker_id,
            repr(time.time()),
            self.max_attempts,
            self.ttl,
        )
        if text(reply[0]) != "run":
            return text(reply[0]) or "?"
        inputs: dict[str, dict[str, Any]] = json.loads(reply[4])
        blobs = {text(reply[5][i]) or "": reply[5][i + 1] for i in range(0, len(reply[5]), 2)}
        tensors = {
            n: RawTensor(m["datatype"], tuple(m["shape"]), blobs[n]) for n, m in inputs.items()
        }
        return Attempt(
            job_id=job_id,
            op=op,
            entry_id=entry_id,
            token=int(reply[1]),
            attempt=int(reply[2]),
            params=json.loads(reply[3]),
            inputs=inputs,
            worker_id=worker_id,
            tensors=tensors,
        )

    def report_progress(self, att: Attempt, done: int, total: int, *, force: bool = False) -> bool:
        """Record progress (at most ~20 writes/s); True when a cancel was requested.

        Raises StaleAttempt when this attempt's token is no longer current.
        """
        now = time.monotonic()
        if not force and now - att.last_progress_write < 0.05:
            return False
        att.last_progress_write = now
        reply = checked(
            self._script("progress", att.job_id, att.token, int(done), int(total)), _what(att)
        )
        return text(reply[1]) == "1"

    # ------------------------------------------------------------------ worker side: endings
    def finish_success(
        self, att: Attempt, outputs: Mapping[str, RawTensor], summary: Mapping[str, Any]
    ) -> int:
        """Store outputs and summary (fenced); returns the bytes stored (0 when a cancel was
        asked while the attempt ran: the job ended cancelled, its result discarded)."""
        reply = checked(
            self._script("succeed", *self._succeed_args(att, outputs, summary)), _what(att)
        )
        return sum(len(t.data) for t in outputs.values()) if text(reply[0]) == "ok" else 0

    def finish_success_and_read(
        self,
        att: Attempt,
        outputs: Mapping[str, RawTensor],
        summary: Mapping[str, Any],
        ops: list[str],
    ) -> tuple[str, int, tuple[str, str] | None]:
        """:meth:`finish_success` and a non-blocking read of the next entry in one round trip
        (a pipeline): returns (the job's status, bytes stored, the next entry or None). The
        status is ``succeeded``, or ``cancelled`` when a cancel was asked while it ran."""
        script = self._scripts["succeed"]
        pipe = self.r.pipeline(transaction=False)
        pipe.evalsha(script.sha, 0, *self._succeed_args(att, outputs, summary))
        pipe.xreadgroup(GROUP, att.worker_id, {stream_key(op): ">" for op in ops}, count=1)
        reply, got = pipe.execute(raise_on_error=False)
        if isinstance(got, redis.RedisError):
            got = None  # read again by the loop
        nxt = self._one_entry(att.worker_id, got)
        try:
            if isinstance(reply, redis.exceptions.NoScriptError):  # Redis restarted: load, retry
                reply = self._script("succeed", *self._succeed_args(att, outputs, summary))
            elif isinstance(reply, Exception):
                raise reply
            checked(reply, _what(att))
        except Exception:
            if nxt is not None:  # the caller retries this write first: the entry goes back now
                op, handle = nxt
                self._script("reclaim", op, handle.split("|", 1)[0], *[att.worker_id] * 2, 0, 0)
            raise
        if text(reply[0]) == "cancelled":
            return "cancelled", 0, nxt
        return "succeeded", sum(len(t.data) for t in outputs.values()), nxt

    def _succeed_args(
        self, att: Attempt, outputs: Mapping[str, RawTensor], summary: Mapping[str, Any]
    ) -> list[Any]:
        names = sorted(outputs)
        done, total = att.progress
        return [
            att.job_id,
            att.token,
            att.op,
            att.entry_id,
            repr(time.time()),
            self.ttl,
            json.dumps(dict(summary)),
            json.dumps({n: outputs[n].meta() for n in names}),
            " ".join(names),
            int(done),
            int(total),
            *(outputs[n].data for n in names),
        ]

    def finish_failure(self, att: Attempt, code: str, message: str, *, retry: bool) -> str:
        """Fail the job, or put it back for another attempt when ``retry`` and attempts remain."""
        final = not retry or att.attempt >= self.max_attempts
        msg = message if att.attempt == 1 or not final else f"attempt {att.attempt}: {message}"
        reply = checked(
            self._script(
                "fail",
                att.job_id,
                att.token,
                att.op,
                att.entry_id,
                repr(time.time()),
                self.ttl,
                code,
                msg,
                "1" if final else "0",
            ),
            _what(att),
        )
        return text(reply[0]) or "failed"

    def finish_cancelled(self, att: Attempt) -> None:
        checked(
            self._script(
                "cancelled",
                att.job_id,
                att.token,
                att.op,
                att.entry_id,
                repr(time.time()),
                self.ttl,
            ),
            _what(att),
        )

    def hand_back(self, att: Attempt) -> None:
        """Graceful stop: return the job to the queue without counting the attempt."""
        checked(self._script("hand_back", att.job_id, att.token, att.op, att.entry_id), _what(att))


def _what(att: Attempt) -> str:
    return f"attempt {att.attempt} of job {att.job_id} (token {att.token})"


# ---------------------------------------------------------------------------------- async client
class AsyncQueue(_Settings):
    """The API's client, on ``redis.asyncio``: never blocks the event loop."""

    def __init__(self, client: Any, *, retry_for: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.r: Any = client
        self.retry_for = retry_for
        self._scripts = {name: self.r.register_script(text) for name, text in SCRIPTS.items()}
        self._memory: tuple[float, int, int] = (0.0, 0, 0)  # (read at, used, maxmemory)

    @classmethod
    def from_settings(cls, settings: Settings, client: Any = None) -> AsyncQueue:
        return cls(
            client if client is not None else connect_async(settings),
            retry_for=settings.redis_timeout_seconds,
            **_Settings.kwargs(settings),
        )

    async def _run(self, call: Call[T]) -> T:
        """Run a script; a refused connection or a loading Redis is retried for ``retry_for``
        seconds (every script is safe to repeat: submit is idempotent by job id), so a Redis
        restart shorter than that is not seen by clients."""
        loop = asyncio.get_running_loop()
        end, pause = loop.time() + self.retry_for, 0.02
        while True:
            try:
                return call.decode(await self._scripts[call.script](keys=[], args=call.args))
            except (redis.ConnectionError, redis.BusyLoadingError):
                if loop.time() + pause > end:
                    raise
                await asyncio.sleep(pause)
                pause = min(2 * pause, 0.25)

    async def ping(self) -> bool:
        try:
            return bool(await self.r.ping())
        except redis.RedisError:
            return False

    async def ensure_groups(self, ops: Iterable[str] | None = None) -> None:
        for op in operation_names() if ops is None else ops:
            try:
                await self.r.xgroup_create(stream_key(op), GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def status(self, ops: Iterable[str] | None = None) -> QueueStatus:
        return await self._run(status_call(operation_names() if ops is None else ops))

    def memory_cached(self, max_age: float = 1.0) -> tuple[int, int] | None:
        """:meth:`memory` when its last reading is recent enough (no await), else None."""
        read_at, used, limit = self._memory
        return (used, limit) if time.monotonic() - read_at <= max_age else None

    async def memory(self, max_age: float = 1.0) -> tuple[int, int]:
        """(used_memory, maxmemory) of Redis, read at most once per ``max_age`` seconds."""
        read_at, used, limit = self._memory
        if time.monotonic() - read_at > max_age:
            try:
                info = await self.r.info("memory")
            except redis.ResponseError:  # a server without INFO (the embedded fakeredis)
                self._memory = (math.inf, 0, 0)
                return 0, 0
            used, limit = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0) or 0)
            self._memory = (time.monotonic(), used, limit)
        return used, limit

    async def submit(
        self,
        op: str,
        params: Mapping[str, Any],
        tensors: Mapping[str, RawTensor],
        *,
        idempotency_key: str | None = None,
        digest: str = "",
        owner: str = "",
        job_id: str | None = None,
    ) -> Submitted:
        outcome, created, fresh = await self._run(
            self.submit_call(op, params, tensors, idempotency_key, digest, owner, job_id)
        )
        if outcome == "replay":
            return Submitted(await self.get_job(created, owner=owner), replayed=True)
        return Submitted(fresh)

    async def get_job(
        self, job_id: str, *, owner: str = "", outputs: bool = False
    ) -> dict[str, Any]:
        """The job's public record; with ``outputs`` a succeeded job's output bytes come along
        in the same call (read them with :func:`app.jobs.records.outputs_of`)."""
        return await self._run(get_call(job_id, owner, outputs=outputs))

    async def get_outputs(
        self, job_id: str, *, owner: str = ""
    ) -> tuple[dict[str, Any], dict[str, RawTensor]]:
        return outputs_of(await self._run(get_call(job_id, owner, outputs=True)))

    async def cancel(self, job_id: str, *, owner: str = "") -> dict[str, Any]:
        await self._run(cancel_call(job_id, owner, self.ttl))
        return await self.get_job(job_id, owner=owner)
