"""Hypothesis over the two body decoders (JSON and safetensors): truncated, oversized, mislabeled,
nested, overlapping and huge inputs. Whatever the bytes, a decoder returns tensors that match
their declared shapes or raises a ServiceError (a 4xx), never anything else, in bounded memory."""

from __future__ import annotations

import json
import struct
import tracemalloc
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.api.requests import parse_binary, parse_json, specs
from app.jobs.codec import DATATYPES, decode_safetensors, encode_safetensors, from_array
from app.jobs.errors import ServiceError, http_status

MAX_ELEMENTS = 4096
FUZZ = settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)

ints = st.one_of(
    st.integers(-3, 70),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, 2**31, 2**63, 10**30, -1]),
)
json_scalars = st.one_of(
    st.none(), st.booleans(), ints, st.floats(allow_nan=False), st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)
st_dtypes = st.one_of(st.sampled_from(["F32", "F64", "F16", "BF16", "I32", "U8", ""]), json_values)


@st.composite
def safetensors_bodies(draw: Any) -> bytes:
    """Headers near the real format: entries with plausible, broken or hostile fields."""
    names = draw(st.lists(st.sampled_from(["q", "k", "v", "w", "__metadata__"]), max_size=5))
    header: dict[str, Any] = {}
    for name in names:
        if name == "__metadata__":
            header[name] = draw(st.one_of(st.dictionaries(st.text(max_size=5), json_values)))
            continue
        entry: dict[str, Any] = {
            "dtype": draw(st_dtypes),
            "shape": draw(st.one_of(st.lists(ints, max_size=4), json_values)),
            "data_offsets": draw(st.one_of(st.lists(ints, min_size=2, max_size=2), json_values)),
        }
        for key in draw(st.lists(st.sampled_from(list(entry)), max_size=2)):
            entry.pop(key, None)
        header[name] = entry
    head = json.dumps(header).encode()
    declared = draw(st.one_of(st.just(len(head)), ints.filter(lambda n: n >= 0)))
    declared = min(declared, 2**64 - 1)
    buf = draw(st.binary(max_size=256))
    body = struct.pack("<Q", declared) + head + buf
    cut = draw(st.one_of(st.none(), st.integers(0, len(body))))
    return body if cut is None else body[:cut]


def _checked(call: Any) -> Any:
    """Run a decoder: a result, or a ServiceError with a 4xx status; nothing else escapes."""
    try:
        return call()
    except ServiceError as exc:
        status, _ = http_status(exc)
        assert 400 <= status < 500, exc
        assert len(exc.message) < 1000
        return None


def _bounded(call: Any, nbytes: int) -> Any:
    tracemalloc.start()
    try:
        out = _checked(call)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * nbytes + (1 << 20), (peak, nbytes)
    return out


@FUZZ
@given(body=st.one_of(safetensors_bodies(), st.binary(max_size=512)))
def test_safetensors_decoder_never_fails_badly(body: bytes) -> None:
    got = _bounded(lambda: decode_safetensors(body, max_elements=MAX_ELEMENTS), len(body))
    if got is None:
        return
    tensors, meta = got
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    for t in tensors.values():
        assert t.datatype in DATATYPES and len(t.data) == t.nbytes
        assert t.numel <= MAX_ELEMENTS
    _checked(lambda: parse_binary(specs()["attention"], tensors, meta))


@st.composite
def json_bodies(draw: Any) -> bytes:
    def tensor() -> Any:
        return draw(
            st.one_of(
                st.fixed_dictionaries(
                    {
                        "shape": st.one_of(st.lists(ints, max_size=3), json_values),
                        "datatype": st.one_of(
                            st.sampled_from(["FP32", "FP16", "BF16"]), json_values
                        ),
                        "data": st.one_of(
                            st.lists(st.floats(width=32, allow_nan=False), max_size=16),
                            json_values,
                        ),
                    }
                ),
                json_values,
            )
        )

    body: dict[str, Any] = {n: tensor() for n in draw(st.lists(st.sampled_from("qkv"), max_size=3))}
    body.update(
        draw(st.dictionaries(st.sampled_from(["eps", "method", "causal", "x"]), json_values))
    )
    raw = json.dumps(body).encode()
    cut = draw(st.one_of(st.none(), st.integers(0, len(raw))))
    return raw if cut is None else raw[:cut]


@FUZZ
@given(body=st.one_of(json_bodies(), st.binary(max_size=256), st.text(max_size=64).map(str.encode)))
def test_json_decoder_never_fails_badly(body: bytes) -> None:
    got = _bounded(
        lambda: parse_json(specs()["attention"], body, max_elements=MAX_ELEMENTS), len(body)
    )
    if got is not None:
        _, tensors = got
        assert set(tensors) == {"q", "k", "v"}
        assert all(t.numel <= MAX_ELEMENTS for t in tensors.values())


@FUZZ
@given(
    shape=st.lists(st.integers(1, 5), min_size=2, max_size=3),
    dtype=st.sampled_from([np.float32, np.float64, np.float16]),
    seed=st.integers(0, 2**32 - 1),
)
def test_a_valid_body_decodes_to_its_tensors(shape: list[int], dtype: Any, seed: int) -> None:
    """The decoder is not merely strict: every well-formed body comes back bit for bit."""
    g = np.random.default_rng(seed)
    arrays = {n: g.standard_normal(shape).astype(dtype) for n in "qkv"}
    body = encode_safetensors({n: from_array(a) for n, a in arrays.items()}, {"eps": "0.01"})
    tensors, meta = decode_safetensors(body, max_elements=MAX_ELEMENTS)
    params, checked = parse_binary(specs()["attention"], tensors, meta)
    assert params["eps"] == 0.01
    for n, a in arrays.items():
        np.testing.assert_array_equal(checked[n].to_numpy(), a)
