"""Tightness: adversarial inputs that drive each certified bound close to its worst case.

A bound that is never approached can lose a term, or shrink by half, without any
``measured <= bound`` test noticing. Each test here builds an input on which one part of a
bound is (nearly) attained, so that dropping that part, or scaling the bound down, makes the
measured error exceed the reported bound:

* the polynomial (total-variation) term of attention and tensor attention, float64 and float32,
  both CPU routes of tensor attention: err / bound >= 0.9;
* the float32 rounding of every product the attention and tensor models count (key-side sums,
  feature-side sums), with the polynomial term zero or negligible: the measured error is far
  above what the bound would be without that product's inner length;
* the three per-row bounds of the LoRA gradient (dQ, dK, dV), through dA of each adapter:
  err / bound >= 0.9 in float64 and float32;
* ``measured_error`` against an independent recomputation, in both directions.

The float32 rounding constructions steer the rounding of each addition; they assume that the
CPU's float32 matrix products accumulate every dot product in index order with one rounding
per term (true of the MKL kernels PyTorch uses on x86, checked by ``_sequential_float32``);
where that does not hold they are skipped with the reason. How close a rounding term can be
approached is limited by the model itself (docs/testing.md): a sum of n terms of size at most
``x`` in floating point errs by at most ``u sum_k |S_k| <= u n^2 x / 2`` (S_k the partial
sums), half of the ``gamma_n n x`` the a-priori model charges, and rounding to the nearest
float loses at most half an ulp, which is between ``u |S|/2`` and ``u |S|``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

import compute
from compute.attention import native as at_native
from compute.attention.bound import certified_bound
from compute.attention.naive import naive_attention
from compute.core.polynomials import approximation, certified_best
from compute.core.radius import centre, matrix_radius, tensor_radius
from compute.core.rounding import gamma, unit_roundoff
from compute.lora import certificate as lora_cert
from compute.lora import plan as lora_plan
from compute.lora import polynomial as lora_poly
from compute.lora.inputs import check_inputs
from compute.lora.naive import naive_lora_gradient
from compute.tensor_attention import bound as ta_bound
from compute.tensor_attention import native as ta_native
from compute.tensor_attention.naive import naive_tensor_attention

F32, F64 = torch.float32, torch.float64
U32 = unit_roundoff(F32)  # 2^-24


# ------------------------------------------------------------------------------- references


# the float64 references of the given (rounded) inputs: compute.<op>.naive
attention_reference = naive_attention
tensor_reference = naive_tensor_attention


def _sequential_float32() -> bool:
    """Do float32 matrix products add each dot product in index order, rounding once per term?

    The row ``[2^24, 1, 1, ..., 1]`` times a column of ones: in that order every ``+ 1`` is a
    tie that rounds back to ``2^24``, so the product is exactly ``2^24``; any other order (vector
    lanes, pairwise trees, several partial sums) keeps some of the ones. Checked on the shapes and
    layouts of the products the constructions below steer (row-major or column-major left
    factor, row-major right factor: a column-major right factor takes another MKL kernel,
    which keeps partial sums, but no product of the pipelines has one).
    """
    for m, k, n in ((1, 512, 2), (2, 256, 32), (2, 256, 2), (1, 512, 4)):
        a = torch.ones(m, k)
        a[:, 0] = 2.0**24
        b = torch.ones(k, n)
        for x, y in ((a, b), (a.T.contiguous().T, b)):
            if not bool((torch.matmul(x, y) == 2.0**24).all()):
                return False
            if not bool((torch.matmul(x[None, None], y[None, None]) == 2.0**24).all()):
                return False
    return True


SEQUENTIAL = _sequential_float32()
needs_sequential = pytest.mark.skipif(
    not SEQUENTIAL,
    reason="this BLAS does not add float32 dot products in index order (lanes or trees), so "
    "the rounding-steering constructions do not apply; the bounds are still checked elsewhere",
)


def steered_values(n: int) -> np.ndarray:
    """``n - 2`` float32 values in [1/2, 1] whose running float32 sum rounds down by almost half
    an ulp at every step, then ``1`` and ``-1`` (so that max = 1, min = -1, midrange 0).

    Each value is chosen so that ``S + x`` lies just below the midpoint between two floats
    (``x`` has a finer grid than ``S`` once ``S >= 1``): the sum in index order errs by about
    ``sum_k ulp(S_k) / 2``, the largest error a sequential sum of such terms can have.
    """
    f32 = np.float32
    s = f32(0.0)
    out: list[np.float32] = []
    for _ in range(n - 2):
        target = float(s) + 0.75
        ulp = float(np.spacing(f32(target)))
        wanted = math.floor(target / ulp) * ulp + ulp / 2 - 2.0**-24
        x = f32(wanted - float(s))
        if not (0.5 <= float(x) <= 1.0 and float(x) == wanted - float(s)):
            x = f32(0.75)  # first steps (S < 1): the grids coincide, nothing to steer
        out.append(x)
        s = f32(s + x)
    out += [f32(1.0), f32(-1.0)]
    return np.array(out, dtype=np.float32)


# ------------------------------------------------------- the polynomial (total-variation) term


def adversarial_1d(
    op: str, R: float, eps: float, dtype: torch.dtype, total: int = 20_000
) -> tuple[compute.AttentionResult, float]:
    """One query, 1-d keys where the certified polynomial's relative error peaks
    (docs/theory.md §1.4).

    q = 1, scale = 1, so the scores are the keys: ``total`` keys at the scores where ``delta``
    is largest and smallest, shared so that the ``argmax`` keys carry the worst-case fraction
    ``1 / (1 + sqrt((1 + dmax) / (1 + dmin)))`` of the softmax mass, values 1 on them and 0
    elsewhere, plus one key at each of ``-R'`` and ``R'`` (``R'`` just below R, so the radius,
    after its rounding-safe inflation, rounds up to the fit grid point R itself and centring
    leaves the keys in place). Tensor attention sees the same scores with ``k2 = v2 = 1``.
    Returns the result and the measured error of its single output.
    """
    below = np.nextafter(np.float32(R), np.float32(0.0))
    Rn = float(below) if dtype == F32 else R * (1.0 - 1e-9)
    one = torch.ones(1, 1, dtype=dtype)
    ends = torch.tensor([[-Rn], [Rn]], dtype=dtype)
    ends_v = torch.tensor([[1.0], [0.0]], dtype=dtype)

    def run(k: torch.Tensor, v: torch.Tensor) -> compute.AttentionResult:
        if op == "attention":
            return compute.attention(one, k, v, method="polynomial", eps=eps, scale=1.0)
        return compute.tensor_attention(
            one, k, one, v, one, method="polynomial", eps=eps, scale=1.0
        )

    probe = run(ends, ends_v)
    assert probe.plan.degree is not None
    approx = certified_best(probe.plan.radius, probe.plan.degree)
    assert approx.family == probe.plan.family
    s = torch.linspace(-Rn, Rn, 200_001, dtype=F64)
    delta = sum(float(c) * s**m for m, c in enumerate(approx.coeffs)) * torch.exp(-s) - 1
    assert isinstance(delta, torch.Tensor)
    s_hi, s_lo = float(s[delta.argmax()]), float(s[delta.argmin()])
    d_hi, d_lo = float(delta.max()), float(delta.min())
    share = 1 / (1 + math.sqrt((1 + d_hi) / (1 + d_lo)))
    w_hi, w_lo = share * math.exp(s_lo), (1 - share) * math.exp(s_hi)
    n_hi = max(1, round(total * w_hi / (w_hi + w_lo)))
    keys = [s_hi] * n_hi + [s_lo] * (total - n_hi) + [-Rn, Rn]
    vals = [1.0] * n_hi + [0.0] * (total - n_hi + 2)
    k = torch.tensor(keys, dtype=F64).view(-1, 1).to(dtype)
    v = torch.tensor(vals, dtype=F64).view(-1, 1).to(dtype)
    res = run(k, v)
    assert res.plan.degree == probe.plan.degree and res.plan.family == probe.plan.family
    ref = float(torch.softmax(k.double().view(-1), 0) @ v.double().view(-1))
    return res, abs(float(res.output.double().view(-1)[0]) - ref)


POLY_CASES = [
    pytest.param("attention", F64, True, id="attention-fp64"),
    pytest.param("attention", F32, True, id="attention-fp32"),
    pytest.param("tensor", F64, True, id="tensor-fp64"),
    pytest.param("tensor", F32, True, id="tensor-fp32-native"),
    pytest.param("tensor", F32, False, id="tensor-fp32-pytorch"),
]


@pytest.mark.parametrize(("op", "dtype", "native"), POLY_CASES)
def test_polynomial_term_is_reached(
    op: str, dtype: torch.dtype, native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """err / bound >= 0.9 where the polynomial term dominates (R = 0.5, eps = 1e-2).

    Measured: 0.993 in float64 (the rest is the certification guard of ``core.polynomials``), 0.96
    (attention) and 0.93 (tensor) in float32, where rounding is 3-6 % of the bound.
    """
    if op == "tensor" and native and ta_native.kernel() is None:
        pytest.skip("compiled kernel unavailable: the PyTorch route case covers float32")
    monkeypatch.setattr(ta_native, "NATIVE", native)
    res, err = adversarial_1d(op, 0.5, 1e-2, dtype)
    assert res.plan.method == "polynomial" and res.plan.compute_dtype == str(dtype)[6:]
    assert res.error_bound is not None
    assert err <= res.error_bound
    assert err >= 0.9 * res.error_bound, (err, res.error_bound, err / res.error_bound)


# ---------------------------------------------------------------- float32 rounding: attention


def _attention_bound_without(
    res: compute.AttentionResult, v_range: float, v_absmax: float, **change: Any
) -> float:
    """The float32 attention bound of ``res`` recomputed with one model parameter changed."""
    p = res.plan
    assert p.degree is not None and p.radius is not None
    approx = certified_best(p.radius, p.degree)
    assert approx.family == p.family
    kw: dict[str, Any] = {
        "features": p.extra["feature_inner"],
        "block": p.extra["key_inner"],
        "compute_dtype": F32,
        "out_dtype": F32,
        "value_range": v_range + 4 * U32 * v_absmax,
        "value_absmax": v_absmax,
        "float64_terms": 64,
        "centring_dtype": F32,
    }
    kw.update(change)
    return float(certified_bound(approx, **kw).total)


@needs_sequential
def test_attention_float32_key_sums_round_as_modelled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Polynomial term zero, rounding all of the bound: the key-side float32 sums.

    All keys equal (centred keys 0, R = 0, degree 0: every output row is the mean of v), 512
    keys (one key chunk), values steered so that their float32 sum errs by ~0.7 u per partial
    sum. The measured error is ~70 x ``(2 u + u_out) max|v|`` (what is left of the rounding
    term without the accumulated float32 part) and far above the bound with the key-side inner
    length dropped; err / bound ~ 0.14 (the model's limit for this product is ~0.18).

    The PyTorch route: the steering needs a BLAS product that adds in index order. The compiled
    kernel adds the key chunk in vector lanes (several partial sums, each within the same model),
    which no single steered order drives to its limit; its bound is checked by the rest of this
    file and tests/test_attention_native.py.
    """
    monkeypatch.setattr(at_native, "NATIVE", False)
    n = 512
    v = torch.from_numpy(steered_values(n)).view(1, n, 1)
    k = torch.full((1, n, 8), 0.3)
    q = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(1))
    res = compute.attention(q, k, v, method="polynomial", eps=1e-4)
    p = res.plan
    assert p.method == "polynomial" and p.compute_dtype == "float32" and p.degree == 0
    assert p.extra["key_inner"] == n and p.extra["bound_polynomial"] == 0.0
    err = float((res.output.double() - v.double().mean()).abs().max())
    assert res.error_bound is not None
    assert err <= res.error_bound
    assert err >= 0.1 * res.error_bound, err / res.error_bound
    assert err > 20 * (2 * U32) * float(v.abs().max())  # not just the final division and cast
    # the key-side inner length counts: without it the bound is far below the error
    assert err > 10 * _attention_bound_without(res, 2.0, 1.0, block=1)


@pytest.mark.parametrize(
    ("dtype", "ratio"), [(F32, 0.45), (torch.float16, 0.9)], ids=["fp32", "fp16"]
)
def test_attention_final_rounding_is_counted(dtype: torch.dtype, ratio: float) -> None:
    """The last term of the bound, ``(2 u + u_out) max|v|``: the output rounding.

    R = 0 and values 1 (1001 keys) or ``1 + ulp`` (1000 keys) of the output dtype: the range is
    one ulp, so everything else in the bound is negligible, and the exact output
    ``1 + 0.49975 ulp`` rounds to 1, an error of 0.9995 ``u_out``. float16 inputs are computed
    in float32 and rounded to float16 once (err / bound ~ 0.997); for float32 the output is
    rounded once too, and the model charges ``2 u`` (err / bound ~ 0.5)."""
    ulp = float(torch.finfo(dtype).eps)
    v = torch.ones(1, 2001, 1, dtype=dtype)
    v[0, :1000] = 1.0 + ulp
    k = torch.zeros(1, 2001, 4, dtype=dtype)
    q = torch.ones(1, 3, 4, dtype=dtype)
    res = compute.attention(q, k, v, method="polynomial", eps=1e-2 if dtype != F32 else 1e-4)
    assert res.plan.method == "polynomial" and res.plan.extra["bound_polynomial"] == 0.0
    assert res.output.dtype == dtype
    err = float((res.output.double() - v.double().mean()).abs().max())
    assert res.error_bound is not None
    assert ratio * res.error_bound <= err <= res.error_bound, (err, res.error_bound)


def feature_side_case(
    d: int = 255, n_keys: int = 16, R: float = 1e-3, eps: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, compute.AttentionResult]:
    """Degree-1 attention whose feature-side float32 sums lose a term at every step.

    ``d + 1 = 256`` features (one feature chunk), 16 keys (a key chunk of 16): the feature
    side dominates the modelled inner lengths. Keys ``+-1`` per column, half of each sign, so
    every column sums to 0 (the denominator's non-constant terms vanish); values ten 1s, one
    -1 and five 0s. Query row 1 sets the radius R (so degree 0 does not certify eps and the
    plan is degree 1 in float32); query row 0 is steered: in its feature-side dot product the
    constant feature comes first with ``S0 = c0 sum(v)`` and every other term is
    ``0.49 ulp(S0)``, so each addition rounds back to S0 and 255 terms of ``0.49 ulp(S0)`` are
    lost, ~125 u of the output, against ~45 u for the bound without the feature inner length.
    """
    gen = torch.Generator().manual_seed(0)
    k = torch.ones(n_keys, d, dtype=F64)
    for col in range(d):
        k[torch.randperm(n_keys, generator=gen)[: n_keys // 2], col] = -1.0
    v = torch.zeros(n_keys, 1, dtype=F64)
    v[:10], v[10] = 1.0, -1.0  # 11 entries +-1: every column sum of k * v is odd, never 0
    q = torch.zeros(2, d, dtype=F64)
    q[1, 0] = R  # Hölder radius: |q_1| max |kc| = R
    probe = compute.attention(
        q.float(), k.float(), v.float(), method="polynomial", eps=eps, scale=1
    )
    assert probe.plan.degree == 1 and probe.plan.compute_dtype == "float32"
    approx = certified_best(probe.plan.radius, 1)
    c0, c1 = float(approx.coeffs[0]), float(approx.coeffs[1])
    s0 = float(np.float32(c0 * float(v.sum())))
    m = (k * v).sum(0)  # [d] sum_j k_jl v_j: odd integers
    q[0] = 0.49 * float(np.spacing(np.float32(s0))) / (c1 * m)  # each term c1 q_l m_l
    q32, k32, v32 = q.float(), k.float(), v.float()
    res = compute.attention(q32, k32, v32, method="polynomial", eps=eps, scale=1.0)
    return q32, k32, v32, res


@needs_sequential
def test_attention_float32_feature_sums_round_as_modelled() -> None:
    q, k, v, res = feature_side_case()
    p = res.plan
    assert p.method == "polynomial" and p.degree == 1 and p.compute_dtype == "float32"
    assert p.extra["feature_inner"] == 256 and p.extra["key_inner"] == 16
    err = (res.output.double() - attention_reference(q, k, v, 1.0)).abs()[:, 0]  # [2]
    assert res.error_bound is not None
    assert float(err.max()) <= res.error_bound
    # the steered row: ~125 u, the bound ~560 u (err / bound ~ 0.22)
    assert float(err[0]) >= 0.15 * res.error_bound
    without = _attention_bound_without(res, 2.0, 1.0, features=0)
    assert float(err[0]) > 2 * without, (float(err[0]), without)


# ------------------------------------------------------------- float32 rounding: tensor attention


@needs_sequential
@pytest.mark.parametrize("side", ["k1", "k2"])
def test_tensor_float32_key_sums_round_as_modelled(
    side: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """q = 0 (R3 = 0, degree 0): the output is mean(v1) * mean(v2); 512 steered values on one
    side, one key on the other, so that side's key-sum length dominates ``Kc``. PyTorch route
    only: the compiled kernel splits every key sum over 16 vector lanes (a depth of about
    chunk / 16 plus a tree of 4), so a sequential construction does not steer it."""
    monkeypatch.setattr(ta_native, "NATIVE", False)
    steered = torch.from_numpy(steered_values(512)).view(-1, 1)
    steered[-1] = 0.0  # no centring in tensor attention: keep the values positive but one
    one = torch.ones(1, 1)
    gen = torch.Generator().manual_seed(2)
    q = torch.zeros(3, 8)
    long_k = torch.randn(512, 8, generator=gen)
    short_k = torch.randn(1, 8, generator=gen)
    if side == "k1":
        args = (q, long_k, short_k, steered, one)
    else:
        args = (q, short_k, long_k, one, steered)
    res = compute.tensor_attention(*args, method="polynomial", eps=1e-4)
    p = res.plan
    assert p.method == "polynomial" and p.compute_dtype == "float32" and p.degree == 0
    assert p.extra["chunk"] == 512 and p.extra["bound_parts"]["polynomial"] == 0.0
    err = float((res.output.double() - tensor_reference(*args, 1 / math.sqrt(8))).abs().max())
    assert res.error_bound is not None
    assert err <= res.error_bound
    assert err >= 0.1 * res.error_bound, err / res.error_bound
    # what the bound would be if this side's key sums were not counted (Kc = 3, Gamma ~ 3u)
    assert err > 10 * (2 * gamma(3, U32) + 2 * U32), err / U32


def tensor_readout_case(
    d: int = 255, R3: float = 1e-3, eps: float = 1e-4
) -> tuple[list[torch.Tensor], compute.AttentionResult]:
    """Degree-1 tensor attention whose readout (``U1^T Me``) loses a term at every feature.

    As ``feature_side_case``: ``d + 1 = 256`` features, two keys per side (``k2 = -k1`` row
    wise, so every feature sum of the keys is 0 and the denominator is the constant term
    alone), values ``[1, 1/2]`` on both sides; query row 1 sets R3, query row 0 makes every
    non-constant readout term ``0.49 ulp(S0)`` with ``S0 = c0 sum(v1) sum(v2)``. Both CPU
    routes add the features of a chunk in order, one rounding per term.
    """
    gen = torch.Generator().manual_seed(0)
    s1 = torch.where(torch.rand(d, generator=gen) < 0.5, -1.0, 1.0).double()
    s2 = torch.where(torch.rand(d, generator=gen) < 0.5, -1.0, 1.0).double()
    k1, k2 = torch.stack([s1, -s1]), torch.stack([s2, -s2])  # [2, d]
    v1 = v2 = torch.tensor([[1.0], [0.5]], dtype=F64)
    q = torch.zeros(2, d, dtype=F64)
    q[1, 0] = 1.0
    q[1] *= R3 / tensor_radius(q, k1, k2, 1.0)
    probe = compute.tensor_attention(
        *(x.float() for x in (q, k1, k2, v1, v2)), method="polynomial", eps=eps, scale=1.0
    )
    assert probe.plan.degree == 1 and probe.plan.compute_dtype == "float32"
    approx = certified_best(probe.plan.radius, 1)
    c0, c1 = float(approx.coeffs[0]), float(approx.coeffs[1])
    s0 = float(np.float32(c0 * 1.5 * 1.5))
    q[0] = 0.49 * float(np.spacing(np.float32(s0))) / (c1 * (0.5 * s1) * (0.5 * s2))
    args = [x.float() for x in (q, k1, k2, v1, v2)]
    res = compute.tensor_attention(*args, method="polynomial", eps=eps, scale=1.0)
    return args, res


@needs_sequential
@pytest.mark.parametrize("native", [True, False], ids=["native", "pytorch"])
def test_tensor_float32_readout_rounds_as_modelled(
    native: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if native and ta_native.kernel() is None:
        pytest.skip("compiled kernel unavailable: the PyTorch route case covers the readout")
    monkeypatch.setattr(ta_native, "NATIVE", native)
    args, res = tensor_readout_case()
    p = res.plan
    assert p.method == "polynomial" and p.degree == 1 and p.compute_dtype == "float32"
    assert p.features == 256 and p.extra["chunk"] >= 256
    q, k1, k2, v1, v2 = args
    err = (res.output.double() - tensor_reference(q, k1, k2, v1, v2, 1.0)).abs()[:, 0]  # [2]
    assert res.error_bound is not None
    assert float(err.max()) <= res.error_bound
    assert float(err[0]) >= 0.15 * res.error_bound  # ~125 u of a ~530 u bound
    # the bound with the readout's inner length dropped: Kc = c1 + c2 + 1 = 5
    without = p.extra["bound_parts"]["polynomial"] + 2 * gamma(6, U32) * 1.01 + 2 * U32
    assert float(err[0]) > 3 * without, (float(err[0]) / U32, without / U32)


# ------------------------------------------------------------------ structure of the bounds


@pytest.mark.parametrize(("g", "block", "features"), [(0, 512, 1), (2, 16, 256), (4, 512, 256)])
def test_attention_rounding_counts_every_inner_length(g: int, block: int, features: int) -> None:
    """The rounding part charges ``gamma_K`` with ``K = 2g + 2 + block + 1 + features``
    (docs/attention.md): every product of the pipeline, not only the long ones the measured
    constructions above can expose. ``rho = kappa / (1 + dmin')`` >= 1."""
    approx = certified_best(0.5, g)
    b = certified_bound(
        approx,
        features=features,
        block=block,
        compute_dtype=F32,
        out_dtype=F32,
        value_range=2.0,
        value_absmax=1.0,
    )
    k = 2 * g + 2 + block + 1 + features
    # range * gamma_K * rho with rho >= kappa / (1 + dmin), plus (2 u + u_out) max|v|, u_out = 0
    assert b.rounding - 2 * U32 >= 2.0 * gamma(k, U32) * approx.kappa / (1 + approx.dmin)
    smaller = certified_bound(
        approx,
        features=features - 1,
        block=block,
        compute_dtype=F32,
        out_dtype=F32,
        value_range=2.0,
        value_absmax=1.0,
    )
    assert b.rounding - smaller.rounding >= 2.0 * U32  # one more rounding per term counts


def test_tensor_rounding_counts_every_inner_length() -> None:
    """``Kc = 3 (g - 1) + min(c, n1) + min(c, n2) + 1 + min(c, r)`` (tensor_rounding_bound):
    each of the four inner lengths adds about ``2 u rho Vabs`` per unit."""
    approx = certified_best(0.5, 3)

    def rounding(features: int, n1: int, n2: int, chunk: int = 512) -> float:
        b = ta_bound.tensor_rounding_bound(
            approx,
            features=features,
            n1=n1,
            n2=n2,
            compute_dtype=F32,
            out_dtype=F64,
            weight_max=1.0,
            entry_max=1.0,
            value_range=np.array([1.0]),
            value_absmax=np.array([1.0]),
            chunk=chunk,
        )
        return float(b.rounding)

    base = rounding(100, 100, 100)
    rho = approx.kappa / (1 + approx.dmin)
    kc = 3 * 2 + 100 + 100 + 1 + 100
    assert base >= 2 * gamma(kc, U32) * rho
    for changed in (rounding(200, 100, 100), rounding(100, 200, 100), rounding(100, 100, 200)):
        assert changed - base >= 2 * 100 * U32 * rho * 0.99
    assert rounding(100, 100, 100, chunk=16) < base  # inner lengths are min(chunk, length)


# -------------------------------------------------------------------------- LoRA gradient


def lora_case(kind: str, L: int, R: float, dtype: torch.dtype) -> dict[str, Any]:
    """Inputs on which one per-row bound of docs/lora_bound.md §4 is nearly attained.

    Head dimension 1, d_model 3: ``x_j = [1, kappa_j, ind_j]`` with ``W_q = e0`` (every query
    is 1), ``W_k = e1`` (key j is kappa_j, so the centred score is kappa_j with scale 1),
    ``W_v = e2`` (value 1 on the marked tokens, 0 elsewhere); ``y = -1000`` so every residual is
    ~1000 and of one sign. One adapter's ``B`` picks the coordinate whose gradient error is
    aligned (``A = 0``, so the weights are the frozen ones), the others are zero.

    * ``"dV"``: token 0 (marked) at score 0 where a Taylor polynomial of odd degree is exact,
      the mass at ``-R`` where its relative error is most negative, one key at ``+R``:
      ``F~_i0 / F_i0 - 1 = -mu / (1 + mu)`` attains ``theta`` of (4.7). ``B_v = e2``.
    * ``"dK"``: every key at ``-R`` but one at ``+R``; token 0 marked: ``H_i0`` attains ``hq``
      and, with an even Taylor degree, ``eta_i0`` attains ``eta`` of (4.6). ``B_k = e2``.
    * ``"dQ"``: the mass at score 0, the two marked tokens at ``+-R``: with an odd Taylor
      degree the two terms of (4.5) have one sign for every query. ``B_q = e0``.
    """
    x = torch.zeros(L, 3, dtype=F64)
    x[:, 0] = 1.0
    if kind == "dV":
        x[1:, 1], x[-1, 1] = -R, R
        x[0, 2] = 1.0
    elif kind == "dK":
        x[:, 1], x[-1, 1] = -R, R
        x[0, 2] = 1.0
    else:
        x[0, 1], x[1, 1] = R, -R
        x[0, 2] = x[1, 2] = 1.0
    eye = torch.eye(3, dtype=F64)
    zero_a, zero_b = torch.zeros(1, 1, dtype=F64), torch.zeros(3, 1, dtype=F64)
    pick = {"dQ": ("q", eye[:, :1]), "dK": ("k", eye[:, 2:]), "dV": ("v", eye[:, 2:])}[kind]
    adapters = {mu: (zero_a, zero_b) for mu in ("qkv" if kind == "dK" else "qv")}
    adapters[pick[0]] = (zero_a, pick[1].clone())
    case: dict[str, Any] = {
        "x": x,
        "y": torch.full((L, 1), -1000.0, dtype=F64),
        "w_q": eye[:, :1].clone(),
        "w_k": eye[:, 1:2].clone(),
        "w_v": eye[:, 2:].clone(),
        "adapters": adapters,
        "alpha": 1.0,
        "scale": 1.0,
    }
    for key in ("x", "y", "w_q", "w_k", "w_v"):
        case[key] = case[key].to(dtype)
    case["adapters"] = {mu: (a.to(dtype), b.to(dtype)) for mu, (a, b) in adapters.items()}
    return case


def lora_reference(case: dict[str, Any]) -> dict[str, torch.Tensor]:
    """dA of every adapter by autograd through softmax attention in float64 (the naive
    reference, ``compute.lora.naive``)."""
    _, grads = naive_lora_gradient(**case)
    return {mu: ga for mu, (ga, _) in grads.items()}


LORA_CASES = [
    # kind, Taylor degree, radius, tokens: measured err / bound 0.99, 0.98, 0.92
    pytest.param("dV", 3, 0.25, 512, id="dV"),
    pytest.param("dK", 4, 0.25, 512, id="dK"),
    pytest.param("dQ", 3, 0.05, 64, id="dQ"),
]


@pytest.mark.parametrize("dtype", [F64, F32], ids=["fp64", "fp32"])
@pytest.mark.parametrize(("kind", "g", "R", "L"), LORA_CASES)
def test_lora_row_bounds_are_reached(
    kind: str, g: int, R: float, L: int, dtype: torch.dtype
) -> None:
    """err / bound >= 0.9 for dA of the adapter whose per-row bound the input attains."""
    case = lora_case(kind, L, R, dtype)
    inp = check_inputs(**case)
    prep = lora_cert.prepare(inp)
    approx = approximation("taylor", g, prep.radius)
    _, grads, cert = lora_poly.run_polynomial(inp, prep, approx, None)
    assert not isinstance(cert, str), cert
    ref = lora_reference(case)
    mu = kind[1].lower()
    for name, want in ref.items():  # every gradient within its bound
        err_a = float((grads[name][0].double() - want).abs().max())
        assert err_a <= cert.bounds[name][0], (name, err_a, cert.bounds[name][0])
    err = float((grads[mu][0].double() - ref[mu]).abs().max())
    bound = cert.bounds[mu][0]
    assert grads[mu][0].dtype == dtype
    assert 0.9 * bound <= err <= bound, (err, bound, err / bound)


def test_lora_public_bound_is_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same through ``lora_gradient``: its returned ``error_bounds`` of dA_k is attained to
    >= 0.9 at the degree the planner takes (Taylor is forced: the construction puts keys where
    Taylor's relative errors are extreme; measured 0.953 at degree 6). Every adapter has
    ``B = e2`` and a tiny ``A`` so that no gradient is zero (the certificate is relative to
    ``max |G|``), which leaves the construction intact."""
    monkeypatch.setattr(
        lora_plan, "families", lambda radius, g: [approximation("taylor", g, radius)]
    )
    case = lora_case("dK", 512, 0.25, F64)
    e2 = torch.eye(3, dtype=F64)[:, 2:]
    case["adapters"] = {mu: (torch.full((1, 1), 1e-3, dtype=F64), e2) for mu in "qkv"}
    res = compute.lora_gradient(**case, method="polynomial", eps=0.9)
    assert res.error_bounds is not None and res.plan.family == "taylor"
    ref = lora_reference(case)
    for mu, want in ref.items():
        bound = res.error_bounds[mu][0]
        err = float((res.grads[mu][0].double() - want).abs().max())
        assert bound is not None and err <= bound, (mu, err, bound)
        if mu == "k":
            assert err >= 0.9 * bound, (err, bound, err / bound)


# -------------------------------------------------------------------------- measured_error


def _random_attention(seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 64, 8, generator=gen) for _ in range(3))
    q = q * torch.linspace(0.05, 1.0, 64).view(1, 64, 1)  # error grows along the rows
    q = q * (0.5 / matrix_radius(q, centre(k), 1 / math.sqrt(8)))
    return q, k, v


@pytest.mark.parametrize("rows", [10, 128, 1000])
def test_attention_measured_error_is_the_sampled_rows_error(rows: int) -> None:
    """``measured_error`` equals the max error on the documented rows (independent float64
    recomputation): neither smaller (e.g. always 0) nor larger. Rows: a CPU generator seeded
    with 0 draws ``min(rows, L n)`` of the ``L n`` (slice, row) pairs without replacement
    (``torch.randperm``; all of them when ``rows >= L n``)."""
    q, k, v = _random_attention(5)
    res = compute.attention(q, k, v, method="polynomial", eps=1e-2, sample_rows=rows)
    err = (res.output.double() - attention_reference(q, k, v, 1 / math.sqrt(8))).abs()
    per_row = err.amax(dim=-1).reshape(-1)  # [L n]
    pick = torch.randperm(128, generator=torch.Generator().manual_seed(0))[: min(rows, 128)]
    want = float(per_row[pick].max())
    assert res.measured_error is not None and want > 1e3 * U32
    assert abs(res.measured_error - want) <= 1e-9 * want
    if rows < 128:  # the rows matter: the sample misses the worst row here
        assert want < float(per_row.max())


@pytest.mark.parametrize("rows", [1, 7, 30, 100])
def test_tensor_measured_error_is_the_sampled_rows_error(rows: int) -> None:
    """As above for tensor attention, whose rows are ``min(rows, n)`` evenly spaced query rows
    per slice, first and last included (rounded to the nearest row)."""
    gen = torch.Generator().manual_seed(6)
    q, k1, k2, v1, v2 = (torch.randn(2, m, 3, generator=gen) for m in (30, 10, 12, 10, 12))
    q = q * (0.8 / tensor_radius(q, k1, k2, 1 / math.sqrt(3)))
    q = q * torch.linspace(0.1, 1.0, 30).view(1, 30, 1)
    res = compute.tensor_attention(q, k1, k2, v1, v2, method="polynomial", sample_rows=rows)
    ref = tensor_reference(q, k1, k2, v1, v2, 1 / math.sqrt(3))
    per_row = (res.output.double() - ref).abs().amax(dim=-1)  # [2, 30]
    m = min(rows, 30)
    idx = sorted({round(float(x)) for x in np.linspace(0, 29, m)}) if m < 30 else list(range(30))
    want = float(per_row[:, idx].max())
    assert res.measured_error is not None and want > 10 * U32
    assert abs(res.measured_error - want) <= 1e-9 * want


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("n_q", "n_k"), [(300, 300), (4096, 4096), (65536, 65536), (700, 300)])
def test_attention_plan_certifies_the_inner_lengths_the_kernels_run(
    n_q: int, n_k: int, causal: bool
) -> None:
    """Structure, whatever this BLAS's summation order (the rounding-steering tests above need
    one): the inner lengths a selected plan was certified with are at least the key and
    feature products ``polynomial_forward`` runs with that plan's chunks (``geometry``, which
    both the PyTorch and the compiled route take them from)."""
    from compute.attention.plan import select
    from compute.attention.polynomial import geometry

    sel = select(
        R=1.0, d=8, dv=8, n_q=n_q, n_k=n_k, target=1e-3, value_range=2.0, value_absmax=1.0,
        dtypes=(torch.float32,), out_dtype=torch.float32, causal=causal,
        centring_dtype=torch.float32,
    )  # fmt: skip
    cfg = sel.config
    assert cfg is not None and cfg.dtype == torch.float32
    r = cfg.features
    runs = [(max(n_q, n_k), causal)]
    if causal and n_q > n_k:  # rows >= n_k run the non-causal kernel with their own geometry
        runs.append((max(n_q - n_k, n_k), False))
    for n_max, c in runs:
        B, ck, cr, _, unit = geometry(
            r, n_max, fp32=True, key_chunk=cfg.key_chunk, feature_chunk=cfg.feature_chunk,
            causal=c, block=cfg.block if (c, n_max) != runs[0] else None,
        )  # fmt: skip
        assert cfg.key_inner >= (unit if c else (ck or B)), (cfg, B, ck, unit)
        assert cfg.feature_inner >= (cr or r), (cfg, cr)
