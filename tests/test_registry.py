"""The operation registry drives the service: a toy operation registered in a test runs end to
end through the real API, queue and worker (JSON and safetensors, ``/v1/plan``, the client)
without a line of service code knowing about it; and each operation's shape rule is the same
for the service and the library."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import compute
from compute.registry import OPERATIONS, Operation, Scalar, TensorArg, register

pytestmark = pytest.mark.redis


def _toy_shapes(shapes: Mapping[str, Any]) -> None:
    if list(shapes["x"]) != list(shapes["y"]):
        raise compute.InvalidInputError(
            "y.shape", f"must equal x's {list(shapes['x'])}, got {list(shapes['y'])}"
        )


def _toy_run(
    t: Mapping[str, torch.Tensor], p: Mapping[str, Any], progress: Any
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    out = t["x"] * p["alpha"] + t["y"]
    if progress is not None:
        progress(1, 1)
    return {"z": out}, {"method": "exact", "error_bound": 0.0}


def _toy_plan(*, n: int, alpha: float = 1.0) -> compute.Plan:
    return compute.Plan(
        op="toy-axpy",
        method="exact",
        reason=f"axpy of {n} elements with {alpha}",
        radius=0.0,
        rho=0.0,
        n=n,
        d=1,
        eps=0.0,
    )


TOY = Operation(
    name="toy-axpy",
    summary="z = alpha x + y (a test's operation)",
    tensors=(TensorArg("x", "(..., n)"), TensorArg("y", "(..., n)")),
    params=(Scalar("alpha", float, 1.0, "the factor", gt=0),),
    outputs="z, the shape of x",
    check_shapes=_toy_shapes,
    run=_toy_run,
    plan=_toy_plan,
    plan_params=(Scalar("n", int, ge=1), Scalar("alpha", float, 1.0, gt=0)),
)


@pytest.fixture
def toy() -> Iterator[Operation]:
    register(TOY)
    try:
        yield TOY
    finally:
        del OPERATIONS[TOY.name]


def test_a_registered_operation_runs_through_the_whole_service(
    toy: Operation, live_server: Any, start_worker: Any
) -> None:
    import httpx

    from app.client import Client
    from app.jobs.codec import encode_safetensors, from_array

    start_worker()  # consumes every registered operation, the toy one included
    url = live_server()
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    y = np.ones((2, 3), dtype=np.float32)
    t = lambda a: {"shape": list(a.shape), "datatype": "FP32", "data": a.ravel().tolist()}  # noqa: E731
    r = httpx.post(
        f"{url}/v1/toy-axpy",
        json={"x": t(x), "y": t(y), "alpha": 2.0},
        headers={"prefer": "wait=30"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    got = r.json()["outputs"]["z"]
    np.testing.assert_array_equal(np.array(got["data"]).reshape(got["shape"]), 2 * x + y)
    # the shape rule and the parameter constraints are the registry's
    r = httpx.post(f"{url}/v1/toy-axpy", json={"x": t(x), "y": t(y[:1])})
    assert r.status_code == 422 and "y.shape" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/toy-axpy", json={"x": t(x), "y": t(y), "alpha": -1})
    assert r.status_code == 422 and "alpha" in r.json()["error"]["message"]
    # safetensors, the client, the planner route, the OpenAPI document
    body = encode_safetensors({"x": from_array(x), "y": from_array(y)}, {"alpha": "3"})
    r = httpx.post(
        f"{url}/v1/toy-axpy",
        content=body,
        headers={"content-type": "application/octet-stream", "prefer": "wait=30"},
    )
    assert r.status_code == 200 and r.json()["summary"]["method"] == "exact"
    with Client(url, hold=30) as c:
        res = c.submit("toy-axpy", {"x": x, "y": y}, {"alpha": 0.5}).wait(timeout=60)
    np.testing.assert_array_equal(res.outputs["z"], 0.5 * x + y)
    plan = httpx.get(f"{url}/v1/plan", params={"op": "toy-axpy", "n": 6}).json()
    assert "plan" in plan, plan
    assert plan["plan"]["reason"] == "axpy of 6 elements with 1.0"
    spec = httpx.get(f"{url}/openapi.json").json()
    assert "/v1/toy-axpy" in spec["paths"] and "ToyAxpyRequest" in spec["components"]["schemas"]


# ------------------------------------------------------------------------------ one shape rule
dims = st.integers(1, 3)


@st.composite
def attention_shapes(draw: Any) -> dict[str, tuple[int, ...]]:
    lead = tuple(draw(st.lists(st.integers(1, 2), max_size=1)))
    n, m, d, dv = (draw(dims) for _ in range(4))

    def maybe(shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape if draw(st.booleans()) or len(shape) < 2 else (*shape[:-1], shape[-1] + 1)

    return {
        "q": (*lead, n, d),
        "k": maybe((*lead, m, d)),
        "v": maybe((*lead, m, dv)),
    }


@st.composite
def tensor_shapes(draw: Any) -> dict[str, tuple[int, ...]]:
    n, n1, n2, d, dv = (draw(dims) for _ in range(5))
    shapes = {"q": (n, d), "k1": (n1, d), "k2": (n2, d), "v1": (n1, dv), "v2": (n2, dv)}
    if draw(st.booleans()):
        name = draw(st.sampled_from(sorted(shapes)))
        axis = draw(st.sampled_from([0, 1]))
        s = list(shapes[name])
        s[axis] += 1
        shapes[name] = tuple(s)
    return shapes


def _agree(rule: Any, call: Any, shapes: dict[str, tuple[int, ...]]) -> None:
    """The service's rule (on shapes) and the library (on tensors) accept the same inputs."""
    try:
        rule(shapes)
        service_ok = True
    except compute.InvalidInputError:
        service_ok = False
    t = {n: torch.rand(s, dtype=torch.float64) for n, s in shapes.items()}
    try:
        call(t)
        library_ok = True
    except compute.InvalidInputError:
        library_ok = False
    assert service_ok == library_ok, (shapes, service_ok, library_ok)


@settings(max_examples=60, deadline=None)
@given(attention_shapes())
def test_attention_shape_rule_is_the_library_rule(shapes: dict[str, tuple[int, ...]]) -> None:
    _agree(
        OPERATIONS["attention"].check_shapes,
        lambda t: compute.attention(t["q"], t["k"], t["v"], method="exact"),
        shapes,
    )


@settings(max_examples=60, deadline=None)
@given(tensor_shapes())
def test_tensor_attention_shape_rule_is_the_library_rule(
    shapes: dict[str, tuple[int, ...]],
) -> None:
    _agree(
        OPERATIONS["tensor-attention"].check_shapes,
        lambda t: compute.tensor_attention(
            t["q"], t["k1"], t["k2"], t["v1"], t["v2"], method="exact"
        ),
        shapes,
    )


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(1, 2),
    st.sampled_from(["ok", "w_q", "w_v", "a", "b", "rank", "y"]),
)
def test_lora_shape_rule_is_the_library_rule(L: int, dm: int, dh: int, r: int, broken: str) -> None:
    shapes = {
        "x": (L, dm),
        "y": (L, dh + (broken == "y")),
        "w_q": (dm + (broken == "w_q"), dh),
        "w_k": (dm, dh),
        "w_v": (dm, dh + (broken == "w_v")),
    }
    for m in "qv":
        shapes[f"adapters.{m}.a"] = (r, dh + (broken == "a"))
        shapes[f"adapters.{m}.b"] = (dm, r + (broken == "rank") + 0 * (broken == "b"))
    if broken == "b":
        shapes["adapters.q.b"] = (dm + 1, r)

    def call(t: dict[str, torch.Tensor]) -> Any:
        ad = {m: (t[f"adapters.{m}.a"], t[f"adapters.{m}.b"]) for m in "qv"}
        return compute.lora_gradient(
            t["x"],
            t["y"],
            w_q=t["w_q"],
            w_k=t["w_k"],
            w_v=t["w_v"],
            adapters=ad,
            alpha=1.0,
            method="exact",
        )

    _agree(OPERATIONS["lora-gradient"].check_shapes, call, shapes)


def test_the_service_takes_key_sets_of_different_lengths(api: Any, start_worker: Any) -> None:
    """Tensor attention's k1/v1 and k2/v2 may differ in length, in the library and the service."""
    start_worker()
    client = api()
    g = np.random.default_rng(4)
    a = {
        n: (0.4 * g.standard_normal(s)).astype(np.float32)
        for n, s in {"q": (8, 4), "k1": (6, 4), "v1": (6, 3), "k2": (10, 4), "v2": (10, 3)}.items()
    }
    t = lambda x: {"shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}  # noqa: E731
    r = client.post(
        "/v1/tensor-attention", json={n: t(x) for n, x in a.items()}, headers={"prefer": "wait=30"}
    )
    assert r.status_code == 200, r.text
    got = r.json()["outputs"]["output"]
    want = compute.tensor_attention(
        *(torch.from_numpy(a[n]) for n in ("q", "k1", "k2", "v1", "v2"))
    )
    np.testing.assert_allclose(
        np.array(got["data"]).reshape(got["shape"]), want.output.numpy(), rtol=1e-5, atol=1e-6
    )
    assert json.loads(json.dumps(r.json()["summary"]))["method"] in ("exact", "polynomial")
