"""Attention, tensor attention and LoRA gradients, with certified error bounds.

One public function per operation; each returns the output, a certified bound on its error and
the plan (exact or polynomial, and why). ``OPERATIONS`` is the registry the service derives its
routes, models and dispatch from. PyTorch only: no web or queue imports.
"""

from __future__ import annotations

from ._device import default_device
from .attention import attention, plan_attention
from .errors import (
    Cancelled,
    CertificationError,
    ComputeError,
    InvalidInputError,
    OutOfRangeError,
)
from .lora import lora_gradient, plan_lora_gradient
from .registry import OPERATIONS, Operation
from .result import AttentionResult, LoraResult, Plan
from .tensor_attention import plan_tensor_attention, tensor_attention

__all__ = [
    "OPERATIONS",
    "AttentionResult",
    "Cancelled",
    "CertificationError",
    "ComputeError",
    "InvalidInputError",
    "LoraResult",
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
