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
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

import compute
from app.api.deps import QueueDep, deadline, within
from app.api.guard import Guard
from app.api.models import HealthPublic
from app.api.requests import specs
from app.api.responses import error_response
from app.api.routes import build_router
from app.jobs import metrics
from app.jobs.errors import (
    ServiceError,
    error_body,
)
from app.jobs.notify import Completions
from app.jobs.queue import AsyncQueue
from app.jobs.settings import Settings, get_settings

__all__ = [
    "create_app",
]

log = logging.getLogger("app")


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
            from app.jobs.queue import Queue
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
        return error_response(exc)

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
        return error_response(exc)

    app.include_router(build_router())

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
            st = await within(deadline(settings), queue.status())
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
            metrics.set_from_status(await within(deadline(settings), queue.status()))
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
        for spec in specs().values():
            js = spec.request.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in js.pop("$defs", {}).items():
                components.setdefault(name, sub)
            components[spec.request.__name__] = js
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(Guard, settings=settings)
    return app
