"""Attention, tensor attention and LoRA gradients, with certified error bounds.

One public function per operation; each returns the output, a certified bound on its error and
the plan (exact or polynomial, and why). PyTorch only: no web or queue imports. Each operation
is a package (``attention/``, ``tensor_attention/``, ``lora/``) with its naive reference beside
its fast paths; what they share is in ``core/`` (docs/architecture_compute.md). ``OPERATIONS``
is the registry the service derives its routes, models and dispatch from.
"""

from __future__ import annotations

from .attention import attention, plan_attention
from .core.calibration import recalibrate
from .core.device import default_device
from .core.errors import (
    Cancelled,
    CertificationError,
    ComputeError,
    InvalidInputError,
    OutOfRangeError,
)
from .core.result import AttentionResult, LoraResult, Plan
from .lora import lora_gradient, plan_lora_gradient
from .radii import Radius, attention_radius, lora_radius, tensor_attention_radius
from .registry import OPERATIONS, Operation, radius
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
    "Radius",
    "attention",
    "attention_radius",
    "default_device",
    "lora_gradient",
    "lora_radius",
    "plan_attention",
    "plan_lora_gradient",
    "plan_tensor_attention",
    "radius",
    "recalibrate",
    "tensor_attention",
    "tensor_attention_radius",
]
