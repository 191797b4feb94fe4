"""The HTTP API: ``uvicorn app.main:app``.

Submit (``POST /v1/{op}``, JSON or safetensors) -> 202 + ``Location: /v1/jobs/{id}``; poll the job;
fetch the result (JSON or safetensors); cancel; ask the planner; health and metrics. With
``EMBEDDED=1`` the app also runs one worker thread on an in-process Redis (fakeredis).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import redis
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

import compute
from app import metrics
from app.errors import (
    Forbidden,
    InvalidInput,
    JobNotFinished,
    PayloadTooLarge,
    ServiceError,
    UnsupportedMediaType,
    error_body,
    http_status,
)
from app.models import ErrorBody, HealthPublic, JobPublic, PlanPublic, ResultPublic
from app.ops import OPS, OpSpec, parse_binary, parse_json
from app.queue import TERMINAL, Queue, retry_after
from app.settings import Settings, get_settings
from app.tensors import decode_safetensors, encode_safetensors

__all__ = ["app", "create_app"]

log = logging.getLogger("app")

JSON = "application/json"
BINARY = "application/octet-stream"


# ---------------------------------------------------------------------------------- dependencies
def get_queue(request: Request) -> Queue:
    queue: Queue = request.app.state.queue
    return queue


def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


QueueDep = Annotated[Queue, Depends(get_queue)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def require_api_key(request: Request, settings: SettingsDep) -> None:
    if not settings.api_key:
        return
    given = request.headers.get("authorization", "")
    expected = f"Bearer {settings.api_key}"
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise Forbidden("missing or wrong API key (Authorization: Bearer <key>)")


# ---------------------------------------------------------------------------------- helpers
def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat() if ts is not None else None


def job_public(job: dict[str, Any]) -> dict[str, Any]:
    view = {k: job.get(k) for k in JobPublic.model_fields}
    for k in ("created_at", "started_at", "finished_at"):
        view[k] = _iso(job.get(k))
    return JobPublic.model_validate(view).model_dump(mode="json")


def _error_response(exc: BaseException) -> JSONResponse:
    status, code = http_status(exc)
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    if status >= 500 and code == "internal_error":
        log.error("unhandled error", exc_info=exc)
        message = "internal error"
    headers = {"Retry-After": "5"} if status == 503 else None
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


async def read_body(request: Request, limit: int) -> bytearray:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` (never read whole)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise InvalidInput("not an integer", field="Content-Length") from None
        if size > limit:
            raise PayloadTooLarge(
                f"body of {size} bytes exceeds the limit of {limit} (MAX_BODY_BYTES)"
            )
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes (MAX_BODY_BYTES)")
    return buf


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _submit_route(spec: OpSpec) -> Any:
    async def submit(request: Request, queue: QueueDep, settings: SettingsDep) -> Response:
        ctype = _content_type(request)
        if ctype not in (JSON, BINARY):
            raise UnsupportedMediaType(
                f"Content-Type {ctype or '(none)'!r}: use {JSON} or {BINARY} (safetensors)"
            )
        body = await read_body(request, settings.max_body_bytes)

        def parse_and_enqueue() -> dict[str, Any]:
            if ctype == JSON:
                params, tensors = parse_json(spec, body, max_elements=settings.max_elements)
            else:
                raw, meta = decode_safetensors(body, max_elements=settings.max_elements)
                params, tensors = parse_binary(spec, raw, meta)
            job = queue.enqueue(spec.name, params, tensors)
            metrics.JOBS_SUBMITTED.labels(spec.name, "json" if ctype == JSON else "binary").inc()
            metrics.BYTES_STORED.labels("input").inc(sum(len(t.data) for t in tensors.values()))
            return job

        job = await run_in_threadpool(parse_and_enqueue)
        return JSONResponse(
            job_public(job),
            status_code=202,
            headers={"Location": f"/v1/jobs/{job['id']}", "Retry-After": "1"},
        )

    submit.__name__ = f"submit_{spec.name.replace('-', '_')}"
    submit.__doc__ = (
        f"Queue a {spec.name} job. Body: JSON ({spec.request.__name__}) or, for large inputs, "
        "`application/octet-stream` safetensors with tensors named as the JSON fields "
        "(`adapters.q.a` for nested ones) and the scalar parameters in `__metadata__`. "
        "Answers 202 with `Location: /v1/jobs/{id}` once the job and its inputs are in Redis."
    )
    return submit


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 404, 409, 413, 415, 422, 503)
}


def _request_body_doc(spec: OpSpec) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                JSON: {"schema": {"$ref": f"#/components/schemas/{spec.request.__name__}"}},
                BINARY: {
                    "schema": {"type": "string", "format": "binary"},
                    "description": "safetensors; scalar parameters in __metadata__ as strings",
                },
            },
        }
    }


# ---------------------------------------------------------------------------------- routes
def _build_router() -> APIRouter:
    router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=_ERRORS)
    for spec in OPS.values():
        router.add_api_route(
            f"/{spec.name}",
            _submit_route(spec),
            methods=["POST"],
            status_code=202,
            response_model=JobPublic,
            openapi_extra=_request_body_doc(spec),
            summary=f"Submit a {spec.name} job",
            tags=["jobs"],
        )

    @router.get("/jobs/{job_id}", response_model=JobPublic, tags=["jobs"])
    async def get_job(
        job_id: str,
        queue: QueueDep,
        wait: Annotated[float, Query(ge=0, le=60, description="long-poll up to this many s")] = 0,
    ) -> Response:
        """The job record; with ``wait`` the answer is held until the job ends or time is up."""
        job = queue.get_job(job_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        pause = 0.001
        while job["status"] not in TERMINAL and loop.time() < deadline:
            await asyncio.sleep(min(pause, max(deadline - loop.time(), 0)))
            pause = min(pause * 1.5, 0.05)
            job = queue.get_job(job_id)
        headers = {} if job["status"] in TERMINAL else {"Retry-After": str(retry_after(job))}
        return JSONResponse(job_public(job), headers=headers)

    @router.get(
        "/jobs/{job_id}/result",
        response_model=ResultPublic,
        tags=["jobs"],
        responses={200: {"content": {BINARY: {"schema": {"type": "string", "format": "binary"}}}}},
    )
    async def get_result(job_id: str, request: Request, queue: QueueDep) -> Response:
        """Outputs and summary; ``Accept: application/octet-stream`` gives safetensors."""
        try:
            job, outputs = await run_in_threadpool(queue.get_outputs, job_id)
        except JobNotFinished as exc:
            job = queue.get_job(job_id)
            return JSONResponse(
                error_body(exc.code, exc.message),
                status_code=409,
                headers={"Retry-After": str(retry_after(job))},
            )
        if BINARY in request.headers.get("accept", ""):
            import json

            meta = {"id": job_id, "op": job["op"], "summary": json.dumps(job["summary"])}
            body = await run_in_threadpool(encode_safetensors, outputs, meta)
            return Response(body, media_type=BINARY)
        content = {
            "id": job_id,
            "outputs": {n: t.to_json() for n, t in outputs.items()},
            "summary": job["summary"],
        }
        return JSONResponse(content)

    @router.delete("/jobs/{job_id}", response_model=JobPublic, tags=["jobs"])
    async def cancel_job(job_id: str, queue: QueueDep) -> Response:
        """Cancel: a queued job never runs (200); a running one stops at its next block (202)."""
        job = queue.cancel(job_id)
        if job["status"] in ("succeeded", "failed"):
            return JSONResponse(
                error_body("job_finished", f"job {job_id} already {job['status']}"), status_code=409
            )
        return JSONResponse(job_public(job), status_code=202 if job["status"] == "running" else 200)

    @router.get("/plan", response_model=PlanPublic, tags=["plan"])
    async def plan(
        op: Literal["attention", "tensor-attention", "lora-gradient"],
        n: Annotated[int, Query(ge=1, le=1 << 31)],
        d: Annotated[int, Query(ge=1, le=1 << 16)],
        radius: Annotated[float, Query(ge=0, allow_inf_nan=False)],
        eps: Annotated[float, Query(gt=0, lt=1, allow_inf_nan=False)] = 1e-3,
        method: Literal["auto", "exact", "polynomial"] = "auto",
        causal: bool = False,
        dv: Annotated[int | None, Query(ge=1, le=1 << 16)] = None,
        rank: Annotated[int, Query(ge=1, le=4096)] = 4,
        full: bool = False,
        batch: Annotated[int, Query(ge=1, le=1 << 20)] = 1,
        dtype: Literal["float16", "bfloat16", "float32", "float64"] = "float32",
    ) -> Response:
        """What the planner would do for these sizes, and why, without running anything."""
        common: dict[str, Any] = {
            "n": n,
            "d": d,
            "radius": radius,
            "eps": eps,
            "batch": batch,
            "dtype": dtype,
            "method": method,
        }
        if op == "attention":
            inputs = {**common, "causal": causal, "dv": dv}
            p = await run_in_threadpool(lambda: compute.plan_attention(**inputs))
        elif op == "tensor-attention":
            inputs = {**common, "dv": dv}
            p = await run_in_threadpool(lambda: compute.plan_tensor_attention(**inputs))
        else:
            inputs = {**common, "rank": rank, "full": full}
            p = await run_in_threadpool(lambda: compute.plan_lora_gradient(**inputs))
        return JSONResponse({"op": op, "inputs": inputs, "plan": p.to_dict()})

    return router


def create_app(settings: Settings | None = None, *, client: redis.Redis | None = None) -> FastAPI:
    """The API; ``client`` overrides the Redis client (tests)."""
    settings = settings or get_settings()
    queue = Queue.from_settings(settings, client)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            queue.ensure_groups()
        except redis.RedisError:
            log.warning("Redis not reachable at start; /health/ready will say so")
        worker = thread = None
        if settings.embedded:
            from workers.worker import Worker

            worker = Worker(queue, settings, worker_id="embedded")
            thread = threading.Thread(target=worker.run, name="embedded-worker", daemon=True)
            thread.start()
        try:
            yield
        finally:
            if worker is not None and thread is not None:
                worker.stop()
                thread.join(timeout=10)

    app = FastAPI(
        title="certified-attention",
        version="0.1.0",
        summary="Attention, tensor attention and LoRA gradients with certified error bounds.",
        lifespan=lifespan,
    )
    app.state.queue = queue
    app.state.settings = settings

    @app.exception_handler(ServiceError)
    @app.exception_handler(compute.ComputeError)
    @app.exception_handler(redis.RedisError)
    async def service_error(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body"))
        msg = f"{loc}: {first.get('msg')}" if loc else str(first.get("msg"))
        return JSONResponse(error_body("invalid_input", msg), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(
            error_body(code, str(exc.detail)), status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(Exception)
    async def unhandled(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(exc)

    app.include_router(_build_router())

    @app.get("/health/live", response_model=HealthPublic, tags=["health"])
    @app.get("/v2/health/live", include_in_schema=False)
    async def live() -> dict[str, Any]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/health/ready", response_model=HealthPublic, tags=["health"])
    @app.get("/v2/health/ready", include_in_schema=False)
    async def ready(queue: QueueDep) -> JSONResponse:
        """Redis reachable and at least one worker with a current lease."""
        ok = await run_in_threadpool(queue.ping)
        workers = len(await run_in_threadpool(queue.live_workers)) if ok else 0
        good = ok and workers > 0
        body = {"status": "ok" if good else "unavailable", "redis": ok, "workers": workers}
        return JSONResponse(body, status_code=200 if good else 503)

    @app.get("/metrics", tags=["health"])
    async def prometheus(queue: QueueDep) -> Response:
        """Prometheus text format."""
        try:
            await run_in_threadpool(metrics.refresh_from_redis, queue)
        except redis.RedisError:
            log.warning("metrics: Redis unreachable")
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, summary=app.summary, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for spec in OPS.values():
            js = spec.request.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in js.pop("$defs", {}).items():
                components.setdefault(name, sub)
            components[spec.request.__name__] = js
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


app = create_app()
