"""CUDA checks: the same code on CUDA tensors, against float64 references on the CPU.

Marked ``gpu``; they run where CUDA is available (``benchmarks/gpu.sh`` runs ``pytest -m gpu``)
and are reported as skipped elsewhere, since this CI machine has no GPU.
"""

from __future__ import annotations

import pytest
import torch

import compute
from compute.attention.naive import naive_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]

CUDA = torch.device("cuda")


def _inputs(n: int, d: int, radius_scale: float, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, n, d, generator=g, dtype=torch.float64) * radius_scale for _ in range(3)]


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return naive_attention(q, k, v)  # float64, default scale 1/sqrt(d)


@pytest.mark.parametrize("method", ["exact", "polynomial", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_attention_on_cuda(method: str, dtype: torch.dtype) -> None:
    q, k, v = _inputs(4096, 8, 0.3, 0)
    ref = _reference(q, k, v)
    eps = 1e-2 if dtype == torch.bfloat16 else 1e-3
    if method == "polynomial" and dtype == torch.bfloat16:
        with pytest.raises(compute.CertificationError):  # the bf16 output cast alone is 2^-9
            compute.attention(*(x.to(CUDA, dtype) for x in (q, k, v)), method=method, eps=1e-3)
        return
    res = compute.attention(*(x.to(CUDA, dtype) for x in (q, k, v)), method=method, eps=eps)
    assert res.output.device.type == "cuda" and res.output.dtype == dtype
    err = float((res.output.double().cpu() - ref).abs().max())
    if res.error_bound is not None:
        assert err <= res.error_bound
    else:
        assert err <= (2e-2 if dtype == torch.bfloat16 else 1e-5)


def test_causal_attention_on_cuda_matches_sdpa() -> None:
    q, k, v = (x.to(CUDA, torch.float32) for x in _inputs(2048, 16, 0.3, 1))
    res = compute.attention(q, k, v, method="exact", causal=True)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(res.output, want, rtol=1e-4, atol=1e-5)
    poly = compute.attention(q, k, v, method="polynomial", causal=True, eps=1e-3, sample_rows=32)
    assert poly.measured_error is not None and poly.error_bound is not None
    assert poly.measured_error <= poly.error_bound


def test_tensor_attention_on_cuda() -> None:
    g = torch.Generator().manual_seed(2)
    q, k1, k2, v1, v2 = (
        torch.randn(1, 256, 4, generator=g, dtype=torch.float64) * 0.5 for _ in range(5)
    )
    cpu = compute.tensor_attention(q, k1, k2, v1, v2, method="exact")
    for method in ("exact", "polynomial"):
        res = compute.tensor_attention(
            *(x.to(CUDA, torch.float32) for x in (q, k1, k2, v1, v2)), method=method, eps=1e-3
        )
        assert res.output.device.type == "cuda"
        err = float((res.output.double().cpu() - cpu.output).abs().max())
        assert err <= (res.error_bound if res.error_bound is not None else 1e-5)


def test_lora_gradient_on_cuda() -> None:
    g = torch.Generator().manual_seed(3)
    L, dm, dh, r = 512, 16, 8, 4

    def rnd(*shape: int, s: float = 0.3) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64) * s

    x, y = rnd(L, dm), rnd(L, dh)
    w = [rnd(dm, dh) for _ in range(3)]
    adapters = {m: (rnd(r, dh), rnd(dm, r)) for m in "qkv"}
    ref = compute.lora_gradient(
        x, y, w_q=w[0], w_k=w[1], w_v=w[2], adapters=adapters, alpha=8.0, method="exact"
    )
    res = compute.lora_gradient(
        x.to(CUDA),
        y.to(CUDA),
        w_q=w[0].to(CUDA),
        w_k=w[1].to(CUDA),
        w_v=w[2].to(CUDA),
        adapters={m: (a.to(CUDA), b.to(CUDA)) for m, (a, b) in adapters.items()},
        alpha=8.0,
        method="exact",
    )
    for m in "qkv":
        for got, want in zip(res.grads[m], ref.grads[m], strict=True):
            assert got.device.type == "cuda"
            torch.testing.assert_close(got.cpu(), want, rtol=1e-8, atol=1e-10)
