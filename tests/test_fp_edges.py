"""The certificate holds on every finite input (issue #16): extreme scales, subnormals, overflow,
every tensor kind, and the three gaps of the rounding argument.

Every case ends in one of two outcomes, and the tests assert which:

- a result: finite, of the documented dtype and shape, never requiring grad; its measured error
  against an extended-precision reference (``tests/strategies.py``, numpy long double, computed
  independently of ``compute``) is at most the reported bound (polynomial) or within the
  rounding of its dtype (exact: a tolerance from the cancellation-free size of the scores and
  values), and it lies in the range the exact output must lie in;
- a ``ValueError`` subclass of ``compute``: ``InvalidInputError`` naming the argument for sparse
  and meta tensors, ``CertificationError`` only for ``method="polynomial"``, and
  ``OutOfRangeError`` naming an input and saying what to do, only where the reference shows the
  answer (or its scores) out of the representable range.

Any other exception type fails the test (it propagates), as does NaN/inf with a finite bound.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from strategies import (
    BAD_KINDS,
    EXPONENTS,
    LD,
    AttentionCase,
    Entries,
    LoraCase,
    TensorCase,
    apply_kind,
    attention_cases,
    build,
    dense_values,
    lora_cases,
    ref_attention,
    ref_lora,
    ref_tensor_attention,
    subnormal_spacing,
    tensor_cases,
    unit_roundoff,
)

import compute
from compute.attention import native as att_native
from compute.attention import polynomial as att_poly
from compute.core.monomials import monomial_table, weight_max, weights
from compute.core.polynomials import approximation, certified_best, grid_radius, tv_factor
from compute.tensor_attention import native as ta_native

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
SETTINGS = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
HUGE_SCORES = 2.0**990  # beyond this a score (hence the softmax shift) may not fit float64


# ---- outcome checks -------------------------------------------------------------------------


def check_refusal(
    exc: ValueError, *, names: tuple[str, ...], method: str, kind: str, out_of_range: bool
) -> None:
    """A refusal must be one of compute's ValueErrors, with the reason the case allows."""
    assert isinstance(exc, compute.ComputeError), f"{type(exc).__name__}: {exc}"
    event(f"refused: {type(exc).__name__}" + (f" ({kind})" if kind in BAD_KINDS else ""))
    msg = str(exc)
    note(f"refused: {type(exc).__name__}: {msg}")
    if kind in BAD_KINDS:
        assert isinstance(exc, compute.InvalidInputError)
        assert exc.argument in names and kind in msg
    elif isinstance(exc, compute.OutOfRangeError):
        assert exc.argument in names
        assert "float64" in msg or "rescale" in msg  # what to do
        assert out_of_range, f"refused although the reference is in range: {msg}"
    elif isinstance(exc, compute.CertificationError):
        assert method == "polynomial"
        event("why: " + msg.split(":")[-1][:70])
    else:
        raise AssertionError(f"a valid input was refused: {msg}")


def check_output(out: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    assert out.dtype == dtype and tuple(out.shape) == shape
    assert not out.requires_grad
    assert bool(torch.isfinite(out).all()), "NaN/inf output"


def exact_tolerance(
    vmax: float, s_abs: float, inner: int, d: int, in_dtype: torch.dtype, out_dtype: torch.dtype
) -> float:
    """What an exact path in the input's compute dtype may err by: score rounding (relative
    ``(d + 4) u`` of the cancellation-free score size, amplified by exp), the weighted sums
    (``inner + 4`` roundings) and the output cast, with a factor 8 of slack."""
    u = unit_roundoff(F64 if in_dtype == F64 else F32)
    with np.errstate(over="ignore"):
        amp = math.expm1(min(700.0, 2.0 * (d + 4) * u * s_abs))
    rel = 2.0 * amp + (inner + 4) * u + unit_roundoff(out_dtype)
    tiny = subnormal_spacing(out_dtype) + subnormal_spacing(F32)
    return 8.0 * (rel * vmax + tiny)


def make_attention(case: AttentionCase) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(case.seed)
    dt = case.dtype
    q = build(gen, (*case.lead, case.n, case.d), dt, case.q)
    k = build(gen, (*case.lead, case.m, case.d), dt, case.k)
    v = build(gen, (*case.lead, case.m, case.dv), dt, case.v)
    return {"q": q, "k": k, "v": v}


# ---- attention --------------------------------------------------------------------------------


def run_attention_case(case: AttentionCase) -> None:
    note(repr(case))
    plain = make_attention(case)
    args = dict(plain)
    args[case.kind_arg] = apply_kind(plain[case.kind_arg], case.kind)
    if case.kind == "expanded":
        plain[case.kind_arg] = dense_values(args[case.kind_arg])
    ref, s_abs = ref_attention(plain["q"], plain["k"], plain["v"], case.scale, case.causal)
    try:
        res = compute.attention(
            args["q"],
            args["k"],
            args["v"],
            method=case.method,
            eps=case.eps,
            scale=case.scale,
            causal=case.causal,
            sample_rows=case.sample_rows,
        )
    except ValueError as exc:
        check_refusal(
            exc,
            names=("q", "k", "v"),
            method=case.method,
            kind=case.kind,
            out_of_range=s_abs >= HUGE_SCORES,
        )
        return
    assert case.kind not in BAD_KINDS, "a sparse/meta tensor was accepted"
    v = plain["v"]
    check_output(res.output, v.dtype, (*case.lead, case.n, case.dv))
    out = res.output.double().numpy().astype(LD)
    err = float(np.abs(out - ref).max())
    v64 = v.double()
    vmax = float(v64.abs().max())
    # the exact output is a convex combination of the values: every column within its range
    lo, hi = v64.amin(dim=-2, keepdim=True), v64.amax(dim=-2, keepdim=True)
    slack = (res.error_bound or 0.0) + 4 * unit_roundoff(v.dtype) * vmax
    assert bool(
        (res.output.double() >= lo - slack).all() and (res.output.double() <= hi + slack).all()
    )
    note(f"plan={res.plan.method} err={err:.3g} bound={res.error_bound} s_abs={s_abs:.3g}")
    event(f"{res.plan.method} {case.dtype}")
    # every result carries a certified bound (the exact path's: its rounding model)
    # (finite except where the values' own range, which bounds the exact path's error, is beyond
    # float64: then no float64 number bounds the error)
    assert res.error_bound is not None
    with np.errstate(over="ignore"):
        range_overflows = not math.isfinite(float((hi - lo).max()))
    assert math.isfinite(res.error_bound) or (res.plan.method == "exact" and range_overflows)
    assert err <= res.error_bound, f"{res.plan.method} off by {err:.3g} > {res.error_bound:.3g}"
    if res.plan.method == "polynomial":
        assert res.error_bound <= case.eps * vmax * (1 + 1e-9) + 1e-300
    else:
        tol = exact_tolerance(vmax, s_abs, case.m, case.d, case.dtype, v.dtype)
        if math.isfinite(tol):
            assert err <= tol, f"exact path off by {err:.3g} > {tol:.3g}"
    if case.sample_rows:
        assert res.measured_error is not None and math.isfinite(res.measured_error)


@SETTINGS
@given(attention_cases())
def test_attention_every_finite_input(case: AttentionCase) -> None:
    run_attention_case(case)


# ---- tensor attention --------------------------------------------------------------------------


def run_tensor_case(case: TensorCase, native: bool) -> None:
    note(repr(case))
    gen = torch.Generator().manual_seed(case.seed)
    dt = case.dtype
    shapes = {
        "q": (case.n, case.d),
        "k1": (case.n1, case.d),
        "k2": (case.n2, case.d),
        "v1": (case.n1, case.dv),
        "v2": (case.n2, case.dv),
    }
    plain = {
        name: build(gen, (*case.lead, *shape), dt, getattr(case, name))
        for name, shape in shapes.items()
    }
    args = dict(plain)
    args[case.kind_arg] = apply_kind(plain[case.kind_arg], case.kind)
    if case.kind == "expanded":
        plain[case.kind_arg] = dense_values(args[case.kind_arg])
    names = ("q", "k1", "k2", "v1", "v2")
    ref, s_abs = ref_tensor_attention(*(plain[nm] for nm in names), case.scale)
    fmax = float(torch.finfo(dt).max)
    saved = ta_native.NATIVE
    ta_native.NATIVE = native
    try:
        res = compute.tensor_attention(
            *(args[nm] for nm in names),
            method=case.method,
            eps=case.eps,
            scale=case.scale,
            sample_rows=case.sample_rows,
        )
    except ValueError as exc:
        big = float(np.abs(ref).max()) >= fmax * (1 - 1e-2)
        check_refusal(
            exc,
            names=names,
            method=case.method,
            kind=case.kind,
            out_of_range=big or s_abs >= HUGE_SCORES,
        )
        return
    finally:
        ta_native.NATIVE = saved
    assert case.kind not in BAD_KINDS, "a sparse/meta tensor was accepted"
    check_output(res.output, dt, (*case.lead, case.n, case.dv))
    out = res.output.double().numpy().astype(LD)
    err = float(np.abs(out - ref).max())
    v1, v2 = plain["v1"].double(), plain["v2"].double()
    prod = v1.unsqueeze(-2) * v2.unsqueeze(-3)  # [..., n1, n2, dv]
    vmax = float(prod.abs().max())
    note(f"plan={res.plan.method} err={err:.3g} bound={res.error_bound} s_abs={s_abs:.3g}")
    event(f"{res.plan.method} {case.dtype}")
    # every result carries a certified bound (the exact path's: its rounding model)
    assert res.error_bound is not None and math.isfinite(res.error_bound)
    assert err <= res.error_bound, f"{res.plan.method} off by {err:.3g} > {res.error_bound:.3g}"
    if res.plan.method == "exact":
        tol = exact_tolerance(vmax, s_abs, case.n1 * case.n2, case.d, dt, dt)
        # the kernel forms sum_j2 w v2 before multiplying by v1 and dividing by the weights'
        # sum (at least e^-2h with its fixed shift h <= 20): a subnormal partial sum's
        # rounding comes back amplified by max|v1| e^(2h)
        v1max = float(v1.abs().max())
        amp = math.exp(min(40.0, 2.0 * s_abs))
        tol += 8.0 * subnormal_spacing(F32) * (1.0 + v1max) * case.n1 * case.n2 * amp
        if math.isfinite(tol):
            assert err <= tol, f"exact path off by {err:.3g} > {tol:.3g}"
    if case.sample_rows:
        assert res.measured_error is not None and math.isfinite(res.measured_error)


@SETTINGS
@given(tensor_cases(), st.booleans())
def test_tensor_attention_every_finite_input(case: TensorCase, native: bool) -> None:
    run_tensor_case(case, native)


# ---- LoRA -----------------------------------------------------------------------------------


def run_lora_case(case: LoraCase) -> None:
    note(repr(case))
    gen = torch.Generator().manual_seed(case.seed)
    dt = case.dtype
    L, dm, dh, r = case.L, case.dm, case.dh, case.rank
    plain: dict[str, torch.Tensor] = {
        "x": build(gen, (L, dm), dt, case.x),
        "y": build(gen, (L, dh), dt, case.y),
    }
    for mu in "qkv":
        plain[f"w_{mu}"] = build(gen, (dm, dh), dt, case.w)
    adapters = {
        mu: (build(gen, (r, dh), dt, case.a), build(gen, (dm, r), dt, case.a))
        for mu in ("qkv" if case.full else "qv")
    }
    args = dict(plain)
    args[case.kind_arg] = apply_kind(plain[case.kind_arg], case.kind)
    if case.kind == "expanded":
        plain[case.kind_arg] = dense_values(args[case.kind_arg])
    w = {mu: plain[f"w_{mu}"] for mu in "qkv"}
    loss, grads, s_abs = ref_lora(plain["x"], plain["y"], w, adapters, case.alpha, case.scale)
    sizes = lora_sizes(plain["x"], plain["y"], w, adapters, case.alpha, case.scale)
    fmax = float(torch.finfo(dt).max)
    ref_top = max(float(np.abs(g).max()) for pair in grads.values() for g in pair)
    try:
        res = compute.lora_gradient(
            args["x"],
            args["y"],
            w_q=args["w_q"],
            w_k=args["w_k"],
            w_v=args["w_v"],
            adapters=adapters,
            alpha=case.alpha,
            method=case.method,
            eps=case.eps,
            scale=case.scale,
        )
    except ValueError as exc:
        out_of_range = (
            not math.isfinite(loss)
            or loss >= 1e300
            or not math.isfinite(ref_top)
            or ref_top >= fmax / 4
            or s_abs >= HUGE_SCORES
        )
        check_refusal(
            exc,
            names=(
                "x",
                "y",
                "w_q",
                "w_k",
                "w_v",
                *tuple(f"adapters[{mu!r}][{i}]" for mu in "qkv" for i in (0, 1)),
            ),
            method=case.method,
            kind=case.kind,
            out_of_range=out_of_range,
        )
        return
    assert case.kind not in BAD_KINDS, "a sparse/meta tensor was accepted"
    assert math.isfinite(res.loss)
    note(f"plan={res.plan.method} bounds={res.error_bounds} s_abs={s_abs:.3g}")
    event(f"{res.plan.method} {case.dtype}")
    u = unit_roundoff(F64 if dt == F64 else F32)
    for mu, (ga, gb) in res.grads.items():
        for i, got in enumerate((ga, gb)):
            check_output(got, adapters[mu][i].dtype, tuple(adapters[mu][i].shape))
            want = grads[mu][i]
            err = float(np.abs(got.double().numpy().astype(LD) - want).max())
            assert res.error_bounds is not None  # both methods report bounds
            b = res.error_bounds[mu][i]
            # (the exact path's bound is None only where the scores' rounding alone may move the
            # softmax by a factor beyond 1.5: s_abs of order 1e5 or more in float32)
            assert b is not None or (res.plan.method == "exact" and s_abs * u > 1e-4)
            if b is not None:
                assert err <= b, f"d{'AB'[i]}_{mu}: {err:.3g} > {b}"
            if res.plan.method == "exact":
                inner = L + dm + dh + r + 8
                tol = 64.0 * inner * u * (1.0 + s_abs) * sizes[mu][i]
                tol += 2.0 * unit_roundoff(got.dtype) * float(np.abs(want).max())
                tol += 4.0 * subnormal_spacing(got.dtype)
                if math.isfinite(tol) and s_abs < 1e3:
                    assert err <= tol, f"exact d{'AB'[i]}_{mu} off by {err:.3g} > {tol:.3g}"


def lora_sizes(
    x: torch.Tensor,
    y: torch.Tensor,
    w: dict[str, torch.Tensor],
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]],
    alpha: float,
    scale: float,
) -> dict[str, tuple[float, float]]:
    """Cancellation-free sizes of the adapter gradients (for the exact path's tolerance), from
    the closed form with every factor bounded by its largest magnitude (rows of softmax weights
    sum to 1): ``|dQ| <= 2 |scale| |E| |V| |K|``, ``|dK| <= 2 |scale| L |E| |V| |Q|``,
    ``|dV| <= L |E|``, ``|dW| <= L |X| |d.|``, ``|dA| <= |s| d_model |B| |dW|``,
    ``|dB| <= |s| d_head |dW| |A|``."""
    L, dm = x.shape
    dh = y.shape[-1]

    def top(t: torch.Tensor) -> float:
        return float(t.detach().double().abs().max())

    xm = top(x)
    proj = {}
    for mu in "qkv":
        wm = top(w[mu]) * dm * xm
        if mu in adapters:
            a, b = adapters[mu]
            wm += abs(alpha) / a.shape[0] * dm * xm * a.shape[0] * top(a) * top(b)
        proj[mu] = wm
    e = proj["v"] + top(y)
    d_proj = {
        "q": 2 * abs(scale) * e * proj["v"] * proj["k"],
        "k": 2 * abs(scale) * L * e * proj["v"] * proj["q"],
        "v": L * e,
    }
    out = {}
    for mu, (a, b) in adapters.items():
        dw = L * xm * d_proj[mu]
        s = abs(alpha) / a.shape[0]
        out[mu] = (s * dm * top(b) * dw, s * dh * dw * top(a))
    return out


@settings(SETTINGS, max_examples=200)
@given(lora_cases())
def test_lora_every_finite_input(case: LoraCase) -> None:
    run_lora_case(case)


# ---- the polynomial regime at the ends of the exponent range (issue items 1 and 2) -----------


@st.composite
def balanced_attention(draw: Any) -> AttentionCase:
    """Scores of order 1 made of factors anywhere in the exponent range (scale compensating),
    values of any normal size: the polynomial path must certify eps = 1e-2 and hold it."""
    dtype = draw(st.sampled_from(list(EXPONENTS)))
    lo, hi = EXPONENTS[dtype]
    normal_lo = lo + int(-math.log2(float(torch.finfo(dtype).eps))) + 4  # smallest normal + 4
    eq = draw(st.integers(normal_lo, hi - 4))
    ek = draw(st.integers(normal_lo, hi - 4))
    es = -(eq + ek) - draw(st.integers(1, 3))
    if not -1070 <= es <= 1020:  # keep the scale a float64 number: move q's exponent
        es = max(-1070, min(1020, es))
        eq = max(normal_lo, min(hi - 4, -(es + ek) - 2))
    return AttentionCase(
        dtype=dtype,
        lead=(),
        n=draw(st.integers(1, 64)),
        m=draw(st.integers(1, 64)),
        d=draw(st.integers(1, 3)),
        dv=draw(st.integers(1, 2)),
        q=Entries("normal", eq),
        k=Entries("normal", ek),
        v=Entries("normal", draw(st.integers(normal_lo, hi - 4))),
        scale=math.ldexp(draw(st.sampled_from([1.0, -1.0])), es),
        causal=draw(st.booleans()),
        method="polynomial",
        eps=1e-2,
        kind="contiguous",
        kind_arg="q",
        sample_rows=0,
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@settings(SETTINGS, max_examples=120)
@given(balanced_attention())
def test_attention_polynomial_certifies_at_any_exponent(case: AttentionCase) -> None:
    """Balancing keeps every monomial in range whatever the exponents of q, k and the scale
    (float32 scale 2^124 with q, k ~ 2^-62 once erred by 0.53 against a bound of 1.35e-3)."""
    note(repr(case))
    a = make_attention(case)
    res = compute.attention(
        a["q"], a["k"], a["v"], method="polynomial", eps=case.eps, scale=case.scale,
        causal=case.causal,
    )  # fmt: skip
    ref, _ = ref_attention(a["q"], a["k"], a["v"], case.scale, case.causal)
    err = float(np.abs(res.output.double().numpy().astype(LD) - ref).max())
    assert res.error_bound is not None and err <= res.error_bound
    check_output(res.output, case.dtype, (case.n, case.dv))


@pytest.mark.parametrize("dtype", [F16, BF16, F32, F64])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("n", "radius", "eps"), [(8, 0.0, 0.5), (64, 0.0, 0.5), (64, 2.0, 0.25)])
def test_attention_subnormal_values_are_covered(
    dtype: torch.dtype, causal: bool, n: int, radius: float, eps: float
) -> None:
    """Values that are small integers times the smallest subnormal (once err/bound 4-1080).

    At R = 0 (uniform weights) the output is a mean of subnormals: its rounding is absolute,
    half a subnormal spacing, and only the bound's absolute term covers it. At R = 2 every
    product of a monomial with a value would underflow: the values are normalised by a power
    of two first, and the bound certifies eps well above the subnormal spacing."""
    lo, _ = EXPONENTS[dtype]
    gen = torch.Generator().manual_seed(n)
    q = torch.randn(2, n, 2, generator=gen, dtype=F64)
    k = torch.randn(2, n, 2, generator=gen, dtype=F64)
    v = build(gen, (2, n, 3), dtype, Entries("ints", lo))
    scale = 1e-30
    if radius > 0:  # scale so that the certified radius of the centred keys is about R
        kc = k - (k.amax(dim=1, keepdim=True) + k.amin(dim=1, keepdim=True)) / 2
        scale = radius / float((q.abs() @ kc.abs().transpose(1, 2)).max())
    q, k = q.to(dtype), k.to(dtype)
    ref, _ = ref_attention(q, k, v, scale, causal)
    for method in ("polynomial", "auto", "exact"):
        try:
            res = compute.attention(q, k, v, method=method, eps=eps, scale=scale, causal=causal)
        except compute.CertificationError:
            # float64 values of a few subnormal spacings: the output's own rounding and the
            # bound's (a few spacings) exceed eps max|v|; every other dtype certifies
            assert method == "polynomial" and dtype == F64
            continue
        err = err_vs(res.output, ref)
        check_output(res.output, dtype, (2, n, 3))
        if method == "polynomial":
            assert res.error_bound is not None
        if res.error_bound is not None:
            assert err <= res.error_bound
        else:
            tiny = subnormal_spacing(dtype) + subnormal_spacing(F32)
            assert err <= 2 * tiny + unit_roundoff(dtype) * 16 * float(v.double().abs().max())


@pytest.mark.parametrize("causal", [False, True])
def test_attention_float64_subnormal_values_certify(causal: bool) -> None:
    """float64 values deep in the subnormal range (2^-1060 units): certified, and covered."""
    gen = torch.Generator().manual_seed(12)
    q, k = (torch.randn(2, 64, 2, generator=gen, dtype=F64) * 0.4 for _ in range(2))
    v = build(gen, (2, 64, 3), F64, Entries("ints", -1060))
    ref, _ = ref_attention(q, k, v, 0.5, causal)
    res = compute.attention(q, k, v, method="polynomial", eps=0.05, scale=0.5, causal=causal)
    assert res.error_bound is not None and err_vs(res.output, ref) <= res.error_bound


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("dtype", "exponent"), [(F32, -140), (F32, 100), (F64, -1060), (F16, -20)])
def test_polynomial_products_see_normalised_values(
    dtype: torch.dtype, exponent: int, causal: bool, monkeypatch: Any
) -> None:
    """The invariant the underflow term of the bound rests on: the values that meet the
    monomials in the products are normalised per column (largest magnitude in [1/4, 1)),
    however small or large the inputs' values are (subnormal ones included)."""
    seen: list[torch.Tensor] = []
    name = "causal_blocks" if causal else "noncausal_blocks"
    real = getattr(att_poly, name)

    def spy(work: Any, **kw: Any) -> Any:
        seen.append(work.vc.abs().amax(dim=1).double())  # [lg, dv]
        return real(work, **kw)

    monkeypatch.setattr(att_poly, name, spy)
    for core_name in ("core", "core_causal"):  # the compiled route's values [L, dv]
        real_core = getattr(att_native, core_name)

        def spy_core(kern: Any, prep: Any, *a: Any, real_core: Any = real_core, **kw: Any) -> Any:
            # (the kernel forms these values bit for bit while it loads them: Prepared.apply)
            seen.append(prep.apply()[2].abs().amax(dim=1).double())
            return real_core(kern, prep, *a, **kw)

        monkeypatch.setattr(att_native, core_name, spy_core)
    gen = torch.Generator().manual_seed(13)
    q, k = (torch.randn(2, 96, 3, generator=gen, dtype=F64).to(dtype) * 0.5 for _ in range(2))
    v = build(gen, (2, 96, 2), dtype, Entries("ints", exponent))
    res = compute.attention(q, k, v, method="polynomial", eps=0.5, scale=0.5, causal=causal)
    assert res.error_bound is not None and seen
    top = torch.cat(seen)
    assert bool(((top >= 0.25) & (top < 1.0)).all()), top


@pytest.mark.parametrize(("dtype", "shift"), [(F32, -100), (F64, -1000), (F64, 1000)])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_values_scale_exactly_by_powers_of_two(
    dtype: torch.dtype, shift: int, causal: bool
) -> None:
    """Values are normalised by a power of two before any product: values times 2^shift give
    the output times 2^shift bit for bit, also where the products of monomials with the raw
    values would be subnormal (they would then lose digits outside the rounding model)."""
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(1, 200, 3, generator=gen, dtype=F64) * 0.3
    k = torch.randn(1, 200, 3, generator=gen, dtype=F64) * 0.3
    v = 1.0 + torch.rand(1, 200, 2, generator=gen, dtype=F64)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    a = compute.attention(q, k, v, method="polynomial", eps=1e-4, causal=causal)
    b = compute.attention(
        q, k, torch.ldexp(v, torch.tensor(shift)), method="polynomial", eps=1e-4, causal=causal
    )
    assert a.plan.degree == b.plan.degree and a.plan.degree is not None and a.plan.degree >= 3
    assert torch.equal(b.output, torch.ldexp(a.output, torch.tensor(shift)))


def err_vs(out: torch.Tensor, ref: np.ndarray) -> float:
    return float(np.abs(out.double().numpy().astype(LD) - ref).max())


# ---- the issue's own examples, kept as regression tests -------------------------------------


@pytest.mark.parametrize("method", ["polynomial", "auto"])
def test_issue_extreme_scale_float32(method: str) -> None:
    """scale = 2^124, q, k ~ 2^-62.5: the degree >= 2 monomials underflowed (err 0.53 against a
    bound of 1.35e-3; auto at n = 4096 picked it, err/bound 15)."""
    n = 256 if method == "polynomial" else 4096
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, n, 1, generator=gen) * 2**-62.5
    k = torch.randn(1, n, 1, generator=gen) * 2**-62.5
    v = torch.randn(1, n, 1, generator=gen)
    res = compute.attention(q, k, v, method=method, eps=3e-3, scale=2.0**124)
    err = err_vs(res.output, ref_attention(q, k, v, 2.0**124, False)[0])
    check_output(res.output, F32, (1, n, 1))
    if method == "polynomial" or res.error_bound is not None:
        assert res.error_bound is not None and err <= res.error_bound <= 3e-3 * float(v.abs().max())
    else:
        assert err <= 1e-5


def test_issue_extreme_scale_float64() -> None:
    """float64, scale = 2^-125 and large q, k: the weights c_m scale^m underflowed at high
    degree (err/bound up to 1.9e4)."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 256, 2, generator=gen, dtype=F64) * 2.0**61
    k = torch.randn(1, 256, 2, generator=gen, dtype=F64) * 2.0**61
    v = torch.randn(1, 256, 2, generator=gen, dtype=F64)
    for eps in (1e-4, 1e-8, 1e-10):
        res = compute.attention(q, k, v, method="polynomial", eps=eps, scale=2.0**-125)
        err = err_vs(res.output, ref_attention(q, k, v, 2.0**-125, False)[0])
        assert res.error_bound is not None and err <= res.error_bound
        assert res.plan.degree is not None and res.plan.degree >= 3


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("dtype", [F16, F32, F64])
def test_issue_tensor_subnormal_values(dtype: torch.dtype, native: bool, monkeypatch: Any) -> None:
    """v1 = small integers times the smallest subnormal: the output's cast is absolute there,
    on both CPU routes (the compiled kernel writes the float32 output itself)."""
    monkeypatch.setattr(ta_native, "NATIVE", native)
    lo, _ = EXPONENTS[dtype]
    gen = torch.Generator().manual_seed(3)
    q, k1, k2 = (torch.randn(2, m, 2, generator=gen).to(dtype) * 0.5 for m in (7, 9, 8))
    v1 = build(gen, (2, 9, 2), dtype, Entries("ints", lo))
    v2 = torch.randn(2, 8, 2, generator=gen).to(dtype)
    for scale, eps in ((0.5, 0.9), (1e-30, 0.5)):  # R3 = 0: only the absolute term covers it
        ref, _ = ref_tensor_attention(q, k1, k2, v1, v2, scale)
        res = compute.tensor_attention(q, k1, k2, v1, v2, method="polynomial", eps=eps, scale=scale)
        check_output(res.output, dtype, (2, 7, 2))
        assert res.error_bound is not None and err_vs(res.output, ref) <= res.error_bound


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("method", ["exact", "polynomial", "auto"])
def test_issue_tensor_output_overflow_is_refused(
    method: str, native: bool, monkeypatch: Any
) -> None:
    """float16 v1 = v2 = 300 (products 9e4 > 65504), float32 1e20 x 1e20: once inf with a finite
    bound; now OutOfRangeError naming v1 and the dtype to pass. float64 holds 1e40."""
    monkeypatch.setattr(ta_native, "NATIVE", native)
    gen = torch.Generator().manual_seed(4)
    q, k1, k2 = (torch.randn(1, 5, 2, generator=gen) * 0.3 for _ in range(3))
    for dtype, size, wider in ((F16, 300.0, "float32"), (F32, 1e20, "float64")):
        v = torch.full((1, 5, 2), size, dtype=dtype)
        with pytest.raises(compute.OutOfRangeError) as info:
            compute.tensor_attention(
                q.to(dtype), k1.to(dtype), k2.to(dtype), v, v, method=method, eps=0.1
            )
        assert info.value.argument == "v1" and wider in str(info.value)
    v = torch.full((1, 5, 2), 1e20, dtype=F64)
    res = compute.tensor_attention(
        q.double(), k1.double(), k2.double(), v, v, method=method, eps=0.1
    )
    assert torch.allclose(res.output, torch.full_like(res.output, 1e40), rtol=1e-6)


def test_issue_crashes_are_gone() -> None:
    """OverflowError in the weights (float32 scale = 1e45), in LoRA planning beyond radius 710,
    in tensor attention's weight bound (subnormal inputs, huge scale)."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 32, 2, generator=gen) for _ in range(3))
    for method in ("auto", "exact", "polynomial"):
        for small in (1.0, 2e-23):  # scores 1e45 (exact) or of order 1 (polynomial)
            qq, kk = q * small, k * small
            try:
                res = compute.attention(qq, kk, v, method=method, eps=1e-2, scale=1e45)
            except compute.CertificationError:
                assert method == "polynomial" and small == 1.0
                continue
            check_output(res.output, F32, (1, 32, 2))
            ref, _ = ref_attention(qq, kk, v, 1e45, False)
            assert err_vs(res.output, ref) <= (res.error_bound or 1e-5)
            if small < 1.0 and method == "polynomial":
                assert res.error_bound is not None
    for method in ("auto", "exact", "polynomial"):
        try:
            plan = compute.plan_lora_gradient(n=64, d=4, radius=800.0, method=method)
            assert plan.method == "exact"
        except compute.CertificationError:
            assert method == "polynomial"
    x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 2, generator=gen)
    w = {f"w_{mu}": torch.randn(4, 2, generator=gen) for mu in "qkv"}
    ad = {mu: (torch.randn(1, 2, generator=gen), torch.randn(4, 1, generator=gen)) for mu in "qv"}
    for method in ("auto", "polynomial"):
        try:
            res = compute.lora_gradient(
                x, y, **w, adapters=ad, alpha=1.0, method=method, scale=100.0
            )
            assert res.plan.method == "exact" and math.isfinite(res.loss)
        except compute.CertificationError:
            assert method == "polynomial"
    tiny = [build(gen, (1, 6, 2), F32, Entries("ints", -149)) for _ in range(3)]
    vals = [torch.randn(1, 6, 2, generator=gen) for _ in range(2)]
    for scale in (2.0**430, 2.0**1000, 1e300):
        res = compute.tensor_attention(*tiny, *vals, scale=scale, eps=1e-2)
        check_output(res.output, F32, (1, 6, 2))
        ref, _ = ref_tensor_attention(*tiny, *vals, scale)
        assert err_vs(res.output, ref) <= (res.error_bound or 1e-5)


def test_issue_inputs_that_require_grad() -> None:
    """An nn.Parameter or an activation inside a training graph: computed without a graph
    (once RuntimeError on every method), the caller's graph untouched."""
    gen = torch.Generator().manual_seed(6)
    lin = torch.nn.Linear(3, 3)
    x = torch.randn(2, 20, 3, generator=gen)
    q = lin(x)  # an activation: requires grad, has a grad_fn
    k = torch.nn.Parameter(torch.randn(2, 20, 3, generator=gen))
    v = torch.randn(2, 20, 3, generator=gen)
    for method in ("auto", "exact", "polynomial"):
        res = compute.attention(q, k, v, method=method, eps=0.1, scale=0.3)
        plain = compute.attention(q.detach(), k.detach(), v, method=method, eps=0.1, scale=0.3)
        assert not res.output.requires_grad and torch.equal(res.output, plain.output)
        t = compute.tensor_attention(q, k, k, v, v, method=method, eps=0.1, scale=0.3)
        assert not t.output.requires_grad
    q.sum().backward()  # the caller's graph still works
    assert lin.weight.grad is not None and k.grad is None
    xx = torch.nn.Parameter(torch.randn(8, 3, generator=gen) * 0.3)
    ad = {
        mu: (torch.nn.Parameter(torch.randn(1, 2)), torch.nn.Parameter(torch.randn(3, 1)))
        for mu in "qv"
    }
    w = {f"w_{mu}": torch.randn(3, 2, generator=gen) for mu in "qkv"}
    for method in ("auto", "exact", "polynomial"):
        res = compute.lora_gradient(
            xx, torch.randn(8, 2), **w, adapters=ad, alpha=1.0, method=method, eps=0.3
        )
        assert res.plan.method == ("exact" if method == "exact" else res.plan.method)
        assert all(not g.requires_grad for pair in res.grads.values() for g in pair)
    assert xx.grad is None


def test_weights_of_any_scale_never_raise() -> None:
    """The weight helpers once raised OverflowError for an unbalanced huge scale (attention's
    weights with float32 scale = 1e45, tensor attention's weight bound on subnormal inputs):
    they now return inf, which the planner treats as "not certified"."""
    a = certified_best(1.0, 8)
    w = weights(a.coeffs, monomial_table(2, 8), 1e45)
    assert np.isinf(w).any() and not np.isnan(w[np.isfinite(w)]).any()
    assert weight_max(a, 1e300) == math.inf
    assert math.isfinite(weight_max(a, 0.7))
    assert weight_max(a, 0.0) == abs(a.coeffs[0]) * (1 + 1e-12)


@pytest.mark.parametrize("kind", ["sparse", "meta"])
def test_issue_sparse_and_meta_tensors_are_named(kind: str) -> None:
    gen = torch.Generator().manual_seed(7)
    base = {nm: torch.randn(6, 2, generator=gen) for nm in ("q", "k", "v", "k1", "k2", "v1", "v2")}
    for nm in ("q", "k", "v"):
        args = {a: base[a] for a in ("q", "k", "v")}
        args[nm] = apply_kind(args[nm], kind)
        with pytest.raises(compute.InvalidInputError) as info:
            compute.attention(args["q"], args["k"], args["v"])
        assert info.value.argument == nm and kind in str(info.value)
    names = ("q", "k1", "k2", "v1", "v2")
    for nm in names:
        args = {a: base[a] for a in names}
        args[nm] = apply_kind(args[nm], kind)
        with pytest.raises(compute.InvalidInputError) as info:
            compute.tensor_attention(*(args[a] for a in names))
        assert info.value.argument == nm and kind in str(info.value)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    w = {f"w_{mu}": torch.randn(3, 2) for mu in "qkv"}
    ad = {mu: (torch.randn(1, 2), torch.randn(3, 1)) for mu in "qv"}
    for nm in ("x", "y", "w_q"):
        args = {"x": x, "y": y, **w}
        args[nm] = apply_kind(args[nm], kind)
        with pytest.raises(compute.InvalidInputError) as info:
            compute.lora_gradient(args.pop("x"), args.pop("y"), **args, adapters=ad, alpha=1.0)
        assert info.value.argument == nm and kind in str(info.value)


@pytest.mark.parametrize("causal", [False, True])
def test_issue_exact_paths_stay_finite(causal: bool) -> None:
    """float32 scores that overflow although the float64 answer is finite: attention with
    scale = 1e38 or q, k x 1e20, tensor attention with q, k1, k2 x 1e13, LoRA with scale =
    1e40 once returned NaN."""
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, 24, 3, generator=gen) for _ in range(3))
    for qq, kk, scale in ((q, k, 1e38), (q * 1e20, k * 1e20, 0.5), (q * 1e20, k + 1e20, 0.5)):
        for method in ("auto", "exact"):
            res = compute.attention(qq, kk, v, method=method, scale=scale, causal=causal)
            check_output(res.output, F32, (2, 24, 3))
            ref, _ = ref_attention(qq, kk, v, scale, causal)
            assert err_vs(res.output, ref) <= 1e-5 * float(v.abs().max())


def test_issue_exact_paths_stay_finite_tensor_and_lora() -> None:
    """Tensor attention with q, k1, k2 x 1e13 and LoRA with scale = 1e40 (NaN once)."""
    gen = torch.Generator().manual_seed(8)
    q3, a3, b3 = (torch.randn(1, 6, 2, generator=gen) * 1e13 for _ in range(3))
    v1, v2 = torch.randn(1, 6, 2, generator=gen), torch.randn(1, 6, 2, generator=gen)
    res = compute.tensor_attention(q3, a3, b3, v1, v2)
    check_output(res.output, F32, (1, 6, 2))
    assert err_vs(res.output, ref_tensor_attention(q3, a3, b3, v1, v2, 1 / math.sqrt(2))[0]) < 1e-5
    x, y = torch.randn(10, 3, generator=gen), torch.randn(10, 2, generator=gen)
    w = {mu: torch.randn(3, 2, generator=gen) for mu in "qkv"}
    ad = {mu: (torch.randn(1, 2, generator=gen), torch.randn(3, 1, generator=gen)) for mu in "qv"}
    res_l = compute.lora_gradient(
        x, y, w_q=w["q"], w_k=w["k"], w_v=w["v"], adapters=ad, alpha=1.0, scale=1e40
    )
    loss, _, _ = ref_lora(x, y, w, ad, 1.0, 1e40)
    assert math.isfinite(res_l.loss) and abs(res_l.loss - loss) <= 1e-4 * loss
    for pair in res_l.grads.values():
        assert all(bool(torch.isfinite(g).all()) for g in pair)


@pytest.mark.parametrize("full", [False, True])
def test_issue_lora_overflow_in_float32_is_recomputed_in_float64(full: bool) -> None:
    """float32 projections of 1e20: the gradient terms E V^T (1e40) overflow float32, and the
    exact path repeats itself in float64 (as for scale = 1e40, whose scores overflow)."""
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(10, 3, generator=gen) * 1e20
    y = torch.randn(10, 2, generator=gen)
    w = {mu: torch.randn(3, 2, generator=gen) for mu in "qkv"}
    ad = {
        mu: (torch.randn(1, 2, generator=gen) * 1e-30, torch.randn(3, 1, generator=gen) * 1e-30)
        for mu in ("qkv" if full else "qv")
    }
    res = compute.lora_gradient(
        x, y, w_q=w["q"], w_k=w["k"], w_v=w["v"], adapters=ad, alpha=1.0, method="exact",
        scale=1e-20,
    )  # fmt: skip
    loss, grads, _ = ref_lora(x, y, w, ad, 1.0, 1e-20)
    assert math.isfinite(res.loss) and abs(res.loss - loss) <= 1e-5 * loss
    assert res.plan.compute_dtype == "float64" and "repeated in float64" in res.plan.reason
    for mu, pair in res.grads.items():
        for got, want in zip(pair, grads[mu], strict=True):
            assert bool(torch.isfinite(got).all()) and got.dtype == F32
            assert float(
                np.abs(got.double().numpy() - want.astype(np.float64)).max()
            ) <= 1e-3 * max(float(np.abs(want).max()), 1e-300)


def test_issue_lora_surrogate_weights_overflow_is_not_certified() -> None:
    """scale 9e102 on tiny projections (found by test_lora_every_finite_input): the scores fit,
    but the surrogate's weights c_m scale^m overflow float64, so its gradients are NaN. That is
    "not certified" (CertificationError for method="polynomial"; auto computes exactly), never
    an OutOfRangeError for gradients that fit."""
    gen = torch.Generator().manual_seed(0)
    dt = F16
    x = build(gen, (2, 1), dt, Entries("normal", 0))
    y = build(gen, (2, 1), dt, Entries("ints", -24))
    w = {mu: build(gen, (1, 1), dt, Entries("wide", -16)) for mu in "qkv"}
    a = Entries("normal", -2)
    adapters = {mu: (build(gen, (1, 1), dt, a), build(gen, (1, 1), dt, a)) for mu in "qv"}
    scale = 8.958978968711217e102
    args = dict(w_q=w["q"], w_k=w["k"], w_v=w["v"], adapters=adapters, alpha=1.0, scale=scale)
    with pytest.raises(compute.CertificationError):
        compute.lora_gradient(x, y, **args, method="polynomial", eps=0.3)
    res = compute.lora_gradient(x, y, **args, method="auto", eps=0.3)
    assert res.plan.method == "exact" and res.error_bounds is not None
    _, grads, _ = ref_lora(x, y, w, adapters, 1.0, scale)
    for mu, pair in res.grads.items():
        for got, want in zip(pair, grads[mu], strict=True):
            assert bool(torch.isfinite(got).all())
            err = float(np.abs(got.double().numpy() - want.astype(np.float64)).max())
            assert err <= 1e-2 * max(float(np.abs(want).max()), 1e-6)


# ---- the three gaps of the rounding argument (issue item 6) ----------------------------------


@pytest.mark.parametrize("dtype", [F32, F64])
def test_causal_rows_beyond_the_keys_run_what_is_certified(
    dtype: torch.dtype, monkeypatch: Any
) -> None:
    """Causal with m < n: rows >= m run the non-causal kernel with its own (longer) chunks of
    keys; the plan's certified inner lengths must cover every product that actually runs
    (once 512-key float32 chunks ran under a bound certified for 32)."""
    seen: list[tuple[int, int]] = []
    real = att_poly.geometry

    def spy(r: int, n_max: int, **kw: Any) -> Any:
        out = real(r, n_max, **kw)
        B, ck, cr, _, unit = out
        key_inner = unit if kw["causal"] else (ck or B)
        seen.append((key_inner, cr or r))
        return out

    monkeypatch.setattr(att_poly, "geometry", spy)
    gen = torch.Generator().manual_seed(9)
    n, m = 1500, 600
    q = torch.randn(1, n, 2, generator=gen, dtype=dtype) * 0.4
    k = torch.randn(1, m, 2, generator=gen, dtype=dtype) * 0.4
    v = torch.randn(1, m, 2, generator=gen, dtype=dtype)
    res = compute.attention(q, k, v, method="polynomial", eps=1e-3, causal=True)
    seen.clear()
    res = compute.attention(q, k, v, method="polynomial", eps=1e-3, causal=True)
    ran = seen[-2:]  # the two _polynomial_forward calls: causal rows, then the rest
    extra = res.plan.extra
    assert len(ran) == 2 and ran[1][0] > ran[0][0]  # the rest does run with longer chunks
    assert extra["key_inner"] >= max(k_ for k_, _ in ran)
    assert extra["feature_inner"] >= max(f for _, f in ran)
    assert res.error_bound is not None
    ref, _ = ref_attention(q, k, v, 1 / math.sqrt(2), True)
    assert err_vs(res.output, ref) <= res.error_bound


def _delta_range_ld(coeffs: np.ndarray, R: float, points: int = 20001) -> tuple[float, float]:
    """The relative error range of the polynomial with exactly these float64 coefficients, on a
    dense grid, in extended precision (evaluation error ~1e-19 times e^R sum |c_m| R^m)."""
    s = np.linspace(-R, R, points).astype(LD)
    p = np.zeros_like(s)
    for c in coeffs[::-1]:
        p = p * s + LD(float(c))
    delta = p * np.exp(-s) - 1
    slack = 1e-18 * math.exp(R) * float(np.sum(np.abs(coeffs) * R ** np.arange(len(coeffs))))
    return float(delta.min()) - slack, float(delta.max()) + slack


@pytest.mark.parametrize(
    ("g", "R"), [(24, 4.0), (24, 3.36), (22, 2.0), (18, 1.0), (16, 8.0), (12, 0.5)]
)
@pytest.mark.parametrize("family", ["chebyshev", "taylor"])
def test_certified_range_holds_for_the_float64_coefficients(g: int, R: float, family: str) -> None:
    """The truncation bound is for the exact series; the float64 coefficients differ (g = 24,
    R = 4 Chebyshev: certified +-2.98e-16, actual [-1.37e-13, 3.2e-15]). The certified range must
    contain the actual one, and t must not round to 0 (it did at g = 24, R = 3.36)."""
    a = approximation(family, g, R)
    lo, hi = _delta_range_ld(a.coeffs, R)
    assert a.dmin <= lo and hi <= a.dmax, (a.dmin, lo, hi, a.dmax)
    t_true = (hi - lo) / (math.sqrt(1.0 + hi) + math.sqrt(1.0 + lo)) ** 2  # no cancellation
    assert a.t > 0.0 and a.t >= t_true * (1.0 - 1e-9)


def test_tv_factor_does_not_cancel() -> None:
    for x in (1e-18, 1e-15, 1e-9, 1e-3):
        t = tv_factor(-x, x)
        assert t >= x / (1.0 + math.sqrt(1.0 - x * x)) * (1.0 - 1e-12)  # the exact value
        assert t <= x * (1.0 + 1e-9)
    assert tv_factor(0.0, 0.0) == 0.0
    assert tv_factor(-1.0, 0.5) == math.inf


def test_float32_is_not_certified_when_matmuls_may_run_in_tf32(monkeypatch: Any) -> None:
    """TF32 (or a float32 matmul precision below "highest") rounds float32 products to 10 bits:
    the float32 certificate then does not hold, for attention as for tensor attention."""
    gen = torch.Generator().manual_seed(10)
    q, k, v = (torch.randn(1, 256, 2, generator=gen) * 0.5 for _ in range(3))
    base = compute.attention(q, k, v, method="polynomial", eps=1e-2)
    assert base.plan.compute_dtype == "float32"
    plan32 = compute.plan_attention(n=65536, d=8, radius=1.0, eps=1e-2, device="cpu")
    assert plan32.compute_dtype == "float32"
    for switch in ("tf32", "precision"):
        with monkeypatch.context() as mp:
            if switch == "tf32":
                mp.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
            else:
                mp.setattr(torch, "get_float32_matmul_precision", lambda: "high")
            res = compute.attention(q, k, v, method="polynomial", eps=1e-2)
            assert res.plan.compute_dtype == "float64"
            ref, _ = ref_attention(q, k, v, 1 / math.sqrt(2), False)
            assert res.error_bound is not None and err_vs(res.output, ref) <= res.error_bound
            plan = compute.plan_attention(n=65536, d=8, radius=1.0, eps=1e-2, device="cpu")
            assert plan.method == "exact" or plan.compute_dtype == "float64"
            t = compute.tensor_attention(q, k, k, v, v, method="polynomial", eps=1e-2)
            assert t.plan.compute_dtype == "float64"


# ---- tightness: the adversarial total-variation construction ----------------------------------


def _tv_points(coeffs: np.ndarray, R: float) -> tuple[float, float, float, float]:
    """Where the relative error of P peaks and dips on [-R, R], and its values there."""
    s = np.linspace(-R, R, 400001)
    delta = np.polynomial.polynomial.polyval(s, coeffs) * np.exp(-s) - 1.0
    i, j = int(delta.argmax()), int(delta.argmin())
    return float(s[i]), float(s[j]), float(delta[i]), float(delta[j])


def _tv_counts(s_hi: float, s_lo: float, d_hi: float, d_lo: float, total: int) -> tuple[int, int]:
    """Key counts that make the error reach t (docs/theory.md §1.4): masses in the ratio
    ``n_hi e^s_hi sqrt(1 + d_hi) = n_lo e^s_lo sqrt(1 + d_lo)``."""
    ratio = math.exp(s_lo - s_hi) * math.sqrt((1.0 + d_lo) / (1.0 + d_hi))  # n_hi / n_lo
    n_lo = max(1, round(total / (1.0 + ratio)))
    return total - n_lo, n_lo


@pytest.mark.parametrize("eps", [0.05, 1e-2, 1e-3])
def test_attention_bound_is_tight_on_the_tv_construction(eps: float) -> None:
    """One query, keys where the polynomial's relative error is largest and smallest, in the
    proportion that maximises the total variation, values 1 and 0: the error reaches the bound
    (err/bound >= 0.9), so a bound that becomes loose fails here."""
    G = 1.0  # a point of the radius grid 2^(k/32): the polynomial is certified on [-G, G]
    r0 = G * (1.0 - 1e-9)  # the keys' radius, so that the inflated radius rounds to G
    q = torch.ones(1, 1, dtype=F64)
    probe_k = torch.tensor([[-r0], [r0]], dtype=F64)
    probe = compute.attention(q, probe_k, torch.tensor([[0.0], [1.0]], dtype=F64),
                              method="polynomial", eps=eps, scale=1.0)  # fmt: skip
    assert grid_radius(probe.plan.radius) == G
    approx = certified_best(probe.plan.radius, probe.plan.degree)
    s_hi, s_lo, d_hi, d_lo = _tv_points(approx.coeffs, r0)
    n_hi, n_lo = _tv_counts(s_hi, s_lo, d_hi, d_lo, 20000)
    keys = [s_hi] * n_hi + [s_lo] * n_lo + [-r0, r0]
    vals = [1.0] * n_hi + [0.0] * n_lo + [0.0, 1.0]
    k = torch.tensor(keys, dtype=F64)[:, None]
    v = torch.tensor(vals, dtype=F64)[:, None]
    res = compute.attention(q, k, v, method="polynomial", eps=eps, scale=1.0)
    assert res.plan.degree == probe.plan.degree and res.error_bound is not None
    err = err_vs(res.output, ref_attention(q, k, v, 1.0, False)[0])
    assert 0.9 <= err / res.error_bound <= 1.0, (err, res.error_bound)


@pytest.mark.parametrize("eps", [0.05, 1e-2, 1e-3])
def test_tensor_attention_bound_is_tight_on_the_tv_construction(eps: float) -> None:
    """The same construction through tensor attention (scores q k1 k2 with q = k1 = 1)."""
    G = 1.0
    r0 = G * (1.0 - 1e-9)
    q = torch.ones(1, 1, dtype=F64)
    k1 = torch.ones(1, 1, dtype=F64)
    v1 = torch.ones(1, 1, dtype=F64)
    probe_k2 = torch.tensor([[-r0], [r0]], dtype=F64)
    probe = compute.tensor_attention(
        q, k1, probe_k2, v1, torch.tensor([[0.0], [1.0]], dtype=F64),
        method="polynomial", eps=eps, scale=1.0,
    )  # fmt: skip
    approx = certified_best(probe.plan.radius, probe.plan.degree)
    s_hi, s_lo, d_hi, d_lo = _tv_points(approx.coeffs, r0)
    n_hi, n_lo = _tv_counts(s_hi, s_lo, d_hi, d_lo, 20000)
    k2 = torch.tensor([s_hi] * n_hi + [s_lo] * n_lo + [-r0, r0], dtype=F64)[:, None]
    v2 = torch.tensor([1.0] * n_hi + [0.0] * n_lo + [0.0, 1.0], dtype=F64)[:, None]
    res = compute.tensor_attention(q, k1, k2, v1, v2, method="polynomial", eps=eps, scale=1.0)
    assert res.plan.degree == probe.plan.degree and res.error_bound is not None
    err = err_vs(res.output, ref_tensor_attention(q, k1, k2, v1, v2, 1.0)[0])
    assert 0.9 <= err / res.error_bound <= 1.0, (err, res.error_bound)


# ---- plan functions: any radius, never another exception ----------------------------------------


@settings(SETTINGS, max_examples=150)
@given(
    st.floats(0.0, 1e308),
    st.sampled_from(["auto", "exact", "polynomial"]),
    st.sampled_from(["float16", "bfloat16", "float32", "float64"]),
    st.sampled_from([0.3, 1e-3, 1e-9]),
)
def test_plans_accept_any_radius(radius: float, method: str, dtype: str, eps: float) -> None:
    for fn, kw in (
        (compute.plan_attention, {"n": 4096, "d": 8}),
        (compute.plan_tensor_attention, {"n": 256, "d": 4}),
        (compute.plan_lora_gradient, {"n": 512, "d": 8}),
    ):
        try:
            plan = fn(radius=radius, method=method, dtype=dtype, eps=eps, **kw)  # type: ignore[operator]
        except compute.CertificationError:
            assert method == "polynomial"
            continue
        assert plan.method in ("exact", "polynomial")
        if plan.method == "polynomial":
            assert plan.predicted_bound is not None and math.isfinite(plan.predicted_bound)
