"""The worker loop: take a job, run it (``workers.run``), store outputs and summary.

Thin by design: the Redis layout, leases, fencing and reclaim live in ``app.jobs``. What is here
is what a process must do to never lose or strand a job: renew its lease from its own thread,
retry a final write until it lands or the attempt is stale, put back its own leftover entries
after losing Redis, create the consumer groups again when Redis lost them, and stop a job that
passes its time limit (at a block boundary, or by the watchdog when the compute hangs).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import redis
import torch

import compute
from app.jobs import metrics
from app.jobs.errors import StaleAttempt, job_error
from app.jobs.queue import Queue
from app.jobs.records import Attempt
from app.jobs.settings import Settings
from compute.attention import kernel_status as attention_kernel_status
from compute.tensor_attention import kernel_status
from workers.run import Progress, resolve_device, run_op

__all__ = ["JobTimeout", "Worker", "transient"]

log = logging.getLogger("workers")


class _HandBack(Exception):  # noqa: N818 (a signal, not an error)
    """Raised from the progress callback when the worker is stopping (SIGTERM)."""


class JobTimeout(Exception):  # noqa: N818 (the job's outcome, as compute.Cancelled)
    """Raised at a block boundary once an attempt has run past its time limit."""


# Redis answers that go away by themselves: retry. Anything else is a bug or a refusal.
_TRANSIENT_REPLIES = ("OOM", "BUSY", "LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "NOREPLICAS")


def transient(exc: BaseException) -> bool:
    """A Redis failure worth retrying (connection, timeout, memory full, loading, failover)."""
    if isinstance(
        exc,
        redis.ConnectionError
        | redis.TimeoutError
        | redis.BusyLoadingError
        | redis.exceptions.OutOfMemoryError
        | redis.exceptions.ReadOnlyError,
    ):
        return True
    return isinstance(exc, redis.ResponseError) and str(exc).startswith(_TRANSIENT_REPLIES)


def _largest_bound(summary: Mapping[str, Any]) -> float | None:
    """The job's certified bound for the metric: ``error_bound``, or the largest of LoRA's
    per-gradient ``error_bounds``; None when the job ran exact."""
    bound = summary.get("error_bound")
    if isinstance(bound, float):
        return bound
    found: list[float] = []

    def walk(value: Any) -> None:
        if isinstance(value, float):
            found.append(value)
        elif isinstance(value, Mapping):
            for v in value.values():
                walk(v)

    walk(summary.get("error_bounds"))
    return max(found) if found else None


def _lost_stream(exc: redis.RedisError) -> bool:
    """Redis no longer has our stream or group (FLUSHALL, failover to an empty replica)."""
    text = str(exc)
    return isinstance(exc, redis.ResponseError) and ("NOGROUP" in text or "UNBLOCKED" in text)


class _Running:
    """The attempt in progress, as the lease thread's watchdog sees it."""

    def __init__(self, att: Attempt, limit: float) -> None:
        self.att = att
        self.limit = limit
        self.deadline = time.monotonic() + limit
        self.abandoned = False


class Worker:
    """One job at a time; a lease renewed from its own thread; reclaims dead workers' jobs."""

    def __init__(
        self,
        queue: Queue,
        settings: Settings,
        *,
        worker_id: str | None = None,
        ops: list[str] | None = None,
        exit_on_hang: bool = False,
    ) -> None:
        self.queue = queue
        self.settings = settings
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.ops = ops or settings.ops
        self.device = resolve_device(settings.worker_device)
        self.delay = settings.worker_block_delay_ms / 1000.0
        self.lease_period = max(settings.lease_seconds / 3.0, 0.05)
        self.block_ms = int(min(1000.0, self.lease_period * 1000))
        self.exit_on_hang = exit_on_hang
        self._stop = threading.Event()
        self._lease_thread: threading.Thread | None = None
        self._current: _Running | None = None
        self._next: tuple[str, str] | None = None  # read together with the last result
        self._beat = time.monotonic()
        self.jobs_done = 0

    # ------------------------------------------------------------------ lifecycle
    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Whether the job loop is alive: idle and turning, or busy within its time limit."""
        now = time.monotonic()
        cur = self._current
        if cur is not None:
            over = now - cur.deadline
            ok = over < self._hang_grace(cur.limit)
            return ok, {"state": "busy", "job": cur.att.job_id, "seconds_over_limit": max(over, 0)}
        idle = now - self._beat
        ok = idle < 10.0 + 3 * self.block_ms / 1000.0 and not self._stop.is_set()
        return ok, {"state": "idle", "seconds_since_loop": round(idle, 3)}

    @staticmethod
    def _hang_grace(limit: float) -> float:
        """How long past its limit a job may run without reaching a block before it is hung."""
        return max(1.0, min(60.0, 0.25 * limit))

    def _keep_lease(self) -> None:
        warned = False
        while not self._stop.wait(self.lease_period):
            try:
                self.queue.renew_lease(self.id)
                metrics.LEASE_RENEWALS.inc()
                if warned:
                    log.info("lease renewed again")
                warned = False
            except redis.RedisError as exc:  # Redis briefly away: keep trying; the lease may lapse
                metrics.REDIS_ERRORS.labels("worker", type(exc).__name__).inc()
                if not warned:
                    log.warning("lease renewal failed: %s", exc)
                warned = True
            self._watchdog()

    def _watchdog(self) -> None:
        """End an attempt whose compute hangs past its time limit (no block reached)."""
        cur = self._current
        if cur is None or cur.abandoned:
            return
        over = time.monotonic() - cur.deadline
        if over < self._hang_grace(cur.limit):
            return
        att = cur.att
        message = (
            f"the compute ran past the {cur.limit:g} s time limit and stopped responding "
            "(no block finished); the worker process is restarted"
            if self.exit_on_hang
            else f"the compute ran past the {cur.limit:g} s time limit and stopped responding"
        )
        try:
            self.queue.finish_failure(att, "timeout", message, retry=False)
            metrics.FAILURES.labels(att.op, "timeout").inc()
        except StaleAttempt:
            pass
        except redis.RedisError as exc:
            log.warning("watchdog could not record the timeout yet: %s", exc)
            return
        cur.abandoned = True
        log.error("job %s attempt %d hung past its time limit", att.job_id, att.attempt)
        if self.exit_on_hang:
            logging.shutdown()
            os._exit(70)  # the compute thread cannot be interrupted; the supervisor restarts us

    def _until_redis(self, what: str, action: Callable[[], Any]) -> bool:
        """Run ``action`` until Redis answers (True) or the worker is stopped (False)."""
        pause = 0.1
        while not self._stop.is_set():
            try:
                action()
                return True
            except redis.RedisError as exc:
                metrics.REDIS_ERRORS.labels("worker", type(exc).__name__).inc()
                log.warning("%s: Redis unreachable (%s); retrying", what, exc)
                self._stop.wait(pause)
                pause = min(pause * 2, 2.0)
        return False

    def run(self) -> None:
        """Serve until :meth:`stop`; the current job is handed back at its next block."""

        def setup() -> None:
            self.queue.ensure_groups(self.ops)
            self.queue.renew_lease(self.id)

        if not self._until_redis("start", setup):
            return
        self._lease_thread = threading.Thread(target=self._keep_lease, name="lease", daemon=True)
        self._lease_thread.start()
        log.info("worker %s on %s consuming %s", self.id, self.device, ",".join(self.ops))
        if "tensor-attention" in self.ops and self.device.type == "cpu":
            # build (or load), self-test and calibrate the compiled kernel now, not in a job
            log.info("tensor attention CPU kernel: %s", kernel_status())
        if "attention" in self.ops and self.device.type == "cpu":
            log.info("attention CPU kernel: %s", attention_kernel_status())
        self._warm_planner()
        next_reclaim = next_tune = 0.0
        reclaims = 0
        pause = 0.1
        failing = False
        try:
            while not self._stop.is_set():
                self._beat = time.monotonic()
                try:
                    if time.monotonic() >= next_tune:
                        self._tune_threads()
                        next_tune = time.monotonic() + 10.0
                    if time.monotonic() >= next_reclaim:
                        self._reclaim(prune=reclaims % 10 == 0)
                        reclaims += 1
                        next_reclaim = time.monotonic() + self.lease_period
                    got, self._next = self._next, None
                    if got is None:
                        got = self.queue.read_next(self.id, self.ops, self.block_ms)
                    if failing:
                        log.info("Redis reachable again")
                    failing, pause = False, 0.1
                    if got is not None:
                        self.process(*got)
                except redis.RedisError as exc:
                    if self._stop.is_set():
                        break
                    if _lost_stream(exc):
                        self._recreate_groups()
                        continue
                    metrics.REDIS_ERRORS.labels("worker", type(exc).__name__).inc()
                    if not failing:
                        log.warning("Redis unreachable (%s); retrying", exc)
                    failing = True
                    next_reclaim = 0.0  # take back our own leftover entries once it answers
                    self._stop.wait(pause)
                    pause = min(pause * 2, 2.0)
                except Exception:
                    if self._stop.is_set():
                        break
                    log.exception("worker loop error; retrying in 1 s")
                    self._stop.wait(1.0)
        finally:
            self._stop.set()
            if self._lease_thread is not None:
                self._lease_thread.join(timeout=5)
            try:
                self.queue.drop_lease(self.id)
            except Exception:
                log.warning("could not drop the lease (it lapses by itself)", exc_info=True)
            log.info("worker %s stopped", self.id)

    def _recreate_groups(self) -> None:
        try:
            made = self.queue.ensure_groups(self.ops)
        except redis.RedisError as exc:
            log.warning("could not create the consumer groups yet: %s", exc)
            return
        metrics.GROUPS_RECREATED.labels("worker").inc(made)
        log.warning("consumer groups were missing (Redis lost data?): created %d", made)

    def _warm_planner(self) -> None:
        """Read (or, on a new machine, measure once) the cost model's constants now, at the
        thread count jobs will run with, so that no job pays for the calibration
        (compute/core/calibration.py). Best effort: a failure here is logged, never fatal."""
        with contextlib.suppress(redis.RedisError):  # else the loop tunes them once it answers
            self._tune_threads()
        t0 = time.perf_counter()
        for name in self.ops:
            op = compute.OPERATIONS.get(name)
            if op is None or op.plan is None:
                continue
            for dtype in ("float32", "float64"):
                try:
                    op.plan(n=4096, d=8, radius=1.0, eps=1e-3, dtype=dtype, device=self.device)
                except Exception as exc:  # an operation whose planner takes other arguments
                    log.debug("planner warm-up of %s (%s) skipped: %s", name, dtype, exc)
        log.info("cost model ready in %.2f s", time.perf_counter() - t0)

    def _tune_threads(self) -> None:
        """PyTorch threads: WORKER_THREADS, or the host's cores shared among its live workers
        (several workers on one host each running all cores' threads fight, and spinning
        OpenMP threads of one starve the others)."""
        threads = self.settings.worker_threads
        if threads == 0:
            host = socket.gethostname() + "-"
            peers = sum(w.startswith(host) for w in self.queue.live_workers()) or 1
            threads = max(1, (os.cpu_count() or 1) // peers)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            log.info("PyTorch threads: %d", threads)

    def _reclaim(self, *, prune: bool) -> None:
        keep = {self._next[1].split("|", 1)[0]} if self._next is not None else set()
        counts = self.queue.reclaim(self.id, self.ops, keep=keep)
        for reason in ("worker_lost", "orphan"):
            if counts.get(reason):
                metrics.RECLAIMED.labels(reason).inc(counts[reason])
                log.warning("reclaimed %d job(s): %s", counts[reason], reason)
        if prune:
            removed = self.queue.prune_consumers(self.id, self.ops)
            if removed:
                log.info("removed %d dead consumer(s) from the groups", removed)

    # ------------------------------------------------------------------ one job
    def _check_local(self) -> None:
        """Time limit and stop request (no Redis)."""
        cur = self._current
        if cur is not None and time.monotonic() > cur.deadline:
            raise JobTimeout(f"the job ran past its time limit of {cur.limit:g} s")
        if self._stop.is_set():
            raise _HandBack()

    def _check(self, att: Attempt, done: int, total: int, *, force: bool) -> None:
        """At a block boundary: time limit, cancel request, stop request."""
        cur = self._current
        if cur is not None and time.monotonic() > cur.deadline:
            raise JobTimeout(f"the job ran past its time limit of {cur.limit:g} s")
        try:
            if self.queue.report_progress(att, done, total, force=force):
                raise compute.Cancelled("cancelled by request")
        except redis.RedisError as exc:  # progress is advisory: keep computing
            metrics.REDIS_ERRORS.labels("worker", type(exc).__name__).inc()
        if self._stop.is_set():
            raise _HandBack()

    def _progress(self, att: Attempt) -> Progress:
        def progress(done: int, total: int) -> None:
            att.progress = (done, total)
            if total > 0 and done >= total:
                # The last block: no round trip. The result's write (the succeed script) records
                # this progress and honours a cancel asked until then; the time limit and a stop
                # request are checked here as at every block.
                self._check_local()
                return
            self._check(att, done, total, force=False)
            if self.delay:
                self._sleep(att, done, total)

        return progress

    def _sleep(self, att: Attempt, done: int, total: int) -> None:
        """The diagnostic per-block delay, checking limit, cancel and stop while it lasts."""
        end = time.monotonic() + self.delay
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 0.05))
            self._check(att, done, total, force=True)

    def process(self, op: str, handle: str) -> str | None:
        """Run one queue entry; returns the job's new status (None when nothing ran)."""
        t_start = time.perf_counter()
        started = self.queue.start_attempt(self.id, op, handle)
        if not isinstance(started, Attempt):
            if started == "gone":
                metrics.JOBS_VANISHED.labels(op).inc()
                log.warning("entry %s: its job record is missing (Redis lost data)", handle)
            elif started == "failed":
                log.warning("entry %s: the job could not run and ended as failed", handle)
            return None
        att = started
        log.debug("job %s (%s) attempt %d", att.job_id, op, att.attempt)
        self._current = _Running(att, self.settings.job_timeout(op))
        begin = time.perf_counter()
        stages = {"start": begin - t_start}
        status: str
        try:
            if self.delay:
                self._sleep(att, 0, 0)
            outputs, summary = run_op(
                op,
                att.tensors,
                att.params,
                device=self.device,
                progress=self._progress(att),
                stages=stages,
            )
            t_write = time.perf_counter()
            done = self._settle(
                lambda: self.queue.finish_success_and_read(att, outputs, summary, self.ops)
            )
            stages["write"] = time.perf_counter() - t_write
            if isinstance(done, tuple) and done[0] == "cancelled":  # asked while it ran
                status, self._next = "cancelled", done[2]
            elif isinstance(done, tuple):
                status, stored, self._next = done
                method = str(summary.get("method", "unknown"))
                metrics.child(metrics.BYTES_STORED, "output").inc(stored)
                metrics.child(metrics.JOB_SECONDS, op, method).observe(time.perf_counter() - begin)
                bound = _largest_bound(summary)
                if bound is not None:
                    metrics.child(metrics.ERROR_BOUND, op, method).observe(bound)
                for stage, seconds in stages.items():
                    metrics.child(metrics.WORKER_STAGE, op, stage).observe(seconds)
            else:
                status = str(done)
        except StaleAttempt as exc:
            log.warning("%s; its result is discarded", exc)
            status = "superseded"
        except JobTimeout as exc:
            status = self._fail(att, "timeout", str(exc), retry=False)
        except compute.Cancelled:
            status = self._settle(lambda: self.queue.finish_cancelled(att)) or "cancelled"
        except _HandBack:
            status = self._settle(lambda: self.queue.hand_back(att)) or "handed_back"
        except Exception as exc:
            code, retry = job_error(exc)
            if retry:
                log.exception("job %s attempt %d failed", att.job_id, att.attempt)
            message = f"{type(exc).__name__}: {exc}" if retry else str(exc)
            status = self._fail(att, code, message, retry=retry)
        finally:
            self._current = None
        metrics.child(metrics.WORKER_JOBS, op, status).inc()
        self.jobs_done += 1
        return status

    def _fail(self, att: Attempt, code: str, message: str, *, retry: bool) -> str:
        status = str(
            self._settle(lambda: self.queue.finish_failure(att, code, message, retry=retry))
        )
        if status == "failed":
            metrics.FAILURES.labels(att.op, code).inc()
        elif status == "queued":
            metrics.RETRIES.labels(att.op, code).inc()
        return status

    def _settle(self, write: Callable[[], Any]) -> Any:
        """Run a final write until it lands or the attempt is stale ('superseded').

        A Redis outage delays the write, never drops it: transient errors are retried with
        backoff for as long as the worker runs. Once the worker is stopping, it retries for
        WORKER_STOP_GRACE_SECONDS more and then gives up ('abandoned'): the job stays with this
        worker's lease, which lapses, and another worker reruns it.
        """
        pause = 0.05
        give_up: float | None = None
        while True:
            try:
                result = write()
                return "done" if result is None else result
            except StaleAttempt as exc:
                log.warning("%s", exc)
                return "superseded"
            except redis.RedisError as exc:
                if not transient(exc):
                    raise
                metrics.REDIS_ERRORS.labels("worker", type(exc).__name__).inc()
                if self._stop.is_set():
                    now = time.monotonic()
                    give_up = give_up or now + self.settings.worker_stop_grace_seconds
                    if now > give_up:
                        log.error("could not record the job's end; its lease will lapse instead")
                        return "abandoned"
                log.warning("recording the job's end failed (%s); retrying", exc)
                time.sleep(pause)
                pause = min(pause * 2, 2.0)
