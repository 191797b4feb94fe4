"""The worker: take a job, load its inputs, call ``compute``, store outputs and summary.

Thin by design: the Redis layout, leases, fencing and reclaim live in ``app.queue``.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import torch

import compute
from app import metrics
from app.errors import InvalidInput, JobNotFound, StaleAttempt
from app.queue import Attempt, Queue, job_key
from app.settings import Settings
from app.tensors import RawTensor, from_array
from compute.tensor_attention import kernel_status

__all__ = ["Worker", "resolve_device", "run_op"]

log = logging.getLogger("workers")

Progress = Callable[[int, int], None]

# Errors that will recur on every attempt: the job fails at once.
DETERMINISTIC: dict[type[BaseException], str] = {
    compute.CertificationError: "certification_failed",
    compute.InvalidInputError: "invalid_input",
    InvalidInput: "invalid_input",
    JobNotFound: "inputs_expired",
    ValueError: "invalid_input",
    TypeError: "invalid_input",
}


class _HandBack(Exception):  # noqa: N818 (a signal, not an error)
    """Raised from the progress callback when the worker is stopping (SIGTERM)."""


def resolve_device(setting: str) -> torch.device:
    return compute.default_device() if setting == "auto" else torch.device(setting)


def _finite(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become None, tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def run_op(
    op: str,
    inputs: Mapping[str, RawTensor],
    params: Mapping[str, Any],
    *,
    device: torch.device,
    progress: Progress | None = None,
) -> tuple[dict[str, RawTensor], dict[str, Any]]:
    """Run one operation on decoded inputs; returns (outputs, JSON-safe summary)."""
    t = {name: raw.to_torch().to(device) for name, raw in inputs.items()}
    p = dict(params)
    start = time.perf_counter()
    outputs: dict[str, Any]
    if op == "attention":
        res = compute.attention(t["q"], t["k"], t["v"], progress=progress, **p)
        outputs = {"output": res.output}
        summary = res.summary()
    elif op == "tensor-attention":
        res = compute.tensor_attention(
            t["q"], t["k1"], t["k2"], t["v1"], t["v2"], progress=progress, **p
        )
        outputs = {"output": res.output}
        summary = res.summary()
    elif op == "lora-gradient":
        adapters = {
            m: (t[f"adapters.{m}.a"], t[f"adapters.{m}.b"]) for m in "qkv" if f"adapters.{m}.a" in t
        }
        lres = compute.lora_gradient(
            t["x"],
            t["y"],
            w_q=t["w_q"],
            w_k=t["w_k"],
            w_v=t["w_v"],
            adapters=adapters,
            progress=progress,
            **p,
        )
        outputs = {"loss": torch.tensor(float(lres.loss), dtype=torch.float64)}
        for m, (d_a, d_b) in lres.grads.items():
            outputs[f"adapters.{m}.a"] = d_a
            outputs[f"adapters.{m}.b"] = d_b
        summary = lres.summary()
        summary.setdefault("loss", float(lres.loss))
    else:
        raise InvalidInput(f"unknown operation {op!r}")
    summary = dict(summary)
    summary["seconds"] = time.perf_counter() - start
    return {k: from_array(v) for k, v in outputs.items()}, _finite(summary)


class Worker:
    """One job at a time; a lease renewed from its own thread; reclaims dead workers' jobs."""

    def __init__(
        self,
        queue: Queue,
        settings: Settings,
        *,
        worker_id: str | None = None,
        ops: list[str] | None = None,
    ) -> None:
        self.queue = queue
        self.settings = settings
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.ops = ops or settings.ops
        self.device = resolve_device(settings.worker_device)
        self.delay = settings.worker_block_delay_ms / 1000.0
        self.lease_period = max(settings.lease_seconds / 3.0, 0.05)
        self._stop = threading.Event()
        self._lease_thread: threading.Thread | None = None
        self.jobs_done = 0

    # ------------------------------------------------------------------ lifecycle
    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        self._stop.set()

    def _keep_lease(self) -> None:
        while not self._stop.wait(self.lease_period):
            try:
                self.queue.renew_lease(self.id)
                metrics.LEASE_RENEWALS.inc()
            except Exception:  # Redis briefly away: keep trying; the lease may lapse
                log.warning("lease renewal failed", exc_info=True)

    def run(self) -> None:
        """Serve until :meth:`stop`; the current job is handed back at its next block."""
        self.queue.ensure_groups(self.ops)
        self.queue.renew_lease(self.id)
        self._lease_thread = threading.Thread(target=self._keep_lease, name="lease", daemon=True)
        self._lease_thread.start()
        log.info("worker %s on %s consuming %s", self.id, self.device, ",".join(self.ops))
        if "tensor-attention" in self.ops and self.device.type == "cpu":
            # build (or load), self-test and calibrate the compiled kernel now, not in a job
            log.info("tensor attention CPU kernel: %s", kernel_status())
        block_ms = int(min(1000.0, self.lease_period * 1000))
        next_reclaim = 0.0
        try:
            while not self._stop.is_set():
                try:
                    if time.monotonic() >= next_reclaim:
                        moved = self.queue.reclaim(self.id, self.ops)
                        if moved:
                            metrics.RECLAIMED.inc(moved)
                            log.warning("reclaimed %d job(s) from dead workers", moved)
                        next_reclaim = time.monotonic() + self.lease_period
                    got = self.queue.read_next(self.id, self.ops, block_ms)
                    if got is not None:
                        self.process(*got)
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
                log.warning("could not drop the lease", exc_info=True)
            log.info("worker %s stopped", self.id)

    # ------------------------------------------------------------------ one job
    def _progress(self, att: Attempt) -> Progress:
        def progress(done: int, total: int) -> None:
            last = total > 0 and done >= total
            if self.queue.report_progress(att, done, total, force=last):
                raise compute.Cancelled("cancelled by request")
            if self._stop.is_set():
                raise _HandBack()
            if self.delay and not last:
                self._sleep(att)

        return progress

    def _sleep(self, att: Attempt) -> None:
        """The diagnostic per-block delay, checking for cancel and stop while it lasts."""
        end = time.monotonic() + self.delay
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(left, 0.05))
            if self._cancelled(att):
                raise compute.Cancelled("cancelled by request")
            if self._stop.is_set():
                raise _HandBack()

    def _cancelled(self, att: Attempt) -> bool:
        token, cancel = self.queue.r.hmget(job_key(att.job_id), ["token", "cancel"])
        if token is None or int(token) != att.token:
            raise StaleAttempt(f"attempt {att.attempt} of job {att.job_id} was superseded")
        return cancel in (b"1", "1")

    def process(self, op: str, handle: str) -> str | None:
        """Run one queue entry; returns the job's new status (None when nothing ran)."""
        att = self.queue.start_attempt(self.id, op, handle)
        if att is None:
            return None
        log.info("job %s (%s) attempt %d", att.job_id, op, att.attempt)
        started = time.perf_counter()
        status: str
        try:
            inputs = self.queue.load_inputs(att)
            if self.delay:
                self._sleep(att)
            outputs, summary = run_op(
                op, inputs, att.params, device=self.device, progress=self._progress(att)
            )
            stored = self.queue.finish_success(att, outputs, summary)
            status = "succeeded"
            method = str(summary.get("method", "unknown"))
            metrics.BYTES_STORED.labels("output").inc(stored)
            metrics.JOB_SECONDS.labels(op, method).observe(time.perf_counter() - started)
            bound = summary.get("error_bound")
            if isinstance(bound, float):
                metrics.ERROR_BOUND.labels(op, method).observe(bound)
        except StaleAttempt as exc:
            log.warning("%s; its result is discarded", exc)
            status = "superseded"
        except compute.Cancelled:
            self._settle(lambda: self.queue.finish_cancelled(att))
            status = "cancelled"
        except _HandBack:
            self._settle(lambda: self.queue.hand_back(att))
            status = "handed_back"
        except Exception as exc:
            code = next(
                (c for k, c in DETERMINISTIC.items() if isinstance(exc, k)), "internal_error"
            )
            retry = code == "internal_error"
            if retry:
                log.exception("job %s attempt %d failed", att.job_id, att.attempt)
            message = f"{type(exc).__name__}: {exc}" if retry else str(exc)
            status = (
                self._settle(lambda: self.queue.finish_failure(att, code, message, retry=retry))
                or "failed"
            )
        metrics.WORKER_JOBS.labels(op, status).inc()
        self.jobs_done += 1
        return status

    @staticmethod
    def _settle(write: Callable[[], Any]) -> Any:
        try:
            return write()
        except StaleAttempt as exc:
            log.warning("%s", exc)
            return "superseded"
