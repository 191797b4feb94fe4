"""The public radius functions (compute/radii.py): the certified radius R (and rho) of a user's
tensors, equal to what each operation computes, an upper bound of every score, and the same
number through compute.radius, the service's POST /v1/plan, the client and the CLI."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import compute

F64 = torch.float64


# --------------------------------------------------------------------------- naive references
def centred(k: torch.Tensor) -> torch.Tensor:
    """The keys minus their per-column midrange, in the compute dtype (float32 for every input
    below float64), as the operation centres them (the polynomial path uses these keys)."""
    cd = F64 if k.dtype == F64 else torch.float32
    kc = k.to(cd)
    mid = kc.amax(dim=-2, keepdim=True) * 0.5 + kc.amin(dim=-2, keepdim=True) * 0.5
    return (kc - mid).double()


def naive_attention_radius(q: torch.Tensor, k: torch.Tensor, scale: float) -> float:
    """min(Cauchy-Schwarz, Hölder) of the midrange-centred keys, per slice, max over slices:
    the definition (docs/fast_path.md), written out in float64 loops over slices."""
    q64 = q.double().reshape(-1, q.shape[-2], q.shape[-1])
    k64 = centred(k).reshape(-1, k.shape[-2], k.shape[-1])
    best = 0.0
    for qs, kc in zip(q64, k64, strict=True):
        cs = float(qs.norm(dim=1).max() * kc.norm(dim=1).max())
        holder = float((qs.abs() @ kc.abs().max(dim=0).values).max())
        best = max(best, abs(scale) * min(cs, holder))
    return best


def largest_centred_score(q: torch.Tensor, k: torch.Tensor, scale: float) -> float:
    return float((scale * q.double() @ centred(k).transpose(-1, -2)).abs().max())


def naive_tensor_radius(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, s: float) -> float:
    xs = [x.double().reshape(-1, x.shape[-2], x.shape[-1]) for x in (q, k1, k2)]
    best = 0.0
    for a, b, c in zip(*xs, strict=True):
        two = [float(x.norm(dim=1).max()) for x in (a, b, c)]
        top = [float(x.abs().max()) for x in (a, b, c)]
        opts = [
            two[0] * two[1] * top[2],
            two[0] * top[1] * two[2],
            top[0] * two[1] * two[2],
        ]
        best = max(best, abs(s) * min(opts))
    return best


def largest_triple_score(q: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor, s: float) -> float:
    a, b, c = (x.double() for x in (q, k1, k2))
    return float((s * torch.einsum("...il,...jl,...kl->...ijk", a, b, c)).abs().max())


# --------------------------------------------------------------------------- attention
@settings(max_examples=40, deadline=None)
@given(
    lead=st.sampled_from([(), (2,), (2, 3)]),
    n=st.integers(1, 20),
    m=st.integers(1, 20),
    d=st.sampled_from([1, 2, 8, 16]),
    size=st.floats(0.01, 10.0),
    offset=st.floats(-50.0, 50.0),
    scale=st.one_of(st.none(), st.floats(-3.0, 3.0)),
    dtype=st.sampled_from([torch.float32, F64, torch.float16]),
    seed=st.integers(0, 1000),
)
def test_attention_radius_is_the_definition_and_bounds_every_score(
    lead: tuple[int, ...],
    n: int,
    m: int,
    d: int,
    size: float,
    offset: float,
    scale: float | None,
    dtype: torch.dtype,
    seed: int,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(*lead, n, d, generator=gen, dtype=F64) * size).to(dtype)
    # an offset on the keys: softmax does not see it, and neither does R (centred)
    k = (torch.randn(*lead, m, d, generator=gen, dtype=F64) * size + offset).to(dtype)
    r = compute.attention_radius(q, k, scale=scale)
    s = 1 / math.sqrt(d) if scale is None else scale
    naive = naive_attention_radius(q, k, s)
    assert r.radius == pytest.approx(naive, rel=1e-9, abs=1e-300)
    assert r.radius >= largest_centred_score(q, k, s) * (1 - 1e-12)
    assert r.rho == pytest.approx(r.radius / max(math.log(m), math.log(2)))
    assert (r.op, r.d, r.batch, r.lengths) == ("attention", d, math.prod(lead), {"n": n, "m": m})


def test_attention_radius_is_the_plans_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(3)
    for dtype, causal in itertools.product((torch.float32, F64, torch.bfloat16), (False, True)):
        q = torch.randn(2, 40, 16, generator=gen).to(dtype) * 0.4
        k = torch.randn(2, 60, 16, generator=gen).to(dtype) * 0.4
        v = torch.randn(2, 60, 4, generator=gen).to(dtype)
        res = compute.attention(q, k, v, causal=causal, scale=0.3)
        r = compute.attention_radius(q, k, causal=causal, scale=0.3)
        assert r.radius == res.plan.radius and r.rho == res.plan.rho
        # causal with more keys than queries: only the first n keys count
        assert r.lengths["m"] == (40 if causal else 60)
        p = compute.plan_attention(**r.plan_args, eps=1e-3)
        assert p.radius == r.radius and p.n == r.lengths["m"]


def test_attention_radius_of_typical_heads() -> None:
    """The numbers docs/fast_path.md quotes: N(0, 1) q and k at d = 16 with 1/sqrt(d): R ~ 11,
    exact only; q and k scaled to norm ~1 per row: R <= 2, the polynomial path."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1024, 16, generator=gen) for _ in range(3))
    r = compute.attention_radius(q, k)
    assert 8 < r.radius < 16
    assert compute.plan_attention(**r.plan_args, eps=1e-3).method == "exact"
    qn = q / q.norm(dim=-1, keepdim=True)
    kn = k / k.norm(dim=-1, keepdim=True)
    small = compute.attention_radius(qn, kn)
    assert small.radius <= 2.0 / math.sqrt(16) * 1.0001
    assert compute.attention(qn, kn, v).plan.radius == small.radius


def test_radius_errors_name_the_argument() -> None:
    q, k = torch.randn(4, 8), torch.randn(5, 8)
    with pytest.raises(compute.InvalidInputError, match="k"):
        compute.attention_radius(q, torch.randn(5, 7))
    with pytest.raises(compute.InvalidInputError, match="k"):
        compute.attention_radius(q.expand(2, 4, 8), k)
    with pytest.raises(compute.InvalidInputError, match="q"):
        compute.attention_radius(torch.full((4, 8), math.nan), k)
    with pytest.raises(compute.InvalidInputError, match="scale"):
        compute.attention_radius(q, k, scale=math.inf)
    with pytest.raises(compute.InvalidInputError, match="k2"):
        compute.tensor_attention_radius(q, k, torch.randn(3, 6))
    with pytest.raises(KeyError, match="conv"):
        compute.radius("conv", {"q": q})
    with pytest.raises(compute.InvalidInputError, match="k"):
        compute.radius("attention", {"q": q, "v": k})


def test_huge_entries_give_a_finite_or_infinite_radius_never_nan() -> None:
    q = torch.full((3, 4), 1e300, dtype=F64)
    k = torch.tensor([[1e300] * 4, [-1e300] * 4, [0.0] * 4], dtype=F64)
    r = compute.attention_radius(q, k)
    assert r.radius == math.inf and r.to_dict()["radius"] is None
    assert json.dumps(r.to_dict())  # JSON-ready


# --------------------------------------------------------------------------- tensor attention
@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 7),
    n1=st.integers(1, 7),
    n2=st.integers(1, 7),
    d=st.sampled_from([1, 3, 8]),
    size=st.floats(0.05, 4.0),
    seed=st.integers(0, 1000),
    dtype=st.sampled_from([torch.float32, F64]),
)
def test_tensor_attention_radius_is_the_definition_and_bounds_every_score(
    n: int, n1: int, n2: int, d: int, size: float, seed: int, dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(seed)
    q, k1, k2 = ((torch.randn(2, m, d, generator=gen) * size).to(dtype) for m in (n, n1, n2))
    r = compute.tensor_attention_radius(q, k1, k2)
    s = 1 / math.sqrt(d)
    assert r.radius == pytest.approx(naive_tensor_radius(q, k1, k2, s), rel=1e-9)
    assert r.radius >= largest_triple_score(q, k1, k2, s) * (1 - 1e-12)
    assert r.rho == pytest.approx(r.radius / max(math.log(n * n1 * n2) / 3, math.log(2)))
    assert r.lengths == {"n": n, "n1": n1, "n2": n2}


def test_tensor_attention_radius_is_the_plans() -> None:
    gen = torch.Generator().manual_seed(5)
    q, k1, k2 = (torch.randn(3, m, 8, generator=gen) * 0.3 for m in (30, 20, 25))
    v1, v2 = torch.randn(3, 20, 4, generator=gen), torch.randn(3, 25, 4, generator=gen)
    res = compute.tensor_attention(q, k1, k2, v1, v2)
    r = compute.tensor_attention_radius(q, k1, k2)
    assert r.radius == pytest.approx(res.plan.radius, rel=1e-12) and r.radius >= res.plan.radius
    via = compute.radius("tensor-attention", {"q": q, "k1": k1, "k2": k2, "v1": v1, "v2": v2})
    assert via.radius == r.radius and via.plan_args["dv"] == 4
    assert via.plan_args["n"] == round((30 * 20 * 25) ** (1 / 3))
    assert compute.plan_tensor_attention(**via.plan_args).radius == r.radius


# --------------------------------------------------------------------------- LoRA
def lora_case(seed: int = 0, L: int = 20, full: bool = True, size: float = 1.0) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, s: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=F64) * s

    dm, dh, rank = 6, 4, 2
    adapters = {m: (rnd(rank, dh, s=0.5), rnd(dm, rank, s=0.5)) for m in ("qkv" if full else "qv")}
    return dict(
        x=rnd(2, L, dm, s=size),
        y=rnd(2, L, dh),
        w_q=rnd(dm, dh, s=0.4),
        w_k=rnd(dm, dh, s=0.4),
        w_v=rnd(dm, dh, s=0.4),
        adapters=adapters,
        alpha=2.0,
    )


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_lora_radius_bounds_the_centred_scores_and_is_the_plans(full: bool, seed: int) -> None:
    case = lora_case(seed, full=full, size=0.3 + seed)
    r = compute.lora_radius(case["x"], case["y"], **{k: case[k] for k in case if k not in "xy"})
    # the adapted projections, in float64, and their centred scores
    rank = {m: a.shape[0] for m, (a, _) in case["adapters"].items()}
    w = {}
    for m in "qk":
        w[m] = case[f"w_{m}"].clone()
        if m in case["adapters"]:
            a, b = case["adapters"][m]
            w[m] = w[m] + case["alpha"] / rank[m] * b @ a
    q, k = case["x"] @ w["q"], case["x"] @ w["k"]
    s = 1 / math.sqrt(4)
    assert r.radius >= largest_centred_score(q, k, s)
    assert r.radius <= naive_attention_radius(q, k, s) * 1.001  # projection errors are tiny
    res = compute.lora_gradient(**case, method="auto")
    assert r.radius == res.plan.radius and r.rho == res.plan.rho
    assert r.plan_args["full"] is full and r.plan_args["rank"] == 2
    assert compute.plan_lora_gradient(**r.plan_args).radius == r.radius


def test_radius_by_operation_name_matches_the_functions() -> None:
    case = lora_case(7)
    tensors = {"x": case["x"], "y": case["y"], "w_q": case["w_q"], "w_k": case["w_k"]}
    tensors["w_v"] = case["w_v"]
    for m, (a, b) in case["adapters"].items():
        tensors[f"adapters.{m}.a"], tensors[f"adapters.{m}.b"] = a, b
    via = compute.radius("lora-gradient", tensors, {"alpha": 2.0, "scale": None})
    direct = compute.lora_radius(
        case["x"], case["y"], **{k: case[k] for k in case if k not in "xy"}
    )
    assert via == direct
    q, k, v = (torch.randn(10, 8) for _ in range(3))
    got = compute.radius("attention", {"q": q, "k": k, "v": v[:, :3]}, {"causal": True})
    assert got.radius == compute.attention_radius(q, k, causal=True).radius
    assert got.plan_args["dv"] == 3 and got.plan_args["causal"] is True
    for name, op in compute.OPERATIONS.items():
        assert op.radius is not None, name


# --------------------------------------------------------------------------- the service
def _t(a: np.ndarray[Any, Any]) -> dict[str, Any]:
    return {"shape": list(a.shape), "datatype": "FP32", "data": a.reshape(-1).tolist()}


def _arrays(n: int = 64, d: int = 8, size: float = 1.0, seed: int = 0) -> dict[str, Any]:
    g = np.random.default_rng(seed)
    return {x: (size * g.standard_normal((n, d))).astype(np.float32) for x in ("q", "k", "v")}


@pytest.mark.redis
def test_post_plan_computes_the_radius_from_the_tensors(api: Any) -> None:
    client = api()
    arrays = _arrays(size=1.0)
    body = {name: _t(a) for name, a in arrays.items()} | {"eps": 1e-3}
    r = client.post("/v1/plan", params={"op": "attention"}, json=body)
    assert r.status_code == 200, r.text
    got = r.json()
    want = compute.attention_radius(*(torch.from_numpy(arrays[x]) for x in "qk"))
    assert got["radius"]["radius"] == want.radius and got["radius"]["rho"] == want.rho
    assert got["plan"]["radius"] == want.radius and got["inputs"]["eps"] == 1e-3
    assert got["inputs"]["n"] == 64 and got["inputs"]["dv"] == 8
    assert got["plan"]["method"] == "exact"  # N(0, 1) at d = 8: R ~ 7, beyond the fast path
    # the same as GET with that radius
    g = client.get("/v1/plan", params={"op": "attention", **got["inputs"]}).json()
    assert g["plan"]["method"] == got["plan"]["method"]
    assert g["plan"]["degree"] == got["plan"]["degree"]
    # small entries: the polynomial is certified
    small = {name: _t(a) for name, a in _arrays(size=0.2).items()}
    r = client.post("/v1/plan", params={"op": "attention"}, json=small)
    assert r.status_code == 200 and r.json()["plan"]["degree"] is not None
    assert r.json()["radius"]["radius"] < 1


@pytest.mark.redis
def test_post_plan_takes_safetensors_and_every_operation(api: Any) -> None:
    from app.jobs.codec import encode_safetensors, from_array

    client = api()
    g = np.random.default_rng(1)
    f = lambda *s: (0.3 * g.standard_normal(s)).astype(np.float32)  # noqa: E731
    tensors = {"q": f(6, 4), "k1": f(5, 4), "k2": f(7, 4), "v1": f(5, 2), "v2": f(7, 2)}
    raw = {n: from_array(a) for n, a in tensors.items()}
    r = client.post(
        "/v1/plan",
        params={"op": "tensor-attention"},
        content=encode_safetensors(raw, {"eps": "0.01"}),
        headers={"content-type": "application/octet-stream"},
    )
    assert r.status_code == 200, r.text
    want = compute.tensor_attention_radius(
        *(torch.from_numpy(tensors[x]) for x in ("q", "k1", "k2"))
    )
    assert r.json()["radius"]["radius"] == want.radius
    assert r.json()["radius"]["lengths"] == {"n": 6, "n1": 5, "n2": 7}
    lora = {"x": f(12, 6), "y": f(12, 4), "w_q": f(6, 4), "w_k": f(6, 4), "w_v": f(6, 4)}
    lora |= {"adapters.q.a": f(2, 4), "adapters.q.b": f(6, 2)}
    lora |= {"adapters.v.a": f(2, 4), "adapters.v.b": f(6, 2)}
    body: dict[str, Any] = {"alpha": 2.0}
    for name, a in lora.items():
        node = body
        *path, leaf = name.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = _t(a)
    r = client.post("/v1/plan", params={"op": "lora-gradient"}, json=body)
    assert r.status_code == 200, r.text
    assert r.json()["radius"]["op"] == "lora-gradient" and r.json()["inputs"]["full"] is False


@pytest.mark.redis
def test_post_plan_refuses_what_a_job_refuses(api: Any) -> None:
    client = api()
    arrays = _arrays(n=8)
    body = {name: _t(a) for name, a in arrays.items()}
    cases = [
        ({"op": "conv"}, body, 422, "op"),
        ({"op": "attention"}, {"q": body["q"], "v": body["v"]}, 422, "k"),
        ({"op": "attention"}, body | {"eps": 2}, 422, "eps"),
        ({"op": "attention"}, body | {"k": _t(np.ones((8, 3), np.float32))}, 422, "k"),
    ]
    for params, b, code, field in cases:
        r = client.post("/v1/plan", params=params, json=b)
        assert r.status_code == code, (params, r.text)
        assert field in r.json()["error"]["message"], r.text
    from app.jobs.codec import encode_safetensors, from_array

    nan = {n: from_array(a) for n, a in arrays.items()} | {"q": from_array(np.full((8, 8), np.nan))}
    r = client.post(
        "/v1/plan",
        params={"op": "attention"},
        content=encode_safetensors(nan, {}),
        headers={"content-type": "application/octet-stream"},
    )
    assert r.status_code == 422 and "q" in r.json()["error"]["message"], r.text
    r = client.post(
        "/v1/plan", params={"op": "attention"}, content=b"x", headers={"content-type": "text/plain"}
    )
    assert r.status_code == 415


@pytest.mark.redis
def test_client_and_cli_plan_with_tensors(live_server: Any, tmp_path: Path, capsys: Any) -> None:
    from app.cli import main as cli
    from app.client import Client

    url = live_server()
    arrays = _arrays(n=32, size=0.3)
    want = compute.attention_radius(*(torch.from_numpy(arrays[x]) for x in "qk"))
    with Client(url) as c:
        got = c.plan("attention", tensors=arrays, eps=1e-2)
        assert got["radius"]["radius"] == want.radius and got["inputs"]["eps"] == 1e-2
        binary = c.plan("attention", tensors=arrays, eps=1e-2, binary=True)
        assert (
            binary["radius"] == got["radius"] and binary["plan"]["method"] == got["plan"]["method"]
        )
        by_size = c.plan("attention", n=32, d=8, radius=want.radius, eps=1e-2)
        assert by_size["plan"]["degree"] == got["plan"]["degree"]
    for name, a in arrays.items():
        np.save(tmp_path / f"{name}.npy", a)
    files = [f"{x}={tmp_path / x}.npy" for x in "qkv"]
    assert cli(["--url", url, "plan", "attention", *files, "--eps", "0.01"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["radius"]["radius"] == want.radius and out["inputs"]["eps"] == 0.01
    assert cli(["--url", url, "plan", "attention", *files, "--causal", "true"]) == 0
    assert json.loads(capsys.readouterr().out)["inputs"]["causal"] is True
    with pytest.raises(SystemExit):
        cli(["--url", url, "plan", "attention", "--n", "5"])  # --d, --radius missing
