# ruff: noqa: N818  (JobFailed/JobCancelled/JobTimeout read better than *Error here)
"""Python client: ``Client(url).attention(q, k, v).wait()``.

numpy arrays or torch tensors in, the same kind out. Inputs above ``binary_threshold`` bytes go
as a safetensors body (no JSON detour); results always come back as safetensors.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from app.jobs.codec import RawTensor, decode_safetensors, encode_safetensors, from_array

__all__ = [
    "ApiError",
    "Client",
    "ClientError",
    "Job",
    "JobCancelled",
    "JobFailed",
    "JobTimeout",
    "Result",
    "ServerError",
]

BINARY = "application/octet-stream"
TERMINAL = ("succeeded", "failed", "cancelled")


class ClientError(Exception):
    """Base class of every error this client raises."""


class ApiError(ClientError):
    """A 4xx answer: the request was refused; ``code`` and ``message`` say why."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status, self.code, self.message = status, code, message
        super().__init__(f"HTTP {status} {code}: {message}")


class ServerError(ApiError):
    """A 5xx answer (service or Redis unavailable, internal error)."""


class JobFailed(ClientError):
    def __init__(self, job: Mapping[str, Any]) -> None:
        self.job = dict(job)
        err = job.get("error") or {}
        self.code, self.message = err.get("code", "failed"), err.get("message", "")
        super().__init__(f"job {job.get('id')} failed: {self.code}: {self.message}")


class JobCancelled(ClientError):
    def __init__(self, job: Mapping[str, Any]) -> None:
        self.job = dict(job)
        super().__init__(f"job {job.get('id')} was cancelled")


class JobTimeout(ClientError, TimeoutError):
    pass


@dataclass
class Result:
    """A finished job: ``outputs`` by name, ``summary`` (method, bound(s), plan, seconds)."""

    id: str
    outputs: dict[str, Any]
    summary: dict[str, Any]
    job: dict[str, Any] = field(default_factory=dict)

    @property
    def output(self) -> Any:
        return self.outputs["output"]

    @property
    def error_bound(self) -> float | None:
        return self.summary.get("error_bound")

    @property
    def plan(self) -> dict[str, Any] | None:
        return self.summary.get("plan")

    @property
    def loss(self) -> float | None:
        return self.summary.get("loss")

    @property
    def grads(self) -> dict[str, tuple[Any, Any]]:
        """LoRA: ``{"q": (dA, dB), ...}``."""
        ms = sorted({n.split(".")[1] for n in self.outputs if n.startswith("adapters.")})
        return {m: (self.outputs[f"adapters.{m}.a"], self.outputs[f"adapters.{m}.b"]) for m in ms}


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        err = resp.json()["error"]
        code, message = str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", resp.text[:500]
    cls = ServerError if resp.status_code >= 500 else ApiError
    raise cls(resp.status_code, code, message)


def _retry_after(resp: httpx.Response, default: float) -> float:
    try:
        return max(float(resp.headers.get("retry-after", default)), 0.0)
    except ValueError:
        return default


class Job:
    """A submitted job; :meth:`wait` polls until it ends and returns its :class:`Result`."""

    def __init__(
        self,
        client: Client,
        record: Mapping[str, Any],
        kind: str = "numpy",
        result: Result | None = None,
    ) -> None:
        self.client = client
        self.record = dict(record)
        self.id: str = str(record["id"])
        self.kind = kind
        self._result = result  # came with the submit's answer (``hold``)

    def __repr__(self) -> str:
        return f"Job({self.id!r}, status={self.status!r})"

    @property
    def status(self) -> str:
        return str(self.record.get("status"))

    def refresh(self, *, wait: float = 0.0) -> dict[str, Any]:
        params = {"wait": f"{wait:g}"} if wait else None
        resp = self.client._request("GET", f"/v1/jobs/{self.id}", params=params, timeout_extra=wait)
        self.record = resp.json()
        self._retry_after = float(resp.headers.get("retry-after", "1"))
        return self.record

    def cancel(self) -> dict[str, Any]:
        """Cancel the job; raises ApiError (409 ``job_finished``) when it already ended."""
        self.record = self.client._request("DELETE", f"/v1/jobs/{self.id}").json()
        return self.record

    def wait(
        self,
        timeout: float | None = None,
        *,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> Result:
        """Poll (long-polling, backoff up to the server's Retry-After) and return the result.

        Raises JobFailed / JobCancelled / JobTimeout.
        """
        if self._result is not None:
            return self._result
        deadline = None if timeout is None else time.monotonic() + timeout
        backoff = 0.05
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise JobTimeout(f"job {self.id} still {self.status} after {timeout} s")
            hold = 5.0 if left is None else max(0.0, min(5.0, left))
            rec = self.refresh(wait=hold)
            if on_progress is not None:
                on_progress(rec)
            if rec["status"] in TERMINAL:
                break
            pause = min(backoff, self._retry_after)
            if deadline is not None:
                pause = min(pause, max(0.0, deadline - time.monotonic()))
            time.sleep(pause)
            backoff = min(backoff * 2, 5.0)
        if rec["status"] == "failed":
            raise JobFailed(rec)
        if rec["status"] == "cancelled":
            raise JobCancelled(rec)
        return self.result()

    def result(self) -> Result:
        if self._result is not None:
            return self._result
        resp = self.client._request("GET", f"/v1/jobs/{self.id}/result", headers={"accept": BINARY})
        return _result_of(resp.content, self.id, self.kind, self.record)


def _result_of(body: bytes, job_id: str, kind: str, record: Mapping[str, Any]) -> Result:
    raw, meta = decode_safetensors(body, max_elements=1 << 62)
    summary = json.loads(meta.get("summary", "null")) or {}
    outputs = {n: _to_kind(t, kind) for n, t in raw.items()}
    return Result(job_id, outputs, summary, dict(record))


def _to_kind(t: RawTensor, kind: str) -> Any:
    if kind == "torch":
        return t.to_torch()
    return t.to_numpy()


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


class Client:
    """HTTP client of the service (sync, httpx)."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        binary_threshold: int = 1 << 20,
        retries: int = 5,
        hold: float = 0.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout
        self.retries = retries
        self.hold = hold
        self.binary_threshold = binary_threshold
        self.http = httpx.Client(
            base_url=url.rstrip("/"), headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def _request(
        self, method: str, path: str, *, timeout_extra: float = 0.0, **kwargs: Any
    ) -> httpx.Response:
        """One request, retried while the service says "later" (429, 503) or cannot be reached.

        Safe to retry: reads are idempotent, and every submit carries an ``Idempotency-Key``, so a
        submit whose answer was lost returns the job it created instead of a second one.
        """
        pause = 0.2
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                resp = self.http.request(
                    method, path, timeout=self.timeout + timeout_extra, **kwargs
                )
            except httpx.TransportError as exc:
                if last:
                    raise ClientError(f"cannot reach the service: {exc}") from exc
                time.sleep(pause)
                pause = min(pause * 2, 5.0)
                continue
            if resp.status_code in (429, 503) and not last:
                time.sleep(min(_retry_after(resp, pause), 30.0))
                pause = min(pause * 2, 5.0)
                continue
            _raise_for(resp)
            return resp
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ operations
    def attention(self, q: Any, k: Any, v: Any, **params: Any) -> Job:
        """Queue ``softmax(scale q k^T) v``; params: method, eps, scale, causal, sample_rows."""
        return self.submit("attention", {"q": q, "k": k, "v": v}, params)

    def tensor_attention(self, q: Any, k1: Any, k2: Any, v1: Any, v2: Any, **params: Any) -> Job:
        return self.submit(
            "tensor-attention", {"q": q, "k1": k1, "k2": k2, "v1": v1, "v2": v2}, params
        )

    def lora_gradient(
        self,
        x: Any,
        y: Any,
        *,
        w_q: Any,
        w_k: Any,
        w_v: Any,
        adapters: Mapping[str, Any],
        alpha: float,
        **params: Any,
    ) -> Job:
        """``adapters``: ``{"q": (A, B), ...}`` or ``{"q": {"a": A, "b": B}, ...}``; params:
        method, eps, eps_mode ("scale": bound <= eps * the gradient's natural scale, the
        default; "strict": bound <= eps * max|G|), estimator ("auto", "reverse", "chained"),
        scale."""
        tensors = {"x": x, "y": y, "w_q": w_q, "w_k": w_k, "w_v": w_v}
        for m, ab in adapters.items():
            a, b = (ab["a"], ab["b"]) if isinstance(ab, Mapping) else ab
            tensors[f"adapters.{m}.a"], tensors[f"adapters.{m}.b"] = a, b
        return self.submit("lora-gradient", tensors, {"alpha": alpha, **params})

    def submit(
        self,
        op: str,
        tensors: Mapping[str, Any],
        params: Mapping[str, Any] | None = None,
        *,
        binary: bool | None = None,
        hold: float | None = None,
    ) -> Job:
        """Queue any operation; ``binary=None`` picks safetensors above ``binary_threshold``.

        ``hold`` (seconds, at most 60; default the client's ``hold``) asks the server to answer
        only once the job ended (``Prefer: wait``): a small job then costs one round trip, its
        result comes with the answer and :meth:`Job.wait` returns it at once.
        """
        params = dict(params or {})
        hold = self.hold if hold is None else hold
        idem = {"idempotency-key": uuid.uuid4().hex}
        if hold > 0:
            idem.update({"prefer": f"wait={min(hold, 60.0):g}", "accept": BINARY})
        kind = "torch" if any(_is_torch(t) for t in tensors.values()) else "numpy"
        body = self._body(tensors, params, binary)
        headers = {**body.pop("headers", {}), **idem}
        resp = self._request("POST", f"/v1/{op}", headers=headers, timeout_extra=hold, **body)
        if resp.headers.get("content-type", "").startswith(BINARY):  # ended, with its result
            meta = decode_safetensors(resp.content, max_elements=1 << 62)[1]
            record = json.loads(meta["job"])
            return Job(self, record, kind, _result_of(resp.content, record["id"], kind, record))
        return Job(self, resp.json(), kind)

    def _body(
        self, tensors: Mapping[str, Any], params: Mapping[str, Any], binary: bool | None
    ) -> dict[str, Any]:
        """A job's body as request arguments: JSON, or safetensors (``binary``; ``None`` picks
        safetensors above ``binary_threshold``)."""
        raw = {n: from_array(t) for n, t in tensors.items()}
        if binary is None:
            binary = sum(t.nbytes for t in raw.values()) > self.binary_threshold
        if binary:
            meta = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in params.items()}
            return {
                "content": encode_safetensors(raw, meta),
                "headers": {"content-type": BINARY},
            }
        body: dict[str, Any] = dict(params)
        for name, t in raw.items():
            node = body
            *path, leaf = name.split(".")
            for part in path:
                node = node.setdefault(part, {})
            node[leaf] = t.to_json()
        return {"json": body}

    def job(self, job_id: str) -> Job:
        job = Job(self, {"id": job_id})
        job.refresh()
        return job

    def plan(
        self,
        op: str = "attention",
        *,
        tensors: Mapping[str, Any] | None = None,
        binary: bool | None = None,
        **params: Any,
    ) -> dict[str, Any]:
        """What the planner would do, nothing run. Without ``tensors``: ``GET /v1/plan`` with
        the sizes (``n``, ``d``, ``radius``, ``eps``, ...). With ``tensors`` (numpy or torch,
        named as the operation's job takes them, e.g. ``{"q": q, "k": k, "v": v}``):
        ``POST /v1/plan``, where the service computes the certified radius R of these tensors
        (answer's ``radius``) and plans at it; ``params`` are the job's (``eps``, ``method``,
        ``scale``, ``causal``, ``alpha``)."""
        if tensors is None:
            resp = self._request("GET", "/v1/plan", params={"op": op, **params})
        else:
            body = self._body(tensors, params, binary)
            resp = self._request("POST", "/v1/plan", params={"op": op}, **body)
        result: dict[str, Any] = resp.json()
        return result

    def ready(self) -> bool:
        return self.http.get("/health/ready").status_code == 200
