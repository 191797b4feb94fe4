"""The service against a real redis-server: submit -> poll -> result for every operation (JSON and
safetensors), results equal ``compute`` called directly, every bad-input case, cancel, TTL, the
fencing token, retries, health, metrics, auth."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

import compute
from app.jobs.codec import RawTensor, encode_safetensors, from_array
from app.jobs.queue import Queue
from app.jobs.records import stream_key
from tests.conftest import wait_until

pytestmark = pytest.mark.redis

BINARY = "application/octet-stream"


def T(a: np.ndarray[Any, Any], datatype: str = "FP32") -> dict[str, Any]:  # noqa: N802
    return {"shape": list(a.shape), "datatype": datatype, "data": a.ravel().tolist()}


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def attention_inputs(n: int = 16, d: int = 8, seed: int = 0) -> dict[str, np.ndarray[Any, Any]]:
    g = rng(seed)
    return {x: (0.5 * g.standard_normal((n, d))).astype(np.float32) for x in ("q", "k", "v")}


def tensor_inputs(n: int = 8, d: int = 4, seed: int = 1) -> dict[str, np.ndarray[Any, Any]]:
    g = rng(seed)
    names = ("q", "k1", "k2", "v1", "v2")
    return {x: (0.5 * g.standard_normal((n, d))).astype(np.float32) for x in names}


def lora_inputs(
    n: int = 12, d: int = 6, r: int = 2, seed: int = 2
) -> dict[str, np.ndarray[Any, Any]]:
    g = rng(seed)
    f = lambda *s: (0.3 * g.standard_normal(s)).astype(np.float32)  # noqa: E731
    return {
        "x": f(n, d),
        "y": f(n, d),
        "w_q": f(d, d),
        "w_k": f(d, d),
        "w_v": f(d, d),
        "adapters.q.a": f(r, d),
        "adapters.q.b": f(d, r),
        "adapters.v.a": f(r, d),
        "adapters.v.b": f(d, r),
    }


CASES: dict[str, tuple[Callable[[], dict[str, Any]], dict[str, Any]]] = {
    "attention": (attention_inputs, {"eps": 1e-3, "causal": True}),
    "tensor-attention": (tensor_inputs, {"eps": 1e-3}),
    "lora-gradient": (lora_inputs, {"alpha": 4.0, "eps": 1e-3}),
}


def json_body(tensors: dict[str, np.ndarray[Any, Any]], params: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = dict(params)
    for name, a in tensors.items():
        node = body
        *path, leaf = name.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = T(a)
    return body


def st_body(tensors: dict[str, Any], params: dict[str, Any]) -> bytes:
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in params.items()}
    return encode_safetensors({n: from_array(a) for n, a in tensors.items()}, meta)


def direct(
    op: str, tensors: dict[str, np.ndarray[Any, Any]], params: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """The same computation through ``compute`` directly."""
    t = {n: torch.from_numpy(a) for n, a in tensors.items()}
    if op == "attention":
        return {"output": compute.attention(t["q"], t["k"], t["v"], **params).output}
    if op == "tensor-attention":
        return {
            "output": compute.tensor_attention(
                *(t[n] for n in ("q", "k1", "k2", "v1", "v2")), **params
            ).output
        }
    adapters = {m: (t[f"adapters.{m}.a"], t[f"adapters.{m}.b"]) for m in "qv"}
    res = compute.lora_gradient(
        t["x"], t["y"], w_q=t["w_q"], w_k=t["w_k"], w_v=t["w_v"], adapters=adapters, **params
    )
    out = {"loss": torch.tensor(float(res.loss), dtype=torch.float64)}
    for m, (da, db) in res.grads.items():
        out[f"adapters.{m}.a"], out[f"adapters.{m}.b"] = da, db
    return out


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-6)


def wait_done(client: Any, job_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get(f"/v1/jobs/{job_id}", params={"wait": 2})
        assert r.status_code == 200
        if r.json()["status"] in ("succeeded", "failed", "cancelled"):
            return dict(r.json())
    pytest.fail(f"job {job_id} did not finish in {timeout} s")


# ----------------------------------------------------------------------------- happy paths
@pytest.mark.parametrize("op", list(CASES))
def test_json_submit_poll_result_equals_compute(op: str, api: Any, start_worker: Any) -> None:
    start_worker()
    client = api()
    make, params = CASES[op]
    tensors = make()
    r = client.post(f"/v1/{op}", json=json_body(tensors, params))
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and job["op"] == op
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert int(r.headers["retry-after"]) >= 1
    done = wait_done(client, job["id"])
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 1 and done["error"] is None
    assert done["summary"]["method"] in ("exact", "polynomial")
    assert done["summary"]["seconds"] >= 0
    assert done["created_at"] <= done["started_at"] <= done["finished_at"]
    res = client.get(f"/v1/jobs/{job['id']}/result")
    assert res.status_code == 200
    body = res.json()
    assert body["summary"] == done["summary"]
    want = direct(op, tensors, params)
    assert set(body["outputs"]) == set(want)
    for name, tj in body["outputs"].items():
        got = torch.tensor(tj["data"], dtype=torch.float64).reshape(tj["shape"])
        close(got, want[name])


@pytest.mark.parametrize("op", list(CASES))
def test_binary_submit_and_binary_result_equal_compute(
    op: str, api: Any, start_worker: Any
) -> None:
    from app.jobs.codec import decode_safetensors

    start_worker()
    client = api()
    make, params = CASES[op]
    tensors = make()
    r = client.post(f"/v1/{op}", content=st_body(tensors, params), headers={"content-type": BINARY})
    assert r.status_code == 202, r.text
    done = wait_done(client, r.json()["id"])
    assert done["status"] == "succeeded", done
    res = client.get(f"/v1/jobs/{done['id']}/result", headers={"accept": BINARY})
    assert res.status_code == 200 and res.headers["content-type"] == BINARY
    outputs, meta = decode_safetensors(res.content, max_elements=1 << 30)
    assert json.loads(meta["summary"]) == done["summary"]
    want = direct(op, tensors, params)
    assert set(outputs) == set(want)
    for name, raw in outputs.items():
        close(raw.to_torch(), want[name])


POLY_CASES: dict[str, tuple[Callable[[], dict[str, Any]], dict[str, Any]]] = {
    "attention": (lambda: attention_inputs(64, 4, seed=5), {"method": "polynomial", "eps": 1e-3}),
    "tensor-attention": (
        lambda: tensor_inputs(32, 4, seed=6),
        {"method": "polynomial", "eps": 1e-3},
    ),
    "lora-gradient": (
        lambda: lora_inputs(24, 8, 2, seed=7),
        {"alpha": 4.0, "method": "polynomial", "eps": 1e-2},
    ),
}


def _bounds(summary: dict[str, Any]) -> dict[str, float]:
    """Output name -> certified bound, from a job summary."""
    if "error_bound" in summary:
        return {"output": summary["error_bound"]}
    return {
        f"adapters.{m}.{part}": b
        for m, ab in summary["error_bounds"].items()
        for part, b in ab.items()
    }


@pytest.mark.parametrize("transport", ["json", "binary"])
@pytest.mark.parametrize("op", list(POLY_CASES))
def test_polynomial_jobs_end_to_end_with_their_bound(
    op: str, transport: str, api: Any, start_worker: Any
) -> None:
    """A polynomial job through the service: the summary carries the certified bound, the
    output is within it of the float64 exact answer, and the bound reaches the metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    def observed(text: str) -> float:
        for fam in text_string_to_metric_families(text):
            for smp in fam.samples:
                if smp.name == "attn_error_bound_count" and smp.labels == {
                    "op": op,
                    "method": "polynomial",
                }:
                    return float(smp.value)
        return 0.0

    start_worker()
    client = api()
    before = observed(client.get("/metrics").text)
    make, params = POLY_CASES[op]
    tensors = make()
    if transport == "json":
        r = client.post(f"/v1/{op}", json=json_body(tensors, params))
    else:
        r = client.post(
            f"/v1/{op}", content=st_body(tensors, params), headers={"content-type": BINARY}
        )
    assert r.status_code == 202, r.text
    done = wait_done(client, r.json()["id"])
    assert done["status"] == "succeeded", done
    summary = done["summary"]
    assert summary["method"] == "polynomial" and summary["degree"] >= 1
    bounds = _bounds(summary)
    assert bounds and all(0 < b < float("inf") for b in bounds.values())
    body = client.get(f"/v1/jobs/{done['id']}/result").json()
    exact = {**params, "method": "exact"}
    t64 = {n: a.astype(np.float64) for n, a in tensors.items()}
    want = direct(op, t64, {k: v for k, v in exact.items() if k != "eps"})
    for name, bound in bounds.items():
        tj = body["outputs"][name]
        got = torch.tensor(tj["data"], dtype=torch.float64).reshape(tj["shape"])
        err = float((got - want[name].double()).abs().max())
        assert err <= bound, (name, err, bound)
    assert observed(client.get("/metrics").text) == before + 1


@pytest.mark.parametrize("op", list(POLY_CASES))
def test_exact_jobs_end_to_end_with_their_bound(op: str, api: Any, start_worker: Any) -> None:
    """An exact job through the service: the summary carries the exact path's certified
    rounding bound (never null), and the output is within it of the float64 answer."""
    start_worker()
    client = api()
    make, params = POLY_CASES[op]
    tensors = make()
    exact = {**params, "method": "exact"}
    r = client.post(f"/v1/{op}", json=json_body(tensors, exact))
    assert r.status_code == 202, r.text
    done = wait_done(client, r.json()["id"])
    assert done["status"] == "succeeded", done
    summary = done["summary"]
    assert summary["method"] == "exact"
    bounds = _bounds(summary)
    assert bounds and all(b is not None and 0 < b < float("inf") for b in bounds.values())
    body = client.get(f"/v1/jobs/{done['id']}/result").json()
    t64 = {n: a.astype(np.float64) for n, a in tensors.items()}
    want = direct(op, t64, {k: v for k, v in exact.items() if k != "eps"})
    for name, bound in bounds.items():
        tj = body["outputs"][name]
        got = torch.tensor(tj["data"], dtype=torch.float64).reshape(tj["shape"])
        err = float((got - want[name].double()).abs().max())
        assert err <= bound, (name, err, bound)


def test_fp64_and_bf16_datatypes_round_trip(api: Any, start_worker: Any) -> None:
    start_worker()
    client = api()
    t = attention_inputs()
    body = {
        "q": T(t["q"].astype(np.float64), "FP64"),
        "k": T(t["k"].astype(np.float64), "FP64"),
        "v": T(t["v"].astype(np.float64), "FP64"),
    }
    r = client.post("/v1/attention", json=body)
    assert r.status_code == 202
    assert wait_done(client, r.json()["id"])["status"] == "succeeded"
    out = client.get(f"/v1/jobs/{r.json()['id']}/result").json()["outputs"]["output"]
    assert out["datatype"] == "FP64"
    body = {n: T(a, "BF16") for n, a in t.items()}
    r = client.post("/v1/attention", json=body)
    assert r.status_code == 202
    assert wait_done(client, r.json()["id"])["status"] == "succeeded"


# ----------------------------------------------------------------------------- bad input
def _attn(**override: Any) -> dict[str, Any]:
    body = json_body(attention_inputs(4, 2), {})
    body.update(override)
    return body


BAD_JSON: list[tuple[str, Any, int, str, str]] = [
    # id, body (bytes or dict), status, code, text expected in message
    ("malformed", b'{"q": ', 400, "malformed_body", "JSON"),
    ("not-an-object", b"[1, 2]", 400, "malformed_body", "object"),
    (
        "nan-token",
        b'{"q": {"shape": [1, 1], "datatype": "FP32", "data": [NaN]}}',
        422,
        "invalid_input",
        "q.data",
    ),
    (
        "inf-token",
        b'{"q": {"shape": [1, 1], "datatype": "FP32", "data": [Infinity]}}',
        422,
        "invalid_input",
        "q.data",
    ),
    (
        "fp16-overflow",
        _attn(q={"shape": [4, 2], "datatype": "FP16", "data": [1e6] * 8}),
        422,
        "invalid_input",
        "q.data",
    ),
    (
        "datatype",
        _attn(k={"shape": [4, 2], "datatype": "INT8", "data": [0] * 8}),
        422,
        "invalid_input",
        "k.datatype",
    ),
    (
        "len-data",
        _attn(v={"shape": [4, 2], "datatype": "FP32", "data": [0] * 7}),
        422,
        "invalid_input",
        "v.data",
    ),
    (
        "negative-shape",
        _attn(v={"shape": [-4, 2], "datatype": "FP32", "data": []}),
        422,
        "invalid_input",
        "v.shape",
    ),
    (
        "rank-1",
        _attn(q={"shape": [8], "datatype": "FP32", "data": [0] * 8}),
        422,
        "invalid_input",
        "q.shape",
    ),
    (
        "head-dim",
        _attn(k={"shape": [4, 3], "datatype": "FP32", "data": [0] * 12}),
        422,
        "invalid_input",
        "k.shape",
    ),
    (
        "key-count",
        _attn(v={"shape": [5, 2], "datatype": "FP32", "data": [0] * 10}),
        422,
        "invalid_input",
        "v.shape",
    ),
    ("missing-field", {"q": T(np.zeros((2, 2), np.float32))}, 422, "invalid_input", "k"),
    ("unknown-field", _attn(bogus=1), 422, "invalid_input", "bogus"),
    ("method", _attn(method="magic"), 422, "invalid_input", "method"),
    ("eps-zero", _attn(eps=0), 422, "invalid_input", "eps"),
    ("eps-big", _attn(eps=1.5), 422, "invalid_input", "eps"),
    ("scale-string", _attn(scale="big"), 422, "invalid_input", "scale"),
    ("lora-adapter-shape", None, 422, "invalid_input", "adapters.q"),
    ("lora-missing-v", None, 422, "invalid_input", "adapters"),
    ("lora-eps-mode", None, 422, "invalid_input", "eps_mode"),
    (
        "too-many-elements",
        _attn(q={"shape": [100, 100], "datatype": "FP32", "data": [0] * 10000}),
        422,
        "invalid_input",
        "MAX_ELEMENTS",
    ),
]


@pytest.mark.parametrize(
    ("case", "body", "status", "code", "text"), BAD_JSON, ids=[c[0] for c in BAD_JSON]
)
def test_bad_json_input_is_4xx_naming_the_field(
    case: str, body: Any, status: int, code: str, text: str, api: Any, redis_url: str
) -> None:
    client = api(max_elements=5000)
    op = "attention"
    if case == "lora-adapter-shape":
        op = "lora-gradient"
        t = lora_inputs()
        t["adapters.q.a"] = np.zeros((2, 5), np.float32)
        body = json_body(t, {"alpha": 1.0})
    if case == "lora-missing-v":
        op = "lora-gradient"
        t = lora_inputs()
        del t["adapters.v.a"], t["adapters.v.b"]
        body = json_body(t, {"alpha": 1.0})
    if case == "lora-eps-mode":
        op = "lora-gradient"
        body = json_body(lora_inputs(), {"alpha": 1.0, "eps_mode": "relative"})
    if isinstance(body, bytes):
        r = client.post(f"/v1/{op}", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(f"/v1/{op}", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code
    assert text in err["message"]
    q: Queue = client.queue
    assert q.r.xlen(stream_key(op)) == 0  # nothing was queued


def _st(tensors: dict[str, RawTensor], meta: dict[str, str] | None = None) -> bytes:
    return encode_safetensors(tensors, meta)


def _raw(a: np.ndarray[Any, Any]) -> RawTensor:
    return from_array(a)


_z = np.zeros((4, 2), np.float32)
_nan = _z.copy()
_nan[1, 1] = np.nan
BAD_BINARY: list[tuple[str, bytes, int, str]] = [
    ("short", b"\x01\x02", 400, "malformed_body"),
    ("header-length", struct.pack("<Q", 10**6) + b"{}", 400, "malformed_body"),
    ("header-json", struct.pack("<Q", 4) + b"{no}", 400, "malformed_body"),
    ("nan", _st({"q": _raw(_nan), "k": _raw(_z), "v": _raw(_z)}), 422, "q.data"),
    (
        "dtype",
        _st({"q": RawTensor("FP32", (4, 2), bytes(32)), "k": _raw(_z), "v": _raw(_z)}).replace(
            b'"F32"', b'"I32"', 1
        ),
        422,
        "datatype",
    ),
    ("missing", _st({"q": _raw(_z), "k": _raw(_z)}), 422, "v"),
    ("extra", _st({"q": _raw(_z), "k": _raw(_z), "v": _raw(_z), "w": _raw(_z)}), 422, "w"),
    ("eps-meta", _st({"q": _raw(_z), "k": _raw(_z), "v": _raw(_z)}, {"eps": "7"}), 422, "eps"),
    (
        "method-meta",
        _st({"q": _raw(_z), "k": _raw(_z), "v": _raw(_z)}, {"method": "fast"}),
        422,
        "method",
    ),
]


@pytest.mark.parametrize(
    ("case", "body", "status", "text"), BAD_BINARY, ids=[c[0] for c in BAD_BINARY]
)
def test_bad_binary_input_is_4xx(case: str, body: bytes, status: int, text: str, api: Any) -> None:
    client = api()
    r = client.post("/v1/attention", content=body, headers={"content-type": BINARY})
    assert r.status_code == status, r.text
    assert text in r.json()["error"]["message"] or text == r.json()["error"]["code"]
    assert client.queue.r.xlen(stream_key("attention")) == 0


def test_wrong_content_type_is_415(api: Any) -> None:
    r = api().post("/v1/attention", content=b"q=1", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    assert r.json()["error"]["code"] == "unsupported_media_type"


def test_body_over_limit_is_413(api: Any) -> None:
    client = api(max_body_bytes=1000)
    body = json_body(attention_inputs(16, 8), {})
    r = client.post("/v1/attention", json=body)
    assert r.status_code == 413
    assert "MAX_BODY_BYTES" in r.json()["error"]["message"]
    # a chunked body (no Content-Length) is counted while it streams
    r = client.post(
        "/v1/attention",
        content=iter([b"x" * 600, b"x" * 600]),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413


def test_plan_endpoint_and_its_validation(api: Any) -> None:
    client = api()
    r = client.get(
        "/v1/plan", params={"op": "attention", "n": 4096, "d": 16, "radius": 2.0, "eps": 1e-3}
    )
    assert r.status_code == 200, r.text
    plan = r.json()["plan"]
    assert plan["method"] in ("exact", "polynomial") and plan["reason"]
    assert "rho" in plan
    for op in ("tensor-attention", "lora-gradient"):
        r = client.get("/v1/plan", params={"op": op, "n": 256, "d": 4, "radius": 1.0})
        assert r.status_code == 200, r.text
    for bad in ({"n": 0}, {"radius": -1}, {"eps": 2}, {"radius": "nan"}, {"op": "conv"}):
        params = {"op": "attention", "n": 64, "d": 8, "radius": 1.0, **bad}
        r = client.get("/v1/plan", params=params)
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["error"]["code"] == "invalid_input"
    # LoRA's eps_mode (and the strict mode's optional conditioning kappa)
    lora = {"op": "lora-gradient", "n": 65536, "d": 8, "radius": 0.5, "full": "true"}
    for mode, extra in (("scale", {}), ("strict", {}), ("strict", {"kappa": 9e4})):
        r = client.get("/v1/plan", params={**lora, "eps_mode": mode, **extra})
        assert r.status_code == 200, r.text
        assert r.json()["plan"]["extra"]["eps_mode"] == mode
    # the polynomial estimator: forced, or the cheaper certified one (plan.extra says which)
    for est in ("reverse", "chained"):
        r = client.get("/v1/plan", params={**lora, "method": "polynomial", "estimator": est})
        assert r.status_code == 200, r.text
        extra = r.json()["plan"]["extra"]
        assert extra["estimator"] == est and set(extra["estimators"]) == {est}
    bad_cases = (({"eps_mode": "loose"}, "eps_mode"), ({"kappa": 0.5}, "kappa"),
                 ({"estimator": "forward"}, "estimator"))  # fmt: skip
    for bad, field in bad_cases:
        r = client.get("/v1/plan", params={**lora, **bad})
        assert r.status_code == 422, (bad, r.text)
        err = r.json()["error"]
        assert err["code"] == "invalid_input" and field in err["message"]


# ----------------------------------------------------------------------------- jobs
def test_unknown_job_is_404_and_unfinished_result_is_409(api: Any) -> None:
    client = api()
    for path in ("/v1/jobs/0123456789abcdef0123456789abcdef", "/v1/jobs/nope/result", "/v1/jobs/x"):
        r = client.get(path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.post("/v1/attention", json=json_body(attention_inputs(), {}))
    r = client.get(f"/v1/jobs/{r.json()['id']}/result")
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_finished"
    assert "retry-after" in r.headers


def test_cancel_queued_job_never_runs(api: Any, start_worker: Any) -> None:
    client = api()
    job = client.post("/v1/attention", json=json_body(attention_inputs(), {})).json()
    r = client.delete(f"/v1/jobs/{job['id']}")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    w = start_worker()
    q: Queue = client.queue
    wait_until(lambda: q.depth("attention") == (0, 0), timeout=30)
    final = client.get(f"/v1/jobs/{job['id']}").json()
    assert final["status"] == "cancelled" and final["attempts"] == 0
    assert final["error"]["code"] == "cancelled"
    assert w.jobs_done == 0
    assert client.get(f"/v1/jobs/{job['id']}/result").status_code == 409
    assert q.r.keys("attn:in:*") == []  # inputs dropped


def test_cancel_running_job_stops_at_next_block(api: Any, start_worker: Any) -> None:
    start_worker(worker_block_delay_ms=30_000)
    client = api()
    job = client.post("/v1/attention", json=json_body(attention_inputs(), {})).json()
    wait_until(lambda: client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running")
    r = client.delete(f"/v1/jobs/{job['id']}")
    assert r.status_code == 202 and r.json()["cancel_requested"] is True
    done = wait_done(client, job["id"], timeout=30)
    assert done["status"] == "cancelled" and done["attempts"] == 1
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 200  # idempotent


def test_cancel_finished_job_is_409(api: Any, start_worker: Any) -> None:
    start_worker()
    client = api()
    job = client.post("/v1/attention", json=json_body(attention_inputs(), {})).json()
    assert wait_done(client, job["id"])["status"] == "succeeded"
    r = client.delete(f"/v1/jobs/{job['id']}")
    assert r.status_code == 409 and r.json()["error"]["code"] == "job_finished"


def test_results_expire_after_ttl(api: Any, start_worker: Any) -> None:
    start_worker(result_ttl_seconds=1)
    client = api(result_ttl_seconds=1)
    job = client.post("/v1/attention", json=json_body(attention_inputs(), {})).json()
    assert wait_done(client, job["id"])["status"] == "succeeded"
    q: Queue = client.queue
    wait_until(lambda: not q.r.exists(f"attn:job:{job['id']}"), timeout=15, interval=0.1)
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert client.get(f"/v1/jobs/{job['id']}/result").status_code == 404
    assert q.r.keys(f"attn:*{job['id']}*") == []


def test_stale_attempt_cannot_overwrite_newer_result(make_queue: Any) -> None:
    from app.jobs.errors import StaleAttempt
    from app.jobs.records import Attempt

    q: Queue = make_queue()
    t = {n: from_array(a) for n, a in attention_inputs().items()}
    job = q.enqueue("attention", {}, t)
    got = q.read_next("w-old", ["attention"], 100)
    assert got is not None
    old = q.start_attempt("w-old", *got)
    assert isinstance(old, Attempt) and old.attempt == 1
    q.renew_lease("w-other")
    assert q.reclaim("w-other", ["attention"]) == {"worker_lost": 1}  # w-old never had a lease
    got2 = q.read_next("w-new", ["attention"], 100)
    assert got2 is not None
    new = q.start_attempt("w-new", *got2)
    assert isinstance(new, Attempt) and new.attempt == 2 and new.token > old.token
    out_new = {"output": from_array(np.full((2, 2), 2.0, np.float32))}
    out_old = {"output": from_array(np.full((2, 2), 1.0, np.float32))}

    q.finish_success(new, out_new, {"method": "exact"})
    with pytest.raises(StaleAttempt):
        q.finish_success(old, out_old, {"method": "stale"})
    with pytest.raises(StaleAttempt):
        q.report_progress(old, 1, 2, force=True)
    with pytest.raises(StaleAttempt):
        q.finish_failure(old, "internal_error", "late", retry=False)
    final, outputs = q.get_outputs(job["id"])
    assert final["status"] == "succeeded" and final["summary"] == {"method": "exact"}
    assert outputs["output"].to_numpy().tolist() == [[2.0, 2.0], [2.0, 2.0]]


@pytest.mark.parametrize("write", ["succeed", "fail", "cancel", "hand_back", "progress"])
def test_attempt_exactly_one_token_behind_is_stale(make_queue: Any, write: str) -> None:
    """The fencing check is equality: an attempt one token behind a running one writes nothing."""
    from app.jobs.errors import StaleAttempt
    from app.jobs.records import Attempt, job_key

    q: Queue = make_queue()
    job = q.enqueue("attention", {}, {n: from_array(a) for n, a in attention_inputs().items()})
    got = q.read_next("w", ["attention"], 100)
    assert got is not None
    att = q.start_attempt("w", *got)
    assert isinstance(att, Attempt)
    q.r.hincrby(job_key(job["id"]), "token", 1)  # a newer attempt now holds token + 1
    before = q.get_job(job["id"])
    out = {"output": from_array(np.ones((2, 2), np.float32))}
    writes = {
        "succeed": lambda: q.finish_success(att, out, {"method": "exact"}),
        "fail": lambda: q.finish_failure(att, "internal_error", "x", retry=False),
        "cancel": lambda: q.finish_cancelled(att),
        "hand_back": lambda: q.hand_back(att),
        "progress": lambda: q.report_progress(att, 1, 2, force=True),
    }
    with pytest.raises(StaleAttempt):
        writes[write]()
    after = q.get_job(job["id"])
    assert after == before and after["status"] == "running"
    # the same write with the current token goes through
    att.token += 1
    writes[write]()
    assert q.get_job(job["id"]) != before


def test_deterministic_failure_fails_at_once(make_queue: Any, start_worker: Any) -> None:
    q: Queue = make_queue()
    t = {n: from_array(a) for n, a in attention_inputs().items()}
    # scores far beyond the polynomial regime (R ~ 2e3 > 32): no polynomial can ever certify it
    wide = {n: from_array(a * (40.0 if n != "v" else 1.0)) for n, a in attention_inputs().items()}
    job = q.enqueue("attention", {"method": "polynomial", "eps": 1e-6}, wide)
    bad = q.enqueue("attention", {"method": "warp"}, t)  # slipped past validation
    start_worker(max_attempts=3)
    for j, code in ((job, "certification_failed"), (bad, "invalid_input")):
        rec = wait_until(
            lambda j=j: (r := q.get_job(j["id"]))["status"] in ("failed", "succeeded") and r
        )
        assert rec["status"] == "failed" and rec["attempts"] == 1, rec
        assert rec["error"]["code"] == code, rec


def test_cancel_is_seen_through_the_progress_callback(make_queue: Any, make_settings: Any) -> None:
    """The worker's progress callback (no diagnostic delay) stops a job whose cancel was asked,
    and lets an uncancelled one run on."""
    from app.jobs.records import Attempt
    from workers.worker import Worker

    q: Queue = make_queue()
    job = q.enqueue("attention", {}, {n: from_array(a) for n, a in attention_inputs().items()})
    got = q.read_next("w", ["attention"], 100)
    assert got is not None
    att = q.start_attempt("w", *got)
    assert isinstance(att, Attempt)
    worker = Worker(q, make_settings(), worker_id="w")
    progress = worker._progress(att)
    progress(1, 10)  # not cancelled: carries on
    assert q.report_progress(att, 2, 10, force=True) is False
    assert q.cancel(job["id"])["cancel_requested"] is True
    assert q.report_progress(att, 3, 10, force=True) is True
    time.sleep(0.06)  # progress is written (and the flag read) at most every 50 ms
    with pytest.raises(compute.Cancelled):
        progress(4, 10)


def test_a_summary_is_made_json_safe() -> None:
    """Non-finite floats (also numpy's, a float subclass) become null at any depth, tuples and
    other sequences of the summary become lists, keys strings; other values are kept."""
    import types

    from workers.run import _finite

    inf, nan = float("inf"), float("nan")
    summary = {
        "a": inf,
        "b": (1, 2.5, nan, [np.float64(-inf), np.float64(0.5)]),
        3: {"c": True, "d": None, "e": "x", "f": types.MappingProxyType({"g": nan})},
        "h": np.float32(1.5),
    }
    safe = _finite(summary)
    assert safe == {
        "a": None,
        "b": [1, 2.5, None, [None, 0.5]],
        "3": {"c": True, "d": None, "e": "x", "f": {"g": None}},
        "h": np.float32(1.5),
    }
    assert type(safe["b"][3][1]) is np.float64 and json.loads(json.dumps(safe["b"])) == safe["b"]


def test_the_last_block_makes_no_round_trip_and_its_write_honours_a_cancel(
    make_queue: Any, make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last block's progress is not written on its own (no Redis round trip): the result's
    write (the succeed script) records it, and ends the job cancelled, its result discarded,
    when a cancel was asked while the attempt ran."""
    from app.jobs.errors import NoResult
    from app.jobs.records import Attempt
    from workers.worker import Worker

    q: Queue = make_queue()
    inputs = {n: from_array(a) for n, a in attention_inputs().items()}
    out = {"output": from_array(np.ones((16, 8), dtype=np.float32))}
    for cancel in (False, True):
        job = q.enqueue("attention", {}, inputs)
        got = q.read_next("w", ["attention"], 100)
        assert got is not None
        att = q.start_attempt("w", *got)
        assert isinstance(att, Attempt)
        worker = Worker(q, make_settings(), worker_id="w")
        progress = worker._progress(att)
        if cancel:
            assert q.cancel(job["id"])["cancel_requested"] is True

        def no_call(*args: Any, **kwargs: Any) -> bool:
            raise AssertionError("the last block wrote its progress on its own")

        with monkeypatch.context() as m:
            m.setattr(q, "report_progress", no_call)
            progress(7, 7)  # the last block: never a round trip, never raises
        assert q.get_job(job["id"])["progress"] is None  # not written yet
        status, stored, _ = q.finish_success_and_read(att, out, {"method": "exact"}, ["attention"])
        rec = q.get_job(job["id"])
        assert rec["progress"] == {"done": 7, "total": 7}
        if cancel:
            assert (status, stored, rec["status"]) == ("cancelled", 0, "cancelled")
            assert rec["error"]["code"] == "cancelled"
            with pytest.raises(NoResult):
                q.get_outputs(job["id"])
        else:
            assert (status, stored, rec["status"]) == ("succeeded", 512, "succeeded")
            _, outputs = q.get_outputs(job["id"])
            assert outputs["output"].data == out["output"].data
        assert q.stats()[f"attention:{rec['status']}"] == 1


def test_transient_failure_is_retried_then_fails_with_last_error(
    make_queue: Any, start_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import workers.worker as ww

    calls = []

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        raise RuntimeError(f"device lost #{len(calls)}")

    monkeypatch.setattr(ww, "run_op", flaky)
    q: Queue = make_queue(max_attempts=2)
    job = q.enqueue("attention", {}, {n: from_array(a) for n, a in attention_inputs().items()})
    start_worker(max_attempts=2)
    rec = wait_until(lambda: (r := q.get_job(job["id"]))["status"] == "failed" and r)
    assert rec["attempts"] == 2 and len(calls) == 2
    assert rec["error"]["code"] == "internal_error"
    assert "device lost #2" in rec["error"]["message"]


# ----------------------------------------------------------------------------- ops surface
def test_health_ready_needs_a_live_worker(api: Any, start_worker: Any) -> None:
    client = api()
    assert client.get("/health/live").status_code == 200
    r = client.get("/health/ready")
    assert r.status_code == 503 and r.json()["redis"] is True and r.json()["workers"] == 0
    start_worker()
    r = client.get("/health/ready")
    assert r.status_code == 200 and r.json()["workers"] == 1


def test_ready_is_503_when_redis_is_unreachable() -> None:
    from fastapi.testclient import TestClient

    from app.api import create_app
    from app.jobs.settings import Settings
    from tests.conftest import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    with TestClient(create_app(Settings(redis_url=url))) as c:
        assert c.get("/health/ready").status_code == 503
        r = c.post("/v1/attention", json=json_body(attention_inputs(), {}))
        assert r.status_code == 503 and r.json()["error"]["code"] == "queue_unavailable"


def test_metrics_exposed(api: Any, start_worker: Any) -> None:
    start_worker()
    client = api()
    job = client.post("/v1/attention", json=json_body(attention_inputs(), {})).json()
    assert wait_done(client, job["id"])["status"] == "succeeded"
    text = client.get("/metrics").text
    for name in (
        "attn_queue_depth",
        "attn_jobs{",
        "attn_job_seconds_bucket",
        "attn_lease_renewals_total",
        "attn_reclaimed_total",
        "attn_bytes_stored_total",
        "attn_jobs_submitted_total",
    ):
        assert name in text, name
    assert 'attn_jobs{op="attention",status="succeeded"} 1.0' in text


def test_api_key_required_when_set(api: Any) -> None:
    client = api(api_key="s3cret")
    body = json_body(attention_inputs(), {})
    r = client.post("/v1/attention", json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = client.post("/v1/attention", json=body, headers={"authorization": "Bearer s3cret"})
    assert r.status_code == 202
    assert client.get("/health/live").status_code == 200  # health stays open


def test_openapi_documents_routes_and_both_body_types(api: Any) -> None:
    client = api()
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    for path in (
        "/v1/attention",
        "/v1/tensor-attention",
        "/v1/lora-gradient",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/result",
        "/v1/plan",
        "/health/ready",
        "/metrics",
    ):
        assert path in spec["paths"], path
    content = spec["paths"]["/v1/attention"]["post"]["requestBody"]["content"]
    assert set(content) == {"application/json", BINARY}
    assert "AttentionRequest" in spec["components"]["schemas"]


def test_unknown_route_and_method_are_json_errors(api: Any) -> None:
    client = api()
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.put("/v1/attention")
    assert r.status_code == 405 and "error" in r.json()


def test_an_end_announced_before_the_wait_is_not_missed(
    make_queue: Any, make_settings: Any, start_worker: Any
) -> None:
    """The completion event may fire between submit and the wait (a fast job): the waiter must
    take it, not clear it and sleep out its whole wait."""
    import asyncio

    from app.api.routes import await_end
    from app.jobs.queue import AsyncQueue

    q: Queue = make_queue()
    start_worker()
    job = q.enqueue("attention", {}, {n: from_array(a) for n, a in attention_inputs().items()})
    wait_until(lambda: q.get_job(job["id"])["status"] == "succeeded")
    settings = make_settings()

    async def run() -> tuple[dict[str, Any], float]:
        aq = AsyncQueue.from_settings(settings)
        ended = asyncio.Event()
        ended.set()  # announced while the (now stale) record below was being read
        t0 = time.monotonic()
        try:
            rec = await await_end(None, aq, settings, job["id"], "", 20.0, ended, job=job)  # type: ignore[arg-type]
        finally:
            await aq.r.aclose()
        return rec, time.monotonic() - t0

    rec, took = asyncio.run(run())
    assert rec["status"] == "succeeded" and took < 2.0, took
