"""Hypothesis strategies for floating-point edge cases, and extended-precision references.

Inputs are drawn as *specifications* (exponents, styles, a seed) and built with a seeded
``torch.Generator``, so every example is reproducible from its printed specification:

- dtypes: all four supported (float16, bfloat16, float32, float64);
- exponents over each dtype's whole range, subnormals included (``EXPONENTS``), and scales over
  float64's whole range (2^-1074 .. 2^1023, signed, and 0);
- value styles: ordinary normals, small integers times a power of two (exact even as
  subnormals), entries near the largest finite number, and a wide per-entry dynamic range;
- regimes: "balanced" draws the scale's exponent to compensate the inputs' (scores of order 1
  however extreme each factor is: the polynomial regime at the edges of the exponent range),
  "free" draws everything independently (scores anywhere, overflow included);
- tensor kinds: contiguous, transposed (non-contiguous), strided, expanded (stride 0),
  requires_grad, sparse and meta.

The references (``ref_attention``, ``ref_tensor_attention``, ``ref_lora``) are computed in
numpy's extended precision (``np.longdouble``: 64-bit mantissa, exponent range 2^±16383 on
x86-64), independently of ``compute``: no score of finite float64 inputs overflows there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from hypothesis import strategies as st

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# log2 of the smallest subnormal and of the largest power of two below the largest finite
EXPONENTS = {
    torch.float16: (-24, 15),
    torch.bfloat16: (-133, 127),
    torch.float32: (-149, 127),
    torch.float64: (-1074, 1023),
}
KINDS = ("contiguous", "transposed", "strided", "expanded", "requires_grad", "sparse", "meta")
BAD_KINDS = ("sparse", "meta")
LD = np.longdouble

assert np.finfo(LD).eps < 1e-18, "the references need an extended-precision long double"


def subnormal_spacing(dtype: torch.dtype) -> float:
    fi = torch.finfo(dtype)
    return float(fi.tiny) * float(fi.eps)


def unit_roundoff(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) / 2.0


@dataclass(frozen=True)
class Entries:
    """How one tensor's entries are drawn: ``style`` and the power of two ``exponent``."""

    style: str
    exponent: int


def build(
    gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype, spec: Entries
) -> torch.Tensor:
    """A tensor of ``shape`` and ``dtype`` drawn as ``spec`` says (finite: clamped to the
    dtype's range before the cast)."""
    top = float(torch.finfo(dtype).max)
    base = torch.randn(shape, generator=gen, dtype=torch.float64)
    if spec.style == "ints":
        base = torch.randint(-6, 7, shape, generator=gen).double()
        x = torch.ldexp(base, torch.tensor(spec.exponent, dtype=torch.float64))
    elif spec.style == "near_max":
        sign = torch.where(base >= 0, 1.0, -1.0)
        mag = 0.5 + 0.5 * torch.rand(shape, generator=gen, dtype=torch.float64)
        x = sign * mag * top
    elif spec.style == "wide":
        spread = torch.randint(-40, 41, shape, generator=gen).double()
        x = torch.ldexp(base, spread + spec.exponent)
    else:
        x = torch.ldexp(base, torch.tensor(spec.exponent, dtype=torch.float64))
    return x.clamp(-top, top).to(dtype)


def apply_kind(x: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values (``expanded``: the first row broadcast) as another kind of tensor."""
    if kind == "transposed":
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if kind == "strided":
        wide = torch.zeros((*x.shape[:-1], 2 * x.shape[-1]), dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    if kind == "expanded":
        return x[..., :1, :].expand(x.shape)
    if kind == "requires_grad":
        return x.clone().requires_grad_(True)
    if kind == "sparse":
        return x.to_sparse()
    if kind == "meta":
        return x.to("meta")
    return x


def dense_values(x: torch.Tensor) -> torch.Tensor:
    """The values of a strided tensor (any kind but sparse/meta), detached, contiguous."""
    return x.detach().contiguous()


def to_ld(x: torch.Tensor) -> np.ndarray:
    return dense_values(x).double().numpy().astype(LD)


# ---- strategies ----------------------------------------------------------------------------


def _clamp(e: int, dtype: torch.dtype, margin: int = 4) -> int:
    lo, hi = EXPONENTS[dtype]
    return max(lo + margin, min(hi - margin, e))


KIND_WEIGHTS = ("contiguous",) * 6 + KINDS[1:]  # mostly plain tensors, every kind drawn


@st.composite
def styles(draw: Any, count: int) -> list[str]:
    """Value styles of ``count`` tensors: mostly normal, some of every other style."""
    return [
        draw(st.sampled_from(["normal"] * 5 + ["ints", "near_max", "wide"])) for _ in range(count)
    ]


@st.composite
def exponent_plan(
    draw: Any, dtype: torch.dtype, kinds: list[str], powers: tuple[int, ...] | None = None
) -> tuple[list[int], float]:
    """Exponents of inputs drawn with the styles ``kinds``, and a scale, over the whole ranges.

    ``balanced``: the scale's exponent compensates the inputs' (``sum powers_i e_i``; a
    ``near_max`` input counts with its top exponent) so that the scores are about
    ``2^target``, target in [-6, 2]: the polynomial regime wherever each factor lies in its
    range; ``free``: everything independent (scores anywhere, overflow included).
    """
    lo, hi = EXPONENTS[dtype]
    pw = powers or (1,) * len(kinds)
    regime = draw(st.sampled_from(["balanced", "balanced", "balanced", "free"]))
    exps = [draw(st.integers(lo, hi)) for _ in kinds]
    if regime == "free":
        if draw(st.integers(0, 9)) == 0:
            return exps, 0.0
        es = draw(st.integers(-1074, 1023))
    else:
        exps = [
            hi if k == "near_max" else _clamp(e, dtype, 8)
            for e, k in zip(exps, kinds, strict=False)
        ]
        target = draw(st.integers(-6, 2))
        es = target - sum(p * e for p, e in zip(pw, exps, strict=False))
        if not -1070 <= es <= 1020:  # move a free input's exponent instead, within its range
            es = max(-1070, min(1020, es))
            free = [i for i, k in enumerate(kinds) if k != "near_max"]
            if free:
                i = free[0]
                rest = (
                    target
                    - es
                    - sum(p * e for j, (p, e) in enumerate(zip(pw, exps, strict=False)) if j != i)
                )
                exps[i] = _clamp(rest // pw[i], dtype, 8)
    mant = draw(st.floats(1.0, 2.0, exclude_max=True))
    sign = draw(st.sampled_from([1.0, -1.0]))
    return exps, sign * math.ldexp(mant, es)


def entries_for(style: str, exponent: int, dtype: torch.dtype, draw: Any) -> Entries:
    lo, _ = EXPONENTS[dtype]
    if style == "ints":  # small integers times a power of two: subnormal when it is small
        exponent = draw(st.sampled_from([lo, lo + 1, lo + 3, exponent]))
    return Entries(style, exponent)


def value_exponent(draw: Any, dtype: torch.dtype) -> int:
    lo, hi = EXPONENTS[dtype]
    return draw(st.sampled_from([0, lo, lo + 2, hi - 1, draw(st.integers(lo, hi))]))


@dataclass(frozen=True)
class AttentionCase:
    dtype: torch.dtype
    lead: tuple[int, ...]
    n: int
    m: int
    d: int
    dv: int
    q: Entries
    k: Entries
    v: Entries
    scale: float
    causal: bool
    method: str
    eps: float
    kind: str
    kind_arg: str
    sample_rows: int
    seed: int


@st.composite
def attention_cases(draw: Any) -> AttentionCase:
    dtype = draw(st.sampled_from(DTYPES))
    sq, sk, sv = draw(styles(3))
    (eq, ek), scale = draw(exponent_plan(dtype, [sq, sk]))
    return AttentionCase(
        dtype=dtype,
        lead=draw(st.sampled_from([(), (2,), (1, 2)])),
        n=draw(st.integers(1, 40)),
        m=draw(st.integers(1, 40)),
        d=draw(st.integers(1, 4)),
        dv=draw(st.integers(1, 3)),
        q=entries_for(sq, eq, dtype, draw),
        k=entries_for(sk, ek, dtype, draw),
        v=entries_for(sv, value_exponent(draw, dtype), dtype, draw),
        scale=scale,
        causal=draw(st.booleans()),
        method=draw(st.sampled_from(["auto", "exact", "polynomial", "polynomial"])),
        eps=draw(st.sampled_from([0.3, 0.1, 1e-2, 1e-3, 1e-6])),
        kind=draw(st.sampled_from(KIND_WEIGHTS)),
        kind_arg=draw(st.sampled_from(["q", "k", "v"])),
        sample_rows=draw(st.sampled_from([0, 0, 3])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@dataclass(frozen=True)
class TensorCase:
    dtype: torch.dtype
    lead: tuple[int, ...]
    n: int
    n1: int
    n2: int
    d: int
    dv: int
    q: Entries
    k1: Entries
    k2: Entries
    v1: Entries
    v2: Entries
    scale: float
    method: str
    eps: float
    kind: str
    kind_arg: str
    sample_rows: int
    seed: int


@st.composite
def tensor_cases(draw: Any) -> TensorCase:
    dtype = draw(st.sampled_from(DTYPES))
    sty = draw(styles(5))
    (eq, e1, e2), scale = draw(exponent_plan(dtype, sty[:3]))
    return TensorCase(
        dtype=dtype,
        lead=draw(st.sampled_from([(), (2,)])),
        n=draw(st.integers(1, 9)),
        n1=draw(st.integers(1, 9)),
        n2=draw(st.integers(1, 9)),
        d=draw(st.integers(1, 3)),
        dv=draw(st.integers(1, 2)),
        q=entries_for(sty[0], eq, dtype, draw),
        k1=entries_for(sty[1], e1, dtype, draw),
        k2=entries_for(sty[2], e2, dtype, draw),
        v1=entries_for(sty[3], value_exponent(draw, dtype), dtype, draw),
        v2=entries_for(sty[4], value_exponent(draw, dtype), dtype, draw),
        scale=scale,
        method=draw(st.sampled_from(["auto", "exact", "polynomial", "polynomial"])),
        eps=draw(st.sampled_from([0.3, 0.1, 1e-2, 1e-3, 1e-6])),
        kind=draw(st.sampled_from(KIND_WEIGHTS)),
        kind_arg=draw(st.sampled_from(["q", "k1", "k2", "v1", "v2"])),
        sample_rows=draw(st.sampled_from([0, 0, 2])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@dataclass(frozen=True)
class LoraCase:
    dtype: torch.dtype
    L: int
    dm: int
    dh: int
    rank: int
    full: bool
    x: Entries
    w: Entries
    y: Entries
    a: Entries
    scale: float
    alpha: float
    method: str
    eps: float
    kind: str
    kind_arg: str
    seed: int


@st.composite
def lora_cases(draw: Any) -> LoraCase:
    dtype = draw(st.sampled_from(DTYPES))
    lo, hi = EXPONENTS[dtype]
    sx, sw, sy, sa = draw(styles(4))
    # the scores are scale * (x W_q)(x W_k)^T: x and W twice each
    (ex, ew), scale = draw(exponent_plan(dtype, [sx, sw], (2, 2)))
    ey = draw(st.sampled_from([0, lo, hi - 1, ex + ew]))
    ea = draw(st.sampled_from([-2, -2, lo + 2, hi - 2]))
    return LoraCase(
        dtype=dtype,
        L=draw(st.integers(2, 12)),
        dm=draw(st.integers(1, 4)),
        dh=draw(st.integers(1, 3)),
        rank=draw(st.integers(1, 2)),
        full=draw(st.booleans()),
        x=entries_for(sx, ex, dtype, draw),
        w=entries_for(sw, ew, dtype, draw),
        y=entries_for(sy, max(lo, min(hi - 1, ey)), dtype, draw),
        a=entries_for(sa, ea, dtype, draw),
        scale=scale,
        alpha=draw(st.sampled_from([1.0, 0.5, 16.0])),
        method=draw(st.sampled_from(["auto", "exact", "polynomial", "polynomial"])),
        eps=draw(st.sampled_from([0.3, 0.1, 1e-2, 1e-3])),
        kind=draw(st.sampled_from(KIND_WEIGHTS)),
        kind_arg=draw(st.sampled_from(["x", "y", "w_q", "w_k", "w_v"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


# ---- extended-precision references ----------------------------------------------------------


def _softmax_rows(s: np.ndarray) -> np.ndarray:
    e = np.exp(s - s.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def ref_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
) -> tuple[np.ndarray, float]:
    """Attention in extended precision: ``([..., n, dv], max |scale| sum_l |q_il| |k_jl|)``."""
    q_, k_, v_ = to_ld(q), to_ld(k), to_ld(v)
    sc = LD(scale)
    s = sc * np.matmul(q_, np.swapaxes(k_, -1, -2))  # [..., n, m]
    s_abs = abs(sc) * np.matmul(np.abs(q_), np.swapaxes(np.abs(k_), -1, -2))
    if causal:
        n, m = s.shape[-2:]
        hidden = np.triu(np.ones((n, m), dtype=bool), 1)
        s = np.where(hidden, LD(-np.inf), s)
    out = np.matmul(_softmax_rows(s), v_)
    return out, float(s_abs.max())


def ref_tensor_attention(
    q: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
    v1: torch.Tensor,
    v2: torch.Tensor,
    scale: float,
) -> tuple[np.ndarray, float]:
    """Tensor attention in extended precision: ``([..., n, dv], max |scores| bound)``."""
    q_, a_, b_, v1_, v2_ = (to_ld(t) for t in (q, k1, k2, v1, v2))
    sc = LD(scale)
    s = sc * np.einsum("...il,...jl,...kl->...ijk", q_, a_, b_)  # [..., n, n1, n2]
    s_abs = abs(sc) * np.einsum("...il,...jl,...kl->...ijk", *(np.abs(x) for x in (q_, a_, b_)))
    shape = s.shape
    w = _softmax_rows(s.reshape(*shape[:-2], shape[-2] * shape[-1])).reshape(shape)
    out = np.einsum("...ijk,...jc,...kc->...ic", w, v1_, v2_)
    return out, float(s_abs.max())


def ref_lora(
    x: torch.Tensor,
    y: torch.Tensor,
    w: dict[str, torch.Tensor],
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]],
    alpha: float,
    scale: float,
) -> tuple[float, dict[str, tuple[np.ndarray, np.ndarray]], float]:
    """Loss, adapter gradients and the largest ``|scale| |q_i| |k_j|`` sum, in extended
    precision, from the closed form of the gradient (one head, no mask)."""
    x_, y_ = to_ld(x), to_ld(y)
    weights = {}
    for mu in ("q", "k", "v"):
        wm = to_ld(w[mu])
        if mu in adapters:
            a, b = (to_ld(t) for t in adapters[mu])
            wm = wm + LD(alpha / a.shape[0]) * (b @ a)
        weights[mu] = wm
    q, k, v = (x_ @ weights[mu] for mu in ("q", "k", "v"))
    sc = LD(scale)
    f = _softmax_rows(sc * (q @ k.T))
    o = f @ v
    e = o - y_
    loss = float(LD(0.5) * (e * e).sum())
    ds = f * (e @ v.T - (e * o).sum(axis=-1, keepdims=True))
    dw = {"q": x_.T @ (sc * ds @ k), "k": x_.T @ (sc * ds.T @ q), "v": x_.T @ (f.T @ e)}
    grads = {}
    for mu, (a_t, b_t) in adapters.items():
        a, b = to_ld(a_t), to_ld(b_t)
        s = LD(alpha / a.shape[0])
        grads[mu] = (s * (b.T @ dw[mu]), s * (dw[mu] @ a.T))
    s_abs = float(abs(sc) * (np.abs(q) @ np.abs(k).T).max())
    return loss, grads, s_abs
