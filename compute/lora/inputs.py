"""LoRA's inputs: checked, flattened, and the maps between adapters and weight gradients
(docs/lora.md).

``W_mu = W*_mu + (alpha / r_mu) B_mu A_mu`` for each adapted ``mu``; the gradients of the
adapters are ``dA = (alpha / r) B^T dW`` and ``dB = (alpha / r) dW A^T``, returned in the dtype
of A and of B (as autograd would give them).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..core.errors import InvalidInputError, OutOfRangeError
from ..core.validate import check_scale, check_tensor, compute_dtype_of
from . import shapes

__all__ = ["ADAPTER_NAMES", "Inputs", "adapter_grads", "check_inputs", "effective_weights"]

ADAPTER_NAMES = shapes.ADAPTER_NAMES


@dataclass(frozen=True)
class Inputs:
    x: torch.Tensor  # [nb, L, dm]
    y: torch.Tensor  # [nb, L, dh]
    w: dict[str, torch.Tensor]  # frozen weights [dm, dh]
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]]  # A [r, dh], B [dm, r]
    alpha: float
    scale: float
    lead: tuple[int, ...]
    dtype: torch.dtype  # compute dtype of the exact path


def _argument(name: str) -> str:
    """A wire name (``adapters.q.a``) as ``lora_gradient``'s argument (``adapters['q'][0]``)."""
    if name.startswith("adapters."):
        _, key, part = name.split(".", 2)
        return f"adapters[{key!r}][{'ab'.index(part)}]"
    return name


def check_inputs(
    x: object,
    y: object,
    w_q: object,
    w_k: object,
    w_v: object,
    adapters: object,
    alpha: object,
    scale: object,
) -> Inputs:
    """Check every argument of ``lora_gradient`` (each error names it) and flatten the
    leading dimensions: ``x [nb, L, dm]``, ``y [nb, L, dh]``."""
    xt = check_tensor("x", x)
    yt = check_tensor("y", y)
    weights = {
        name[-1]: check_tensor(name, wt) for name, wt in (("w_q", w_q), ("w_k", w_k), ("w_v", w_v))
    }
    if not isinstance(adapters, Mapping):
        raise InvalidInputError(
            "adapters",
            f"expected a dict like {{'q': (A, B), 'v': (A, B)}}, got {type(adapters).__name__}",
        )
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in ADAPTER_NAMES:
        if key not in adapters:
            continue
        pair = adapters[key]
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise InvalidInputError(f"adapters[{key!r}]", "expected a pair (A, B)")
        pairs[key] = (
            check_tensor(f"adapters[{key!r}][0]", pair[0]),
            check_tensor(f"adapters[{key!r}][1]", pair[1]),
        )
    # the shape rule (lora.shapes, the service's too), on the wire's names, told in ours
    named = {"x": xt, "y": yt, **{f"w_{m}": t for m, t in weights.items()}}
    for m, (a, b) in pairs.items():
        named[f"adapters.{m}.a"], named[f"adapters.{m}.b"] = a, b
    sizes = {n: tuple(t.shape) for n, t in named.items()}
    for key in adapters:  # names the rule refuses, so that it says so (not a silent drop)
        if key not in ADAPTER_NAMES:
            sizes[f"adapters.{key}.a"] = sizes[f"adapters.{key}.b"] = (1, 1)
    shapes.check_shapes(sizes, label=_argument)
    for name, t in named.items():
        if t.device != xt.device:
            raise InvalidInputError(_argument(name), f"on device {t.device}, x is on {xt.device}")
    L, dm, dh = xt.shape[-2], xt.shape[-1], yt.shape[-1]
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise InvalidInputError("alpha", f"expected a number, got {alpha!r}")
    if not math.isfinite(float(alpha)):
        raise InvalidInputError("alpha", f"must be finite, got {alpha!r}")
    sc = check_scale(scale, dh)
    lead = tuple(xt.shape[:-2])
    tensors = [xt, yt, *weights.values()] + [t for p in pairs.values() for t in p]
    return Inputs(
        x=xt.reshape(-1, L, dm),
        y=yt.reshape(-1, L, dh),
        w=weights,
        adapters=pairs,
        alpha=float(alpha),
        scale=sc,
        lead=lead,
        dtype=compute_dtype_of(*tensors),
    )


def effective_weights(inp: Inputs, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``W_mu = W*_mu + (alpha / r) B A`` in ``dtype``: [dm, dh] each."""
    out = {}
    for mu in ADAPTER_NAMES:
        w = inp.w[mu].to(dtype)
        if mu in inp.adapters:
            a, b = (t.to(dtype) for t in inp.adapters[mu])
            s = inp.alpha / a.shape[0]
            w = w + s * (b @ a)  # [dm, dh]
        out[mu] = w
    return out


def adapter_grads(
    inp: Inputs, dw: dict[str, torch.Tensor]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``dA = s B^T dW`` [r, dh], ``dB = s dW A^T`` [dm, r], in the adapters' dtypes."""
    grads = {}
    for mu, (a, b) in inp.adapters.items():
        g = dw[mu]
        s = inp.alpha / a.shape[0]
        da = s * (b.to(g.dtype).T @ g)  # [r, dh]
        db = s * (g @ a.to(g.dtype).T)  # [dm, r]
        grads[mu] = (da.to(a.dtype), db.to(b.dtype))
        for i, t in enumerate(grads[mu]):
            if not bool(torch.isfinite(t).all()):
                name = f"adapters[{mu!r}][{i}]"
                raise OutOfRangeError(
                    name,
                    f"the gradient d{'AB'[i]}_{mu} does not fit {t.dtype} (it overflows or is "
                    f"not finite in float64); pass float64 adapters, or rescale x, y or scale",
                )
    return grads
