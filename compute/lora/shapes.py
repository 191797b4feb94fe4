"""LoRA's shape rule, on shapes alone: the library applies it to tensors, the service to a
request before anything is queued, with the same message. Tensors are named as on the wire
(``adapters.q.a``); ``label`` renames them in the caller's words."""

from __future__ import annotations

from ..core.errors import InvalidInputError
from ..core.validate import Label, Shapes, shape_of

__all__ = ["ADAPTER_NAMES", "check_shapes"]

ADAPTER_NAMES = ("q", "k", "v")


def _plain(name: str) -> str:
    return name


def check_shapes(shapes: Shapes, label: Label = _plain) -> None:
    """``x (..., L, d_model)``, ``y (..., L, d_head)``; ``w_q, w_k, w_v (d_model, d_head)``; for
    each adapted projection m (q and v; k too for full adaptation) ``A_m (r, d_head)`` and
    ``B_m (d_model, r)``, so that ``B_m A_m`` has the shape of ``W_m``."""
    x, y = shape_of(shapes, "x", label), shape_of(shapes, "y", label)
    if x[:-1] != y[:-1]:
        raise InvalidInputError(
            label("y"),
            f"shape {y} does not match x's {x} (expected [..., {x[-2]}, d_head] with the same "
            "leading dimensions)",
        )
    dm, dh = x[-1], y[-1]
    for name in ("w_q", "w_k", "w_v"):
        w = shape_of(shapes, name, label, exact=2)
        if w != (dm, dh):
            raise InvalidInputError(
                label(name), f"expected shape (d_model, d_head) = ({dm}, {dh}), got {w}"
            )
    present = {n.split(".")[1] for n in shapes if n.startswith("adapters.")}
    for key in sorted(present - set(ADAPTER_NAMES)):
        raise InvalidInputError("adapters", f"unknown adapter name {key!r}; use 'q', 'k' and 'v'")
    for key in ("q", "v"):
        if key not in present:
            raise InvalidInputError(
                "adapters", f"missing {key!r}: partial adaptation needs 'q' and 'v', full adds 'k'"
            )
    for key in ADAPTER_NAMES:
        if key not in present:
            continue
        for part in ("a", "b"):
            if f"adapters.{key}.{part}" not in shapes:
                raise InvalidInputError(f"adapters.{key}.{part}", "missing")
        a_name, b_name = f"adapters.{key}.a", f"adapters.{key}.b"
        a = shape_of(shapes, a_name, label, exact=2)
        b = shape_of(shapes, b_name, label, exact=2)
        if a[1] != dh:
            raise InvalidInputError(
                label(a_name), f"A must have shape (r, d_head) = (r, {dh}), got {a}"
            )
        if b[0] != dm:
            raise InvalidInputError(
                label(b_name), f"B must have shape (d_model, r) = ({dm}, r), got {b}"
            )
        if b[1] != a[0]:
            raise InvalidInputError(
                label(b_name), f"rank mismatch: B has rank {b[1]}, A has rank {a[0]}"
            )
