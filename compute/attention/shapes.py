"""Attention's shape rule, on shapes alone: the library applies it to tensors, the service to a
request before anything is queued, with the same message."""

from __future__ import annotations

from ..core.validate import Label, Shapes, check_match, check_same_leading, shape_of

__all__ = ["NAMES", "check_shapes"]

NAMES = ("q", "k", "v")


def _plain(name: str) -> str:
    return name


def check_shapes(shapes: Shapes, label: Label = _plain) -> None:
    """``q (..., n, d)``, ``k (..., m, d)``, ``v (..., m, dv)``, equal leading dimensions."""
    q, k, v = (shape_of(shapes, n, label) for n in NAMES)
    check_match(label("k"), "head dimension", k[-1], "q", q[-1])
    check_match(label("v"), "key count", v[-2], "k", k[-2])
    check_same_leading(NAMES, shapes, label)
