"""Shared fixtures: a real ``redis-server`` on a free loopback port (never the system Redis on
6379), the API against it, in-process and subprocess workers, and a live uvicorn server.

Every fixture here is opt-in (none is autouse), so compute and deploy tests are unaffected.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A port for a server that cannot take a pre-bound socket (redis-server).

    Drawn at random below the kernel's ephemeral range (32768+), where no outgoing connection is
    ever given a local port, so only another explicit bind can take it between this check and the
    server's own bind; the starters below retry with a new port when that happens.
    """
    rng = random.Random()
    while True:
        port = rng.randrange(20000, 32000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
            return port


def bound_socket() -> socket.socket:
    """A listening-ready socket on a free loopback port, bound now (no port-reuse race)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((LOOPBACK, 0))
    return s


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


class RedisProcess:
    """A private ``redis-server`` the test controls: start, crash (kill -9), stop, hang
    (SIGSTOP) and resume, restart on the same port and data directory (AOF optional)."""

    def __init__(self, directory: Path, *, aof: bool = False, extra: tuple[str, ...] = ()) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.path.exists(binary):
            pytest.fail("redis-server is not installed: `make test` installs it (Debian package)")
        self.binary = binary
        self.dir = directory
        self.aof = aof
        self.extra = extra
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def _argv(self) -> list[str]:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "everysec"]
            if self.aof
            else [
                "--appendonly",
                "no",
            ]
        )
        return [
            self.binary,
            *("--port", str(self.port), "--bind", LOOPBACK, "--save", ""),
            *persistence,
            *("--dir", str(self.dir), "--protected-mode", "yes"),
            *("--maxmemory-policy", "noeviction", "--logfile", str(self.dir / "redis.log")),
            *self.extra,
        ]

    def start(self, *, same_port: bool = False) -> None:
        import redis

        for _ in range(20):
            if not same_port or not self.port:
                self.port = free_port()
            self.proc = subprocess.Popen(
                self._argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            client = redis.Redis(host=LOOPBACK, port=self.port, socket_connect_timeout=1)
            try:
                deadline = time.monotonic() + 20
                while self.proc.poll() is None:
                    try:
                        client.ping()
                        return
                    except redis.BusyLoadingError:
                        time.sleep(0.05)
                    except redis.ConnectionError:
                        if time.monotonic() > deadline:
                            break
                        time.sleep(0.05)
            finally:
                client.close()
            self.kill()
            if same_port:  # the port was taken meanwhile: say so rather than move
                raise RuntimeError(f"redis-server could not restart on port {self.port}")
        raise RuntimeError("redis-server did not start")

    def client(self) -> Any:
        import redis

        return redis.Redis(host=LOOPBACK, port=self.port)

    def kill(self) -> None:
        """Crash it (SIGKILL): what AOF everysec has not written is lost."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def pause(self) -> None:
        """Hang it (SIGSTOP): connections stay open, nothing answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        self.kill()
        self.start(same_port=True)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server for the test session; yields its URL."""
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server of this test alone, with AOF (appendfsync everysec), to break on purpose."""
    server = RedisProcess(tmp_path / "redis", aof=True)
    server.dir.mkdir()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """The session server, emptied for this test."""
    import redis

    with contextlib.closing(redis.Redis.from_url(redis_server)) as r:
        r.flushall()
    return redis_server


@pytest.fixture
def make_settings(redis_url: str) -> Callable[..., Any]:
    from app.jobs.settings import Settings

    def make(**overrides: Any) -> Settings:
        base: dict[str, Any] = {"redis_url": redis_url, "lease_seconds": 2.0, "metrics_port": 0}
        base.update(overrides)
        return Settings(**base)

    return make


@pytest.fixture
def make_queue(make_settings: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    from app.jobs.queue import Queue

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
    from app.jobs.queue import Queue
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
    synchronous :class:`app.jobs.queue.Queue` on the same Redis (the app's client is asyncio)."""
    from fastapi.testclient import TestClient

    from app.api import create_app

    clients: list[Any] = []

    def make(**overrides: Any) -> Any:
        from app.jobs.queue import Queue

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


FAULT_WORKER = Path(__file__).with_name("fault_worker.py")


@pytest.fixture
def spawn_worker(
    redis_url: str, tmp_path: Path
) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """``spawn_worker(**env)`` starts ``python -m workers`` as a real subprocess.

    ``url=`` points it at another Redis than the session's; ``faults=True`` starts
    ``tests/fault_worker.py`` instead: the same worker, whose compute crashes the process or hangs
    for jobs marked with the eps values it names. ``proc.log`` is the path of its log.
    """
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(*, url: str | None = None, faults: bool = False, **env: Any) -> Any:
        full = {
            **os.environ,
            "REDIS_URL": url or redis_url,
            "METRICS_PORT": "0",
            "LEASE_SECONDS": "1",
            "WORKER_DEVICE": "cpu",
            "PYTHONPATH": _import_roots(),
            "LOG_LEVEL": "INFO",
        }
        full.update({k.upper(): str(v) for k, v in env.items()})
        path = tmp_path / f"worker-{len(procs)}.log"
        log = open(path, "wb")  # noqa: SIM115
        argv = [sys.executable, str(FAULT_WORKER)] if faults else [sys.executable, "-m", "workers"]
        p = subprocess.Popen(argv, env=full, stdout=log, stderr=log)
        p.log = path  # type: ignore[attr-defined]
        procs.append(p)
        return p

    yield spawn
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)
            p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)


@pytest.fixture
def live_server(make_settings: Callable[..., Any]) -> Iterator[Callable[..., str]]:
    """``live_server(**settings)`` -> base URL of a real uvicorn server on a free loopback port."""
    import uvicorn

    from app.api import create_app

    servers: list[tuple[Any, threading.Thread]] = []

    def start(**overrides: Any) -> str:
        sock = bound_socket()
        port = sock.getsockname()[1]
        config = uvicorn.Config(
            create_app(make_settings(**overrides)),
            host=LOOPBACK,
            port=port,
            log_level="warning",
            lifespan="on",
        )
        server = uvicorn.Server(config)
        t = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        t.start()
        wait_until(lambda: server.started, timeout=20)
        servers.append((server, t))
        return f"http://{LOOPBACK}:{port}"

    yield start
    for server, t in servers:
        server.should_exit = True
        t.join(timeout=15)
