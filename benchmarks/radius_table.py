"""The certified radius R of typical attention inputs, and the largest R each eps certifies.

Writes the two tables of docs/fast_path.md ("Will my inputs take the fast path?"):

1. R (``compute.attention_radius``), rho and the largest centred score actually present, for
   q, k of n = 4096 rows drawn as: N(0, 1); N(0, 1) times 0.3 (the README's example); rows
   LayerNorm-ed (mean 0, variance 1 per row, from inputs with arbitrary per-feature offsets and
   scales); rows of unit 2-norm (cosine / QK-norm attention); each at d = 8, 16, 64, 128 with
   the default scale 1/sqrt(d) and with scale 1. For each: whether a polynomial is certified at
   eps = 1e-2 and 1e-3 (``plan_attention(method="polynomial")``: degree and features r, or
   "exact only"), and the factor the scores would need (``R_max / R``) to get under the
   practical threshold R_max of eps = 1e-3 (table 2, at most ``PRACTICAL`` features).
2. Per d and eps: the largest certified R (bisection on the planner), with the degree and r it
   needs there, and the largest with at most ``PRACTICAL`` features (R_max).

Certification does not depend on the machine (only which path is faster does), so the tables
are the same everywhere; the draws are seeded.

    python benchmarks/radius_table.py [--out DIR] [--n 4096]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import OUT_DEFAULT, markdown_table, save_text

import compute

DIMS = (8, 16, 64, 128)
EPSS = (1e-2, 1e-3)


def inputs(kind: str, n: int, d: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    def normal() -> torch.Tensor:
        return torch.randn(1, n, d, generator=gen, dtype=torch.float64)

    if kind == "N(0,1)":
        return normal(), normal()
    if kind == "0.3 N(0,1)":
        return 0.3 * normal(), 0.3 * normal()
    if kind == "LayerNorm":
        # arbitrary per-feature offsets and scales, removed row by row by LayerNorm (no affine)
        out = []
        for _ in range(2):
            x = normal() * (1 + 3 * torch.rand(d, generator=gen)) + 5 * torch.randn(
                d, generator=gen
            )
            out.append(torch.nn.functional.layer_norm(x, (d,)))
        return out[0], out[1]
    if kind == "unit rows":
        q, k = normal(), normal()
        return q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    raise ValueError(kind)


PRACTICAL = 10_000  # features: beyond this the polynomial rarely beats exact at these n


def certified(
    n: int, d: int, R: float, eps: float, cap: int | None = None
) -> tuple[int, int] | None:
    """(degree, features) of the certified polynomial (with at most ``cap`` features), or None
    (exact only)."""
    if not math.isfinite(R):
        return None
    try:
        p = compute.plan_attention(n=n, d=d, radius=R, eps=eps, method="polynomial")
    except compute.CertificationError:
        return None
    assert p.degree is not None and p.features is not None
    if cap is not None and p.features > cap:
        return None
    return p.degree, p.features


def largest_certified(
    n: int, d: int, eps: float, cap: int | None = None
) -> tuple[float, tuple[int, int] | None]:
    """The largest R (to 3 digits) at which a polynomial is certified, by bisection."""
    lo, hi = 0.0, 32.0
    if certified(n, d, 1e-6, eps, cap) is None:
        return 0.0, None
    while hi - lo > 1e-3 * max(hi, 1e-3):
        mid = 0.5 * (lo + hi)
        if certified(n, d, mid, eps, cap) is not None:
            lo = mid
        else:
            hi = mid
    return lo, certified(n, d, lo, eps, cap)


def phrase(got: tuple[int, int] | None) -> str:
    return "exact only" if got is None else f"g = {got[0]}, r = {got[1]}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--out", default=str(OUT_DEFAULT))
    ap.add_argument("--n", type=int, default=4096)
    args = ap.parse_args()
    n = args.n
    r_max = {(d, eps): largest_certified(n, d, eps) for d in DIMS for eps in EPSS}
    r_prac = {(d, eps): largest_certified(n, d, eps, PRACTICAL) for d in DIMS for eps in EPSS}
    rows2 = [
        [
            d,
            eps,
            f"{r_max[(d, eps)][0]:.3g}",
            phrase(r_max[(d, eps)][1]),
            f"{r_prac[(d, eps)][0]:.3g}",
            phrase(r_prac[(d, eps)][1]),
        ]
        for d in DIMS
        for eps in EPSS
    ]
    gen = torch.Generator().manual_seed(0)
    rows1 = []
    for kind in ("N(0,1)", "0.3 N(0,1)", "LayerNorm", "unit rows"):
        for d in DIMS:
            q, k = inputs(kind, n, d, gen)
            for scale_name, scale in (("1/sqrt(d)", None), ("1", 1.0)):
                r = compute.attention_radius(q, k, scale=scale)
                s = 1 / math.sqrt(d) if scale is None else scale
                kc = k - (k.amax(dim=-2, keepdim=True) + k.amin(dim=-2, keepdim=True)) / 2
                top = float((s * q @ kc.transpose(-1, -2)).abs().max())
                row = [kind, d, scale_name, f"{r.radius:.3g}", f"{r.rho:.2g}", f"{top:.3g}"]
                for eps in EPSS:
                    row.append(phrase(certified(n, d, r.radius, eps)))
                need = r_prac[(d, 1e-3)][0] / r.radius
                row.append("-" if need >= 1 else f"{need:.2g}")
                rows1.append(row)
    t1 = markdown_table(
        [
            "inputs (q and k)",
            "d",
            "scale",
            "R",
            "rho",
            "max |centred score|",
            "eps = 1e-2",
            "eps = 1e-3",
            f"scores x this for eps = 1e-3, r <= {PRACTICAL}",
        ],
        rows1,
    )
    t2 = markdown_table(
        [
            "d",
            "eps",
            "largest certified R",
            "polynomial there",
            f"largest R with r <= {PRACTICAL}",
            "polynomial there",
        ],
        rows2,
    )
    text = (
        f"R of typical inputs (n = {n}, certification at eps):\n\n{t1}\n\n"
        f"Largest certified R (n = {n}):\n\n{t2}"
    )
    print(text)
    save_text(args.out, "radius_table.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
