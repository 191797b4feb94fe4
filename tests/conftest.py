"""Shared fixtures: a real ``redis-server`` on a free loopback port (never the system Redis on
6379), the API against it, in-process and subprocess workers, and a live uvicorn server.

Every fixture here is opt-in (none is autouse), so compute and deploy tests are unaffected.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until truthy; fail the test (never hang) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(interval)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """A private redis-server for the test session; yields its URL."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(binary):
        pytest.fail("redis-server is not installed: `make test` installs it (Debian redis-server)")
    tmp = tempfile.mkdtemp(prefix="attn-redis-")
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            LOOPBACK,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            tmp,
            "--protected-mode",
            "yes",
            "--maxmemory-policy",
            "noeviction",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(host=LOOPBACK, port=port)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        yield f"redis://{LOOPBACK}:{port}/0"
    finally:
        client.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """The session server, emptied for this test."""
    import redis

    with contextlib.closing(redis.Redis.from_url(redis_server)) as r:
        r.flushall()
    return redis_server


@pytest.fixture
def make_settings(redis_url: str) -> Callable[..., Any]:
    from app.settings import Settings

    def make(**overrides: Any) -> Settings:
        base: dict[str, Any] = {"redis_url": redis_url, "lease_seconds": 2.0, "metrics_port": 0}
        base.update(overrides)
        return Settings(**base)

    return make


@pytest.fixture
def make_queue(make_settings: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    from app.queue import Queue

    made: list[Any] = []

    def make(**overrides: Any) -> Any:
        s = make_settings(**overrides)
        q = Queue.from_settings(s)
        q.ensure_groups()
        made.append(q)
        return q

    yield make
    for q in made:
        q.r.close()


@pytest.fixture
def start_worker(make_settings: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    """Start an in-process worker thread against the test Redis; stopped at teardown."""
    from app.queue import Queue
    from workers.worker import Worker

    started: list[tuple[Any, threading.Thread]] = []

    def start(**overrides: Any) -> Any:
        s = make_settings(**overrides)
        q = Queue.from_settings(s)
        w = Worker(q, s)
        t = threading.Thread(target=w.run, daemon=True)
        t.start()
        wait_until(lambda: w.id in q.live_workers(), timeout=20)
        started.append((w, t))
        return w

    yield start
    for w, _ in started:
        w.stop()
    for _, t in started:
        t.join(timeout=15)


@pytest.fixture
def api(make_settings: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    """``api(**settings)`` -> a TestClient of a fresh app on the test Redis; ``.queue`` is a
    synchronous :class:`app.queue.Queue` on the same Redis (the app's own client is asyncio)."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    clients: list[Any] = []

    def make(**overrides: Any) -> Any:
        from app.queue import Queue

        settings = make_settings(**overrides)
        c = TestClient(create_app(settings))
        c.__enter__()
        c.queue = Queue.from_settings(settings)  # type: ignore[attr-defined]  # sync view
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.__exit__(None, None, None)
        c.queue.r.close()


def _import_roots() -> str:
    """PYTHONPATH for subprocesses: where this process found app/ and compute/."""
    import app
    import compute

    roots = {str(Path(m.__file__).parent.parent) for m in (app, compute) if m.__file__}
    return os.pathsep.join([*sorted(roots), os.environ.get("PYTHONPATH", "")])


@pytest.fixture
def spawn_worker(
    redis_url: str, tmp_path: Path
) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """``spawn_worker(**env)`` starts ``python -m workers`` as a real subprocess."""
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(**env: Any) -> subprocess.Popen[bytes]:
        full = {
            **os.environ,
            "REDIS_URL": redis_url,
            "METRICS_PORT": "0",
            "LEASE_SECONDS": "1",
            "WORKER_DEVICE": "cpu",
            "PYTHONPATH": _import_roots(),
            "LOG_LEVEL": "INFO",
        }
        full.update({k.upper(): str(v) for k, v in env.items()})
        log = open(tmp_path / f"worker-{len(procs)}.log", "wb")  # noqa: SIM115
        p = subprocess.Popen([sys.executable, "-m", "workers"], env=full, stdout=log, stderr=log)
        procs.append(p)
        return p

    yield spawn
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)


@pytest.fixture
def live_server(make_settings: Callable[..., Any]) -> Iterator[Callable[..., str]]:
    """``live_server(**settings)`` -> base URL of a real uvicorn server on a free loopback port."""
    import uvicorn

    from app.main import create_app

    servers: list[tuple[Any, threading.Thread]] = []

    def start(**overrides: Any) -> str:
        port = free_port()
        config = uvicorn.Config(
            create_app(make_settings(**overrides)),
            host=LOOPBACK,
            port=port,
            log_level="warning",
            lifespan="on",
        )
        server = uvicorn.Server(config)
        t = threading.Thread(target=server.run, daemon=True)
        t.start()
        wait_until(lambda: server.started, timeout=20)
        servers.append((server, t))
        return f"http://{LOOPBACK}:{port}"

    yield start
    for server, t in servers:
        server.should_exit = True
        t.join(timeout=15)
