"""Service benchmark on loopback: per-job overhead (HTTP + queue + worker) p50/p99 and jobs/s with
1 and 2 workers, and upload time (POST until 202) of JSON vs safetensors bodies for 1-64 MB.

Starts its own redis-server (free port, temp dir), the API (uvicorn) and workers
(``python -m workers``) as subprocesses; prints a markdown table and writes it, with a PNG plot,
to ``benchmarks/out/``. Run as ``flock /tmp/bench.lock python3 benchmarks/service.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(os.path.abspath(__file__)).parent.parent
sys.path.insert(0, str(ROOT))

from app.jobs.codec import encode_safetensors, from_array  # noqa: E402

OUT = ROOT / "benchmarks" / "out"
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


class Stack:
    """redis-server + API + N workers, all subprocesses on loopback."""

    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="attn-bench-")
        self.redis_port, self.api_port = free_port(), free_port()
        self.redis = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.redis_port),
                "--bind",
                HOST,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.tmp,
            ],
            stdout=subprocess.DEVNULL,
        )
        self.env = {
            **os.environ,
            "REDIS_URL": f"redis://{HOST}:{self.redis_port}/0",
            "METRICS_PORT": "0",
            "LOG_LEVEL": "WARNING",
            "PYTHONPATH": str(ROOT),
            "WORKER_DEVICE": "cpu",
        }
        self.api = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "app.main:app",
                "--host",
                HOST,
                "--port",
                str(self.api_port),
                "--log-level",
                "warning",
                "--no-access-log",
            ],
            env=self.env,
            cwd=ROOT,
        )
        self.url = f"http://{HOST}:{self.api_port}"
        wait_http(self.url + "/health/live")
        self.workers: list[subprocess.Popen[bytes]] = []

    def scale(self, n: int) -> None:
        while len(self.workers) > n:
            w = self.workers.pop()
            w.terminate()
            w.wait(30)
        while len(self.workers) < n:
            self.workers.append(
                subprocess.Popen([sys.executable, "-m", "workers"], env=self.env, cwd=ROOT)
            )
        deadline = time.monotonic() + 120
        while n and time.monotonic() < deadline:
            r = httpx.get(self.url + "/health/ready", timeout=5)
            if r.status_code == 200 and r.json()["workers"] == n:
                return
            time.sleep(0.1)

    def close(self) -> None:
        for p in [*self.workers, self.api]:
            p.terminate()
        for p in [*self.workers, self.api]:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        self.redis.terminate()
        self.redis.wait(10)
        shutil.rmtree(self.tmp, ignore_errors=True)


def small_body() -> dict[str, Any]:
    g = np.random.default_rng(0)

    def t() -> dict[str, Any]:
        data = (0.3 * g.standard_normal(128)).astype(np.float32).tolist()
        return {"shape": [16, 8], "datatype": "FP32", "data": data}

    return {"q": t(), "k": t(), "v": t(), "method": "exact"}


def one_job(client: httpx.Client, body: dict[str, Any]) -> tuple[float, float]:
    """Seconds from POST to result fetched, and the compute seconds the worker reported."""
    t0 = time.perf_counter()
    r = client.post("/v1/attention", json=body)
    r.raise_for_status()
    job_id = r.json()["id"]
    while True:
        rec = client.get(f"/v1/jobs/{job_id}", params={"wait": 10}).json()
        if rec["status"] in ("succeeded", "failed", "cancelled"):
            break
    assert rec["status"] == "succeeded", rec
    client.get(f"/v1/jobs/{job_id}/result").raise_for_status()
    return time.perf_counter() - t0, float(rec["summary"]["seconds"])


def overhead(stack: Stack, jobs: int) -> dict[str, float]:
    body = small_body()
    with httpx.Client(base_url=stack.url, timeout=60) as c:
        for _ in range(10):
            one_job(c, body)  # warm-up
        samples = [one_job(c, body) for _ in range(jobs)]
    total = np.array([s[0] for s in samples]) * 1e3
    over = np.array([s[0] - s[1] for s in samples]) * 1e3
    return {
        "p50": float(np.percentile(over, 50)),
        "p99": float(np.percentile(over, 99)),
        "total_p50": float(np.percentile(total, 50)),
        "compute_p50": float(statistics.median(s[1] for s in samples) * 1e3),
    }


def throughput(stack: Stack, jobs: int, clients: int = 8) -> float:
    body = small_body()

    def run(n: int) -> None:
        with httpx.Client(base_url=stack.url, timeout=60) as c:
            for _ in range(n):
                one_job(c, body)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        list(ex.map(run, [jobs // clients] * clients))
    return (jobs // clients * clients) / (time.perf_counter() - t0)


def upload(stack: Stack, mbytes: int, binary: bool) -> float:
    """Seconds from the start of the POST to the 202 (three FP32 tensors, mbytes in total)."""
    d = 64
    n = max(1, mbytes * (1 << 20) // (3 * 4 * d))
    g = np.random.default_rng(1)
    arrays = {x: g.standard_normal((n, d), dtype=np.float32) for x in ("q", "k", "v")}
    with httpx.Client(base_url=stack.url, timeout=600) as c:
        if binary:
            content = encode_safetensors({k: from_array(a) for k, a in arrays.items()})
            headers = {"content-type": "application/octet-stream"}
        else:
            body = {
                k: {"shape": [n, d], "datatype": "FP32", "data": a.ravel().tolist()}
                for k, a in arrays.items()
            }
            content = json.dumps(body).encode()
            headers = {"content-type": "application/json"}
        t0 = time.perf_counter()
        r = c.post("/v1/attention", content=content, headers=headers)
        took = time.perf_counter() - t0
        r.raise_for_status()
        c.delete(f"/v1/jobs/{r.json()['id']}")  # no worker runs it; free the memory
    return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=200, help="sequential small jobs per config")
    ap.add_argument("--sizes", default="1,4,16,64", help="upload sizes in MB")
    ap.add_argument("--json-max", type=int, default=16, help="largest JSON upload in MB")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    stack = Stack()
    rows: list[str] = []
    results: dict[str, Any] = {"overhead": {}, "upload": {}}
    try:
        for n in (1, 2):
            stack.scale(n)
            o = overhead(stack, args.jobs)
            tput = throughput(stack, args.jobs)
            results["overhead"][n] = {**o, "jobs_per_s": tput}
            print(f"workers={n}: {o} jobs/s={tput:.1f}", flush=True)
        stack.scale(0)
        for mb in (int(s) for s in args.sizes.split(",")):
            b = upload(stack, mb, True)
            j = upload(stack, mb, False) if mb <= args.json_max else None
            results["upload"][mb] = {"binary": b, "json": j}
            print(f"upload {mb} MB: binary {b:.3f} s, json {j}", flush=True)
    finally:
        stack.close()

    rows.append(
        "| workers | overhead p50 (ms) | overhead p99 (ms) | round trip p50 (ms) "
        "| jobs/s (8 clients) |"
    )
    rows.append("|---:|---:|---:|---:|---:|")
    for n, o in results["overhead"].items():
        rows.append(
            f"| {n} | {o['p50']:.2f} | {o['p99']:.2f} | {o['total_p50']:.2f} "
            f"| {o['jobs_per_s']:.0f} |"
        )
    rows.append("")
    rows.append("| input size | safetensors upload (s) | JSON upload (s) | JSON / binary |")
    rows.append("|---:|---:|---:|---:|")
    for mb, u in results["upload"].items():
        j = f"{u['json']:.3f}" if u["json"] is not None else "(skipped)"
        ratio = f"{u['json'] / u['binary']:.0f}x" if u["json"] is not None else ""
        rows.append(f"| {mb} MB | {u['binary']:.3f} | {j} | {ratio} |")
    table = "\n".join(rows)
    header = (
        f"Service benchmark, loopback, {os.cpu_count()} CPUs, small job = exact attention "
        "16x8 (overhead = round trip minus the worker's compute seconds)\n\n"
    )
    print("\n" + header + table)
    (OUT / "service.md").write_text(header + table + "\n")
    (OUT / "service.json").write_text(json.dumps(results, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(10, 4))
        ws = list(results["overhead"])
        ax[0].bar([f"{w} worker(s)\np50" for w in ws], [results["overhead"][w]["p50"] for w in ws])
        ax[0].bar([f"{w} worker(s)\np99" for w in ws], [results["overhead"][w]["p99"] for w in ws])
        ax[0].axhline(10, color="red", ls="--", label="10 ms target (p50)")
        ax[0].set_ylabel("per-job overhead (ms)")
        ax[0].legend()
        sizes = list(results["upload"])
        ax[1].plot(
            sizes, [results["upload"][s]["binary"] for s in sizes], "o-", label="safetensors"
        )
        js = [s for s in sizes if results["upload"][s]["json"] is not None]
        ax[1].plot(js, [results["upload"][s]["json"] for s in js], "s-", label="JSON")
        ax[1].axhline(1.0, color="red", ls="--", label="1 s target (64 MB binary)")
        ax[1].set_xscale("log", base=2)
        ax[1].set_yscale("log")
        ax[1].set_xlabel("input MB")
        ax[1].set_ylabel("POST -> 202 (s)")
        ax[1].legend()
        fig.tight_layout()
        fig.savefig(OUT / "service.png", dpi=110)
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)


if __name__ == "__main__":
    main()
