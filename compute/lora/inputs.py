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

__all__ = ["ADAPTER_NAMES", "Inputs", "adapter_grads", "check_inputs", "effective_weights"]

ADAPTER_NAMES = ("q", "k", "v")


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
    L, dm = xt.shape[-2], xt.shape[-1]
    if tuple(yt.shape[:-1]) != tuple(xt.shape[:-1]):
        raise InvalidInputError(
            "y",
            f"shape {tuple(yt.shape)} does not match x's {tuple(xt.shape)} (expected "
            f"[..., {L}, d_head] with the same leading dimensions)",
        )
    dh = yt.shape[-1]
    if yt.device != xt.device:
        raise InvalidInputError("y", f"on device {yt.device}, x is on {xt.device}")
    weights: dict[str, torch.Tensor] = {}
    for name, wt in (("w_q", w_q), ("w_k", w_k), ("w_v", w_v)):
        t = check_tensor(name, wt)
        if t.dim() != 2 or tuple(t.shape) != (dm, dh):
            raise InvalidInputError(
                name, f"expected shape (d_model, d_head) = ({dm}, {dh}), got {tuple(t.shape)}"
            )
        if t.device != xt.device:
            raise InvalidInputError(name, f"on device {t.device}, x is on {xt.device}")
        weights[name[-1]] = t
    if not isinstance(adapters, Mapping):
        raise InvalidInputError(
            "adapters",
            f"expected a dict like {{'q': (A, B), 'v': (A, B)}}, got {type(adapters).__name__}",
        )
    for key in adapters:
        if key not in ADAPTER_NAMES:
            raise InvalidInputError(
                "adapters", f"unknown adapter name {key!r}; use 'q', 'k' and 'v'"
            )
    for key in ("q", "v"):
        if key not in adapters:
            raise InvalidInputError(
                "adapters",
                f"missing {key!r}: partial adaptation needs 'q' and 'v', full adds 'k'",
            )
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key in ADAPTER_NAMES:
        if key not in adapters:
            continue
        pair = adapters[key]
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise InvalidInputError(f"adapters[{key!r}]", "expected a pair (A, B)")
        a = check_tensor(f"adapters[{key!r}][0]", pair[0])
        b = check_tensor(f"adapters[{key!r}][1]", pair[1])
        if a.dim() != 2 or a.shape[1] != dh:
            raise InvalidInputError(
                f"adapters[{key!r}][0]",
                f"A must have shape (r, d_head) = (r, {dh}), got {tuple(a.shape)}",
            )
        if b.dim() != 2 or b.shape[0] != dm:
            raise InvalidInputError(
                f"adapters[{key!r}][1]",
                f"B must have shape (d_model, r) = ({dm}, r), got {tuple(b.shape)}",
            )
        if b.shape[1] != a.shape[0]:
            raise InvalidInputError(
                f"adapters[{key!r}][1]",
                f"rank mismatch: B has rank {b.shape[1]}, A has rank {a.shape[0]}",
            )
        for nm, t in ((f"adapters[{key!r}][0]", a), (f"adapters[{key!r}][1]", b)):
            if t.device != xt.device:
                raise InvalidInputError(nm, f"on device {t.device}, x is on {xt.device}")
        pairs[key] = (a, b)
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
