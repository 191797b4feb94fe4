"""The Redis layout and every operation on it; the one module that knows how jobs are stored.

Keys (all under ``attn:``)::

    attn:stream:{op}         stream per operation, consumer group "workers"; entries carry {id}
    attn:job:{id}            hash: the job record (status, attempts, token, params, meta, ...)
    attn:in:{id}:{name}      raw little-endian input tensor bytes (TTL)
    attn:out:{id}:{name}     raw little-endian output tensor bytes (TTL)
    attn:lease:{worker}      the worker's lease (PX = LEASE_SECONDS); its absence = worker dead
    attn:workers             set of worker ids ever seen (pruned when their lease is gone)
    attn:stats               hash "{op}:{status}" -> count of jobs that entered that status

Recovery follows worker liveness, never job age: an entry pending for a consumer whose lease key
is gone is XCLAIMed and put back on the stream; an entry of a live worker is never touched, however
long it runs. Every attempt gets a fencing token (``HINCRBY token``); a worker writes progress and
results only while its token is the job's current one (WATCH/MULTI), so a stale attempt can never
overwrite a newer one's result.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis

from app.errors import JobNotFinished, JobNotFound, NoResult, StaleAttempt
from app.redis_conn import connect
from app.settings import Settings
from app.tensors import RawTensor

__all__ = [
    "GROUP",
    "OPS",
    "TERMINAL",
    "Attempt",
    "Queue",
    "job_key",
    "lease_key",
    "stream_key",
]

PREFIX = "attn"
GROUP = "workers"
OPS = ("attention", "tensor-attention", "lora-gradient")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
WORKERS_KEY = f"{PREFIX}:workers"
STATS_KEY = f"{PREFIX}:stats"


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


def _s(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


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
    last_progress_write: float = field(default=0.0)


class Queue:
    """Jobs, inputs, results, leases and recovery on one Redis connection pool."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        ttl_seconds: int = 86_400,
        lease_seconds: float = 15.0,
        max_attempts: int = 3,
    ) -> None:
        self.r: Any = client  # redis-py's annotations do not fit a binary-safe client
        self.ttl = int(ttl_seconds)
        self.lease_seconds = float(lease_seconds)
        self.max_attempts = int(max_attempts)

    @classmethod
    def from_settings(cls, settings: Settings, client: redis.Redis | None = None) -> Queue:
        """The queue the settings describe, on ``client`` or a new connection (``connect``)."""
        return cls(
            client if client is not None else connect(settings),
            ttl_seconds=settings.result_ttl_seconds,
            lease_seconds=settings.lease_seconds,
            max_attempts=settings.max_attempts,
        )

    # ------------------------------------------------------------------ setup and health
    def ensure_groups(self, ops: Iterable[str] = OPS) -> None:
        for op in ops:
            try:
                self.r.xgroup_create(stream_key(op), GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def ping(self) -> bool:
        try:
            return bool(self.r.ping())
        except redis.RedisError:
            return False

    def live_workers(self) -> list[str]:
        """Workers whose lease is current (members whose lease is gone are pruned)."""
        members = [_s(m) or "" for m in self.r.smembers(WORKERS_KEY)]
        if not members:
            return []
        pipe = self.r.pipeline(transaction=False)
        for w in members:
            pipe.exists(lease_key(w))
        alive = pipe.execute()
        dead = [w for w, a in zip(members, alive, strict=True) if not a]
        if dead:
            self.r.srem(WORKERS_KEY, *dead)
        return [w for w, a in zip(members, alive, strict=True) if a]

    def depth(self, op: str) -> tuple[int, int]:
        """(entries waiting, entries held by workers) on an operation's stream."""
        pipe = self.r.pipeline(transaction=False)
        pipe.xlen(stream_key(op))
        pipe.xpending(stream_key(op), GROUP)
        try:
            length, pending = pipe.execute()
        except redis.ResponseError:
            return 0, 0
        held = int(pending["pending"]) if pending else 0
        return max(int(length) - held, 0), held

    def stats(self) -> dict[str, int]:
        return {_s(k) or "": int(v) for k, v in self.r.hgetall(STATS_KEY).items()}

    # ------------------------------------------------------------------ API side
    def enqueue(
        self, op: str, params: Mapping[str, Any], tensors: Mapping[str, RawTensor]
    ) -> dict[str, Any]:
        """Store the job record and its inputs and queue its id, in one MULTI/EXEC."""
        job_id = uuid.uuid4().hex
        now = time.time()
        record = {
            "id": job_id,
            "op": op,
            "status": "queued",
            "attempts": 0,
            "token": 0,
            "created_at": repr(now),
            "params": json.dumps(dict(params)),
            "inputs": json.dumps({n: t.meta() for n, t in tensors.items()}),
        }
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(job_key(job_id), mapping=record)
        pipe.expire(job_key(job_id), self.ttl)
        for name, t in tensors.items():
            pipe.set(input_key(job_id, name), t.data, ex=self.ttl)
        pipe.xadd(stream_key(op), {"id": job_id})
        pipe.hincrby(STATS_KEY, f"{op}:queued", 1)
        pipe.execute()
        return self._decode(record)

    def get_job(self, job_id: str) -> dict[str, Any]:
        raw = self.r.hgetall(job_key(job_id)) if _valid_id(job_id) else {}
        if not raw:
            raise JobNotFound(f"job {job_id} is unknown or expired")
        return self._decode({_s(k) or "": _s(v) for k, v in raw.items()})

    def get_outputs(self, job_id: str) -> tuple[dict[str, Any], dict[str, RawTensor]]:
        job = self.get_job(job_id)
        if job["status"] != "succeeded":
            if job["status"] in TERMINAL:
                raise NoResult(f"job {job_id} {job['status']}; it has no result")
            raise JobNotFinished(f"job {job_id} is {job['status']}")
        meta: dict[str, dict[str, Any]] = job["outputs"]
        names = sorted(meta)
        values = self.r.mget([output_key(job_id, n) for n in names]) if names else []
        outputs: dict[str, RawTensor] = {}
        for name, value in zip(names, values, strict=True):
            if value is None:
                raise JobNotFound(f"the result of job {job_id} expired")
            m = meta[name]
            outputs[name] = RawTensor(m["datatype"], tuple(m["shape"]), bytes(value))
        return job, outputs

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel: a queued job is cancelled now; a running one is flagged and stops at a block."""
        key = job_key(job_id)
        with self.r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    status, op, inputs = (
                        _s(v) for v in pipe.hmget(key, ["status", "op", "inputs"])
                    )
                    if status is None:
                        raise JobNotFound(f"job {job_id} is unknown or expired")
                    pipe.multi()
                    if status == "queued":
                        pipe.hset(key, "cancel", 1)
                        names = list(json.loads(inputs or "{}"))
                        self._terminal(pipe, job_id, "cancelled", None, op, names)
                    elif status == "running":
                        pipe.hset(key, "cancel", 1)
                    else:
                        pipe.reset()
                        break
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        return self.get_job(job_id)

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
        """Block up to ``block_ms`` for one new entry; returns (op, entry_id)."""
        streams = {stream_key(op): ">" for op in ops}
        got = self.r.xreadgroup(GROUP, worker_id, streams, count=1, block=block_ms or None)
        entries: list[tuple[str, str, str]] = []
        for stream, items in got or []:
            op = (_s(stream) or "").rsplit(":", 1)[-1]
            for entry_id, fields in items:
                entries.append((op, _s(entry_id) or "", _s(fields.get(b"id")) or ""))
        if not entries:
            return None
        # One job at a time: entries read from other streams in the same call go back at once.
        for op, entry_id, job_id in entries[1:]:
            self._requeue_entry(op, entry_id, job_id, reason=None)
        op, entry_id, job_id = entries[0]
        return op, f"{entry_id}|{job_id}"

    def reclaim(self, worker_id: str, ops: list[str]) -> int:
        """Put back on the stream every entry held by a worker whose lease expired.

        XPENDING lists held entries; a holder without a lease key is dead; its entries are
        XCLAIMed (so only one live worker moves each) and re-added, with a new fencing token.
        """
        moved = 0
        min_idle = int(min(1000.0, self.lease_seconds * 1000 / 3))
        for op in ops:
            try:
                pending = self.r.xpending_range(stream_key(op), GROUP, "-", "+", 100)
            except redis.ResponseError:
                continue
            holders = sorted({_s(p["consumer"]) or "" for p in pending} - {worker_id})
            if not holders:
                continue
            pipe = self.r.pipeline(transaction=False)
            for h in holders:
                pipe.exists(lease_key(h))
            dead = {h for h, alive in zip(holders, pipe.execute(), strict=True) if not alive}
            ids = [p["message_id"] for p in pending if (_s(p["consumer"]) or "") in dead]
            if not ids:
                continue
            claimed = self.r.xclaim(stream_key(op), GROUP, worker_id, min_idle, ids)
            for entry_id, fields in claimed:
                if not fields:  # deleted meanwhile
                    self.r.xack(stream_key(op), GROUP, entry_id)
                    continue
                job_id = _s(fields.get(b"id")) or ""
                self._requeue_entry(op, _s(entry_id) or "", job_id, reason="worker_lost")
                moved += 1
        return moved

    def _requeue_entry(self, op: str, entry_id: str, job_id: str, *, reason: str | None) -> None:
        """Ack+delete an entry and add a fresh one for the same job (status back to queued)."""
        key = job_key(job_id)
        with self.r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    status = _s(pipe.hget(key, "status"))
                    attempts = int(pipe.hget(key, "attempts") or 0)
                    pipe.multi()
                    pipe.xack(stream_key(op), GROUP, entry_id)
                    pipe.xdel(stream_key(op), entry_id)
                    if status is not None and status not in TERMINAL:
                        pipe.hincrby(key, "token", 1)
                        fields: dict[str, Any] = {"status": "queued", "worker": ""}
                        if reason == "worker_lost" and status == "running":
                            fields["error_code"] = "worker_lost"
                            fields["error_message"] = (
                                f"the worker running attempt {attempts} stopped renewing its lease"
                            )
                        pipe.hset(key, mapping=fields)
                        pipe.xadd(stream_key(op), {"id": job_id})
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue

    def start_attempt(self, worker_id: str, op: str, handle: str) -> Attempt | None:
        """Begin an attempt at the entry's job, or settle the entry when the job must not run."""
        entry_id, job_id = handle.split("|", 1)
        key = job_key(job_id)
        with self.r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = {_s(k) or "": _s(v) for k, v in pipe.hgetall(key).items()}
                    status = raw.get("status")
                    attempts = int(raw.get("attempts") or 0)
                    names = list(json.loads(raw.get("inputs") or "{}"))
                    pipe.multi()
                    settle: tuple[str, tuple[str, str] | None] | None = None
                    if status is None or status in TERMINAL:
                        pass
                    elif raw.get("cancel") == "1":
                        settle = ("cancelled", None)
                    elif attempts >= self.max_attempts:
                        settle = (
                            "failed",
                            (
                                raw.get("error_code") or "max_attempts",
                                f"failed after {attempts} attempts; last error: "
                                + (raw.get("error_message") or "unknown"),
                            ),
                        )
                    else:
                        settle = None
                    if status is None or status in TERMINAL or settle is not None:
                        pipe.xack(stream_key(op), GROUP, entry_id)
                        pipe.xdel(stream_key(op), entry_id)
                        if settle is not None:
                            self._terminal(pipe, job_id, settle[0], settle[1], op, names)
                        pipe.execute()
                        return None
                    # The entry stays pending (held by this worker) until the attempt ends.
                    pipe.hincrby(key, "attempts", 1)
                    pipe.hincrby(key, "token", 1)
                    pipe.hset(
                        key,
                        mapping={
                            "status": "running",
                            "started_at": repr(time.time()),
                            "worker": worker_id,
                            "entry": entry_id,
                            "progress_done": 0,
                            "progress_total": 0,
                        },
                    )
                    result = pipe.execute()
                    return Attempt(
                        job_id=job_id,
                        op=op,
                        entry_id=entry_id,
                        token=int(result[1]),
                        attempt=int(result[0]),
                        params=json.loads(raw.get("params") or "{}"),
                        inputs=json.loads(raw.get("inputs") or "{}"),
                        worker_id=worker_id,
                    )
                except redis.WatchError:
                    continue

    def load_inputs(self, att: Attempt) -> dict[str, RawTensor]:
        names = sorted(att.inputs)
        values = self.r.mget([input_key(att.job_id, n) for n in names]) if names else []
        out: dict[str, RawTensor] = {}
        for name, value in zip(names, values, strict=True):
            if value is None:
                raise JobNotFound(f"input {name} of job {att.job_id} expired")
            meta = att.inputs[name]
            out[name] = RawTensor(meta["datatype"], tuple(meta["shape"]), value)
        return out

    def report_progress(self, att: Attempt, done: int, total: int, *, force: bool = False) -> bool:
        """Record progress (at most ~20 writes/s); True when a cancel was requested.

        Raises StaleAttempt when this attempt's token is no longer current.
        """
        now = time.monotonic()
        key = job_key(att.job_id)
        if not force and now - att.last_progress_write < 0.05:
            return False
        att.last_progress_write = now
        token, cancel = self.r.hmget(key, ["token", "cancel"])
        if token is None or int(token) != att.token:
            raise StaleAttempt(f"attempt {att.attempt} of job {att.job_id} was superseded")
        self.r.hset(key, mapping={"progress_done": int(done), "progress_total": int(total)})
        return _s(cancel) == "1"

    # ------------------------------------------------------------------ worker side: endings
    def _fenced(self, att: Attempt, write: Any) -> None:
        """Run ``write(pipe)`` inside MULTI only while ``att.token`` is the job's token."""
        key = job_key(att.job_id)
        with self.r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    token = pipe.hget(key, "token")
                    if token is None or int(token) != att.token:
                        raise StaleAttempt(
                            f"attempt {att.attempt} of job {att.job_id} was superseded "
                            f"(token {att.token}, current {_s(token)})"
                        )
                    pipe.multi()
                    write(pipe)
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue

    def finish_success(
        self, att: Attempt, outputs: Mapping[str, RawTensor], summary: Mapping[str, Any]
    ) -> int:
        """Store outputs and summary (fenced); returns the bytes stored."""
        stored = sum(len(t.data) for t in outputs.values())

        def write(pipe: Any) -> None:
            for name, t in outputs.items():
                pipe.set(output_key(att.job_id, name), t.data, ex=self.ttl)
            pipe.hset(
                job_key(att.job_id),
                mapping={
                    "summary": json.dumps(dict(summary)),
                    "outputs": json.dumps({n: t.meta() for n, t in outputs.items()}),
                    "error_code": "",
                    "error_message": "",
                },
            )
            self._terminal(pipe, att.job_id, "succeeded", None, att.op, list(att.inputs))
            pipe.xack(stream_key(att.op), GROUP, att.entry_id)
            pipe.xdel(stream_key(att.op), att.entry_id)

        self._fenced(att, write)
        return stored

    def finish_failure(self, att: Attempt, code: str, message: str, *, retry: bool) -> str:
        """Fail the job, or put it back for another attempt when ``retry`` and attempts remain."""
        final = not retry or att.attempt >= self.max_attempts

        def write(pipe: Any) -> None:
            pipe.xack(stream_key(att.op), GROUP, att.entry_id)
            pipe.xdel(stream_key(att.op), att.entry_id)
            if final:
                msg = message if att.attempt == 1 else f"attempt {att.attempt}: {message}"
                self._terminal(pipe, att.job_id, "failed", (code, msg), att.op, list(att.inputs))
            else:
                pipe.hincrby(job_key(att.job_id), "token", 1)
                pipe.hset(
                    job_key(att.job_id),
                    mapping={"status": "queued", "error_code": code, "error_message": message},
                )
                pipe.xadd(stream_key(att.op), {"id": att.job_id})

        self._fenced(att, write)
        return "failed" if final else "queued"

    def finish_cancelled(self, att: Attempt) -> None:
        def write(pipe: Any) -> None:
            self._terminal(pipe, att.job_id, "cancelled", None, att.op, list(att.inputs))
            pipe.xack(stream_key(att.op), GROUP, att.entry_id)
            pipe.xdel(stream_key(att.op), att.entry_id)

        self._fenced(att, write)

    def hand_back(self, att: Attempt) -> None:
        """Graceful stop: return the job to the queue without counting the attempt."""

        def write(pipe: Any) -> None:
            pipe.xack(stream_key(att.op), GROUP, att.entry_id)
            pipe.xdel(stream_key(att.op), att.entry_id)
            pipe.hincrby(job_key(att.job_id), "token", 1)
            pipe.hincrby(job_key(att.job_id), "attempts", -1)
            pipe.hset(job_key(att.job_id), mapping={"status": "queued", "worker": ""})
            pipe.xadd(stream_key(att.op), {"id": att.job_id})

        self._fenced(att, write)

    def _terminal(
        self,
        pipe: Any,
        job_id: str,
        status: str,
        error: tuple[str, str] | None,
        op: str | None,
        input_names: Iterable[str],
    ) -> None:
        """Queue (inside MULTI) the writes that end a job: status, error, TTL, inputs dropped."""
        key = job_key(job_id)
        fields: dict[str, Any] = {"status": status, "finished_at": repr(time.time())}
        if error is not None:
            fields["error_code"], fields["error_message"] = error
        pipe.hset(key, mapping=fields)
        pipe.expire(key, self.ttl)
        for name in input_names:
            pipe.delete(input_key(job_id, name))
        if op:
            pipe.hincrby(STATS_KEY, f"{op}:{status}", 1)

    # ------------------------------------------------------------------ decoding
    @staticmethod
    def _decode(raw: Mapping[str, Any]) -> dict[str, Any]:
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


def _valid_id(job_id: str) -> bool:
    return len(job_id) == 32 and all(c in "0123456789abcdef" for c in job_id)


def retry_after(job: Mapping[str, Any]) -> int:
    """Seconds a client should wait before polling again (1 s floor, grows with elapsed time)."""
    created = job.get("created_at") or time.time()
    return max(1, min(30, math.ceil((time.time() - created) / 4)))
