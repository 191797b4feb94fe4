"""Tensors on the wire and in Redis: KServe-v2-style JSON, safetensors, raw little-endian bytes.

A :class:`RawTensor` is (datatype, shape, bytes): exactly what is stored in Redis and what a
safetensors body carries, so a binary upload goes to Redis without decoding to numbers (the
values are still checked to be finite, on the raw bits). No pickle anywhere.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from app.jobs.errors import BadRequest, InvalidInput

if TYPE_CHECKING:  # torch is imported where a torch tensor is made: clients may pass numpy only
    import torch

__all__ = [
    "DATATYPES",
    "RawTensor",
    "decode_safetensors",
    "encode_safetensors",
    "from_array",
    "from_json",
]


@dataclass(frozen=True)
class _DType:
    name: str  # KServe name: FP32
    st: str  # safetensors name: F32
    torch: str  # torch dtype name: float32
    itemsize: int
    # bit mask of the exponent field, on the unsigned integer view; all ones means Inf/NaN
    exp_mask: int
    uint: type[np.unsignedinteger[Any]]


DATATYPES: dict[str, _DType] = {
    "FP32": _DType("FP32", "F32", "float32", 4, 0x7F80_0000, np.uint32),
    "FP64": _DType("FP64", "F64", "float64", 8, 0x7FF0_0000_0000_0000, np.uint64),
    "FP16": _DType("FP16", "F16", "float16", 2, 0x7C00, np.uint16),
    "BF16": _DType("BF16", "BF16", "bfloat16", 2, 0x7F80, np.uint16),
}
_FROM_ST = {d.st: d for d in DATATYPES.values()}
_FROM_TORCH = {d.torch: d for d in DATATYPES.values()}
_NUMPY = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16}
_LARGEST = {
    "FP32": 3.4028234663852886e38,
    "FP64": 1.7976931348623157e308,
    "FP16": 65504.0,
    "BF16": 3.3895313892515355e38,
}


@dataclass(frozen=True)
class RawTensor:
    """A dense row-major tensor as little-endian bytes."""

    datatype: str
    shape: tuple[int, ...]
    data: bytes | memoryview

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DATATYPES[self.datatype].itemsize

    def to_torch(self) -> torch.Tensor:
        """A CPU tensor owning a copy of the bytes."""
        import torch

        dtype = getattr(torch, DATATYPES[self.datatype].torch)
        if self.numel == 0:
            return torch.empty(self.shape, dtype=dtype)
        buf = bytearray(self.data)
        return torch.frombuffer(buf, dtype=dtype).reshape(self.shape)

    def to_numpy(self) -> np.ndarray[Any, Any]:
        """A numpy array (BF16 is widened to float32, exactly: numpy has no bfloat16)."""
        if self.datatype == "BF16":
            bits = np.frombuffer(self.data, dtype="<u2").astype(np.uint32) << 16
            return bits.view(np.float32).reshape(self.shape)
        return np.frombuffer(self.data, dtype=_NUMPY[self.datatype]).reshape(self.shape).copy()

    def to_json(self) -> dict[str, Any]:
        """KServe v2 JSON: ``{"shape", "datatype", "data": [flat, row-major]}``."""
        values = self.to_numpy().astype(np.float64).reshape(-1).tolist()
        return {"shape": list(self.shape), "datatype": self.datatype, "data": values}

    def meta(self) -> dict[str, Any]:
        return {"datatype": self.datatype, "shape": list(self.shape)}


def from_array(value: Any) -> RawTensor:
    """A RawTensor from a torch tensor or a numpy array (any float dtype the API supports)."""
    if type(value).__module__.startswith("torch"):
        import torch

        t = value.detach().to("cpu").contiguous()
        name = str(t.dtype).removeprefix("torch.")
        if name not in _FROM_TORCH:
            raise InvalidInput(f"unsupported dtype {t.dtype}; use float16/bfloat16/32/64")
        dt = _FROM_TORCH[name]
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return RawTensor(dt.name, tuple(t.shape), data)
    arr = np.asarray(value)
    for name, np_dtype in _NUMPY.items():
        if arr.dtype == np_dtype:
            le = np.ascontiguousarray(arr, dtype=np.dtype(np_dtype).newbyteorder("<"))
            return RawTensor(name, tuple(arr.shape), le.tobytes())
    if arr.dtype.kind in "iub":
        return from_array(arr.astype(np.float64))
    raise InvalidInput(f"unsupported dtype {arr.dtype}; use float16/32/64")


def _to_bfloat16_bits(values: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """float64 -> bfloat16 bit patterns, as torch rounds them: to float32, then to nearest even
    on the top 16 bits (values past the range become Inf, which the finiteness check refuses)."""
    with np.errstate(over="ignore"):
        bits = values.astype(np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def check_finite(field: str, t: RawTensor) -> None:
    """Raise InvalidInput when any value is NaN or +-Inf (checked on the raw exponent bits)."""
    dt = DATATYPES[t.datatype]
    if t.numel == 0:
        return
    bits = np.frombuffer(t.data, dtype=np.dtype(dt.uint).newbyteorder("<"))
    bad = np.flatnonzero((bits & dt.exp_mask) == dt.exp_mask)
    if bad.size:
        raise InvalidInput(
            f"non-finite value (NaN or Inf) at flat index {int(bad[0])}", field=f"{field}.data"
        )


def _name(field: str) -> str:
    """A field name fit for a message (names come from the client: keep them short)."""
    return field if len(field) <= 64 else field[:61] + "..."


def check_shape(field: str, shape: Any, max_elements: int) -> tuple[int, ...]:
    """A shape of at most 8 non-negative dimensions and at most ``max_elements`` elements.

    Never formats a client's number it has not bounded (a dimension of 10**3000 is refused
    without turning it into text).
    """
    field = _name(field)
    if not isinstance(shape, list | tuple) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
    ):
        raise InvalidInput("must be a list of non-negative integers", field=f"{field}.shape")
    if len(shape) > 8:
        raise InvalidInput(f"rank {len(shape)} > 8", field=f"{field}.shape")
    for i, s in enumerate(shape):
        if s > max_elements:
            raise InvalidInput(
                f"dimension {i} alone exceeds the limit of {max_elements} elements (MAX_ELEMENTS)",
                field=f"{field}.shape",
            )
    n = math.prod(shape)
    if n > max_elements:
        raise InvalidInput(
            f"{n} elements exceed the limit of {max_elements} (MAX_ELEMENTS)",
            field=f"{field}.shape",
        )
    return tuple(shape)


def from_json(
    field: str, shape: Sequence[int], datatype: str, data: Sequence[float], *, max_elements: int
) -> RawTensor:
    """Validate one KServe JSON tensor and turn it into raw bytes."""
    if datatype not in DATATYPES:
        raise InvalidInput(
            f"unknown datatype {datatype!r}; expected one of {sorted(DATATYPES)}",
            field=f"{field}.datatype",
        )
    dims = check_shape(field, shape, max_elements)
    n = math.prod(dims)
    if len(data) != n:
        raise InvalidInput(
            f"len(data) = {len(data)} but prod(shape {list(dims)}) = {n}", field=f"{field}.data"
        )
    values = np.asarray(data, dtype=np.float64)
    if not np.isfinite(values).all():
        idx = int(np.flatnonzero(~np.isfinite(values))[0])
        raise InvalidInput(f"non-finite value at flat index {idx}", field=f"{field}.data")
    if datatype == "BF16":
        raw = RawTensor("BF16", dims, _to_bfloat16_bits(values).astype("<u2").tobytes())
    else:
        with np.errstate(over="ignore"):
            le = np.dtype(_NUMPY[datatype]).newbyteorder("<")
            raw = RawTensor(datatype, dims, values.astype(le).tobytes())
    bits = np.frombuffer(raw.data, dtype=np.dtype(DATATYPES[datatype].uint).newbyteorder("<"))
    over = np.flatnonzero((bits & DATATYPES[datatype].exp_mask) == DATATYPES[datatype].exp_mask)
    if over.size:  # finite in the request, too large for the datatype: it rounded to Inf
        i = int(over[0])
        raise InvalidInput(
            f"value {values[i]:g} at flat index {i} is outside the {datatype} range (largest "
            f"{_LARGEST[datatype]:g}); send it as FP32 or FP64, or rescale",
            field=f"{field}.data",
        )
    return raw


# ---------------------------------------------------------------------------------------------
# safetensors (https://github.com/huggingface/safetensors#format): u64 little-endian header
# length N, N bytes of JSON header {name: {dtype, shape, data_offsets: [begin, end]},
# "__metadata__": {str: str}}, then the byte buffer. Parsed by hand so that tensor bytes are
# sliced, not decoded, and so that every malformation gets a precise 400/422.
# ---------------------------------------------------------------------------------------------
def decode_safetensors(
    body: bytes | bytearray | memoryview, *, max_elements: int
) -> tuple[dict[str, RawTensor], dict[str, str]]:
    """Split a safetensors body into raw tensors and the string metadata."""
    view = memoryview(body)
    if len(view) < 8:
        raise BadRequest("safetensors body shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", view[:8])
    if n > len(view) - 8 or n > 100_000_000:
        raise BadRequest(f"safetensors header length {n} exceeds the body")
    try:
        header = json.loads(bytes(view[8 : 8 + n]))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"safetensors header is not valid JSON: {str(exc)[:200]}") from None
    except RecursionError:
        raise BadRequest("safetensors header is nested too deeply") from None
    if not isinstance(header, dict):
        raise BadRequest("safetensors header must be a JSON object")
    buf = view[8 + n :]
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise BadRequest("safetensors __metadata__ must map strings to strings")
    tensors: dict[str, RawTensor] = {}
    spans: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise BadRequest(f"safetensors entry {_name(name)!r} lacks dtype/shape/data_offsets")
        dt = _FROM_ST.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dt is None:
            raise InvalidInput(
                f"unsupported safetensors dtype {str(info['dtype'])[:32]!r}; expected F32, F64, "
                "F16 or BF16",
                field=f"{_name(name)}.datatype",
            )
        dims = check_shape(name, info["shape"], max_elements)
        offsets = info["data_offsets"]
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= len(buf)
        ):
            raise BadRequest(
                f"safetensors entry {_name(name)!r} has data_offsets outside its "
                f"{len(buf)}-byte buffer (expected [begin, end] byte offsets)"
            )
        begin, end = offsets
        if end - begin != math.prod(dims) * dt.itemsize:
            raise InvalidInput(
                f"{end - begin} bytes but shape {list(dims)} of {dt.name} needs "
                f"{math.prod(dims) * dt.itemsize}",
                field=f"{_name(name)}.data",
            )
        raw = RawTensor(dt.name, dims, buf[begin:end])
        check_finite(name, raw)
        tensors[name] = raw
        if begin < end:
            spans.append((begin, end, name))
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in itertools.pairwise(spans):
        if begin_b < end_a:
            raise BadRequest(f"safetensors entries {_name(a)!r} and {_name(b)!r} overlap")
    return tensors, {str(k): v for k, v in metadata.items()}


def encode_safetensors(
    tensors: Mapping[str, RawTensor], metadata: Mapping[str, str] | None = None
) -> bytes:
    """One safetensors body (header padded to 8 bytes, tensors in name order)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    names = sorted(tensors)
    for name in names:
        t = tensors[name]
        header[name] = {
            "dtype": DATATYPES[t.datatype].st,
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(t.data)],
        }
        offset += len(t.data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return b"".join([struct.pack("<Q", len(head)), head, *(bytes(tensors[n].data) for n in names)])
