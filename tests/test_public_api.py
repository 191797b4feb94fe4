"""The public surface is what outside checks call: keep it exactly."""

from __future__ import annotations

import inspect

import compute


def test_compute_all_is_exactly_the_public_surface() -> None:
    assert sorted(compute.__all__) == sorted(
        [
            "AttentionResult",
            "Cancelled",
            "CertificationError",
            "ComputeError",
            "InvalidInputError",
            "LoraResult",
            "OPERATIONS",
            "Operation",
            "OutOfRangeError",
            "Plan",
            "attention",
            "default_device",
            "lora_gradient",
            "plan_attention",
            "plan_lora_gradient",
            "plan_tensor_attention",
            "tensor_attention",
        ]
    )
    for name in compute.__all__:
        assert hasattr(compute, name), name


def _keyword_defaults(fn: object) -> dict[str, object]:
    sig = inspect.signature(fn)  # type: ignore[arg-type]
    return {
        p.name: p.default
        for p in sig.parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def test_fixed_signatures() -> None:
    att = _keyword_defaults(compute.attention)
    assert {k: att[k] for k in ("method", "eps", "scale", "causal", "sample_rows")} == {
        "method": "auto",
        "eps": 1e-3,
        "scale": None,
        "causal": False,
        "sample_rows": 0,
    }
    assert list(inspect.signature(compute.attention).parameters)[:3] == ["q", "k", "v"]
    ten = _keyword_defaults(compute.tensor_attention)
    assert {k: ten[k] for k in ("method", "eps", "scale", "sample_rows")} == {
        "method": "auto",
        "eps": 1e-3,
        "scale": None,
        "sample_rows": 0,
    }
    assert list(inspect.signature(compute.tensor_attention).parameters)[:5] == [
        "q",
        "k1",
        "k2",
        "v1",
        "v2",
    ]
    lora = _keyword_defaults(compute.lora_gradient)
    for name in ("w_q", "w_k", "w_v", "adapters", "alpha"):
        assert name in lora
    assert {k: lora[k] for k in ("method", "eps", "scale")} == {
        "method": "auto",
        "eps": 1e-3,
        "scale": None,
    }


def test_errors_are_value_errors() -> None:
    assert issubclass(compute.InvalidInputError, ValueError)
    assert issubclass(compute.CertificationError, ValueError)
    assert issubclass(compute.InvalidInputError, compute.ComputeError)
    assert issubclass(compute.OutOfRangeError, compute.InvalidInputError)


def test_registry_lists_the_three_operations_with_their_public_functions() -> None:
    assert list(compute.OPERATIONS) == ["attention", "tensor-attention", "lora-gradient"]
    assert compute.OPERATIONS["attention"].plan is compute.plan_attention
    assert compute.OPERATIONS["tensor-attention"].plan is compute.plan_tensor_attention
    assert compute.OPERATIONS["lora-gradient"].plan is compute.plan_lora_gradient
