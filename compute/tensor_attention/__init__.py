"""Tensor (triple-wise) attention, exact and polynomial, with certified bounds
(docs/tensor_attention.md).

naive: the float64 definition every path is tested against; exact: the blocked cubic path;
polynomial: the factored path (PyTorch route); native/: the compiled CPU route of the same
steps; balance: exact power-of-two rescaling; stats: the numbers of one call from one host
sync; bound: the certified a-priori bound; plan: the planner; api: ``tensor_attention`` itself.
"""

from __future__ import annotations

from .api import tensor_attention
from .native import kernel_status
from .plan import plan_tensor_attention

__all__ = ["kernel_status", "plan_tensor_attention", "tensor_attention"]
