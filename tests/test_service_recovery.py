"""Recovery with real worker subprocesses (``python -m workers``) against a real redis-server:
a killed worker's job is reclaimed and finished by another; a live worker's long job is never
taken; SIGTERM hands the running job back and exits."""

from __future__ import annotations

import signal
import subprocess
import time
from typing import Any

import numpy as np
import pytest
import torch

import compute
from app.jobs.codec import from_array
from app.jobs.queue import Queue
from tests.conftest import wait_until

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def inputs() -> dict[str, np.ndarray[Any, Any]]:
    g = np.random.default_rng(7)
    return {n: (0.5 * g.standard_normal((16, 8))).astype(np.float32) for n in ("q", "k", "v")}


def submit(q: Queue) -> tuple[str, dict[str, np.ndarray[Any, Any]]]:
    t = inputs()
    job = q.enqueue("attention", {}, {n: from_array(a) for n, a in t.items()})
    return str(job["id"]), t


def check_result(q: Queue, job_id: str, t: dict[str, np.ndarray[Any, Any]]) -> None:
    _, outputs = q.get_outputs(job_id)
    want = compute.attention(*(torch.from_numpy(t[n]) for n in ("q", "k", "v"))).output
    torch.testing.assert_close(outputs["output"].to_torch(), want, rtol=1e-5, atol=1e-6)


def test_killed_worker_job_is_reclaimed_and_finished(make_queue: Any, spawn_worker: Any) -> None:
    q: Queue = make_queue(lease_seconds=1)
    job_id, t = submit(q)
    slow = spawn_worker(worker_block_delay_ms=600_000)  # holds the job "forever"
    rec = wait_until(lambda: (r := q.get_job(job_id))["status"] == "running" and r, timeout=90)
    assert rec["attempts"] == 1
    slow.send_signal(signal.SIGKILL)
    slow.wait(timeout=10)
    spawn_worker()  # a healthy worker: notices the dead lease, reclaims, runs attempt 2
    done = wait_until(lambda: (r := q.get_job(job_id))["status"] == "succeeded" and r, timeout=90)
    assert done["attempts"] == 2
    assert done["worker"] != rec["worker"]
    check_result(q, job_id, t)
    assert q.stats().get("attention:succeeded") == 1


def test_live_worker_long_job_is_never_taken(make_queue: Any, spawn_worker: Any) -> None:
    q: Queue = make_queue(lease_seconds=1)
    job_id, t = submit(q)
    # runs ~10 s, ten times the 1 s lease, renewing its lease from its own thread
    spawn_worker(worker_block_delay_ms=10_000)
    rec = wait_until(lambda: (r := q.get_job(job_id))["status"] == "running" and r, timeout=90)
    other = spawn_worker()  # idle, reclaim loop every ~0.33 s
    wait_until(lambda: len(q.live_workers()) == 2, timeout=90)
    # both alive while the job runs: the idle one had several reclaim passes at it
    assert q.get_job(job_id)["status"] == "running", "the job ended before the workers overlapped"
    time.sleep(2.0)
    assert q.get_job(job_id)["status"] == "running" and len(q.live_workers()) == 2
    done = wait_until(lambda: (r := q.get_job(job_id))["status"] == "succeeded" and r, timeout=90)
    assert done["attempts"] == 1
    assert done["worker"] == rec["worker"]
    assert other.poll() is None
    check_result(q, job_id, t)


def test_sigterm_hands_the_job_back_and_exits(make_queue: Any, spawn_worker: Any) -> None:
    q: Queue = make_queue(lease_seconds=1)
    job_id, t = submit(q)
    w = spawn_worker(worker_block_delay_ms=600_000)
    wait_until(lambda: q.get_job(job_id)["status"] == "running", timeout=90)
    w.send_signal(signal.SIGTERM)
    try:
        assert w.wait(timeout=30) == 0
    except subprocess.TimeoutExpired:
        pytest.fail("worker did not stop on SIGTERM")
    rec = q.get_job(job_id)
    assert rec["status"] == "queued" and rec["attempts"] == 0
    assert q.live_workers() == []  # the lease was dropped
    spawn_worker()
    done = wait_until(lambda: (r := q.get_job(job_id))["status"] == "succeeded" and r, timeout=90)
    assert done["attempts"] == 1
    check_result(q, job_id, t)


def test_job_fails_after_max_attempts_of_lost_workers(make_queue: Any, spawn_worker: Any) -> None:
    q: Queue = make_queue(lease_seconds=1, max_attempts=1)
    job_id, _ = submit(q)
    slow = spawn_worker(worker_block_delay_ms=600_000, max_attempts=1)
    wait_until(lambda: q.get_job(job_id)["status"] == "running", timeout=90)
    slow.send_signal(signal.SIGKILL)
    slow.wait(timeout=10)
    spawn_worker(max_attempts=1)
    done = wait_until(lambda: (r := q.get_job(job_id))["status"] == "failed" and r, timeout=90)
    assert done["attempts"] == 1
    assert done["error"]["code"] == "worker_lost"
