"""Gradients of a LoRA-adapted attention head's loss with respect to the adapters, with
certified bounds (docs/lora.md, docs/lora_bound.md).

naive: the float64 definition (autograd through materialised attention); inputs: the checked
arguments and the adapter maps; exact: the blocked closed form; polynomial: reverse mode
through the factored polynomial attention; chained: the exact softmax backward on the same
surrogate weights; certificate: their a-posteriori bound; plan: the predicted degree per
estimator and the costs; api: ``lora_gradient`` itself.
"""

from __future__ import annotations

from .api import lora_gradient
from .inputs import ADAPTER_NAMES
from .plan import plan_lora_gradient

__all__ = ["ADAPTER_NAMES", "lora_gradient", "plan_lora_gradient"]
