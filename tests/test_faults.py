"""Faults, broken on purpose with real processes: a private ``redis-server`` with AOF (killed,
restarted, hung with SIGSTOP, flushed, out of memory) and real ``python -m workers`` processes
(kill -9, SIGSTOP, SIGTERM, a compute that crashes the process or hangs). Each test shows that
nothing accepted is lost or stuck: every job reaches a terminal state, once."""

from __future__ import annotations

import random
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

import compute
from app.jobs.codec import from_array
from app.jobs.queue import Queue
from app.jobs.records import Attempt, job_key
from tests.conftest import RedisProcess, wait_until
from tests.fault_worker import CRASH_EPS, HANG_EPS

pytestmark = [pytest.mark.redis, pytest.mark.slow]

LEASE = 1.0  # LEASE_SECONDS of every worker spawned here
POLL = LEASE / 3  # how often an idle worker looks for lapsed leases


def arrays(seed: int = 7) -> dict[str, np.ndarray[Any, Any]]:
    g = np.random.default_rng(seed)
    return {n: (0.5 * g.standard_normal((16, 8))).astype(np.float32) for n in ("q", "k", "v")}


def submit(q: Queue, seed: int = 7, **params: Any) -> str:
    job = q.enqueue("attention", params, {n: from_array(a) for n, a in arrays(seed).items()})
    return str(job["id"])


def check_result(q: Queue, job_id: str, seed: int = 7) -> None:
    _, outputs = q.get_outputs(job_id)
    t = arrays(seed)
    want = compute.attention(*(torch.from_numpy(t[n]) for n in ("q", "k", "v"))).output
    torch.testing.assert_close(outputs["output"].to_torch(), want, rtol=1e-5, atol=1e-6)


def status(q: Queue, job_id: str, *wanted: str, timeout: float = 60) -> dict[str, Any]:
    return dict(
        wait_until(lambda: (r := q.get_job(job_id))["status"] in wanted and r, timeout=timeout)
    )


def queue_on(server: RedisProcess, **kwargs: Any) -> Queue:
    return Queue(server.client(), lease_seconds=LEASE, **kwargs)


def pid_of(worker_id: str) -> int:
    """Worker ids are ``{host}-{pid}-{suffix}``."""
    return int(worker_id.rsplit("-", 2)[1])


def log_of(proc: Any) -> str:
    return Path(proc.log).read_text(errors="replace")


# ------------------------------------------------------------------------------- Redis faults
@pytest.mark.parametrize("fault", ["stopped", "out_of_memory"])
def test_redis_lost_mid_job_the_job_still_ends(
    fault: str, own_redis: RedisProcess, spawn_worker: Any
) -> None:
    """Redis stopped (or refusing writes at maxmemory) while a job runs: the final write is
    retried until it lands; the job never stays `running` with a live worker."""
    q = queue_on(own_redis)
    job_id = submit(q)
    w = spawn_worker(url=own_redis.url, worker_block_delay_ms=1500, worker_ops="attention")
    status(q, job_id, "running")
    time.sleep(0.3)
    if fault == "stopped":
        own_redis.kill()  # the compute finishes meanwhile; its write fails, is retried
        time.sleep(4)
        own_redis.start(same_port=True)
    else:
        own_redis.client().config_set("maxmemory", 1)
        time.sleep(4)
        assert q.get_job(job_id)["status"] == "running"  # nothing could be written
        own_redis.client().config_set("maxmemory", 0)
    done = status(q, job_id, "succeeded", "failed", timeout=30)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 1  # the first attempt's result landed (no rerun was needed)
    check_result(q, job_id)
    assert w.poll() is None, log_of(w)
    assert "retrying" in log_of(w)
    # the same worker process serves the next job
    nxt = submit(q, seed=8)
    assert status(q, nxt, "succeeded", "failed")["status"] == "succeeded"


def test_own_leftover_entry_is_put_back_after_reconnecting(make_queue: Any) -> None:
    """An entry a worker read but never started (Redis went away between the two) is its own
    leftover: its next reclaim, between jobs, puts the job back."""
    q: Queue = make_queue()
    job_id = submit(q)
    got = q.read_next("w1", ["attention"], 100)
    assert got is not None
    q.renew_lease("w1")  # alive: another worker leaves the entry alone while it is fresh
    assert q.reclaim("w2", ["attention"]) == {"alive": 1}
    assert q.reclaim("w1", ["attention"]) == {"orphan": 1}
    rec = q.get_job(job_id)
    assert rec["status"] == "queued" and rec["attempts"] == 0
    assert q.depth("attention") == (1, 0)


def test_entry_whose_job_moved_on_is_reclaimed(make_queue: Any) -> None:
    """A pending entry whose holder is alive but whose job says otherwise (another worker, or
    still queued long after delivery) goes back; a current one is left alone."""
    q: Queue = make_queue(lease_seconds=0.3)
    job_id = submit(q)
    got = q.read_next("w1", ["attention"], 100)
    assert got is not None
    att = q.start_attempt("w1", *got)
    assert isinstance(att, Attempt)
    q.renew_lease("w1")
    assert q.reclaim("w2", ["attention"]) == {"alive": 1}
    q.r.hset(job_key(job_id), "worker", "w-somebody-else")  # the record names another holder
    assert q.reclaim("w2", ["attention"]) == {"orphan": 1}
    # delivered to a live worker that never started it, for longer than a lease
    got = q.read_next("w3", ["attention"], 100)
    assert got is not None
    q.renew_lease("w3")
    assert q.reclaim("w2", ["attention"]) == {"alive": 1}
    time.sleep(0.4)
    q.renew_lease("w3")
    assert q.reclaim("w2", ["attention"]) == {"orphan": 1}
    assert q.get_job(job_id)["status"] == "queued"


def test_backlog_longer_than_the_ttl_loses_nothing(make_queue: Any, start_worker: Any) -> None:
    """The TTL starts when a job ends: queued jobs older than RESULT_TTL_SECONDS still run."""
    q: Queue = make_queue(result_ttl_seconds=3)
    ids = [submit(q, seed=s) for s in range(3)]
    time.sleep(4.0)
    for job_id in ids:
        assert q.get_job(job_id)["status"] == "queued"
        assert q.r.ttl(job_key(job_id)) == -1  # no expiry while queued
    assert all(q.r.ttl(k) == -1 for k in q.r.keys("attn:in:*"))
    start_worker(result_ttl_seconds=3)
    for s, job_id in enumerate(ids):
        assert status(q, job_id, "succeeded", "failed")["status"] == "succeeded"
        assert 0 < q.r.pttl(job_key(job_id)) <= 3000  # now it expires
        check_result(q, job_id, seed=s)
    assert q.r.keys("attn:in:*") == []
    wait_until(lambda: not q.r.exists(job_key(ids[-1])), timeout=10)


def test_a_job_whose_inputs_were_lost_fails_with_a_reason(
    make_queue: Any, start_worker: Any
) -> None:
    q: Queue = make_queue()
    job_id = submit(q)
    q.r.delete(f"attn:in:{job_id}:k")  # data loss (eviction, a partial restore)
    ghost = submit(q, seed=2)
    q.r.delete(job_key(ghost))  # the record itself is gone: nothing to report to, no stranding
    fine = submit(q, seed=3)
    start_worker()
    rec = status(q, job_id, "failed", "succeeded")
    assert rec["status"] == "failed" and rec["error"]["code"] == "inputs_lost"
    assert "k" in rec["error"]["message"] and rec["attempts"] == 0
    assert status(q, fine, "succeeded", "failed")["status"] == "succeeded"
    wait_until(lambda: q.depth("attention") == (0, 0))


def test_flushall_groups_come_back_and_jobs_run(
    own_redis: RedisProcess, live_server: Any, spawn_worker: Any
) -> None:
    """After Redis loses everything (FLUSHALL, failover to an empty replica): readiness says so,
    the groups are created again (worker and submit path, counted), and new jobs run."""
    base = live_server(redis_url=own_redis.url)
    http = httpx.Client(base_url=base, timeout=10)
    w = spawn_worker(url=own_redis.url, worker_ops="attention")
    wait_until(lambda: http.get("/health/ready").status_code == 200, timeout=60)
    w.send_signal(signal.SIGSTOP)  # hold the worker so that the empty state can be observed
    try:
        own_redis.client().flushall()
        r = http.get("/health/ready")
        assert r.status_code == 503 and r.json()["groups"] is False
    finally:
        w.send_signal(signal.SIGCONT)
    body = {
        n: {"shape": [16, 8], "datatype": "FP32", "data": a.ravel().tolist()}
        for n, a in arrays().items()
    }
    r = http.post("/v1/attention", json=body)
    assert r.status_code == 202, r.text
    done = http.get(f"/v1/jobs/{r.json()['id']}", params={"wait": 30}).json()
    assert done["status"] == "succeeded", done
    wait_until(lambda: http.get("/health/ready").status_code == 200, timeout=30)
    own_redis.client().flushall()  # now with the worker running: it meets NOGROUP itself
    wait_until(lambda: "consumer groups were missing" in log_of(w), timeout=30)
    port = int(re.findall(r"/health on port (\d+)", log_of(w))[0])
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert re.search(r'attn_groups_recreated_total\{component="worker"\} [1-9]', text), text
    api_metrics = http.get("/metrics").text
    assert 'attn_queue_group_present{op="attention"} 1.0' in api_metrics


@pytest.mark.parametrize("fault", ["hung", "down"])
def test_redis_hung_or_down_api_answers_503_fast_and_stays_live(
    fault: str, own_redis: RedisProcess, live_server: Any
) -> None:
    base = live_server(redis_url=own_redis.url)
    http = httpx.Client(base_url=base, timeout=10)
    body = {
        n: {"shape": [16, 8], "datatype": "FP32", "data": a.ravel().tolist()}
        for n, a in arrays().items()
    }
    job_id = http.post("/v1/attention", json=body).json()["id"]
    own_redis.pause() if fault == "hung" else own_redis.kill()
    try:
        # a long-poll hanging on Redis in the background must not hold up liveness
        waiting = threading.Thread(target=http.get, args=(f"/v1/jobs/{job_id}",), daemon=True)
        waiting.start()
        for _ in range(5):
            t0 = time.monotonic()
            assert http.get("/health/live").status_code == 200
            assert time.monotonic() - t0 < 0.1
        calls = [
            ("GET", f"/v1/jobs/{job_id}", None),
            ("GET", f"/v1/jobs/{job_id}?wait=5", None),
            ("GET", f"/v1/jobs/{job_id}/result", None),
            ("DELETE", f"/v1/jobs/{job_id}", None),
            ("POST", "/v1/attention", body),
            ("GET", "/health/ready", None),
        ]
        for method, path, payload in calls:
            t0 = time.monotonic()
            r = http.request(method, path, json=payload)
            took = time.monotonic() - t0
            assert r.status_code == 503, (path, r.status_code, r.text)
            assert took < 2.0, (path, took)
            if path != "/health/ready":
                err = r.json()["error"]
                assert err["code"] == "queue_unavailable" and "Retry-After" in r.headers
                assert str(own_redis.port) not in err["message"]  # no Redis internals
        t0 = time.monotonic()
        assert http.get("/metrics").status_code == 200 and time.monotonic() - t0 < 2.0
    finally:
        if fault == "hung":
            own_redis.resume()
        else:
            own_redis.start(same_port=True)
    # the same API, without a restart, reconnects
    r = wait_until(lambda: (r := http.get(f"/v1/jobs/{job_id}")).status_code == 200 and r)
    assert r.json()["status"] == "queued"
    assert http.post("/v1/attention", json=body).status_code == 202


def test_redis_crash_and_restart_with_aof_keeps_every_job(
    own_redis: RedisProcess, live_server: Any, spawn_worker: Any
) -> None:
    """kill -9 Redis (AOF everysec) with finished, running and queued jobs; restart it: the API
    and the worker reconnect without a restart; every job ends; the result is still readable."""
    base = live_server(redis_url=own_redis.url)
    http = httpx.Client(base_url=base, timeout=10)
    w = spawn_worker(url=own_redis.url, worker_block_delay_ms=1500, worker_ops="attention")
    body = {
        n: {"shape": [16, 8], "datatype": "FP32", "data": a.ravel().tolist()}
        for n, a in arrays().items()
    }
    first = http.post("/v1/attention", json=body).json()["id"]
    assert http.get(f"/v1/jobs/{first}", params={"wait": 60}).json()["status"] == "succeeded"
    before = http.get(f"/v1/jobs/{first}/result").json()
    running = http.post("/v1/attention", json=body).json()["id"]
    queued = http.post("/v1/attention", json=body).json()["id"]
    wait_until(lambda: http.get(f"/v1/jobs/{running}").json()["status"] == "running")
    time.sleep(1.2)  # everything acknowledged is now more than 1 s old
    own_redis.kill()
    time.sleep(1.0)
    own_redis.start(same_port=True)
    r = wait_until(lambda: (r := http.get(f"/v1/jobs/{first}/result")).status_code == 200 and r)
    assert r.json() == before
    for job_id in (running, queued):
        done = wait_until(
            lambda j=job_id: (
                (r := http.get(f"/v1/jobs/{j}", params={"wait": 5})).status_code == 200
                and r.json()["status"] in ("succeeded", "failed")
                and r.json()
            ),
            timeout=60,
        )
        assert done["status"] == "succeeded", done
    after = http.post("/v1/attention", json=body).json()["id"]
    assert http.get(f"/v1/jobs/{after}", params={"wait": 60}).json()["status"] == "succeeded"
    assert w.poll() is None, log_of(w)


# ------------------------------------------------------------------------------- worker faults
def test_kill_9_mid_job_twenty_times(own_redis: RedisProcess, spawn_worker: Any) -> None:
    """kill -9 the worker running a job at a random point, 20 times: each job is taken up again
    within a lease and a poll, and succeeds exactly once, on its second attempt."""
    q = queue_on(own_redis)
    env = {"url": own_redis.url, "worker_block_delay_ms": 600, "worker_ops": "attention"}
    procs = {p.pid: p for p in (spawn_worker(**env) for _ in range(3))}
    wait_until(lambda: len(q.live_workers()) == 3, timeout=120)
    rng = random.Random(20)
    recoveries = []
    for i in range(20):
        job_id = submit(q, seed=i)
        rec = status(q, job_id, "running")
        time.sleep(rng.uniform(0.0, 0.45))
        victim = procs.pop(pid_of(rec["worker"]))
        victim.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        victim.wait(timeout=10)
        again = wait_until(
            lambda j=job_id, old=rec["worker"]: (
                (r := q.get_job(j))["worker"] not in (None, old) and r
            ),
            timeout=30,
            interval=0.01,
        )
        recoveries.append(time.monotonic() - killed)
        new = spawn_worker(**env)  # the replacement starts while the job runs elsewhere
        procs[new.pid] = new
        done = status(q, job_id, "succeeded", "failed", timeout=30)
        assert done["status"] == "succeeded", done
        assert done["attempts"] == 2 and again["worker"] != rec["worker"]
        check_result(q, job_id, seed=i)
        # two idle workers with a current lease before the next kill
        wait_until(lambda: len({pid_of(x) for x in q.live_workers()} & set(procs)) >= 2, 120)
    assert q.stats().get("attention:succeeded") == 20  # once each: no duplicate endings
    assert max(recoveries) <= LEASE + 2 * POLL + 1.0, recoveries


def test_poison_job_that_kills_the_worker_fails_after_max_attempts(
    own_redis: RedisProcess, spawn_worker: Any
) -> None:
    """A job whose compute kills the worker process (not an exception) fails after MAX_ATTEMPTS
    attempts with a reason; the jobs behind it keep flowing. The test supervises the workers as
    compose's restart policy would."""
    q = queue_on(own_redis, max_attempts=3)
    env = {"url": own_redis.url, "faults": True, "max_attempts": 3, "worker_ops": "attention"}
    procs = [spawn_worker(**env) for _ in range(2)]
    poison = submit(q, eps=CRASH_EPS)
    fine = [submit(q, seed=s) for s in range(4)]
    deaths = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for i, p in enumerate(procs):
            if p.poll() is not None:
                deaths += 1
                procs[i] = spawn_worker(**env)
        if all(q.get_job(j)["status"] in ("succeeded", "failed") for j in [poison, *fine]):
            break
        time.sleep(0.1)
    rec = q.get_job(poison)
    assert rec["status"] == "failed" and rec["attempts"] == 3, rec
    assert rec["error"]["code"] == "worker_lost"
    assert "after 3 attempts" in rec["error"]["message"]
    assert deaths == 3
    for s, job_id in enumerate(fine):
        assert q.get_job(job_id)["status"] == "succeeded"
        check_result(q, job_id, seed=s)


def test_worker_paused_past_its_lease_cannot_overwrite_or_republish(
    own_redis: RedisProcess, spawn_worker: Any
) -> None:
    q = queue_on(own_redis)
    job_id = submit(q)
    slow = spawn_worker(url=own_redis.url, worker_block_delay_ms=2500, worker_ops="attention")
    first = status(q, job_id, "running")
    assert pid_of(first["worker"]) == slow.pid
    slow.send_signal(signal.SIGSTOP)
    other = spawn_worker(url=own_redis.url, worker_ops="attention")
    done = status(q, job_id, "succeeded", "failed", timeout=60)
    assert done["status"] == "succeeded" and done["attempts"] == 2
    assert pid_of(done["worker"]) == other.pid
    _, outputs = q.get_outputs(job_id)
    pubsub = own_redis.client().pubsub()
    pubsub.subscribe("attn:done")
    slow.send_signal(signal.SIGCONT)
    wait_until(lambda: "superseded" in log_of(slow), timeout=30)
    time.sleep(0.5)
    after, outputs_after = q.get_outputs(job_id)
    assert after == done  # status, worker, finished_at, summary: untouched
    assert outputs_after["output"].data == outputs["output"].data
    assert q.stats()["attention:succeeded"] == 1
    published = [m for m in iter(lambda: pubsub.get_message(timeout=0.2), None) if m]
    assert not [m for m in published if m["type"] == "message"], published
    assert slow.poll() is None  # the resumed worker carries on
    nxt = submit(q, seed=9)
    assert status(q, nxt, "succeeded", "failed")["status"] == "succeeded"


@pytest.mark.parametrize("outage", ["shorter_than_grace", "longer_than_grace"])
def test_sigterm_while_redis_is_down_does_not_strand_the_job(
    outage: str, own_redis: RedisProcess, spawn_worker: Any
) -> None:
    q = queue_on(own_redis)
    job_id = submit(q)
    grace = 6 if outage == "shorter_than_grace" else 1
    w = spawn_worker(
        url=own_redis.url,
        worker_block_delay_ms=60_000,
        worker_ops="attention",
        worker_stop_grace_seconds=grace,
    )
    status(q, job_id, "running")
    time.sleep(1.1)
    own_redis.kill()
    w.send_signal(signal.SIGTERM)
    time.sleep(1.5 if outage == "shorter_than_grace" else 4.0)
    own_redis.start(same_port=True)
    assert w.wait(timeout=30) == 0, log_of(w)
    rec = q.get_job(job_id)
    if outage == "shorter_than_grace":
        assert rec["status"] == "queued" and rec["attempts"] == 0, rec  # handed back
    else:
        assert rec["status"] in ("running", "queued"), rec  # left to its lapsing lease
        assert "lease will lapse" in log_of(w)
    spawn_worker(url=own_redis.url, worker_ops="attention")
    done = status(q, job_id, "succeeded", "failed", timeout=60)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == (1 if outage == "shorter_than_grace" else 2)
    check_result(q, job_id)


def test_time_limit_at_a_block_boundary(make_queue: Any, spawn_worker: Any) -> None:
    q: Queue = make_queue()
    job_id = submit(q)
    w = spawn_worker(worker_block_delay_ms=10_000, job_timeouts="attention=1")
    rec = status(q, job_id, "failed", "succeeded", timeout=60)
    assert rec["status"] == "failed" and rec["error"]["code"] == "timeout", rec
    assert "time limit of 1 s" in rec["error"]["message"]
    assert rec["attempts"] == 1  # a timeout is not retried
    assert w.poll() is None


def test_hung_compute_with_a_live_lease_fails_with_timeout(
    make_queue: Any, spawn_worker: Any
) -> None:
    """A compute that never returns while its lease thread lives: the watchdog ends the attempt
    as `timeout`, the process exits for its supervisor to restart it, the next job runs."""
    q: Queue = make_queue()
    job_id = submit(q, eps=HANG_EPS)
    fine = submit(q, seed=3)
    w = spawn_worker(faults=True, job_timeout_seconds=1, worker_ops="attention")
    rec = status(q, job_id, "failed", "succeeded", timeout=60)
    assert rec["status"] == "failed" and rec["error"]["code"] == "timeout", rec
    assert "stopped responding" in rec["error"]["message"]
    assert w.wait(timeout=30) == 70
    spawn_worker(faults=True, worker_ops="attention")
    done = status(q, fine, "succeeded", "failed")
    assert done["status"] == "succeeded", done


def test_watchdog_in_process_and_the_late_result_is_discarded(
    make_queue: Any, start_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The embedded worker cannot exit: the watchdog records the timeout, and when the compute
    finally returns, its result is superseded (fenced), not written."""
    import workers.worker as ww

    release = threading.Event()
    real = ww.run_op

    def stuck(*args: Any, **kwargs: Any) -> Any:
        release.wait(60)
        return real(*args, **kwargs)

    monkeypatch.setattr(ww, "run_op", stuck)
    q: Queue = make_queue()
    job_id = submit(q)
    w = start_worker(job_timeout_seconds=0.5, lease_seconds=0.6)
    rec = status(q, job_id, "failed", timeout=30)
    assert rec["error"]["code"] == "timeout"
    assert not w.health()[0]  # the stuck loop is reported unhealthy
    release.set()
    wait_until(lambda: w.health()[0], timeout=30)
    assert q.get_job(job_id) == rec


def test_lease_is_renewed_while_a_job_runs(make_queue: Any, start_worker: Any) -> None:
    from app.jobs.records import lease_key

    q: Queue = make_queue()
    w = start_worker(lease_seconds=1.5, worker_block_delay_ms=3000)
    job_id = submit(q)
    status(q, job_id, "running")
    ttls = []
    for _ in range(6):
        time.sleep(0.5)
        ttls.append(q.r.pttl(lease_key(w.id)))
    assert min(ttls) > 0  # never lapsed in 3 s, twice its length
    assert q.r.pttl(lease_key(w.id)) > 1500 - 2 * 500 - 300  # renewed every lease/3


def test_dead_consumers_are_removed_from_the_group(
    own_redis: RedisProcess, spawn_worker: Any
) -> None:
    q = queue_on(own_redis)
    dead = spawn_worker(url=own_redis.url, worker_ops="attention")
    status(q, submit(q), "succeeded")  # a consumer exists once it has read an entry
    names = lambda: {  # noqa: E731
        c["name"].decode() for c in q.r.xinfo_consumers("attn:stream:attention", "workers")
    }
    (dead_name,) = names()
    assert pid_of(dead_name) == dead.pid
    dead.send_signal(signal.SIGKILL)
    dead.wait(timeout=10)
    alive = spawn_worker(url=own_redis.url, worker_ops="attention")
    status(q, submit(q, seed=2), "succeeded")
    wait_until(lambda: dead_name not in names(), timeout=60)
    assert {pid_of(n) for n in names()} == {alive.pid}


def test_worker_health_endpoint_reflects_its_loop(make_queue: Any, spawn_worker: Any) -> None:
    q: Queue = make_queue()
    w = spawn_worker(worker_ops="attention", worker_block_delay_ms=2000)
    wait_until(lambda: "/health on port" in log_of(w), timeout=60)
    port = int(re.findall(r"/health on port (\d+)", log_of(w))[0])
    health = lambda: httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)  # noqa: E731
    wait_until(lambda: health().json()["state"] == "idle", timeout=60)
    assert health().status_code == 200
    job_id = submit(q)
    status(q, job_id, "running")
    r = health()
    assert r.status_code == 200 and r.json() == {
        "status": "ok",
        "state": "busy",
        "job": job_id,
        "seconds_over_limit": 0,
    }
    assert httpx.get(f"http://127.0.0.1:{port}/metrics").text.startswith("# HELP")


def test_two_workers_on_one_host_share_no_port(make_queue: Any, spawn_worker: Any) -> None:
    """A taken METRICS_PORT is a warning and a free port, never a crash."""
    import socket

    make_queue()
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        a = spawn_worker(metrics_port=port, worker_ops="attention")
        wait_until(lambda: "serving /metrics and /health on port" in log_of(a), timeout=60)
        assert f"METRICS_PORT {port} is taken" in log_of(a)
        assert a.poll() is None
