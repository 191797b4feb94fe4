"""Service benchmark on loopback: per-job overhead and where it goes, throughput with 1, 2 and 4
workers for 8 and 32 clients, the worker's own per-job path, and uploads of 1-64 MB.

Starts its own redis-server, the API (uvicorn) and workers (``python -m workers``) as
subprocesses, all on this machine; the clients are threads of this process. The small job is
exact attention on 16x8 inputs sent as JSON. Overhead is the round trip minus the compute seconds
the worker reports. Prints markdown tables and writes them with a plot to ``benchmarks/out/``:

    python3 benchmarks/service.py            # about 3-5 minutes on 2 cores
    python3 benchmarks/service.py --quick    # fewer jobs, 1 and 2 workers
    python3 benchmarks/service.py --parts throughput --workers 1,2 --clients 32 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(os.path.abspath(__file__)).parent.parent
sys.path.insert(0, str(ROOT))

from app.jobs.codec import encode_safetensors, from_array  # noqa: E402
from benchmarks.stack import HOST, STAGES, Stack  # noqa: E402

OUT = ROOT / "benchmarks" / "out"


def small_body(seed: int = 0) -> bytes:
    g = np.random.default_rng(seed)

    def t() -> dict[str, Any]:
        data = (0.3 * g.standard_normal(128)).astype(np.float32).tolist()
        return {"shape": [16, 8], "datatype": "FP32", "data": data}

    return json.dumps({"q": t(), "k": t(), "v": t(), "method": "exact"}).encode()


class Conn:
    """A minimal HTTP/1.1 keep-alive connection on asyncio streams: the load generator shares the
    two cores with the service, so it must cost far less per request than httpx does."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Conn:
        return cls(*await asyncio.open_connection(HOST, port))

    async def request(
        self, method: str, path: str, body: bytes = b"", headers: str = ""
    ) -> tuple[int, dict[str, Any]]:
        head = f"{method} {path} HTTP/1.1\r\nHost: bench\r\n{headers}"
        if body:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        status_line = await self.reader.readuntil(b"\r\n")
        length = 0
        while (line := await self.reader.readuntil(b"\r\n")) != b"\r\n":
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        payload = await self.reader.readexactly(length)
        return int(status_line.split()[1]), json.loads(payload)

    def close(self) -> None:
        self.writer.close()


async def one_job(conn: Conn, body: bytes, *, three_calls: bool) -> dict[str, float]:
    """One small job; returns its round trip, compute and stage times (seconds)."""
    t0_wall, t0 = time.time(), time.perf_counter()
    if three_calls:
        status, rec = await conn.request("POST", "/v1/attention", body)
        assert status == 202, rec
        job_id = rec["id"]
        status, rec = await conn.request("GET", f"/v1/jobs/{job_id}?wait=30")
        status, res = await conn.request("GET", f"/v1/jobs/{job_id}/result")
        assert status == 200, res
    else:
        status, rec = await conn.request("POST", "/v1/attention", body, "Prefer: wait=30\r\n")
        assert status == 200, rec
    t1, t1_wall = time.perf_counter(), time.time()
    assert rec["status"] == "succeeded", rec

    def ts(name: str) -> float:
        from datetime import datetime

        return datetime.fromisoformat(rec[name]).timestamp()

    compute = float(rec["summary"]["seconds"])
    return {
        "round_trip": t1 - t0,
        "compute": compute,
        "overhead": t1 - t0 - compute,
        "http_in": ts("created_at") - t0_wall,
        "queue": ts("started_at") - ts("created_at"),
        "worker": ts("finished_at") - ts("started_at"),
        "notify_out": t1_wall - ts("finished_at"),
    }


def load(stack: Stack, clients: int, jobs: int, *, three_calls: bool) -> dict[str, Any]:
    """``jobs`` small jobs from ``clients`` concurrent connections (each one job at a time)."""
    per = [jobs // clients + (1 if i < jobs % clients else 0) for i in range(clients)]

    async def client(n: int, seed: int) -> list[dict[str, float]]:
        body = small_body(seed)
        conn = await Conn.open(stack.api_port)
        try:
            await one_job(conn, body, three_calls=three_calls)  # warm the connection
            start.set()
            return [await one_job(conn, body, three_calls=three_calls) for _ in range(n)]
        finally:
            conn.close()

    async def run() -> tuple[list[list[dict[str, float]]], float]:
        t0 = time.perf_counter()
        out = await asyncio.gather(*(client(n, i) for i, n in enumerate(per)))
        return out, time.perf_counter() - t0

    start = asyncio.Event()
    out, elapsed = asyncio.run(run())
    samples = [x for part in out for x in part]
    return {"samples": samples, "jobs_per_s": (jobs + clients) / elapsed}


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q))


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
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            r = c.post("/v1/attention", content=content, headers=headers)
            best = min(best, time.perf_counter() - t0)
            r.raise_for_status()
            c.delete(f"/v1/jobs/{r.json()['id']}")  # no worker runs it; free the memory
    return best


ROLES = ("api", "redis", "workers", "load")


def throughput(stack: Stack, workers: int, clients: int, jobs: int) -> dict[str, Any]:
    """One throughput run, with the CPU seconds each process took per job (ms): the API, Redis,
    the workers together and the load generator (this process), from /proc."""
    cpu0, t0 = stack.cpu_seconds(), time.perf_counter()
    run = load(stack, clients, jobs, three_calls=False)
    cpu1, wall = stack.cpu_seconds(), time.perf_counter() - t0
    done = jobs + clients
    cpu = {r: (cpu1[r] - cpu0[r]) / done * 1e3 for r in ROLES}
    return {
        "workers": workers,
        "clients": clients,
        "jobs_per_s": run["jobs_per_s"],
        "overhead_p50": pct([x["overhead"] for x in run["samples"]], 50) * 1e3,
        "overhead_p99": pct([x["overhead"] for x in run["samples"]], 99) * 1e3,
        "cpu_ms": cpu,
        "cpu_busy": sum(cpu1[r] - cpu0[r] for r in ROLES) / wall,  # cores in use
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--jobs", type=int, default=1200, help="small jobs per configuration")
    ap.add_argument("--sizes", default="1,4,16,64", help="upload sizes in MB")
    ap.add_argument("--json-max", type=int, default=16, help="largest JSON upload in MB")
    ap.add_argument(
        "--parts", default="overhead,throughput,upload", help="which parts to run (comma list)"
    )
    ap.add_argument("--workers", default=None, help="worker counts of the throughput part")
    ap.add_argument("--clients", default="8,32", help="client counts of the throughput part")
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="throughput rounds; each round runs every worker count (interleaved: same load)",
    )
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    jobs = 300 if args.quick else args.jobs
    if args.workers is not None:
        worker_counts = tuple(int(x) for x in args.workers.split(","))
    else:
        worker_counts = (1, 2) if args.quick else (1, 2, 4)
    client_counts = tuple(int(x) for x in args.clients.split(","))
    OUT.mkdir(parents=True, exist_ok=True)
    # the JSON limit (16 MiB by default) raised to compare JSON and safetensors uploads
    stack = Stack(env={"MAX_JSON_BODY_BYTES": str(1 << 30)})
    results: dict[str, Any] = {"overhead": {}, "throughput": {}, "stages": {}, "upload": {}}
    try:
        stack.scale(1)
        load(stack, 8, 200, three_calls=False)  # warm-up
        for path, three in (
            ("Prefer: wait (1 call)", False),
            ("POST + GET wait + GET result", True),
        ):
            if "overhead" not in parts:
                break
            before = stack.worker_stages()
            run = load(stack, 1, jobs, three_calls=three)
            after = stack.worker_stages()
            s = run["samples"]
            results["overhead"][path] = {
                "p50": pct([x["overhead"] for x in s], 50) * 1e3,
                "p99": pct([x["overhead"] for x in s], 99) * 1e3,
                "round_trip_p50": pct([x["round_trip"] for x in s], 50) * 1e3,
                "jobs_per_s": run["jobs_per_s"],
                "split_ms": {
                    k: statistics.median(x[k] for x in s) * 1e3
                    for k in ("http_in", "queue", "worker", "notify_out", "compute")
                },
            }
            if not three:
                results["stages"] = {
                    st: (after[st][0] - before[st][0]) / max(after[st][1] - before[st][1], 1) * 1e3
                    for st in STAGES
                }
            print(path, json.dumps(results["overhead"][path], indent=1), flush=True)
        runs: dict[str, list[dict[str, Any]]] = {}
        for _ in range(args.rounds if "throughput" in parts else 0):
            for n in worker_counts:
                stack.scale(n)
                load(stack, 32, 300, three_calls=False)  # warm-up: first jobs, connections
                for clients in client_counts:
                    t = throughput(stack, n, clients, jobs)
                    runs.setdefault(f"{n}x{clients}", []).append(t)
                    cpu = " ".join(f"{r} {t['cpu_ms'][r]:.2f}" for r in ROLES)
                    print(
                        f"{n} workers, {clients} clients: {t['jobs_per_s']:.0f} jobs/s; "
                        f"CPU ms/job: {cpu}; cores busy {t['cpu_busy']:.2f}",
                        flush=True,
                    )
        for key, rs in runs.items():
            rates = [r["jobs_per_s"] for r in rs]
            best = rs[int(np.argsort(rates)[len(rates) // 2])]  # the median round
            results["throughput"][key] = {**best, "all_jobs_per_s": rates}
        stack.scale(0)
        for mb in (int(x) for x in args.sizes.split(",")) if "upload" in parts else ():
            b = upload(stack, mb, True)
            j = upload(stack, mb, False) if mb <= args.json_max else None
            results["upload"][mb] = {"binary": b, "json": j}
            print(f"upload {mb} MB: binary {b:.3f} s, json {j}", flush=True)
    finally:
        stack.close()

    table = render(results)
    print("\n" + table)
    name = "service" if all(results[p] for p in ("overhead", "throughput", "upload")) else None
    name = name or "service-" + "-".join(sorted(parts))  # a partial run keeps the full tables
    (OUT / f"{name}.md").write_text(table + "\n")
    (OUT / f"{name}.json").write_text(json.dumps(results, indent=2))
    if name == "service":
        plot(results)


def render(res: dict[str, Any]) -> str:
    rows: list[str] = []
    if res["overhead"]:
        rows += [
            f"Loopback, {os.cpu_count()} CPUs, small job = exact attention 16x8 (JSON), one "
            "client (jobs one after another), 1 worker. Overhead = round trip minus the compute "
            "seconds the worker reports.",
            "",
            "| path | overhead p50 (ms) | overhead p99 (ms) | round trip p50 (ms) | jobs/s |",
            "|---|---:|---:|---:|---:|",
        ]
        for path, o in res["overhead"].items():
            rows.append(
                f"| {path} | {o['p50']:.2f} | {o['p99']:.2f} | {o['round_trip_p50']:.2f} "
                f"| {o['jobs_per_s']:.0f} |"
            )
        one = next(iter(res["overhead"].values()))["split_ms"]
        rows += [
            "",
            "Where a `Prefer: wait` round trip goes (medians, ms): HTTP in (client to the job "
            "record: request, parse, validation) / queue (submit script to attempt started) / "
            "worker (attempt started to result written) / notify and out (write, completion "
            "event, response) / of which compute:",
            "",
            "| HTTP in | queue | worker | notify + out | compute |",
            "|---:|---:|---:|---:|---:|",
            f"| {one['http_in']:.2f} | {one['queue']:.2f} | {one['worker']:.2f} "
            f"| {one['notify_out']:.2f} | {one['compute']:.2f} |",
            "",
            "The worker's own path per job (means from its `attn_worker_stage_seconds`, ms):",
            "",
            "| " + " | ".join(STAGES) + " | non-compute |",
            "|" + "---:|" * (len(STAGES) + 1),
            "| "
            + " | ".join(f"{res['stages'].get(s, 0.0):.3f}" for s in STAGES)
            + f" | {sum(v for k, v in res['stages'].items() if k != 'compute'):.3f} |",
            "",
        ]
    if res["throughput"]:
        rows += [
            "Throughput (the median of the rounds; every round's jobs/s in brackets) and the CPU "
            "each process took per job (ms, user + system from /proc; load = the load generator):",
            "",
            "| workers | clients | jobs/s | rounds | overhead p50 (ms) | overhead p99 (ms) "
            "| CPU api | CPU redis | CPU workers | CPU load | cores busy |",
            "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for t in res["throughput"].values():
            c = t["cpu_ms"]
            rounds = " ".join(f"{r:.0f}" for r in t["all_jobs_per_s"])
            rows.append(
                f"| {t['workers']} | {t['clients']} | {t['jobs_per_s']:.0f} | {rounds} | "
                f"{t['overhead_p50']:.2f} | {t['overhead_p99']:.2f} | {c['api']:.2f} "
                f"| {c['redis']:.2f} | {c['workers']:.2f} | {c['load']:.2f} "
                f"| {t['cpu_busy']:.2f} |"
            )
        rows.append("")
    if res["upload"]:
        rows += [
            "| input size | safetensors upload (s) | JSON upload (s) | JSON / binary |",
            "|---:|---:|---:|---:|",
        ]
        for mb, u in res["upload"].items():
            j = f"{u['json']:.3f}" if u["json"] is not None else "(skipped)"
            ratio = f"{u['json'] / u['binary']:.0f}x" if u["json"] is not None else ""
            rows.append(f"| {mb} MB | {u['binary']:.3f} | {j} | {ratio} |")
    return "\n".join(rows).rstrip()


def plot(res: dict[str, Any]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    paths = list(res["overhead"])
    ax[0].bar(
        [p.split(" (")[0] for p in paths], [res["overhead"][p]["p50"] for p in paths], label="p50"
    )
    ax[0].bar(
        [p.split(" (")[0] for p in paths],
        [res["overhead"][p]["p99"] for p in paths],
        alpha=0.4,
        label="p99",
    )
    ax[0].axhline(3, color="red", ls="--", label="3 ms target (p50, Prefer: wait)")
    ax[0].set_ylabel("per-job overhead (ms)")
    ax[0].tick_params(axis="x", labelsize=7)
    ax[0].legend(fontsize=7)
    for clients in (8, 32):
        pts = [
            (t["workers"], t["jobs_per_s"])
            for t in res["throughput"].values()
            if t["clients"] == clients
        ]
        ax[1].plot(*zip(*pts, strict=True), "o-", label=f"{clients} clients")
    ax[1].axhline(300, color="red", ls="--", label="300 jobs/s target")
    ax[1].set_xlabel("workers")
    ax[1].set_ylabel("jobs/s")
    ax[1].legend(fontsize=7)
    sizes = list(res["upload"])
    ax[2].plot(sizes, [res["upload"][s]["binary"] for s in sizes], "o-", label="safetensors")
    js = [s for s in sizes if res["upload"][s]["json"] is not None]
    ax[2].plot(js, [res["upload"][s]["json"] for s in js], "s-", label="JSON")
    ax[2].axhline(0.35, color="red", ls="--", label="0.35 s target (64 MB binary)")
    ax[2].set_xscale("log", base=2)
    ax[2].set_yscale("log")
    ax[2].set_xlabel("input MB")
    ax[2].set_ylabel("POST -> 202 (s)")
    ax[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / "service.png", dpi=110)


if __name__ == "__main__":
    main()
