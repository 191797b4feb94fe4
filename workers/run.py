"""One job's compute: decoded inputs in, the registered operation run, outputs and a JSON-safe
summary out. How an operation's tensors and parameters map onto its ``compute`` call is the
registry's business (``compute.registry``), not the worker's."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import torch

import compute
from app.jobs.codec import RawTensor, from_array
from app.jobs.errors import InvalidInput
from compute.registry import OPERATIONS, Progress

__all__ = ["Progress", "resolve_device", "run_op"]


def resolve_device(setting: str) -> torch.device:
    return compute.default_device() if setting == "auto" else torch.device(setting)


_PLAIN = frozenset({str, int, bool, type(None)})


def _finite(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become None, tuples become lists. (The exact types of
    a summary are tested first: the abstract ``Mapping`` check is slow, and a summary holds
    dozens of values.)"""
    kind = type(value)
    if kind is float:
        return value if math.isfinite(value) else None
    if kind is dict:
        return {str(k): _finite(v) for k, v in value.items()}
    if kind in _PLAIN:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def run_op(
    op: str,
    inputs: Mapping[str, RawTensor],
    params: Mapping[str, Any],
    *,
    device: torch.device,
    progress: Progress | None = None,
    stages: dict[str, float] | None = None,
) -> tuple[dict[str, RawTensor], dict[str, Any]]:
    """Run one registered operation on decoded inputs; returns (outputs, JSON-safe summary).

    ``stages`` (when given) receives the seconds of ``decode`` (bytes to tensors on the device),
    ``compute`` (the operation, also ``summary["seconds"]``) and ``encode`` (tensors to bytes and
    the JSON-safe summary).
    """
    spec = OPERATIONS.get(op)
    if spec is None:
        raise InvalidInput(f"unknown operation {op!r}")
    t0 = time.perf_counter()
    t = {name: raw.to_torch().to(device) for name, raw in inputs.items()}
    start = time.perf_counter()
    outputs, summary = spec.run(t, dict(params), progress)
    end = time.perf_counter()
    summary = dict(summary)
    summary["seconds"] = end - start
    encoded = {k: from_array(v) for k, v in outputs.items()}, _finite(summary)
    if stages is not None:
        stages.update(decode=start - t0, compute=end - start, encode=time.perf_counter() - end)
    return encoded
