"""One job's compute: decoded inputs in, ``compute`` called, outputs and a JSON-safe summary out.

The only place that knows how each operation's tensors and parameters map onto the ``compute``
call (until the operation registry takes that over).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

import compute
from app.jobs.codec import RawTensor, from_array
from app.jobs.errors import InvalidInput

__all__ = ["Progress", "resolve_device", "run_op"]

Progress = Callable[[int, int], None]


def resolve_device(setting: str) -> torch.device:
    return compute.default_device() if setting == "auto" else torch.device(setting)


def _finite(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become None, tuples become lists."""
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
    """Run one operation on decoded inputs; returns (outputs, JSON-safe summary).

    ``stages`` (when given) receives the seconds of ``decode`` (bytes to tensors on the device),
    ``compute`` (the ``compute`` call, also ``summary["seconds"]``) and ``encode`` (tensors to
    bytes and the JSON-safe summary).
    """
    t0 = time.perf_counter()
    t = {name: raw.to_torch().to(device) for name, raw in inputs.items()}
    p = dict(params)
    start = time.perf_counter()
    outputs: dict[str, Any]
    if op == "attention":
        res = compute.attention(t["q"], t["k"], t["v"], progress=progress, **p)
        outputs = {"output": res.output}
        summary = res.summary()
    elif op == "tensor-attention":
        res = compute.tensor_attention(
            t["q"], t["k1"], t["k2"], t["v1"], t["v2"], progress=progress, **p
        )
        outputs = {"output": res.output}
        summary = res.summary()
    elif op == "lora-gradient":
        adapters = {
            m: (t[f"adapters.{m}.a"], t[f"adapters.{m}.b"]) for m in "qkv" if f"adapters.{m}.a" in t
        }
        lres = compute.lora_gradient(
            t["x"],
            t["y"],
            w_q=t["w_q"],
            w_k=t["w_k"],
            w_v=t["w_v"],
            adapters=adapters,
            progress=progress,
            **p,
        )
        outputs = {"loss": torch.tensor(float(lres.loss), dtype=torch.float64)}
        for m, (d_a, d_b) in lres.grads.items():
            outputs[f"adapters.{m}.a"] = d_a
            outputs[f"adapters.{m}.b"] = d_b
        summary = lres.summary()
        summary.setdefault("loss", float(lres.loss))
    else:
        raise InvalidInput(f"unknown operation {op!r}")
    end = time.perf_counter()
    summary = dict(summary)
    summary["seconds"] = end - start
    encoded = {k: from_array(v) for k, v in outputs.items()}, _finite(summary)
    if stages is not None:
        stages.update(decode=start - t0, compute=end - start, encode=time.perf_counter() - end)
    return encoded
