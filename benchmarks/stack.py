"""The service as the benchmarks run it: a private ``redis-server``, the API under uvicorn and
``python -m workers`` processes, all on loopback, started and broken on purpose from one place
(``benchmarks/service.py`` and ``benchmarks/load.py``)."""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(os.path.abspath(__file__)).parent.parent
HOST = "127.0.0.1"
STAGES = ("start", "decode", "compute", "encode", "write")


def free_port() -> int:
    """A port below the kernel's ephemeral range (no outgoing connection is given one)."""
    rng = random.Random()
    while True:
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return port


def _cpu_of(pid: int) -> float:
    """utime + stime of a process (all its threads) from /proc, in seconds; 0 when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Stack:
    """redis-server (AOF everysec when ``aof``) + the API + workers, as subprocesses."""

    def __init__(self, *, aof: bool = False, env: dict[str, str] | None = None) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="attn-bench-"))
        self.aof = aof
        self.redis_port, self.api_port = free_port(), free_port()
        self.env = {
            **os.environ,
            "REDIS_URL": f"redis://{HOST}:{self.redis_port}/0",
            "METRICS_PORT": "0",
            "LOG_LEVEL": "WARNING",
            "PYTHONPATH": str(ROOT),
            "WORKER_DEVICE": "cpu",
            "MAX_CONCURRENT_UPLOADS": "64",
            "OMP_WAIT_POLICY": "PASSIVE",
            **(env or {}),
        }
        self.start_redis()
        self.api = self._spawn(
            [
                *(sys.executable, "-m", "uvicorn", "app.main:app", "--host", HOST),
                *("--port", str(self.api_port), "--log-level", "warning", "--no-access-log"),
            ],
            "api",
        )
        self.url = f"http://{HOST}:{self.api_port}"
        self.workers: list[tuple[subprocess.Popen[bytes], Path]] = []
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.url + "/health/live", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the API did not come up")
            time.sleep(0.1)

    def _spawn(self, argv: list[str], name: str) -> subprocess.Popen[bytes]:
        with (self.tmp / f"{name}.log").open("ab") as log:
            return subprocess.Popen(argv, env=self.env, stdout=log, stderr=log, cwd=ROOT)

    # ------------------------------------------------------------------ Redis
    def start_redis(self) -> None:
        import redis

        argv = ["redis-server", "--port", str(self.redis_port), "--bind", HOST, "--save", ""]
        argv += ["--appendonly", "yes", "--appendfsync", "everysec"] if self.aof else []
        argv += ["--appendonly", "no"] if not self.aof else []
        argv += ["--dir", str(self.tmp), "--maxmemory-policy", "noeviction"]
        self.redis = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        r = redis.Redis(host=HOST, port=self.redis_port)
        deadline = time.monotonic() + 30
        while True:
            try:
                r.ping()
                return
            except (redis.ConnectionError, redis.BusyLoadingError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def crash_redis(self) -> float:
        """kill -9 and restart on the same port and data; returns the seconds it was away."""
        t0 = time.monotonic()
        self.redis.kill()
        self.redis.wait()
        self.start_redis()
        return time.monotonic() - t0

    def stats(self) -> dict[str, int]:
        import redis

        r = redis.Redis(host=HOST, port=self.redis_port)
        return {k.decode(): int(v) for k, v in r.hgetall("attn:stats").items()}

    # ------------------------------------------------------------------ workers
    def spawn_worker(self) -> None:
        log = self.tmp / f"worker-{time.monotonic_ns()}.log"
        with log.open("wb") as fh:
            p = subprocess.Popen(
                [sys.executable, "-m", "workers"],
                env={**self.env, "LOG_LEVEL": "INFO"},
                cwd=ROOT,
                stdout=fh,
                stderr=fh,
            )
        self.workers.append((p, log))

    def kill_worker(self) -> None:
        """kill -9 the oldest worker and start a replacement."""
        victim, _ = self.workers.pop(0)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        self.spawn_worker()

    def scale(self, n: int) -> None:
        """Exactly ``n`` workers, each with a current lease (ready)."""
        while len(self.workers) > n:
            w, _ = self.workers.pop()
            w.terminate()
            w.wait(30)
        while len(self.workers) < n:
            self.spawn_worker()
        deadline = time.monotonic() + 120
        while n and time.monotonic() < deadline:
            r = httpx.get(self.url + "/health/ready", timeout=5)
            if r.status_code == 200 and r.json()["workers"] == n:
                time.sleep(0.5)  # thread counts settle (each worker divides the cores)
                return
            time.sleep(0.1)

    def worker_stages(self) -> dict[str, tuple[float, float]]:
        """Per stage: (total seconds, jobs) summed over the workers' /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        totals = {s: [0.0, 0.0] for s in STAGES}
        for _, log in self.workers:
            lines = log.read_text().splitlines()
            ports = [ln.rsplit(" ", 1)[-1] for ln in lines if "/health on port" in ln]
            if not ports:
                continue
            text = httpx.get(f"http://{HOST}:{ports[-1]}/metrics", timeout=5).text
            for fam in text_string_to_metric_families(text):
                for smp in fam.samples:
                    stage = smp.labels.get("stage")
                    if fam.name == "attn_worker_stage_seconds" and stage in totals:
                        if smp.name.endswith("_sum"):
                            totals[stage][0] += smp.value
                        elif smp.name.endswith("_count"):
                            totals[stage][1] += smp.value
        return {s: (v[0], v[1]) for s, v in totals.items()}

    def processes(self) -> dict[str, list[int]]:
        """The stack's processes by role (pids): api, redis, workers."""
        return {
            "api": [self.api.pid],
            "redis": [self.redis.pid],
            "workers": [w.pid for w, _ in self.workers],
        }

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds (user + system, every thread) used so far by each role's processes, and
        by this process (``load``: the load generator)."""
        out = {role: sum(_cpu_of(p) for p in pids) for role, pids in self.processes().items()}
        out["load"] = _cpu_of(os.getpid())
        return out

    def close(self) -> None:
        procs = [w for w, _ in self.workers] + [self.api]
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        self.redis.terminate()
        self.redis.wait(10)
        shutil.rmtree(self.tmp, ignore_errors=True)
