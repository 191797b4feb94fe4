"""The HTTP API: ``uvicorn app.main:app`` (or ``python -m app``).

Submit (``POST /v1/{op}``, JSON or safetensors) -> 202 + ``Location: /v1/jobs/{id}``; poll the job;
fetch the result (JSON or safetensors); cancel; ask the planner; health and metrics. With
``EMBEDDED=1`` the app also runs one worker thread on an in-process Redis (fakeredis).

Every Redis call is made on the asyncio client under a deadline, so a down or hung Redis gives a
503 within about two seconds and never blocks ``/health/live``; parsing and encoding of tensors
run in the thread pool.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import math
import threading
from collections.abc import AsyncIterator, Awaitable, MutableMapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar

import redis
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

import compute
from app import metrics
from app.errors import (
    Forbidden,
    InvalidInput,
    JobNotFinished,
    OpenAccessRefused,
    PayloadTooLarge,
    QueueFull,
    QueueUnavailable,
    ServiceError,
    UnsupportedMediaType,
    error_body,
    http_status,
)
from app.models import ErrorBody, HealthPublic, JobPublic, PlanPublic, ResultPublic
from app.notify import Completions
from app.ops import OPS, OpSpec, parse_binary, parse_json
from app.queue import OPS as QUEUE_OPS
from app.queue import TERMINAL, AsyncQueue, body_digest, retry_after
from app.settings import Settings, get_settings
from app.tensors import DATATYPES, RawTensor, decode_safetensors, encode_safetensors

__all__ = ["app", "create_app"]

log = logging.getLogger("app")

JSON = "application/json"
BINARY = "application/octet-stream"
T = TypeVar("T")


# ---------------------------------------------------------------------------------- dependencies
def get_queue(request: Request) -> AsyncQueue:
    queue: AsyncQueue = request.app.state.queue
    return queue


def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


QueueDep = Annotated[AsyncQueue, Depends(get_queue)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]


def owner_of(key: str) -> str:
    """The owner id a key's jobs are stored under (a digest: the key itself is never stored)."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def authorize(headers: MutableMapping[str, str] | Any, settings: Settings) -> str:
    """The caller's owner id ('' when the service is open); Forbidden on a missing/wrong key."""
    keys = settings.api_keys
    if not keys:
        return ""
    given = headers.get("authorization", "")
    for key in keys:
        if hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            return owner_of(key)
    raise Forbidden("missing or wrong API key (Authorization: Bearer <key>)")


def caller(request: Request, settings: SettingsDep) -> str:
    return authorize(request.headers, settings)


CallerDep = Annotated[str, Depends(caller)]


# ---------------------------------------------------------------------------------- helpers
def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat() if ts is not None else None


def job_public(job: dict[str, Any]) -> dict[str, Any]:
    view = {k: job.get(k) for k in JobPublic.model_fields}
    for k in ("created_at", "started_at", "finished_at"):
        view[k] = _iso(job.get(k))
    return JobPublic.model_validate(view).model_dump(mode="json")


def _redis_message(exc: redis.RedisError) -> str:
    """A message for a Redis failure that never echoes Redis's own text (commands, keys)."""
    if isinstance(exc, redis.exceptions.OutOfMemoryError) or str(exc).startswith("OOM"):
        return "the job queue's storage is full; retry later"
    return "the job queue (Redis) is unavailable; retry shortly"


def _error_response(exc: BaseException) -> JSONResponse:
    status, code = http_status(exc)
    if isinstance(exc, redis.RedisError):
        metrics.REDIS_ERRORS.labels("api", type(exc).__name__).inc()
        log.warning("Redis error: %s: %s", type(exc).__name__, exc)
        message = _redis_message(exc)
    else:
        message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    if status >= 500 and code == "internal_error":
        log.error("unhandled error", exc_info=exc)
        message = "internal error"
    headers: dict[str, str] = {}
    if status in (429, 503):
        headers["Retry-After"] = "5" if status == 503 else "2"
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="certified-attention"'
    return JSONResponse(error_body(code, message), status_code=status, headers=headers or None)


async def within(seconds: float, work: Awaitable[T]) -> T:
    """``await work`` under a deadline; a Redis that does not answer in time is a 503."""
    try:
        async with asyncio.timeout(seconds):
            return await work
    except TimeoutError:
        metrics.REDIS_ERRORS.labels("api", "deadline").inc()
        raise QueueUnavailable(
            f"the job queue (Redis) did not answer within {seconds:g} s; retry shortly"
        ) from None


def deadline(settings: Settings, nbytes: int = 0) -> float:
    """The time one request's Redis work may take: 1.5x the socket timeout, plus transfer."""
    return 1.5 * settings.redis_timeout_seconds + nbytes / 100e6


async def read_body(request: Request, limit: int, setting: str) -> bytearray:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` (never read whole)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise InvalidInput("not an integer", field="Content-Length") from None
        if size > limit:
            raise PayloadTooLarge(f"body of {size} bytes exceeds the limit of {limit} ({setting})")
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes ({setting})")
    return buf


def _content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


@asynccontextmanager
async def upload_slot(sem: asyncio.Semaphore, wait: float) -> AsyncIterator[None]:
    """One of MAX_CONCURRENT_UPLOADS slots for reading and parsing a body, or 429."""
    try:
        async with asyncio.timeout(wait):
            await sem.acquire()
    except TimeoutError:
        metrics.REJECTED.labels("uploads").inc()
        raise QueueFull(
            "too many uploads in progress (MAX_CONCURRENT_UPLOADS); retry shortly"
        ) from None
    try:
        yield
    finally:
        sem.release()


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not 1 <= len(key) <= 255 or not key.isprintable():
        raise InvalidInput("must be 1 to 255 printable characters", field="Idempotency-Key")
    return key


async def _check_memory(queue: AsyncQueue, settings: Settings, nbytes: int) -> None:
    """Keep REDIS_MEMORY_RESERVE of maxmemory free of new inputs (for leases and results)."""
    used, limit = await within(deadline(settings), queue.memory())
    if limit and used + nbytes > (1.0 - settings.redis_memory_reserve) * limit:
        metrics.REJECTED.labels("memory").inc()
        raise QueueFull(
            f"Redis memory is {100 * used / limit:.0f}% used; new inputs may use up to "
            f"{100 * (1 - settings.redis_memory_reserve):.0f}% (REDIS_MEMORY_RESERVE); "
            "retry after jobs finish"
        )


def _submit_route(spec: OpSpec) -> Any:
    async def submit(
        request: Request, queue: QueueDep, settings: SettingsDep, owner: CallerDep
    ) -> Response:
        ctype = _content_type(request)
        if ctype not in (JSON, BINARY):
            raise UnsupportedMediaType(
                f"Content-Type {ctype or '(none)'!r}: use {JSON} or {BINARY} (safetensors)"
            )
        idem = _idempotency_key(request)
        if ctype == JSON and settings.max_json_body_bytes < settings.max_body_bytes:
            limit, setting = settings.max_json_body_bytes, "MAX_JSON_BODY_BYTES; send large "
            setting += "tensors as application/octet-stream safetensors"
        else:
            limit, setting = settings.max_body_bytes, "MAX_BODY_BYTES"
        async with upload_slot(request.app.state.uploads, settings.upload_wait_seconds):
            body = await read_body(request, limit, setting)

            def parse() -> tuple[dict[str, Any], dict[str, RawTensor], str]:
                if ctype == JSON:
                    params, tensors = parse_json(spec, body, max_elements=settings.max_elements)
                else:
                    raw, meta = decode_safetensors(body, max_elements=settings.max_elements)
                    params, tensors = parse_binary(spec, raw, meta)
                digest = body_digest(spec.name, ctype, bytes(body)) if idem else ""
                return params, tensors, digest

            params, tensors, digest = await run_in_threadpool(parse)
            nbytes = sum(len(t.data) for t in tensors.values())
            await _check_memory(queue, settings, nbytes)
            try:
                sub = await within(
                    deadline(settings, nbytes),
                    queue.submit(
                        spec.name,
                        params,
                        tensors,
                        idempotency_key=idem,
                        digest=digest,
                        owner=owner,
                    ),
                )
            except QueueFull:
                metrics.REJECTED.labels("budget").inc()
                raise
        job = sub.job
        headers = {"Location": f"/v1/jobs/{job['id']}", "Retry-After": "1"}
        if sub.replayed:
            headers["Idempotent-Replayed"] = "true"
        else:
            metrics.JOBS_SUBMITTED.labels(spec.name, "json" if ctype == JSON else "binary").inc()
            metrics.BYTES_STORED.labels("input").inc(nbytes)
        return JSONResponse(job_public(job), status_code=202, headers=headers)

    submit.__name__ = f"submit_{spec.name.replace('-', '_')}"
    submit.__doc__ = (
        f"Queue a {spec.name} job. Body: JSON ({spec.request.__name__}) or, for large inputs, "
        "`application/octet-stream` safetensors with tensors named as the JSON fields "
        "(`adapters.q.a` for nested ones) and the scalar parameters in `__metadata__`. "
        "Answers 202 with `Location: /v1/jobs/{id}` once the job and its inputs are in Redis. "
        "An `Idempotency-Key` header makes a retried submit return the same job."
    )
    return submit


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413, 415, 422, 429, 503)
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
    router = APIRouter(prefix="/v1", dependencies=[Depends(caller)], responses=_ERRORS)
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
        request: Request,
        queue: QueueDep,
        settings: SettingsDep,
        owner: CallerDep,
        wait: Annotated[float, Query(ge=0, le=60, description="long-poll up to this many s")] = 0,
    ) -> Response:
        """The job record; with ``wait`` the answer is held until the job ends or time is up."""
        completions: Completions = request.app.state.completions
        loop = asyncio.get_running_loop()
        end = loop.time() + wait
        with completions.waiter(job_id) as ended:
            job = await within(deadline(settings), queue.get_job(job_id, owner=owner))
            while job["status"] not in TERMINAL and (left := end - loop.time()) > 0:
                ended.clear()
                try:
                    async with asyncio.timeout(left):
                        await ended.wait()
                except TimeoutError:
                    pass
                job = await within(deadline(settings), queue.get_job(job_id, owner=owner))
        headers = {} if job["status"] in TERMINAL else {"Retry-After": str(retry_after(job))}
        return JSONResponse(job_public(job), headers=headers)

    @router.get(
        "/jobs/{job_id}/result",
        response_model=ResultPublic,
        tags=["jobs"],
        responses={200: {"content": {BINARY: {"schema": {"type": "string", "format": "binary"}}}}},
    )
    async def get_result(
        job_id: str, request: Request, queue: QueueDep, settings: SettingsDep, owner: CallerDep
    ) -> Response:
        """Outputs and summary; ``Accept: application/octet-stream`` gives safetensors."""
        job = await within(deadline(settings), queue.get_job(job_id, owner=owner))
        nbytes = sum(
            math.prod(m["shape"]) * DATATYPES[m["datatype"]].itemsize
            for m in job["outputs"].values()
        )
        try:
            job, outputs = await within(
                deadline(settings, nbytes), queue.get_outputs(job_id, owner=owner)
            )
        except JobNotFinished as exc:
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

        def as_json() -> dict[str, Any]:
            return {
                "id": job_id,
                "outputs": {n: t.to_json() for n, t in outputs.items()},
                "summary": job["summary"],
            }

        return JSONResponse(await run_in_threadpool(as_json))

    @router.delete("/jobs/{job_id}", response_model=JobPublic, tags=["jobs"])
    async def cancel_job(
        job_id: str, queue: QueueDep, settings: SettingsDep, owner: CallerDep
    ) -> Response:
        """Cancel: a queued job never runs (200); a running one stops at its next block (202)."""
        job = await within(deadline(settings), queue.cancel(job_id, owner=owner))
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
        radius: Annotated[float, Query(ge=0, le=1e4, allow_inf_nan=False)],
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
            planner: Any = compute.plan_attention
        elif op == "tensor-attention":
            inputs = {**common, "dv": dv}
            planner = compute.plan_tensor_attention
        else:
            inputs = {**common, "rank": rank, "full": full}
            planner = compute.plan_lora_gradient
        try:
            p = await run_in_threadpool(lambda: planner(**inputs))
        except compute.ComputeError:
            raise
        except (ValueError, ArithmeticError) as exc:  # values no plan can be made for
            raise InvalidInput(f"no plan for these values: {exc}") from None
        return JSONResponse({"op": op, "inputs": inputs, "plan": p.to_dict()})

    return router


# ---------------------------------------------------------------------------------- middleware
_DOCS = frozenset({"/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"})
_HEALTH = frozenset({"/health/live", "/health/ready", "/v2/health/live", "/v2/health/ready"})


def _loopback(host: str | None) -> bool:
    """Whether the local address a request arrived on is loopback (servers report IPs; a unix
    socket or an in-process test transport has no IP and counts as local)."""
    try:
        return host is None or ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return True


class Guard:
    """Pure ASGI middleware: access rules outside the /v1 routes, and responses by status.

    - No API key and no ALLOW_OPEN: requests that arrive on a non-loopback address are refused
      (403), health checks excepted (``python -m app`` refuses to start in that configuration).
    - With a key, PROTECT_METRICS / PROTECT_DOCS extend it to /metrics and the OpenAPI pages.
    """

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        refusal = self._refusal(scope, path)
        status_box = [500]

        async def sending(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status_box[0] = int(message["status"])
            await send(message)

        try:
            if refusal is not None:
                await _error_response(refusal)(scope, receive, sending)
            else:
                await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or ("other" if path not in _HEALTH else path)
            metrics.HTTP_RESPONSES.labels(template, str(status_box[0])).inc()

    def _refusal(self, scope: MutableMapping[str, Any], path: str) -> ServiceError | None:
        s = self.settings
        if path in _HEALTH:
            return None
        if not s.api_keys:
            server = scope.get("server")
            if not s.allow_open and not _loopback(server[0] if server else None):
                return OpenAccessRefused(
                    "this service has no API_KEY and refuses requests that arrive on a "
                    "non-loopback address; set API_KEY (or ALLOW_OPEN=1 to serve openly)"
                )
            return None
        protected = (path == "/metrics" and s.protect_metrics) or (path in _DOCS and s.protect_docs)
        if protected:
            headers = {
                k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]
            }
            try:
                authorize(headers, s)
            except Forbidden as exc:
                return exc
        return None


# ---------------------------------------------------------------------------------- the app
def create_app(settings: Settings | None = None, *, client: Any = None) -> FastAPI:
    """The API; ``client`` overrides the asyncio Redis client (tests)."""
    settings = settings or get_settings()
    queue = AsyncQueue.from_settings(settings, client)
    completions = Completions(queue.r)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.api_keys:
            log.warning(
                "API_KEY is empty: the API is open to anyone who can reach it%s",
                "" if settings.allow_open else " (non-loopback requests are refused)",
            )
        try:
            await within(deadline(settings), queue.ensure_groups())
        except (redis.RedisError, ServiceError):
            log.warning("Redis not reachable at start; /health/ready will say so")
        completions.start()
        worker = thread = None
        if settings.embedded:
            from app.queue import Queue
            from workers.worker import Worker

            worker = Worker(Queue.from_settings(settings), settings, worker_id="embedded")
            thread = threading.Thread(target=worker.run, name="embedded-worker", daemon=True)
            thread.start()
        try:
            yield
        finally:
            if worker is not None and thread is not None:
                worker.stop()
                await run_in_threadpool(thread.join, 10)
            await completions.stop()
            await queue.r.aclose()

    app = FastAPI(
        title="certified-attention",
        version="0.1.0",
        summary="Attention, tensor attention and LoRA gradients with certified error bounds.",
        lifespan=lifespan,
    )
    app.state.queue = queue
    app.state.settings = settings
    app.state.completions = completions
    app.state.uploads = asyncio.Semaphore(settings.max_concurrent_uploads)

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
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # every method of the path, not only the first route's
            allowed: set[str] = set()
            for route in app.router.routes:
                if route.matches(request.scope)[0] != Match.NONE:
                    allowed |= set(getattr(route, "methods", None) or ()) - {"HEAD"}
            headers["Allow"] = ", ".join(sorted(allowed))
        return JSONResponse(
            error_body(code, str(exc.detail)), status_code=exc.status_code, headers=headers
        )

    @app.exception_handler(Exception)
    async def unhandled(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(exc)

    app.include_router(_build_router())

    @app.get("/health/live", response_model=HealthPublic, tags=["health"])
    @app.get("/v2/health/live", include_in_schema=False)
    async def live() -> dict[str, Any]:
        """The process is up (never touches Redis)."""
        return {"status": "ok"}

    @app.get("/health/ready", response_model=HealthPublic, tags=["health"])
    @app.get("/v2/health/ready", include_in_schema=False)
    async def ready(queue: QueueDep) -> JSONResponse:
        """Redis reachable, every consumer group present and a worker with a current lease."""
        try:
            st = await within(deadline(settings), queue.status(QUEUE_OPS))
        except (redis.RedisError, ServiceError):
            body = {"status": "unavailable", "redis": False, "workers": 0, "groups": False}
            return JSONResponse(body, status_code=503)
        groups = all(st.groups.values())
        if not groups:  # Redis lost them (FLUSHALL, failover): create them again, say not ready
            missing = [op for op, ok in st.groups.items() if not ok]
            log.warning("consumer groups missing in Redis: %s; creating them", ",".join(missing))
            try:
                await within(deadline(settings), queue.ensure_groups(missing))
                metrics.GROUPS_RECREATED.labels("api").inc(len(missing))
            except (redis.RedisError, ServiceError):
                pass
        good = groups and len(st.workers) > 0
        body = {
            "status": "ok" if good else "unavailable",
            "redis": True,
            "workers": len(st.workers),
            "groups": groups,
        }
        return JSONResponse(body, status_code=200 if good else 503)

    @app.get(
        "/metrics",
        tags=["health"],
        response_class=PlainTextResponse,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def prometheus(queue: QueueDep) -> Response:
        """Prometheus text format."""
        try:
            metrics.set_from_status(await within(deadline(settings), queue.status(QUEUE_OPS)))
        except (redis.RedisError, ServiceError) as exc:
            log.warning("metrics: Redis unreachable (%s)", type(exc).__name__)
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
    app.add_middleware(Guard, settings=settings)
    return app


app = create_app()
