"""The Python client and the ``attn`` CLI against a real uvicorn server and Redis; the 413 that
comes before the body is read; the embedded mode (API + worker in one process, no Redis)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import compute
from app.client import ApiError, Client, JobCancelled
from tests.conftest import wait_until

pytestmark = pytest.mark.redis


def arrays(n: int = 16, d: int = 8) -> tuple[np.ndarray[Any, Any], ...]:
    g = np.random.default_rng(3)
    return tuple((0.5 * g.standard_normal((n, d))).astype(np.float32) for _ in range(3))


@pytest.fixture
def service(live_server: Any, start_worker: Any) -> str:
    start_worker()
    return str(live_server())


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_client_numpy_in_numpy_out(service: str, binary: bool) -> None:
    q, k, v = arrays()
    with Client(service, binary_threshold=0 if binary else 1 << 30) as c:
        res = c.attention(q, k, v, eps=1e-3).wait(timeout=60)
    assert isinstance(res.output, np.ndarray) and res.output.dtype == np.float32
    want = compute.attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v)).output
    np.testing.assert_allclose(res.output, want.numpy(), rtol=1e-5, atol=1e-6)
    assert res.summary["method"] in ("exact", "polynomial") and "seconds" in res.summary
    assert res.plan is not None


def test_client_torch_in_torch_out_and_lora(service: str) -> None:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 6, generator=g) * 0.3, torch.randn(12, 6, generator=g) * 0.3
    w = [torch.randn(6, 6, generator=g) * 0.3 for _ in range(3)]
    adapters = {
        m: (torch.randn(2, 6, generator=g) * 0.3, torch.randn(6, 2, generator=g) * 0.3)
        for m in "qv"
    }
    with Client(service) as c:
        res = c.lora_gradient(
            x, y, w_q=w[0], w_k=w[1], w_v=w[2], adapters=adapters, alpha=2.0
        ).wait(60)
    want = compute.lora_gradient(x, y, w_q=w[0], w_k=w[1], w_v=w[2], adapters=adapters, alpha=2.0)
    for m in "qv":
        da, db = res.grads[m]
        assert isinstance(da, torch.Tensor)
        torch.testing.assert_close(da.double(), want.grads[m][0].double(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(db.double(), want.grads[m][1].double(), rtol=1e-5, atol=1e-6)
    assert res.loss == pytest.approx(float(want.loss), rel=1e-6)
    # eps_mode travels to the library; the summary reports the mode, the natural scale, the
    # conditioning and the strict ratio
    with Client(service) as c:
        for mode in ("scale", "strict"):
            got = c.lora_gradient(
                x, y, w_q=w[0], w_k=w[1], w_v=w[2], adapters=adapters, alpha=2.0,
                method="polynomial", eps=0.05, eps_mode=mode,
            ).wait(60)  # fmt: skip
            summary = got.summary
            assert summary["eps_mode"] == mode and summary["plan"]["extra"]["eps_mode"] == mode
            for key in ("scales", "conditioning", "strict_ratios", "error_bounds"):
                assert set(summary[key]) == {"q", "v"}, key
            kappa = summary["conditioning"]["q"]["a"]
            assert kappa is not None and kappa >= 1.0 - 1e-9
        # the estimator travels to the library too; the plan says which ran
        got = c.lora_gradient(
            x, y, w_q=w[0], w_k=w[1], w_v=w[2], adapters=adapters, alpha=2.0,
            method="polynomial", eps=0.05, estimator="chained",
        ).wait(60)  # fmt: skip
        assert got.summary["plan"]["extra"]["estimator"] == "chained"


def test_client_raises_clear_errors(service: str) -> None:
    q, k, v = arrays()
    with Client(service) as c:
        with pytest.raises(ApiError) as info:
            c.attention(q, k[:, :4], v)
        assert info.value.status == 422 and "k.shape" in info.value.message
        with pytest.raises(ApiError) as info:
            c.job("0" * 32)
        assert info.value.status == 404
        plan = c.plan("attention", n=1024, d=8, radius=1.0)
        assert plan["plan"]["method"] in ("exact", "polynomial")


def test_client_cancel(live_server: Any, start_worker: Any) -> None:
    start_worker(worker_block_delay_ms=30_000)
    url = live_server()
    with Client(url) as c:
        job = c.attention(*arrays())
        wait_until(lambda: job.refresh()["status"] == "running")
        job.cancel()
        with pytest.raises(JobCancelled):
            job.wait(timeout=60)


def test_413_before_the_body_is_read(live_server: Any) -> None:
    url = live_server(max_body_bytes=1 << 20)
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"POST /v1/attention HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: 67108864000\r\n\r\n"
        )
        reply = _read_response(s)  # answered with no body byte sent
    assert reply.startswith("HTTP/1.1 413"), reply[:200]
    assert "payload_too_large" in reply


def _read_response(s: socket.socket) -> str:
    """One whole HTTP/1.1 response: the head, then Content-Length bytes of body, however the
    bytes are split into segments."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        0,
    )
    while len(rest) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        rest += chunk
    assert len(rest) >= length, "connection closed before the body was complete"
    return (head + b"\r\n\r\n" + rest).decode(errors="replace")


def test_large_binary_input_goes_through(service: str) -> None:
    g = np.random.default_rng(0)
    q = g.standard_normal((2048, 64), dtype=np.float32) * 0.1  # 3 x 512 KiB
    with Client(service, binary_threshold=1 << 16) as c:
        res = c.attention(q, q, q).wait(timeout=120)
    assert res.output.shape == (2048, 64)


def test_cli_submit_wait_status_result(service: str, tmp_path: Path, capsys: Any) -> None:
    from app.cli import main

    q, k, v = arrays()
    for name, a in zip("qkv", (q, k, v), strict=True):
        np.save(tmp_path / f"{name}.npy", a)
    out = tmp_path / "out.safetensors"
    args = ["--url", service, "submit", "attention", *(f"{n}={tmp_path / n}.npy" for n in "qkv")]
    assert main([*args, "--param", "eps=0.001", "--wait", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["summary"]["method"] in ("exact", "polynomial")
    from app.jobs.codec import decode_safetensors

    raw, _ = decode_safetensors(out.read_bytes(), max_elements=1 << 30)
    want = compute.attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v)).output
    np.testing.assert_allclose(raw["output"].to_numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
    # submit without waiting, then status / wait / result by id
    assert (
        main(
            [
                "--url",
                service,
                "submit",
                "attention",
                f"q={tmp_path}/q.npy",
                f"k={tmp_path}/k.npy",
                f"v={tmp_path}/v.npy",
            ]
        )
        == 0
    )
    job_id = capsys.readouterr().out.strip()
    assert main(["--url", service, "wait", job_id, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["--url", service, "status", job_id]) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "succeeded"
    assert main(["--url", service, "result", job_id]) == 0
    assert main(["--url", service, "status", "f" * 32]) == 1


def test_embedded_mode_runs_jobs_without_redis() -> None:
    from fastapi.testclient import TestClient

    from app.api import create_app
    from app.jobs.settings import Settings

    q, k, v = arrays()
    t = lambda a: {"shape": list(a.shape), "datatype": "FP32", "data": a.ravel().tolist()}  # noqa: E731
    with TestClient(create_app(Settings(embedded=True, redis_url="redis://127.0.0.1:1/0"))) as c:
        assert c.get("/health/ready").status_code == 200
        r = c.post("/v1/attention", json={"q": t(q), "k": t(k), "v": t(v)})
        assert r.status_code == 202
        job = c.get(f"/v1/jobs/{r.json()['id']}", params={"wait": 30}).json()
        assert job["status"] == "succeeded", job
        out = c.get(f"/v1/jobs/{job['id']}/result").json()["outputs"]["output"]
    want = compute.attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v)).output
    np.testing.assert_allclose(
        np.array(out["data"]).reshape(out["shape"]), want.numpy(), rtol=1e-5, atol=1e-6
    )


# ----------------------------------------------------------------------------- one round trip
def test_prefer_wait_answers_with_the_result_in_one_round_trip(service: str) -> None:
    import httpx

    from app.jobs.codec import decode_safetensors

    q, k, v = arrays()
    t = lambda a: {"shape": list(a.shape), "datatype": "FP32", "data": a.ravel().tolist()}  # noqa: E731
    body = {"q": t(q), "k": t(k), "v": t(v)}
    want = compute.attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v)).output
    r = httpx.post(f"{service}/v1/attention", json=body, headers={"prefer": "wait=30"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["preference-applied"] == "wait=30"
    doc = r.json()
    assert doc["status"] == "succeeded" and doc["summary"]["method"] in ("exact", "polynomial")
    assert r.headers["location"] == f"/v1/jobs/{doc['id']}"
    out = doc["outputs"]["output"]
    np.testing.assert_allclose(
        np.array(out["data"]).reshape(out["shape"]), want.numpy(), rtol=1e-5, atol=1e-6
    )
    r = httpx.post(
        f"{service}/v1/attention",
        json=body,
        headers={"prefer": "respond-async, wait=30", "accept": "application/octet-stream"},
        timeout=60,
    )
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    raw, meta = decode_safetensors(r.content, max_elements=1 << 20)
    assert json.loads(meta["job"])["status"] == "succeeded"
    np.testing.assert_allclose(raw["output"].to_numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
    # a job that fails within the wait: 200 with the failed record and its reason
    wide = {"q": t(q * 40), "k": t(k * 40), "v": t(v), "method": "polynomial", "eps": 1e-6}
    r = httpx.post(f"{service}/v1/attention", json=wide, headers={"prefer": "wait=30"}, timeout=60)
    assert r.status_code == 200 and r.json()["status"] == "failed"
    assert r.json()["error"]["code"] == "certification_failed" and "outputs" not in r.json()


def test_prefer_wait_that_runs_out_is_the_usual_202(live_server: Any, start_worker: Any) -> None:
    import time

    import httpx

    start_worker(worker_block_delay_ms=5000)
    url = live_server()
    q, k, v = arrays()
    t = lambda a: {"shape": list(a.shape), "datatype": "FP32", "data": a.ravel().tolist()}  # noqa: E731
    t0 = time.monotonic()
    r = httpx.post(
        f"{url}/v1/attention",
        json={"q": t(q), "k": t(k), "v": t(v)},
        headers={"prefer": "wait=0.5"},
        timeout=30,
    )
    took = time.monotonic() - t0
    assert r.status_code == 202 and r.json()["status"] in ("queued", "running")
    assert 0.5 <= took < 3.0 and r.headers["location"].endswith(r.json()["id"])


def test_client_hold_returns_the_result_with_the_submit(service: str) -> None:
    q, k, v = arrays()
    with Client(service, hold=30) as c:
        calls: list[str] = []
        c.http.event_hooks["request"].append(lambda req: calls.append(req.method))
        res = c.attention(q, k, v).wait(timeout=60)
    assert calls == ["POST"]  # one round trip: no poll, no result fetch
    want = compute.attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v)).output
    np.testing.assert_allclose(res.output, want.numpy(), rtol=1e-5, atol=1e-6)


def test_cli_cancel_of_a_finished_job_fails_loudly(service: str, capsys: Any) -> None:
    from app.cli import main

    with Client(service) as c:
        job = c.attention(*arrays())
        job.wait(timeout=60)
    assert main(["--url", service, "cancel", job.id]) == 1
    err = capsys.readouterr().err
    assert "409" in err and "job_finished" in err


def test_cli_imports_neither_torch_nor_fastapi() -> None:
    import subprocess
    import sys

    code = (
        "import sys, app.cli, app.client; "
        "print(sorted(m for m in ('torch', 'fastapi', 'redis', 'compute') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_cli_eps_mode_reaches_the_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """``attn submit ... --eps-mode strict`` sends ``eps_mode`` with the parameters; a bad value
    is refused by the parser, naming the option."""
    import app.cli as cli

    sent: dict[str, Any] = {}

    class Sent:
        id = "j1"

    def submit(self: Any, op: str, tensors: Any, params: Any, **kw: Any) -> Sent:
        sent.update(op=op, params=dict(params))
        return Sent()

    monkeypatch.setattr(cli.Client, "submit", submit)
    np.save(tmp_path / "x.npy", np.zeros((4, 2), np.float32))
    args = ["--url", "http://127.0.0.1:9", "submit", "lora-gradient", f"x={tmp_path}/x.npy"]
    assert cli.main([*args, "--param", "alpha=2", "--eps-mode", "strict"]) == 0
    assert sent == {"op": "lora-gradient", "params": {"alpha": 2, "eps_mode": "strict"}}
    with pytest.raises(SystemExit):
        cli.main([*args, "--eps-mode", "loose"])
    assert "--eps-mode" in capsys.readouterr().err
