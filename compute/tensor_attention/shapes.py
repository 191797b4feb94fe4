"""Tensor attention's shape rule, on shapes alone: the library applies it to tensors, the service
to a request before anything is queued, with the same message."""

from __future__ import annotations

from ..core.validate import Label, Shapes, check_match, check_same_leading, shape_of

__all__ = ["NAMES", "check_shapes"]

NAMES = ("q", "k1", "k2", "v1", "v2")


def _plain(name: str) -> str:
    return name


def check_shapes(shapes: Shapes, label: Label = _plain) -> None:
    """``q (..., n, d)``; ``k1 (..., n1, d)`` with ``v1 (..., n1, dv)``; ``k2 (..., n2, d)``
    with ``v2 (..., n2, dv)``: the two key sets may differ in length; equal leading dims."""
    q, k1, k2, v1, v2 = (shape_of(shapes, n, label) for n in NAMES)
    check_same_leading(NAMES, shapes, label)
    check_match(label("k1"), "head dimension", k1[-1], "q", q[-1])
    check_match(label("k2"), "head dimension", k2[-1], "q", q[-1])
    check_match(label("v1"), "key count", v1[-2], "k1", k1[-2])  # they pair row by row
    check_match(label("v2"), "key count", v2[-2], "k2", k2[-2])
    check_match(label("v2"), "value dimension", v2[-1], "v1", v1[-1])
