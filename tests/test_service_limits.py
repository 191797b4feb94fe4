"""Limits and access, against a real redis-server: body limits at their exact edge, the JSON
limit and the shape prescan, bounded uploads, backpressure (queued jobs, queued bytes, Redis
memory) as 429 + Retry-After, hostile bodies as 4xx, Idempotency-Key, API keys, ownership,
protected /metrics and /docs, and the refusal to serve openly on a public address."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import tracemalloc
from typing import Any

import httpx
import numpy as np
import pytest

from app.jobs.codec import encode_safetensors, from_array
from app.jobs.queue import Queue
from app.jobs.records import stream_key
from tests.conftest import RedisProcess, free_port, wait_until

pytestmark = pytest.mark.redis

BINARY = "application/octet-stream"


def T(a: np.ndarray[Any, Any]) -> dict[str, Any]:  # noqa: N802
    return {"shape": list(a.shape), "datatype": "FP32", "data": a.ravel().tolist()}


def body(n: int = 16, d: int = 8, seed: int = 0) -> dict[str, Any]:
    g = np.random.default_rng(seed)
    return {x: T((0.5 * g.standard_normal((n, d))).astype(np.float32)) for x in "qkv"}


def st_body(n: int = 16, d: int = 8, seed: int = 0) -> bytes:
    g = np.random.default_rng(seed)
    t = {x: from_array((0.5 * g.standard_normal((n, d))).astype(np.float32)) for x in "qkv"}
    return encode_safetensors(t)


def sample(text: str, name: str, **labels: str) -> float:
    """One sample of a Prometheus text page (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return 0.0


def post_json(client: Any, payload: Any, **headers: str) -> Any:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return client.post(
        "/v1/attention", content=raw, headers={"content-type": "application/json", **headers}
    )


# ------------------------------------------------------------------------------- body limits
@pytest.mark.parametrize("transport", ["content-length", "chunked"])
def test_body_of_exactly_the_limit_passes_one_byte_more_is_413(api: Any, transport: str) -> None:
    raw = json.dumps(body(4, 2)).encode()
    for size, want in ((len(raw), 202), (len(raw) - 1, 413)):
        client = api(max_body_bytes=size, max_json_body_bytes=size)
        if transport == "content-length":
            r = post_json(client, raw)
        else:
            r = client.post(
                "/v1/attention",
                content=iter([raw[:10], raw[10:]]),
                headers={"content-type": "application/json"},
            )
        assert r.status_code == want, (size, r.text)
        if want == 413:
            assert "MAX_BODY_BYTES" in r.json()["error"]["message"]


def test_json_has_its_own_smaller_limit_binary_does_not(api: Any) -> None:
    raw = json.dumps(body(64, 8)).encode()
    client = api(max_json_body_bytes=len(raw) - 1, max_body_bytes=1 << 20)
    r = post_json(client, raw)
    assert r.status_code == 413
    assert "MAX_JSON_BODY_BYTES" in r.json()["error"]["message"]
    assert "safetensors" in r.json()["error"]["message"]
    big = st_body(512, 8)
    assert len(big) > len(raw) - 1
    r = client.post("/v1/attention", content=big, headers={"content-type": BINARY})
    assert r.status_code == 202, r.text


def test_declared_shape_over_the_limit_is_refused_before_the_lists_are_built() -> None:
    from app.api.requests import parse_json, specs
    from app.jobs.errors import InvalidInput

    data = ",".join(["0.5"] * 400_000)
    raw = (
        '{"q": {"shape": [400000, 1], "datatype": "FP32", "data": [' + data + "]},"
        ' "k": {"shape": [1, 1], "datatype": "FP32", "data": [0]},'
        ' "v": {"shape": [1, 1], "datatype": "FP32", "data": [0]}}'
    ).encode()
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInput, match=r"q\.shape.*MAX_ELEMENTS"):
            parse_json(specs()["attention"], raw, max_elements=1000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < len(raw) // 4, peak  # 400k Python floats would be ~10 MB


def test_uploads_in_progress_are_bounded(live_server: Any) -> None:
    url = live_server(max_concurrent_uploads=1, upload_wait_seconds=0.3)
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as slow:
        slow.sendall(
            b"POST /v1/attention HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n{"
        )  # holds the only upload slot while its body trickles in
        time.sleep(0.3)
        r = httpx.post(f"{url}/v1/attention", json=body())
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "queue_full" and "Retry-After" in r.headers
        assert "MAX_CONCURRENT_UPLOADS" in r.json()["error"]["message"]
    r = wait_until(
        lambda: (r := httpx.post(f"{url}/v1/attention", json=body())).status_code == 202 and r
    )


# ------------------------------------------------------------------------------- backpressure
def test_queued_jobs_budget_is_429_until_jobs_end(api: Any, start_worker: Any) -> None:
    client = api(max_queued_jobs=2)
    rejected = sample(client.get("/metrics").text, "attn_submits_rejected_total", reason="budget")
    ids = [post_json(client, body(seed=s)).json()["id"] for s in range(2)]
    r = post_json(client, body(seed=3))
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "queue_full"
    assert "MAX_QUEUED_JOBS" in r.json()["error"]["message"]
    assert client.delete(f"/v1/jobs/{ids[0]}").status_code == 200  # a cancel frees its share
    assert post_json(client, body(seed=4)).status_code == 202
    assert post_json(client, body(seed=5)).status_code == 429
    start_worker()
    q: Queue = client.queue
    wait_until(lambda: q.depth("attention") == (0, 0))
    assert post_json(client, body(seed=6)).status_code == 202
    text = client.get("/metrics").text
    assert sample(text, "attn_submits_rejected_total", reason="budget") == rejected + 2


def test_queued_bytes_budget(api: Any) -> None:
    one = 3 * 16 * 8 * 4
    client = api(max_queued_bytes=2 * one)
    assert post_json(client, body(seed=0)).status_code == 202
    assert post_json(client, body(seed=1)).status_code == 202
    r = post_json(client, body(seed=2))
    assert r.status_code == 429 and "MAX_QUEUED_BYTES" in r.json()["error"]["message"]
    r = client.post("/v1/attention", content=st_body(seed=3), headers={"content-type": BINARY})
    assert r.status_code == 429


def test_budget_holds_under_concurrent_submits(live_server: Any) -> None:
    """The check is atomic in the submit script: 40 racing submits, a budget of 7, 7 accepted."""
    url = live_server(max_queued_jobs=7, max_concurrent_uploads=64)
    codes: list[int] = []

    def one(seed: int) -> None:
        codes.append(httpx.post(f"{url}/v1/attention", json=body(4, 2, seed)).status_code)

    threads = [threading.Thread(target=one, args=(s,)) for s in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(set(codes)) == [202, 429] and codes.count(202) == 7


def test_redis_memory_reserve_keeps_room_for_results(
    own_redis: RedisProcess, live_server: Any, spawn_worker: Any
) -> None:
    """Submits stop (429) while REDIS_MEMORY_RESERVE of maxmemory is still free, so the worker
    can still write leases and results for every job that was accepted."""
    r = own_redis.client()
    used = int(r.info("memory")["used_memory"])
    r.config_set("maxmemory", used + 6_000_000)
    url = live_server(redis_url=own_redis.url, redis_memory_reserve=0.5)
    http = httpx.Client(base_url=url, timeout=30)
    accepted, refused = [], None
    for s in range(200):
        resp = http.post(
            "/v1/attention", content=st_body(256, 64, s), headers={"content-type": BINARY}
        )
        if resp.status_code == 429:
            refused = resp
            break
        assert resp.status_code == 202, resp.text
        accepted.append(resp.json()["id"])
        time.sleep(1.05 if s % 4 == 3 else 0)  # let the API's memory reading refresh
    assert refused is not None and accepted
    msg = refused.json()["error"]["message"]
    assert "REDIS_MEMORY_RESERVE" in msg and "OOM" not in msg and "command" not in msg
    spawn_worker(url=own_redis.url, worker_ops="attention")
    for job_id in accepted:
        done = http.get(f"/v1/jobs/{job_id}", params={"wait": 30}).json()
        assert done["status"] == "succeeded", done


def test_redis_messages_never_leak_internals() -> None:
    import redis

    from app.api.responses import redis_message

    for exc in (
        redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'"),
        redis.ConnectionError("Error 111 connecting to 10.1.2.3:6379. Connection refused."),
        redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
    ):
        msg = redis_message(exc)
        assert msg.startswith("the job queue") and "6379" not in msg and "key" not in msg


# ------------------------------------------------------------------------------- hostile bodies
HOSTILE: list[tuple[str, bytes, str, int]] = [
    ("deep-header", struct.pack("<Q", 100_000) + b"[" * 100_000, BINARY, 400),
    (
        "huge-shape-binary",
        (lambda h: struct.pack("<Q", len(h)) + h)(
            json.dumps(
                {"q": {"dtype": "F32", "shape": [10**3000, 10**3000], "data_offsets": [0, 0]}}
            ).encode()
        ),
        BINARY,
        422,
    ),
    (
        "huge-shape-json",
        b'{"q": {"shape": [' + b"9" * 3001 + b", " + b"9" * 3001 + b'], "datatype": "FP32", '
        b'"data": []}, "k": {"shape": [1, 1], "datatype": "FP32", "data": [0]},'
        b' "v": {"shape": [1, 1], "datatype": "FP32", "data": [0]}}',
        "application/json",
        422,
    ),
    ("deep-json", b"[" * 100_000, "application/json", 400),
    (
        "deep-json-object",
        b'{"q": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001,
        "application/json",
        400,
    ),
    (
        "dtype-not-a-string",
        (lambda h: struct.pack("<Q", len(h)) + h)(
            json.dumps({"q": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}).encode()
        )
        + bytes(4),
        BINARY,
        422,
    ),
    (
        "overlapping-offsets",
        (lambda h: struct.pack("<Q", len(h)) + h)(
            json.dumps(
                {
                    "q": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
                    "k": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]},
                    "v": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]},
                }
            ).encode()
        )
        + bytes(24),
        BINARY,
        400,
    ),
]


@pytest.mark.parametrize(("case", "raw", "ctype", "status"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_bodies_are_4xx(case: str, raw: bytes, ctype: str, status: int, api: Any) -> None:
    client = api()
    r = client.post("/v1/attention", content=raw, headers={"content-type": ctype})
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"code", "message"}
    assert len(r.text) < 2000
    assert client.queue.r.xlen(stream_key("attention")) == 0


# ------------------------------------------------------------------------------- idempotency
def test_idempotency_key_same_body_same_job_other_body_422(api: Any) -> None:
    client = api()
    first = post_json(client, body(seed=1), **{"idempotency-key": "abc-1"})
    again = post_json(client, body(seed=1), **{"idempotency-key": "abc-1"})
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    other = post_json(client, body(seed=2), **{"idempotency-key": "abc-1"})
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"
    binary = client.post(
        "/v1/attention",
        content=st_body(seed=1),
        headers={"content-type": BINARY, "idempotency-key": "abc-1"},
    )
    assert binary.status_code == 422  # another body (and encoding) under the same key
    assert (
        post_json(client, body(seed=1), **{"idempotency-key": "abc-2"}).json()["id"]
        != (first.json()["id"])
    )
    assert client.queue.r.xlen(stream_key("attention")) == 2
    bad = post_json(client, body(), **{"idempotency-key": "x" * 300})
    assert bad.status_code == 422 and "Idempotency-Key" in bad.json()["error"]["message"]


def test_idempotency_key_is_atomic_under_racing_retries(live_server: Any) -> None:
    url = live_server(max_concurrent_uploads=64)
    ids: list[str] = []

    def one() -> None:
        r = httpx.post(f"{url}/v1/attention", json=body(), headers={"idempotency-key": "race"})
        assert r.status_code == 202
        ids.append(r.json()["id"])

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 20 and len(set(ids)) == 1


def test_client_retries_a_lost_answer_without_a_duplicate(
    live_server: Any, start_worker: Any, make_queue: Any
) -> None:
    """The client's submit carries an Idempotency-Key: when the first answer is lost (here: a
    transport that drops it after the server acted) the retry returns the same job."""
    from app.client import Client

    start_worker()
    url = live_server()
    drops = {"n": 0}
    real = httpx.HTTPTransport()

    class Lossy(httpx.BaseTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            resp = real.handle_request(request)
            if request.method == "POST" and drops["n"] < 1:
                drops["n"] += 1
                resp.read()
                raise httpx.ReadError("connection reset after the server answered")
            return resp

    g = np.random.default_rng(0)
    q = (0.5 * g.standard_normal((16, 8))).astype(np.float32)
    with Client(url, transport=Lossy()) as c:
        res = c.attention(q, q, q).wait(timeout=60)
    assert drops["n"] == 1 and res.output.shape == (16, 8)
    stats = make_queue().stats()
    assert stats["attention:queued"] == 1 and stats["attention:succeeded"] == 1


def test_client_waits_out_429(api: Any, live_server: Any, start_worker: Any) -> None:
    from app.client import Client

    url = live_server(max_queued_jobs=1)
    g = np.random.default_rng(0)
    q = (0.5 * g.standard_normal((16, 8))).astype(np.float32)
    with Client(url) as c:
        first = c.attention(q, q, q)
        threading.Timer(1.0, start_worker).start()  # frees the budget a second later
        second = c.attention(q, q, q)  # 429 until the first job ends, then accepted
        assert second.id != first.id
        assert second.wait(timeout=60).output.shape == (16, 8)


# ------------------------------------------------------------------------------- access
def test_401_carries_www_authenticate(api: Any) -> None:
    client = api(api_key="s3cret")
    r = post_json(client, body())
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    r = post_json(client, body(), authorization="Bearer wrong")
    assert r.status_code == 401


def test_every_v1_route_needs_the_key(api: Any) -> None:
    """The key is checked for every ``/v1`` path before routing (app.api.guard), not route by
    route: each documented route refuses a request without it (an unknown /v1 path too)."""
    client = api(api_key="s3cret")
    spec = client.get("/openapi.json").json()
    job = "0" * 32
    calls = [
        (method.upper(), path.replace("{job_id}", job))
        for path, item in spec["paths"].items()
        if path.startswith("/v1/")
        for method in item
    ]
    assert len(calls) >= 8, calls  # 3 submits, job, cancel, result, plan (GET and POST)
    for method, path in [*calls, ("GET", "/v1/no-such-route")]:
        r = client.request(method, path)
        assert r.status_code == 401, (method, path, r.status_code)
        assert r.headers["www-authenticate"].startswith("Bearer")
    r = client.get(f"/v1/jobs/{job}", headers={"authorization": "Bearer s3cret"})
    assert r.status_code == 404  # through to the route


def test_each_key_sees_only_its_own_jobs(api: Any) -> None:
    client = api(api_key="key-a, key-b")
    a = {"authorization": "Bearer key-a"}
    b = {"authorization": "Bearer key-b"}
    job = post_json(client, body(), **a).json()
    assert client.get(f"/v1/jobs/{job['id']}", headers=a).status_code == 200
    for method, path in (
        ("GET", f"/v1/jobs/{job['id']}"),
        ("GET", f"/v1/jobs/{job['id']}/result"),
        ("DELETE", f"/v1/jobs/{job['id']}"),
    ):
        r = client.request(method, path, headers=b)
        assert r.status_code == 404, (method, path, r.text)
    assert client.get(f"/v1/jobs/{job['id']}", headers=a).json()["status"] == "queued"
    # the same Idempotency-Key under two keys: two jobs
    ja = post_json(client, body(), **a, **{"idempotency-key": "k"}).json()["id"]
    jb = post_json(client, body(), **b, **{"idempotency-key": "k"}).json()["id"]
    assert ja != jb


def test_metrics_and_docs_can_be_protected(api: Any) -> None:
    open_client = api(api_key="s3cret")
    assert open_client.get("/metrics").status_code == 200
    assert open_client.get("/docs").status_code == 200
    client = api(api_key="s3cret", protect_metrics=True, protect_docs=True)
    for path in ("/metrics", "/docs", "/openapi.json"):
        r = client.get(path)
        assert r.status_code == 401 and "www-authenticate" in r.headers, path
        assert client.get(path, headers={"authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/health/live").status_code == 200
    assert client.get("/health/ready").status_code in (200, 503)


def test_no_key_refuses_requests_on_a_public_address(make_settings: Any) -> None:
    """With no API_KEY, a request that arrives on a non-loopback address is refused (403) unless
    ALLOW_OPEN is set; health checks stay open."""
    import asyncio

    from app.api import create_app

    async def call(app: Any, path: str, method: str = "GET") -> int:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://10.1.2.3:8000") as c:
            return (await c.request(method, path)).status_code

    closed = create_app(make_settings())
    assert asyncio.run(call(closed, "/v1/jobs/" + "0" * 32)) == 403
    assert asyncio.run(call(closed, "/metrics")) == 403
    assert asyncio.run(call(closed, "/health/live")) == 200
    opened = create_app(make_settings(allow_open=True))
    assert asyncio.run(call(opened, "/metrics")) == 200


def test_python_m_app_refuses_to_serve_openly_on_a_public_address(redis_url: str) -> None:
    env = {**os.environ, "REDIS_URL": redis_url, "HOST": "0.0.0.0", "API_KEY": ""}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "app"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "API_KEY" in proc.stderr
    port = free_port()
    env.update(ALLOW_OPEN="1", PORT=str(port))
    server = subprocess.Popen([sys.executable, "-m", "app"], env=env)
    try:
        wait_until(
            lambda: _get(f"http://127.0.0.1:{port}/health/live") == 200, timeout=60, interval=0.2
        )
    finally:
        server.terminate()
        server.wait(timeout=30)


def _get(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return 0


# ------------------------------------------------------------------------------ clear messages
def test_messages_say_what_is_wrong_and_what_to_do(api: Any) -> None:
    client = api()
    fp16 = body(4, 2)
    fp16["q"] = {"shape": [4, 2], "datatype": "FP16", "data": [70000.0] + [0.0] * 7}
    r = post_json(client, fp16)
    msg = r.json()["error"]["message"]
    assert r.status_code == 422 and "q.data" in msg and "70000" in msg and "FP16 range" in msg
    assert "NaN" not in msg
    nested = body(4, 2)
    nested["k"]["data"] = [[0.0, 0.0]] * 4
    r = post_json(client, nested)
    assert r.status_code == 422 and "flat list" in r.json()["error"]["message"]
    r = client.get(
        "/v1/plan",
        params={"op": "attention", "n": 4096, "d": 8, "radius": 1.0, "dtype": "FP32"},
    )
    assert r.status_code == 200 and r.json()["inputs"]["dtype"] == "float32"
