"""The ``/v1`` routes: submit (JSON or safetensors), the job, its result, cancel, the planner."""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

import compute
from app.api.deps import SettingsDep, context, deadline, within
from app.api.models import ErrorBody, JobPublic, PlanPublic, ResultPublic
from app.api.requests import (
    OpSpec,
    parse_binary,
    parse_json,
    plan_model,
    plan_model_of_all,
    specs,
    validation_message,
)
from app.api.responses import JSONResponse, job_public
from app.jobs import metrics
from app.jobs.codec import DATATYPES, RawTensor, decode_safetensors, encode_safetensors
from app.jobs.errors import (
    InvalidInput,
    JobNotFinished,
    PayloadTooLarge,
    QueueFull,
    UnsupportedMediaType,
    error_body,
)
from app.jobs.notify import Completions
from app.jobs.queue import AsyncQueue
from app.jobs.records import TERMINAL, body_digest, outputs_of, retry_after
from app.jobs.settings import Settings

__all__ = ["BINARY", "JSON", "build_router"]

JSON = "application/json"
BINARY = "application/octet-stream"
# Bodies and results up to this size are parsed and encoded on the event loop (well under a
# millisecond); larger ones in the thread pool, so that no request holds the loop for long.
INLINE_BYTES = 64 << 10


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
        if sem.locked():  # no slot free: wait for one (a free one is taken without a timer)
            async with asyncio.timeout(wait):
                await sem.acquire()
        else:
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
    reading = queue.memory_cached()  # read at most once a second: most requests await nothing
    if reading is None:
        reading = await within(deadline(settings), queue.memory())
    used, limit = reading
    if limit and used + nbytes > (1.0 - settings.redis_memory_reserve) * limit:
        metrics.REJECTED.labels("memory").inc()
        raise QueueFull(
            f"Redis memory is {100 * used / limit:.0f}% used; new inputs may use up to "
            f"{100 * (1 - settings.redis_memory_reserve):.0f}% (REDIS_MEMORY_RESERVE); "
            "retry after jobs finish"
        )


def prefer_wait(request: Request) -> float:
    """Seconds from ``Prefer: wait=N`` (RFC 7240), at most 60; 0 when absent or malformed."""
    for pref in request.headers.get("prefer", "").split(","):
        name, _, value = pref.strip().partition("=")
        if name.strip().lower() == "wait":
            try:
                seconds = float(value.strip().strip('"'))
            except ValueError:
                return 0.0
            return min(max(seconds, 0.0), 60.0) if math.isfinite(seconds) else 0.0
    return 0.0


async def await_end(
    request: Request,
    queue: AsyncQueue,
    settings: Settings,
    job_id: str,
    owner: str,
    seconds: float,
    ended: asyncio.Event,
    job: dict[str, Any] | None = None,
    outputs: bool = False,
) -> dict[str, Any]:
    """The job once it ended or ``seconds`` passed, woken by its completion event (no polling;
    ``ended`` is the waiter registered before the job was read or created). With ``outputs``,
    a re-read after the event brings a succeeded job's outputs in the same call."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    if job is None:
        job = await within(deadline(settings), queue.get_job(job_id, owner=owner))
    while job["status"] not in TERMINAL and (left := end - loop.time()) > 0:
        try:
            async with asyncio.timeout(left):
                await ended.wait()
        except TimeoutError:
            pass
        # cleared before the re-read: an end announced after it is seen by the next wait, one
        # announced before it is in what the re-read returns (clearing before the wait could
        # drop an announcement that came while the job was being read or submitted)
        ended.clear()
        # outputs may be as large as an input (MAX_BODY_BYTES): time to move them
        limit = deadline(settings, settings.max_body_bytes if outputs else 0)
        job = await within(limit, queue.get_job(job_id, owner=owner, outputs=outputs))
    return job


async def result_response(
    request: Request,
    job: dict[str, Any],
    outputs: dict[str, RawTensor],
    *,
    with_job: bool,
    headers: dict[str, str] | None = None,
) -> Response:
    """Outputs and summary, as safetensors (``Accept: application/octet-stream``) or JSON; with
    ``with_job`` the job record comes along (the one-round-trip answer of ``Prefer: wait``)."""
    if BINARY in request.headers.get("accept", ""):
        meta = {"id": job["id"], "op": job["op"], "summary": json.dumps(job["summary"])}
        if with_job:
            meta["job"] = json.dumps(job_public(job))
        if sum(len(t.data) for t in outputs.values()) <= INLINE_BYTES:
            body = encode_safetensors(outputs, meta)
        else:
            body = await run_in_threadpool(encode_safetensors, outputs, meta)
        return Response(body, media_type=BINARY, headers=headers)

    def as_json() -> dict[str, Any]:
        content = job_public(job) if with_job else {"id": job["id"]}
        content["outputs"] = {n: t.to_json() for n, t in outputs.items()}
        content["summary"] = job["summary"]
        return content

    if sum(len(t.data) for t in outputs.values()) * 8 <= INLINE_BYTES:
        return JSONResponse(as_json(), headers=headers)
    return JSONResponse(await run_in_threadpool(as_json), headers=headers)


def _submit_route(spec: OpSpec) -> Any:
    async def submit(request: Request) -> Response:
        queue, settings, owner = context(request)
        ctype = _content_type(request)
        if ctype not in (JSON, BINARY):
            raise UnsupportedMediaType(
                f"Content-Type {ctype or '(none)'!r}: use {JSON} or {BINARY} (safetensors)"
            )
        idem = _idempotency_key(request)
        hold = prefer_wait(request)
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

            # a small body parses in well under a millisecond: a thread hop would cost more
            if len(body) <= INLINE_BYTES:
                params, tensors, digest = parse()
            else:
                params, tensors, digest = await run_in_threadpool(parse)
            nbytes = sum(len(t.data) for t in tensors.values())
            await _check_memory(queue, settings, nbytes)
            job_id = uuid.uuid4().hex
            completions: Completions = request.app.state.completions
            with completions.waiter(job_id) as ended:  # before the job exists: no end is missed
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
                            job_id=job_id,
                        ),
                    )
                except QueueFull:
                    metrics.REJECTED.labels("budget").inc()
                    raise
                job = sub.job
                if hold and not sub.replayed:
                    job = await await_end(
                        request, queue, settings, job_id, owner, hold, ended, job=job, outputs=True
                    )
        headers = {"Location": f"/v1/jobs/{job['id']}"}
        if hold:
            headers["Preference-Applied"] = f"wait={hold:g}"
        if sub.replayed:
            headers["Idempotent-Replayed"] = "true"
        else:
            metrics.child(
                metrics.JOBS_SUBMITTED, spec.name, "json" if ctype == JSON else "binary"
            ).inc()
            metrics.child(metrics.BYTES_STORED, "input").inc(nbytes)
        if job["status"] == "succeeded":
            if "_blobs" in job:  # read with the job once it ended: no second round trip
                done, outputs = outputs_of(job)
            else:
                done, outputs = await within(
                    deadline(settings, _output_bytes(job)),
                    queue.get_outputs(job["id"], owner=owner),
                )
            return await result_response(request, done, outputs, with_job=True, headers=headers)
        if job["status"] in TERMINAL:
            return JSONResponse(job_public(job), status_code=200, headers=headers)
        headers["Retry-After"] = "1"
        return JSONResponse(job_public(job), status_code=202, headers=headers)

    submit.__name__ = f"submit_{spec.name.replace('-', '_')}"
    submit.__doc__ = (
        f"Queue a {spec.name} job. Body: JSON ({spec.request.__name__}) or, for large inputs, "
        "`application/octet-stream` safetensors with tensors named as the JSON fields "
        "(`adapters.q.a` for nested ones) and the scalar parameters in `__metadata__`. "
        "Answers 202 with `Location: /v1/jobs/{id}` once the job and its inputs are in Redis. "
        "`Prefer: wait=N` (RFC 7240, N <= 60) holds the answer until the job ends: 200 with the "
        "job record and, when it succeeded, its outputs and summary (safetensors with "
        "`Accept: application/octet-stream`), or 202 as usual when N seconds pass first. "
        "An `Idempotency-Key` header makes a retried submit return the same job."
    )
    return submit


def _output_bytes(job: dict[str, Any]) -> int:
    return sum(
        math.prod(m["shape"]) * DATATYPES[m["datatype"]].itemsize for m in job["outputs"].values()
    )


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


_DTYPE_NAMES = {"FP16": "float16", "BF16": "bfloat16", "FP32": "float32", "FP64": "float64"}


def _plan_parameters(ops: dict[str, OpSpec]) -> list[dict[str, Any]]:
    """The OpenAPI query parameters of ``/v1/plan``: ``op`` and every planner argument."""
    params: dict[str, dict[str, Any]] = {
        "op": {
            "name": "op",
            "in": "query",
            "required": True,
            "schema": {"type": "string", "enum": sorted(ops)},
        }
    }
    for name, spec in ops.items():
        schema = plan_model(spec.op).model_json_schema()
        required = set(schema.get("required", ()))
        for arg, sub in schema["properties"].items():
            entry = params.setdefault(
                arg,
                {"name": arg, "in": "query", "required": False, "schema": sub, "ops": []},
            )
            entry["ops"].append(name)
            if arg in required and len(ops) == len(entry["ops"]):
                entry["required"] = True
    out = []
    for entry in params.values():
        names = entry.pop("ops", None)
        if names is not None and len(names) < len(ops):
            entry["description"] = "for " + ", ".join(names)
        out.append(entry)
    return out


def build_router() -> APIRouter:
    router = APIRouter(prefix="/v1", responses=_ERRORS)  # access: app.api.guard
    for spec in specs().values():
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
        wait: Annotated[float, Query(ge=0, le=60, description="long-poll up to this many s")] = 0,
    ) -> Response:
        """The job record; with ``wait`` the answer is held until the job ends or time is up."""
        queue, settings, owner = context(request)
        completions: Completions = request.app.state.completions
        with completions.waiter(job_id) as ended:
            job = await await_end(request, queue, settings, job_id, owner, wait, ended)
        headers = {} if job["status"] in TERMINAL else {"Retry-After": str(retry_after(job))}
        return JSONResponse(job_public(job), headers=headers)

    @router.get(
        "/jobs/{job_id}/result",
        response_model=ResultPublic,
        tags=["jobs"],
        responses={200: {"content": {BINARY: {"schema": {"type": "string", "format": "binary"}}}}},
    )
    async def get_result(job_id: str, request: Request) -> Response:
        """Outputs and summary; ``Accept: application/octet-stream`` gives safetensors."""
        queue, settings, owner = context(request)
        job = await within(deadline(settings), queue.get_job(job_id, owner=owner))
        try:
            job, outputs = await within(
                deadline(settings, _output_bytes(job)), queue.get_outputs(job_id, owner=owner)
            )
        except JobNotFinished as exc:
            return JSONResponse(
                error_body(exc.code, exc.message),
                status_code=409,
                headers={"Retry-After": str(retry_after(job))},
            )
        return await result_response(request, job, outputs, with_job=False)

    @router.delete("/jobs/{job_id}", response_model=JobPublic, tags=["jobs"])
    async def cancel_job(job_id: str, request: Request) -> Response:
        """Cancel: a queued job never runs (200); a running one stops at its next block (202)."""
        queue, settings, owner = context(request)
        job = await within(deadline(settings), queue.cancel(job_id, owner=owner))
        if job["status"] in ("succeeded", "failed"):
            return JSONResponse(
                error_body("job_finished", f"job {job_id} already {job['status']}"), status_code=409
            )
        return JSONResponse(job_public(job), status_code=202 if job["status"] == "running" else 200)

    ops = specs()
    every = plan_model_of_all(op.op for op in ops.values())

    @router.get(
        "/plan",
        response_model=PlanPublic,
        tags=["plan"],
        openapi_extra={"parameters": _plan_parameters(ops)},
    )
    async def plan(request: Request) -> Response:
        """What the planner would do for these sizes, and why, without running anything.

        ``op`` names the operation; the other query parameters are that operation's planner
        arguments (each listed with the operations that take it)."""
        query = dict(request.query_params)
        name = query.pop("op", None)
        if "dtype" in query:  # the tensors' spelling (FP32) is accepted too
            query["dtype"] = _DTYPE_NAMES.get(query["dtype"].upper(), query["dtype"])
        if name not in ops:
            raise InvalidInput(f"unknown operation {name!r}; one of {sorted(ops)}", field="op")
        op = ops[name].op
        try:
            every.model_validate(query)  # each documented argument well-formed, used or not
            inputs = plan_model(op).model_validate(query).model_dump()
        except ValidationError as exc:
            raise InvalidInput(validation_message(exc)) from None
        try:
            p = await run_in_threadpool(lambda: op.plan(**inputs))
        except compute.ComputeError:
            raise
        except (ValueError, ArithmeticError) as exc:  # values no plan can be made for
            raise InvalidInput(f"no plan for these values: {exc}") from None
        return JSONResponse({"op": name, "inputs": inputs, "plan": p.to_dict()})

    @router.post(
        "/plan",
        response_model=PlanPublic,
        tags=["plan"],
        openapi_extra={
            "parameters": [
                {
                    "name": "op",
                    "in": "query",
                    "required": True,
                    "schema": {"type": "string", "enum": sorted(ops)},
                }
            ],
            "requestBody": {
                "required": True,
                "content": {
                    JSON: {"schema": {"description": "the body of POST /v1/{op}"}},
                    BINARY: {"schema": {"type": "string", "format": "binary"}},
                },
            },
        },
    )
    async def plan_for_tensors(request: Request, settings: SettingsDep) -> Response:
        """The plan for these tensors: the certified radius R (and rho) computed from them
        (``compute.radius``) and what the planner would do at it, nothing queued or run.

        ``op`` names the operation; the body is that operation's job, exactly as ``POST
        /v1/{op}`` takes it (JSON or safetensors). The answer adds ``radius`` to the GET
        answer; ``inputs`` are the planner's arguments for these tensors."""
        name = request.query_params.get("op")
        if name not in ops:
            raise InvalidInput(f"unknown operation {name!r}; one of {sorted(ops)}", field="op")
        spec = ops[name]
        params, tensors = await _parsed_body(request, spec, settings)

        def work() -> tuple[compute.Radius, dict[str, Any], compute.Plan]:
            t = {n: raw.to_torch() for n, raw in tensors.items()}
            r = compute.radius(name, t, params)
            args = {**r.plan_args, "eps": params["eps"], "method": params["method"]}
            return r, args, spec.op.plan(**args)

        try:
            r, args, p = await run_in_threadpool(work)
        except compute.ComputeError:
            raise
        except (ValueError, ArithmeticError) as exc:
            raise InvalidInput(f"no plan for these values: {exc}") from None
        body = {"op": name, "inputs": r.to_dict()["plan_args"], "radius": r.to_dict()}
        body["inputs"].update(eps=args["eps"], method=args["method"])
        body["plan"] = p.to_dict()
        return JSONResponse(body)

    return router


async def _parsed_body(
    request: Request, spec: OpSpec, settings: Settings
) -> tuple[dict[str, Any], dict[str, RawTensor]]:
    """A job's body (JSON or safetensors) read within the upload limits and validated, as the
    submit route reads it."""
    ctype = _content_type(request)
    if ctype not in (JSON, BINARY):
        raise UnsupportedMediaType(
            f"Content-Type {ctype or '(none)'!r}: use {JSON} or {BINARY} (safetensors)"
        )
    if ctype == JSON and settings.max_json_body_bytes < settings.max_body_bytes:
        limit, setting = settings.max_json_body_bytes, "MAX_JSON_BODY_BYTES"
    else:
        limit, setting = settings.max_body_bytes, "MAX_BODY_BYTES"
    async with upload_slot(request.app.state.uploads, settings.upload_wait_seconds):
        body = await read_body(request, limit, setting)

        def parse() -> tuple[dict[str, Any], dict[str, RawTensor]]:
            if ctype == JSON:
                return parse_json(spec, body, max_elements=settings.max_elements)
            raw, meta = decode_safetensors(body, max_elements=settings.max_elements)
            return parse_binary(spec, raw, meta)

        if len(body) <= INLINE_BYTES:
            return parse()
        return await run_in_threadpool(parse)
