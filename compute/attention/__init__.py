"""Softmax attention, exact or by the polynomial method, with a certified error bound
(docs/attention.md).

naive: the float64 definition every path is tested against; exact: blocked online softmax;
polynomial: the factored path; balance: exact power-of-two rescaling; stats: the numbers of one
call from one host sync; bound: the certified a-priori bound; cost and plan: the planner;
native: the compiled float32 CPU route (statistics and the polynomial core); api:
``attention`` itself.
"""

from __future__ import annotations

from .api import attention
from .native import kernel_status
from .plan import plan_attention

__all__ = ["attention", "kernel_status", "plan_attention"]
