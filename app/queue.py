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

Every state change is one Lua script (``app.scripts``), atomic on the server. Recovery follows
worker liveness, never job age: a pending entry whose holder has no lease (or whose job moved on)
is put back on the stream. Every attempt gets a fencing token; a worker writes progress and
results only while its token is the job's current one and the job is running, so a stale attempt
can never overwrite a newer one's result. ``Queue`` is the synchronous client (workers, tests);
``AsyncQueue`` the API's, on ``redis.asyncio``, so that a slow Redis never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import redis

from app.errors import (
    IdempotencyConflict,
    JobNotFinished,
    JobNotFound,
    NoResult,
    QueueFull,
    StaleAttempt,
)
from app.redis_conn import connect, connect_async
from app.scripts import SCRIPTS
from app.settings import Settings
from app.tensors import RawTensor

__all__ = [
    "GROUP",
    "OPS",
    "TERMINAL",
    "AsyncQueue",
    "Attempt",
    "Queue",
    "QueueStatus",
    "Submitted",
    "job_key",
    "lease_key",
    "retry_after",
    "stream_key",
]

PREFIX = "attn"
GROUP = "workers"
OPS = ("attention", "tensor-attention", "lora-gradient")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
WORKERS_KEY = f"{PREFIX}:workers"
STATS_KEY = f"{PREFIX}:stats"
BUDGET_KEY = f"{PREFIX}:budget"
DONE_CHANNEL = f"{PREFIX}:done"

T = TypeVar("T")


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


def idem_key(owner: str, key: str) -> str:
    return f"{PREFIX}:idem:{owner or '-'}:{hashlib.sha256(key.encode()).hexdigest()[:32]}"


def _s(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _valid_id(job_id: str) -> bool:
    return len(job_id) == 32 and all(c in "0123456789abcdef" for c in job_id)


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
    tensors: dict[str, RawTensor] = field(default_factory=dict)
    last_progress_write: float = field(default=0.0)


@dataclass(frozen=True)
class Submitted:
    """A submit's answer: the job record, and whether an Idempotency-Key replayed an earlier one."""

    job: dict[str, Any]
    replayed: bool = False


@dataclass(frozen=True)
class QueueStatus:
    """Cluster-wide figures for readiness and metrics, read in one script call."""

    stats: dict[str, int]
    waiting: dict[str, int]
    held: dict[str, int]
    oldest_age: dict[str, float]  # seconds since the oldest unfinished entry was added; 0 = none
    groups: dict[str, bool]  # the consumer group exists
    workers: list[str]  # live workers (lease current)


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One script call, independent of the client that runs it (sync or asyncio)."""

    script: str
    args: list[Any]
    decode: Callable[[Any], T]


_STATUS_SCRIPT = r"""
local now_ms = tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV do
  local stream = 'attn:stream:' .. ARGV[i]
  local len = redis.call('XLEN', stream)
  local ok, p = pcall(redis.call, 'XPENDING', stream, 'workers')
  local held, group = 0, 0
  if ok then held = p[1] ; group = 1 end
  local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
  local age = 0
  if #first > 0 then
    local ms = tonumber(string.match(first[1][1], '^(%d+)'))
    age = now_ms - ms
  end
  out[#out + 1] = {len, held, age, group}
end
local members = redis.call('SMEMBERS', 'attn:workers')
local live = {}
for _, w in ipairs(members) do
  if redis.call('EXISTS', 'attn:lease:' .. w) == 1 then live[#live + 1] = w
  else redis.call('SREM', 'attn:workers', w) end
end
return {redis.call('HGETALL', 'attn:stats'), out, live}
"""

_PRUNE_SCRIPT = r"""
local stream = 'attn:stream:' .. ARGV[1]
local ok, cons = pcall(redis.call, 'XINFO', 'CONSUMERS', stream, 'workers')
if not ok then return 0 end
local n = 0
for _, c in ipairs(cons) do
  local name, pending = nil, nil
  for i = 1, #c, 2 do
    if c[i] == 'name' then name = c[i + 1] elseif c[i] == 'pending' then pending = c[i + 1] end
  end
  if name and name ~= ARGV[2] and tonumber(pending) == 0
      and redis.call('EXISTS', 'attn:lease:' .. name) == 0 then
    redis.call('XGROUP', 'DELCONSUMER', stream, 'workers', name)
    n = n + 1
  end
end
return n
"""

_ALL_SCRIPTS = {**SCRIPTS, "status": _STATUS_SCRIPT, "prune": _PRUNE_SCRIPT}


# ---------------------------------------------------------------------------------- decoding
def _record(flat: list[Any]) -> dict[str, str]:
    return {_s(flat[i]) or "": _s(flat[i + 1]) or "" for i in range(0, len(flat), 2)}


def public_record(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The job as the API shows it (timestamps as floats; the API formats them)."""

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


def _checked(reply: list[Any], what: str) -> list[Any]:
    """A fenced script's reply, or StaleAttempt when the attempt is no longer current."""
    if _s(reply[0]) == "stale":
        raise StaleAttempt(f"{what} was superseded (current token {_s(reply[1]) or 'none'})")
    return reply


# ---------------------------------------------------------------------------------- calls
def _submit_call(
    op: str,
    params: Mapping[str, Any],
    tensors: Mapping[str, RawTensor],
    *,
    max_jobs: int,
    max_bytes: int,
    idempotency_key: str | None,
    digest: str,
    owner: str,
) -> _Call[tuple[str, str, dict[str, Any]]]:
    job_id = uuid.uuid4().hex
    names = sorted(tensors)
    size = sum(len(tensors[n].data) for n in names)
    now = repr(time.time())
    inputs_meta = json.dumps({n: tensors[n].meta() for n in names})
    fresh = public_record({"id": job_id, "op": op, "status": "queued", "created_at": now})
    args: list[Any] = [
        now,
        job_id,
        op,
        json.dumps(dict(params)),
        inputs_meta,
        " ".join(names),
        str(size),
        str(max_jobs),
        str(max_bytes),
        idem_key(owner, idempotency_key) if idempotency_key else "",
        digest,
        owner,
        *(tensors[n].data for n in names),
    ]

    def decode(reply: list[Any]) -> tuple[str, str, dict[str, Any]]:
        outcome, value = _s(reply[0]) or "", _s(reply[1]) or ""
        if outcome == "conflict":
            raise IdempotencyConflict(
                f"Idempotency-Key was already used for job {value} with a different body"
            )
        if outcome == "busy_jobs":
            raise QueueFull(
                f"the queue holds {value} unfinished jobs, its limit (MAX_QUEUED_JOBS); "
                "retry after a while"
            )
        if outcome == "busy_bytes":
            raise QueueFull(
                f"unfinished jobs hold {value} bytes of inputs; this job's {size} bytes would pass "
                f"the limit of {max_bytes} (MAX_QUEUED_BYTES); retry after a while"
            )
        return outcome, value, fresh

    return _Call("submit", args, decode)


def _get_call(job_id: str, owner: str, *, outputs: bool) -> _Call[dict[str, Any]]:
    def decode(reply: list[Any]) -> dict[str, Any]:
        if not reply:
            raise JobNotFound(f"job {job_id} is unknown or expired")
        job = public_record(_record(reply[0]))
        if outputs:
            blobs = {_s(reply[1][i]) or "": reply[1][i + 1] for i in range(0, len(reply[1]), 2)}
            job["_blobs"] = blobs
            job["_outputs_missing"] = _s(reply[2]) == "1"
        return job

    if not _valid_id(job_id):
        return _Call("get", ["-", owner, "0"], decode)
    return _Call("get", [job_id, owner, "1" if outputs else "0"], decode)


def _outputs_of(job: dict[str, Any]) -> tuple[dict[str, Any], dict[str, RawTensor]]:
    job_id = job["id"]
    blobs = job.pop("_blobs", {})
    missing = job.pop("_outputs_missing", False)
    if job["status"] != "succeeded":
        if job["status"] in TERMINAL:
            raise NoResult(f"job {job_id} {job['status']}; it has no result")
        raise JobNotFinished(f"job {job_id} is {job['status']}")
    if missing:
        raise JobNotFound(f"the result of job {job_id} expired")
    meta: dict[str, dict[str, Any]] = job["outputs"]
    outputs = {
        n: RawTensor(m["datatype"], tuple(m["shape"]), bytes(blobs[n])) for n, m in meta.items()
    }
    return job, outputs


def _cancel_call(job_id: str, owner: str, ttl: int) -> _Call[None]:
    def decode(reply: list[Any]) -> None:
        if _s(reply[0]) == "missing":
            raise JobNotFound(f"job {job_id} is unknown or expired")

    if not _valid_id(job_id):
        return _Call("cancel", ["-", owner, "0", str(ttl)], decode)
    return _Call("cancel", [job_id, owner, repr(time.time()), str(ttl)], decode)


def _status_call(ops: Iterable[str]) -> _Call[QueueStatus]:
    ops = list(ops)

    def decode(reply: list[Any]) -> QueueStatus:
        stats = {k: int(v) for k, v in _record(reply[0]).items()}
        per = dict(zip(ops, reply[1], strict=True))
        return QueueStatus(
            stats=stats,
            waiting={op: max(int(p[0]) - int(p[1]), 0) for op, p in per.items()},
            held={op: int(p[1]) for op, p in per.items()},
            oldest_age={op: max(int(p[2]), 0) / 1000.0 for op, p in per.items()},
            groups={op: bool(int(p[3])) for op, p in per.items()},
            workers=sorted(_s(w) or "" for w in reply[2]),
        )

    return _Call("status", [str(int(time.time() * 1000)), *ops], decode)


def body_digest(*parts: bytes | str) -> str:
    """The digest an Idempotency-Key is bound to (operation, content type, body)."""
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


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
    ) -> _Call[tuple[str, str, dict[str, Any]]]:
        return _submit_call(
            op,
            params,
            tensors,
            max_jobs=self.max_queued_jobs,
            max_bytes=self.max_queued_bytes,
            idempotency_key=idempotency_key,
            digest=digest,
            owner=owner,
        )


# ---------------------------------------------------------------------------------- sync client
class Queue(_Settings):
    """The synchronous client: the workers' side, and the API operations for tests and tools."""

    def __init__(self, client: redis.Redis, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.r: Any = client  # redis-py's annotations do not fit a binary-safe client
        self._scripts = {name: self.r.register_script(text) for name, text in _ALL_SCRIPTS.items()}

    @classmethod
    def from_settings(cls, settings: Settings, client: redis.Redis | None = None) -> Queue:
        """The queue the settings describe, on ``client`` or a new connection (``connect``)."""
        return cls(
            client if client is not None else connect(settings), **_Settings.kwargs(settings)
        )

    def _run(self, call: _Call[T]) -> T:
        return call.decode(self._scripts[call.script](keys=[], args=call.args))

    def _script(self, name: str, *args: Any) -> list[Any]:
        reply: list[Any] = self._scripts[name](keys=[], args=list(args))
        return reply

    # ------------------------------------------------------------------ setup and health
    def ensure_groups(self, ops: Iterable[str] = OPS) -> int:
        """Create the consumer groups that are missing; returns how many were created."""
        made = 0
        for op in ops:
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

    def status(self, ops: Iterable[str] = OPS) -> QueueStatus:
        return self._run(_status_call(ops))

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
    ) -> Submitted:
        outcome, job_id, fresh = self._run(
            self.submit_call(op, params, tensors, idempotency_key, digest, owner)
        )
        if outcome == "replay":
            return Submitted(self.get_job(job_id, owner=owner), replayed=True)
        return Submitted(fresh)

    def enqueue(
        self, op: str, params: Mapping[str, Any], tensors: Mapping[str, RawTensor]
    ) -> dict[str, Any]:
        """Store the job record and its inputs and queue its id (one script)."""
        return self.submit(op, params, tensors).job

    def get_job(self, job_id: str, *, owner: str = "") -> dict[str, Any]:
        return self._run(_get_call(job_id, owner, outputs=False))

    def get_outputs(
        self, job_id: str, *, owner: str = ""
    ) -> tuple[dict[str, Any], dict[str, RawTensor]]:
        return _outputs_of(self._run(_get_call(job_id, owner, outputs=True)))

    def cancel(self, job_id: str, *, owner: str = "") -> dict[str, Any]:
        """Cancel: a queued job is cancelled now; a running one is flagged and stops at a block."""
        self._run(_cancel_call(job_id, owner, self.ttl))
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
        entries: list[tuple[str, str]] = []
        for stream, items in got or []:
            op = (_s(stream) or "").rsplit(":", 1)[-1]
            for entry_id, fields in items:
                entries.append((op, f"{_s(entry_id)}|{_s(fields.get(b'id')) or ''}"))
        if not entries:
            return None
        # One job at a time: entries read from other streams in the same call go back at once.
        for op, handle in entries[1:]:
            self._script("reclaim", op, handle.split("|", 1)[0], worker_id, worker_id, 0, 0)
        return entries[0]

    def reclaim(self, worker_id: str, ops: list[str]) -> dict[str, int]:
        """Look at every pending entry; put back the jobs of dead holders and orphaned entries.

        Called by a worker between jobs, so its own pending entries are leftovers of an
        interrupted attempt (e.g. Redis went away mid-job) and go back too. Returns counts by
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
            for p in pending:
                reply = self._script(
                    "reclaim",
                    op,
                    _s(p["message_id"]),
                    _s(p["consumer"]),
                    worker_id,
                    int(p["time_since_delivered"]),
                    lease_ms,
                )
                outcome = _s(reply[0]) or ""
                key = _s(reply[1]) or outcome if outcome == "requeued" else outcome
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
        if _s(reply[0]) != "run":
            return _s(reply[0]) or "?"
        inputs: dict[str, dict[str, Any]] = json.loads(reply[4])
        blobs = {_s(reply[5][i]) or "": reply[5][i + 1] for i in range(0, len(reply[5]), 2)}
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
        reply = _checked(
            self._script("progress", att.job_id, att.token, int(done), int(total)), _what(att)
        )
        return _s(reply[1]) == "1"

    # ------------------------------------------------------------------ worker side: endings
    def finish_success(
        self, att: Attempt, outputs: Mapping[str, RawTensor], summary: Mapping[str, Any]
    ) -> int:
        """Store outputs and summary (fenced); returns the bytes stored."""
        names = sorted(outputs)
        _checked(
            self._script(
                "succeed",
                att.job_id,
                att.token,
                att.op,
                att.entry_id,
                repr(time.time()),
                self.ttl,
                json.dumps(dict(summary)),
                json.dumps({n: outputs[n].meta() for n in names}),
                " ".join(names),
                *(outputs[n].data for n in names),
            ),
            _what(att),
        )
        return sum(len(t.data) for t in outputs.values())

    def finish_failure(self, att: Attempt, code: str, message: str, *, retry: bool) -> str:
        """Fail the job, or put it back for another attempt when ``retry`` and attempts remain."""
        final = not retry or att.attempt >= self.max_attempts
        msg = message if att.attempt == 1 or not final else f"attempt {att.attempt}: {message}"
        reply = _checked(
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
        return _s(reply[0]) or "failed"

    def finish_cancelled(self, att: Attempt) -> None:
        _checked(
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
        _checked(self._script("hand_back", att.job_id, att.token, att.op, att.entry_id), _what(att))


def _what(att: Attempt) -> str:
    return f"attempt {att.attempt} of job {att.job_id} (token {att.token})"


# ---------------------------------------------------------------------------------- async client
class AsyncQueue(_Settings):
    """The API's client, on ``redis.asyncio``: never blocks the event loop."""

    def __init__(self, client: Any, *, retry_for: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.r: Any = client
        self.retry_for = retry_for
        self._scripts = {name: self.r.register_script(text) for name, text in _ALL_SCRIPTS.items()}
        self._memory: tuple[float, int, int] = (0.0, 0, 0)  # (read at, used, maxmemory)

    @classmethod
    def from_settings(cls, settings: Settings, client: Any = None) -> AsyncQueue:
        return cls(
            client if client is not None else connect_async(settings),
            retry_for=settings.redis_timeout_seconds,
            **_Settings.kwargs(settings),
        )

    async def _run(self, call: _Call[T]) -> T:
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

    async def ensure_groups(self, ops: Iterable[str] = OPS) -> None:
        for op in ops:
            try:
                await self.r.xgroup_create(stream_key(op), GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def status(self, ops: Iterable[str] = OPS) -> QueueStatus:
        return await self._run(_status_call(ops))

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
    ) -> Submitted:
        outcome, job_id, fresh = await self._run(
            self.submit_call(op, params, tensors, idempotency_key, digest, owner)
        )
        if outcome == "replay":
            return Submitted(await self.get_job(job_id, owner=owner), replayed=True)
        return Submitted(fresh)

    async def get_job(self, job_id: str, *, owner: str = "") -> dict[str, Any]:
        return await self._run(_get_call(job_id, owner, outputs=False))

    async def get_outputs(
        self, job_id: str, *, owner: str = ""
    ) -> tuple[dict[str, Any], dict[str, RawTensor]]:
        return _outputs_of(await self._run(_get_call(job_id, owner, outputs=True)))

    async def cancel(self, job_id: str, *, owner: str = "") -> dict[str, Any]:
        await self._run(_cancel_call(job_id, owner, self.ttl))
        return await self.get_job(job_id, owner=owner)


def retry_after(job: Mapping[str, Any]) -> int:
    """Seconds a client should wait before polling again (1 s floor, grows with elapsed time)."""
    created = job.get("created_at") or time.time()
    return max(1, min(30, math.ceil((time.time() - created) / 4)))
