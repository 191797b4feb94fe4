"""Device selection (cuda when available, else cpu) and what the device's float32 products are."""

from __future__ import annotations

import torch

from .errors import InvalidInputError

__all__ = ["default_device", "float32_matmul_is_ieee", "resolve_device"]


def default_device() -> torch.device:
    """``cuda`` when a CUDA device is available, else ``cpu``."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device a plan function prices: ``device``, or :func:`default_device` when None."""
    if device is None:
        return default_device()
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidInputError("device", f"unknown device {device!r} ({exc})") from None


def float32_matmul_is_ieee() -> bool:
    """False when float32 matrix products may run in TF32 or bf16 (``torch.backends.cuda.matmul
    .allow_tf32``, or a float32 matmul precision other than ``"highest"``, which lets CUDA and
    oneDNN round the operands to 10 or 8 bits): the float32 rounding model of the certified
    bounds then does not hold, and only float64 polynomial paths are certified."""
    if torch.get_float32_matmul_precision() != "highest":
        return False
    return not bool(torch.backends.cuda.matmul.allow_tf32)
