"""Argument checks shared by every operation; each error names the argument and the problem.

Each rule and its message exist once, here: a check written again in an operation would drift.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache

import torch

from .errors import InvalidInputError
from .progress import Progress

__all__ = [
    "DTYPE_NAMES",
    "METHODS",
    "SUPPORTED_DTYPES",
    "Label",
    "Shapes",
    "check_count",
    "check_dtype_name",
    "check_eps",
    "check_flag",
    "check_match",
    "check_method",
    "check_progress",
    "check_radius",
    "check_same_batch",
    "check_same_device",
    "check_same_leading",
    "check_sample_rows",
    "check_scale",
    "check_tensor",
    "compute_dtype_for",
    "compute_dtype_of",
    "dtype_name",
    "output_dtype_of",
    "shape_of",
]

METHODS = ("auto", "exact", "polynomial")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, x: object, *, min_dim: int = 2, finite: bool = True) -> torch.Tensor:
    """A non-empty finite dense floating tensor with data, of at least ``min_dim`` dimensions.

    Returned *detached*: the operations compute without building an autograd graph, so inputs
    that require grad (an ``nn.Parameter``, an activation inside a training graph) are accepted
    and the results never require grad. Sparse, nested and meta tensors are refused with a
    message saying what to pass instead. ``finite=False`` skips the NaN/Inf pass, for callers
    that read finiteness off reductions they compute anyway (and must then check it themselves).
    """
    if not isinstance(x, torch.Tensor):
        raise InvalidInputError(name, f"expected a torch.Tensor, got {type(x).__name__}")
    if x.is_nested:
        raise InvalidInputError(name, "nested tensors are not supported; pass a dense tensor")
    if x.layout != torch.strided:
        raise InvalidInputError(
            name, f"{x.layout} tensors are not supported; pass a dense tensor (x.to_dense())"
        )
    if x.is_meta:
        raise InvalidInputError(
            name, "a meta tensor has no data; pass a tensor on the cpu or a cuda device"
        )
    if x.requires_grad:
        x = x.detach()
    if x.dtype not in SUPPORTED_DTYPES:
        raise InvalidInputError(
            name, f"unsupported dtype {x.dtype}; use float16, bfloat16, float32 or float64"
        )
    if x.dim() < min_dim:
        raise InvalidInputError(
            name, f"expected at least {min_dim} dimensions, got shape {tuple(x.shape)}"
        )
    if x.numel() == 0:
        raise InvalidInputError(name, f"empty tensor (shape {tuple(x.shape)})")
    if finite and not bool(torch.isfinite(x).all()):
        raise InvalidInputError(name, "contains NaN or Inf")
    return x


def check_same_batch(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    """Leading (batch/head) dimensions must be equal; devices must be equal."""
    lead = tuple(tensors[0].shape[:-2])
    dev = tensors[0].device
    for name, t in zip(names[1:], tensors[1:], strict=True):
        if tuple(t.shape[:-2]) != lead:
            raise InvalidInputError(
                name,
                f"leading dimensions {tuple(t.shape[:-2])} do not match {names[0]}'s {lead}",
            )
        if t.device != dev:
            raise InvalidInputError(name, f"on device {t.device}, {names[0]} is on {dev}")


Shapes = Mapping[str, Sequence[int]]
Label = Callable[[str], str]


def _plain(name: str) -> str:
    return name


def shape_of(
    shapes: Shapes, name: str, label: Label = _plain, *, exact: int | None = None
) -> tuple[int, ...]:
    """A tensor's shape for a data-free shape rule: at least 2 dimensions (``exact`` when
    given), none empty. ``label`` names the tensor in the caller's words (``k``, ``k.shape``)."""
    shape = tuple(int(s) for s in shapes[name])
    if exact is not None and len(shape) != exact:
        raise InvalidInputError(label(name), f"expected {exact} dimensions, got shape {shape}")
    if len(shape) < 2:
        raise InvalidInputError(label(name), f"expected at least 2 dimensions, got shape {shape}")
    if 0 in shape:
        raise InvalidInputError(label(name), f"empty tensor (shape {shape})")
    return shape


def check_same_leading(names: Sequence[str], shapes: Shapes, label: Label = _plain) -> None:
    """Equal leading (batch / head) dimensions: all but the last two."""
    lead = tuple(shapes[names[0]])[:-2]
    for name in names[1:]:
        got = tuple(shapes[name])[:-2]
        if got != lead:
            raise InvalidInputError(
                label(name), f"leading dimensions {got} do not match {names[0]}'s {lead}"
            )


def check_same_device(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    dev = tensors[0].device
    for name, t in zip(names[1:], tensors[1:], strict=True):
        if t.device != dev:
            raise InvalidInputError(name, f"on device {t.device}, {names[0]} is on {dev}")


def check_match(name: str, what: str, got: int, other: str, want: int) -> None:
    """A dimension two tensors share: ``name``'s ``what`` must equal ``other``'s."""
    if got != want:
        raise InvalidInputError(name, f"{what} {got} does not match {other}'s {want}")


def check_method(method: object) -> str:
    if method not in METHODS:
        raise InvalidInputError("method", f"unknown method {method!r}; use one of {METHODS}")
    return str(method)


def check_eps(eps: object) -> float:
    if isinstance(eps, bool) or not isinstance(eps, int | float):
        raise InvalidInputError("eps", f"expected a number in (0, 1), got {eps!r}")
    e = float(eps)
    if not (math.isfinite(e) and 0.0 < e < 1.0):
        raise InvalidInputError("eps", f"must lie in (0, 1), got {eps!r}")
    return e


def check_scale(scale: object, d: int) -> float:
    """``scale`` defaults to ``1/sqrt(d)``; must be a finite number."""
    if scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, int | float):
        raise InvalidInputError("scale", f"expected a number or None, got {scale!r}")
    s = float(scale)
    if not math.isfinite(s):
        raise InvalidInputError("scale", f"must be finite, got {scale!r}")
    return s


def check_flag(name: str, x: object) -> bool:
    """A plain ``True`` or ``False`` (not 0/1, not a string)."""
    if not isinstance(x, bool):
        raise InvalidInputError(name, f"expected True or False, got {x!r}")
    return x


def check_progress(progress: object) -> Progress | None:
    """None or a callable ``progress(done, total)``."""
    if progress is not None and not callable(progress):
        raise InvalidInputError(
            "progress", f"expected a callable progress(done, total) or None, got {progress!r}"
        )
    return progress


def check_sample_rows(sample_rows: object) -> int:
    if isinstance(sample_rows, bool) or not isinstance(sample_rows, int) or sample_rows < 0:
        raise InvalidInputError("sample_rows", f"expected an integer >= 0, got {sample_rows!r}")
    return sample_rows


def compute_dtype_for(*dtypes: torch.dtype) -> torch.dtype:
    """The compute dtype of inputs of these dtypes: float64 if any is float64, else float32
    (float16 and bfloat16 are computed in float32)."""
    return torch.float64 if any(dt == torch.float64 for dt in dtypes) else torch.float32


def compute_dtype_of(*tensors: torch.Tensor) -> torch.dtype:
    """``compute_dtype_for`` the dtypes of these tensors."""
    return compute_dtype_for(*(t.dtype for t in tensors))


def output_dtype_of(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype of a result computed from these inputs: their promoted dtype (PyTorch's type
    promotion, the dtype of any product of them; the inputs' own dtype when they share one)."""
    out = tensors[0].dtype
    for t in tensors[1:]:
        out = torch.promote_types(out, t.dtype)
    return out


@lru_cache(maxsize=16)
def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (the spelling of plans and of the plan functions)."""
    return str(dtype).removeprefix("torch.")


# ---- arguments of the plan functions (no data, only sizes and names) ----------------------------

DTYPE_NAMES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


def check_count(name: str, x: object, low: int = 1) -> int:
    """An integer (not a bool) of at least ``low``: a length, dimension, rank or batch size."""
    if isinstance(x, bool) or not isinstance(x, int) or x < low:
        raise InvalidInputError(name, f"expected an integer >= {low}, got {x!r}")
    return x


def check_radius(radius: object) -> float:
    """A certified score radius as a plan function takes it: a finite number >= 0."""
    if isinstance(radius, bool) or not isinstance(radius, int | float):
        raise InvalidInputError("radius", f"expected a number >= 0, got {radius!r}")
    r = float(radius)
    if not (math.isfinite(r) and r >= 0.0):
        raise InvalidInputError("radius", f"must be finite and >= 0, got {radius!r}")
    return r


def check_dtype_name(dtype: object) -> torch.dtype:
    """``"float16" | "bfloat16" | "float32" | "float64"`` -> the torch dtype."""
    if not isinstance(dtype, str) or dtype not in DTYPE_NAMES:
        raise InvalidInputError(
            "dtype", f"unsupported dtype {dtype!r}; use one of {list(DTYPE_NAMES)}"
        )
    return DTYPE_NAMES[dtype]
