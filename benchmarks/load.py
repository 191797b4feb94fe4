"""Load and chaos benchmark: 1,000 jobs from 50 concurrent clients against the API, 2 workers and
Redis (AOF everysec) on loopback; mixed sizes and operations, some bad, some cancelled; one worker
is killed with SIGKILL and Redis is crashed (SIGKILL) and restarted during the run.

Prints and saves (``benchmarks/out/load.md``, ``load.json``, ``load.png``) throughput, latency
p50/p99 and the counts that matter: accepted / succeeded / failed / cancelled / lost / duplicated
/ 5xx. Target: 0 lost, 0 duplicated, 0 HTTP 500, every accepted job in a terminal state.

    python3 benchmarks/load.py            # the full run (about 2-4 minutes on 2 cores)
    python3 benchmarks/load.py --quick    # 200 jobs from 20 clients
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(os.path.abspath(__file__)).parent.parent
sys.path.insert(0, str(ROOT))

from app.client import ApiError, Client, ClientError, JobCancelled, JobFailed  # noqa: E402
from benchmarks.common import markdown_table, plot_path, save_text  # noqa: E402
from benchmarks.stack import Stack  # noqa: E402

LEASE = 2.0


class Counting(httpx.HTTPTransport):
    """Counts every HTTP status the clients see (before the client's own retries)."""

    def __init__(self, statuses: Counter[int], lock: threading.Lock) -> None:
        super().__init__()
        self.statuses, self.lock = statuses, lock

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        resp = super().handle_request(request)
        with self.lock:
            self.statuses[resp.status_code] += 1
        return resp


KINDS = ("attention", "attention-binary", "tensor-attention", "lora", "bad", "cancel")
WEIGHTS = (40, 15, 15, 10, 10, 10)


def job_inputs(kind: str, rng: np.random.Generator) -> tuple[str, dict[str, Any], dict[str, Any]]:
    f = lambda *s: (0.3 * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    if kind in ("attention", "cancel"):
        n = int(rng.choice([16, 64, 256]))
        return "attention", {"q": f(n, 16), "k": f(n, 16), "v": f(n, 16)}, {}
    if kind == "attention-binary":
        return "attention", {"q": f(1024, 32), "k": f(1024, 32), "v": f(1024, 32)}, {}
    if kind == "tensor-attention":
        return "tensor-attention", {x: f(32, 4) for x in ("q", "k1", "k2", "v1", "v2")}, {}
    if kind == "lora":
        t = {"x": f(24, 8), "y": f(24, 8), "w_q": f(8, 8), "w_k": f(8, 8), "w_v": f(8, 8)}
        for m in "qv":
            t[f"adapters.{m}.a"], t[f"adapters.{m}.b"] = f(2, 8), f(8, 2)
        return "lora-gradient", t, {"alpha": 4.0}
    return "attention", {"q": f(8, 4), "k": f(8, 3), "v": f(8, 4)}, {}  # bad: head dims differ


def run(jobs: int, clients: int, out: Path) -> dict[str, Any]:
    stack = Stack(aof=True, env={"LEASE_SECONDS": str(LEASE)})
    stack.scale(2)
    statuses: Counter[int] = Counter()
    lock = threading.Lock()
    records: list[dict[str, Any]] = []
    events: list[tuple[str, float]] = []
    started = time.monotonic()
    done_count = [0]

    def client_loop(index: int, count: int) -> None:
        rng = np.random.default_rng(index)
        pick = random.Random(index)
        with Client(
            stack.url, transport=Counting(statuses, lock), retries=20, timeout=30
        ) as client:
            for _ in range(count):
                kind = pick.choices(KINDS, WEIGHTS)[0]
                op, tensors, params = job_inputs(kind, rng)
                rec: dict[str, Any] = {"kind": kind, "t0": time.monotonic() - started}
                try:
                    job = client.submit(op, tensors, params, binary=kind == "attention-binary")
                except ApiError as exc:
                    rec["end"] = f"refused:{exc.status}"
                except ClientError as exc:
                    rec["end"] = f"unsubmitted:{exc}"
                else:
                    rec["id"] = job.id
                    try:
                        if kind == "cancel":
                            try:
                                job.cancel()
                            except ApiError as exc:  # it ended first: 409 job_finished
                                if exc.status != 409:
                                    raise
                        job.wait(timeout=600)
                        rec["end"] = "succeeded"
                    except JobFailed as exc:
                        rec["end"] = f"failed:{exc.code}"
                    except JobCancelled:
                        rec["end"] = "cancelled"
                    except ClientError as exc:  # accepted, then unknown or never ended
                        rec["end"] = f"lost:{exc}"
                rec["t1"] = time.monotonic() - started
                with lock:
                    records.append(rec)
                    done_count[0] += 1

    def chaos() -> None:
        for frac, action in ((0.3, "kill -9 worker"), (0.6, "Redis crash + restart")):
            while done_count[0] < frac * jobs:
                time.sleep(0.05)
            at = time.monotonic() - started
            if action.startswith("kill"):
                stack.kill_worker()
                events.append((action, at))
            else:
                away = stack.crash_redis()
                events.append((f"{action} ({away:.2f} s away)", at))

    per = [jobs // clients + (1 if i < jobs % clients else 0) for i in range(clients)]
    threads = [threading.Thread(target=client_loop, args=(i, n)) for i, n in enumerate(per)]
    chaos_thread = threading.Thread(target=chaos, daemon=True)
    try:
        chaos_thread.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - started
        stats = stack.stats()
    finally:
        stack.close()

    accepted = [r for r in records if "id" in r]
    ends = Counter(r["end"].split(":")[0] for r in records)
    ids = [r["id"] for r in accepted]
    terminal_in_redis = sum(
        stats.get(f"{op}:{s}", 0)
        for op in ("attention", "tensor-attention", "lora-gradient")
        for s in ("succeeded", "failed", "cancelled")
    )
    queued_in_redis = sum(v for k, v in stats.items() if k.endswith(":queued"))
    lost = [r for r in accepted if r["end"].startswith("lost")]
    latencies = sorted(r["t1"] - r["t0"] for r in accepted if r["end"] == "succeeded")
    result = {
        "jobs": jobs,
        "clients": clients,
        "wall_s": wall,
        "throughput_jobs_per_s": len(accepted) / wall,
        "latency_p50_s": statistics.median(latencies) if latencies else None,
        "latency_p99_s": latencies[int(0.99 * (len(latencies) - 1))] if latencies else None,
        "accepted": len(accepted),
        "refused_4xx": ends.get("refused", 0),
        "unsubmitted": ends.get("unsubmitted", 0),
        "succeeded": ends.get("succeeded", 0),
        "failed": ends.get("failed", 0),
        "cancelled": ends.get("cancelled", 0),
        "lost": len(lost),
        "duplicated": (len(ids) - len(set(ids)))
        + max(queued_in_redis - len(set(ids)), 0)
        + max(terminal_in_redis - len(set(ids)), 0),
        "http_500": sum(v for k, v in statuses.items() if k >= 500 and k != 503),
        "http_503_retried": statuses.get(503, 0),
        "http_429_retried": statuses.get(429, 0),
        "terminal_in_redis": terminal_in_redis,
        "events": events,
    }
    rows = [
        ["jobs submitted (clients)", f"{jobs} ({clients})"],
        ["accepted (202)", result["accepted"]],
        ["refused as bad input (4xx)", result["refused_4xx"]],
        [
            "succeeded / failed / cancelled",
            f"{result['succeeded']} / {result['failed']} / {result['cancelled']}",
        ],
        ["lost", result["lost"]],
        ["duplicated", result["duplicated"]],
        ["HTTP 500", result["http_500"]],
        [
            "HTTP 503 / 429 answered, retried by the client",
            f"{result['http_503_retried']} / {result['http_429_retried']}",
        ],
        ["throughput (accepted jobs/s)", f"{result['throughput_jobs_per_s']:.1f}"],
        [
            "latency submit -> result p50 / p99 (s)",
            f"{result['latency_p50_s']:.3f} / {result['latency_p99_s']:.3f}" if latencies else "-",
        ],
        ["wall time (s)", f"{wall:.1f}"],
        *[[f"fault at {at:.1f} s", name] for name, at in events],
    ]
    table = markdown_table(["load run", "value"], rows)
    print(table)
    save_text(out, "load.md", table)
    (out / "load.json").write_text(json.dumps(result, indent=1))
    _plot(records, events, plot_path(out, "load.png"))
    return result


def _plot(records: list[dict[str, Any]], events: list[tuple[str, float]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ends = sorted(r["t1"] for r in records if r.get("end") == "succeeded")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(ends, range(1, len(ends) + 1), label="jobs succeeded (cumulative)")
    for name, at in events:
        ax.axvline(at, color="red", linestyle="--", linewidth=1)
        ax.text(at, 0, " " + name, rotation=90, va="bottom", fontsize=7, color="red")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("jobs")
    ax.set_title("load with a worker kill -9 and a Redis crash")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument("--clients", type=int, default=50)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    args = p.parse_args()
    jobs, clients = (200, 20) if args.quick else (args.jobs, args.clients)
    res = run(jobs, clients, Path(args.out))
    ok = res["lost"] == 0 and res["duplicated"] == 0 and res["http_500"] == 0
    ok = ok and res["terminal_in_redis"] == res["accepted"]
    print("target met" if ok else "TARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
