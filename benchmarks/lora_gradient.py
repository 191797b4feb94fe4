"""LoRA adapter gradients: autograd through SDPA vs ``compute.lora_gradient`` (auto).

For L in {1024, 4096, 16384, 65536}, d_head in {8, 16}, rank 4, partial (q, v) and full
(q, k, v) adaptation, d_model = 64, inputs scaled so that the centred score radius is R = 0.5
(rho = R / ln L well below the threshold). Baseline: x needs no grad; A, B need grad;
``W = W* + (alpha/r) B A``; ``SDPA(xW_q, xW_k, xW_v)``; loss; backward. The error reference is
the blocked exact path in float64 (one per (L, d_head), shared by partial and full: the partial
case freezes ``W*_k + (alpha/r) B_k A_k``, so both have the same effective weights).

For d_head = 8 and L >= 16384 an extra row forces ``method="polynomial"`` (full adaptation) to
show the certified polynomial's time and bound where ``auto`` prefers exact.

Timing: median of ``--repeats`` runs after a warm-up for L <= 4096; one run (no warm-up) for
larger L. The run keeps to a time budget (10 minutes on 2 cores): a baseline that would not fit
in memory (autograd through SDPA on CPU keeps O(L^2) state: ~50 GB at L = 65536) or in time is
extrapolated quadratically from the measured L/4 time and marked ``~``; the float64 reference
at the largest L is computed only where ours ran the polynomial path (error ``n/a`` otherwise).

With ``--targets``: only the rows of the speed targets (docs/lora.md, "Targets"): L in {16384,
65536}, d_head = 8, full adaptation, eps = 1e-3, R in {0.5, 1}, both ``eps_mode``s, side by side in
one process with autograd through SDPA (measured at 16384, extrapolated x16 to 65536: it needs
~48 GiB there) and our own exact closed form (``method="exact"``, measured); written to
``lora_gradient_targets.md``.

With ``--estimators [L ...]``: the two polynomial estimators (reverse mode and chained,
docs/lora_bound.md §10) forced one after the other at equal certified eps (1e-3, scale mode),
d_head = 8, full adaptation, R in {0.5, 1}, float64 inputs (so that the measured error is the
approximation's, not the adapters' cast), against the float64 exact path; plus what ``auto``'s
planner picks and the costs it predicted; written to ``lora_gradient_estimators.md``.

Usage: python3 benchmarks/lora_gradient.py [--quick] [--targets] [--estimators [L ...]]
       [--device cpu] [--dtype float32]
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as nnf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import compute
from benchmarks.common import (
    markdown_table,
    median_time,
    parse_args,
    plot_path,
    save_text,
    sync,
)
from compute.lora.api import radius_only
from compute.lora.inputs import check_inputs, effective_weights

RADIUS = 0.5
EPS = 1e-3
D_MODEL = 64
RANK = 4
ALPHA = 8.0
BUDGET_S = 560.0
# autograd through SDPA on CPU keeps O(L^2) state: measured peak ~12 bytes per (query, key)
# pair at L = 8192 (777 MB); at L = 65536 that is ~50 GB, more than this machine has.
SDPA_BYTES_PER_PAIR = 12.0


def available_bytes() -> int:
    """MemAvailable of /proc/meminfo (CPU); free memory on CUDA."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def make_inputs(
    L: int, dh: int, device: str, dtype: torch.dtype, seed: int, radius: float = RADIUS
) -> dict:
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, s: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * s

    x = rnd(1, L, D_MODEL)
    w = {mu: rnd(D_MODEL, dh, s=1 / math.sqrt(D_MODEL)) for mu in "qkv"}
    adapters = {mu: (rnd(RANK, dh, s=0.3), rnd(D_MODEL, RANK, s=0.3)) for mu in "qkv"}
    case = dict(x=x, w_q=w["q"], w_k=w["k"], w_v=w["v"], adapters=adapters, alpha=ALPHA)
    inp = check_inputs(y=torch.zeros(1, L, dh, dtype=torch.float64), scale=None, **case)
    x = x * math.sqrt(radius / radius_only(inp))
    v = x @ effective_weights(inp, torch.float64)["v"]
    y = rnd(1, L, dh, s=float(v.std()))
    case.update(x=x, y=y)
    return {k: _to(v, device, dtype) for k, v in case.items()}


def _to(v, device, dtype):  # type: ignore[no-untyped-def]
    if isinstance(v, torch.Tensor):
        return v.to(device, dtype)
    if isinstance(v, dict):
        return {k: tuple(t.to(device, dtype) for t in p) for k, p in v.items()}
    return v


def partial_of(case: dict) -> dict:
    """Same effective weights, k frozen: W*_k <- W*_k + (alpha/r) B_k A_k."""
    a, b = case["adapters"]["k"]
    wk = case["w_k"] + (ALPHA / RANK) * (b @ a)
    adapters = {mu: case["adapters"][mu] for mu in "qv"}
    return {**case, "w_k": wk, "adapters": adapters}


def sdpa_backward(case: dict) -> None:
    x, y = case["x"], case["y"]
    leaves = {mu: (a.clone().requires_grad_(), b.clone().requires_grad_())
              for mu, (a, b) in case["adapters"].items()}  # fmt: skip
    w = {}
    for mu in "qkv":
        wm = case[f"w_{mu}"]
        if mu in leaves:
            a, b = leaves[mu]
            wm = wm + (ALPHA / RANK) * (b @ a)
        w[mu] = wm
    out = nnf.scaled_dot_product_attention(x @ w["q"], x @ w["k"], x @ w["v"])
    loss = 0.5 * (out - y).square().sum()
    loss.backward()


def ours(case: dict, method: str = "auto", eps_mode: str = "scale") -> compute.LoraResult:
    return compute.lora_gradient(
        case["x"], case["y"], w_q=case["w_q"], w_k=case["w_k"], w_v=case["w_v"],
        adapters=case["adapters"], alpha=ALPHA, method=method, eps=EPS, eps_mode=eps_mode,
    )  # fmt: skip


def timed(fn, device: str, repeats: int, big: bool) -> float:  # type: ignore[no-untyped-def]
    if not big:
        return median_time(fn, device, repeats)
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def _worst(res: compute.LoraResult, ref: dict) -> tuple[float, float | None, float]:
    """(max err, its bound, worst err / bound) over every dA, dB against the reference."""
    err_max, bound_at, ratio = 0.0, None, 0.0
    for mu, pair in res.grads.items():
        for i, got in enumerate(pair):
            err = float((got.double() - ref[mu][i].double()).abs().max())
            bnd = None if res.error_bounds is None else res.error_bounds[mu][i]
            if err >= err_max:
                err_max, bound_at = err, bnd
            if bnd:
                ratio = max(ratio, err / bnd)
    return err_max, bound_at, ratio


def targets(args) -> None:  # type: ignore[no-untyped-def]
    """The target rows (L = 16384, 65536; R = 0.5, 1; both eps modes), side by side."""
    device = args.device
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    # calibrate the cost model's rates (float32 and float64) before anything is timed
    compute.plan_lora_gradient(n=1024, d=8, radius=0.5, device=device, dtype=args.dtype)
    start = time.perf_counter()
    rows = []
    for R in (0.5, 1.0):
        t16 = None
        sizes = (256, 1024) if args.quick else (16384, 65536)
        for L in sizes:
            case = make_inputs(L, 8, device, dtype, seed=L + 8, radius=R)
            if t16 is None:
                t_sdpa, mark = timed(lambda c=case: sdpa_backward(c), device, 1, True), ""
                t16 = t_sdpa
            else:
                t_sdpa, mark = t16 * (L / sizes[0]) ** 2, "~"
            t_exact = timed(lambda c=case: ours(c, "exact"), device, 1, True)
            ref = compute.lora_gradient(
                **{k: _to(v, device, torch.float64) for k, v in case.items() if k != "alpha"},
                alpha=ALPHA, method="exact",
            ).grads  # fmt: skip
            runs = [("scale", "auto"), ("strict", "polynomial")]
            for mode, meth in runs:
                sync(device)
                t0 = time.perf_counter()
                try:
                    res = ours(case, meth, mode)
                except compute.CertificationError as exc:
                    t = time.perf_counter() - t0
                    why = str(exc).split(": ", 1)[1][:300]
                    rows.append([L, f"{R:g}", mode, meth, "not certified", "-", "-",
                                 f"{mark}{t_sdpa:.3g}", f"{t_exact:.3g}", f"{t:.3g}", "", "",
                                 "", "", "", "", "", "", why])  # fmt: skip
                    print(" | ".join(str(x) for x in rows[-1]), flush=True)
                    continue
                sync(device)
                t = time.perf_counter() - t0
                if meth == "auto" and res.plan.method == "exact":
                    runs.append((mode, "polynomial"))  # show the certified polynomial too
                p = res.plan
                ex = p.extra
                err, bnd, eb = _worst(res, ref)
                tries = [tr["degree"] for tr in ex.get("tries", [])]
                rows.append([
                    L, f"{R:g}", mode, meth, p.method, p.degree or "-", p.features or "-",
                    f"{mark}{t_sdpa:.3g}", f"{t_exact:.3g}", f"{t:.3g}",
                    f"{mark}{t_sdpa / t:.1f}x", f"{t_exact / t:.1f}x", f"{err:.2e}",
                    "none (exact)" if bnd is None else f"{bnd:.2e}",
                    f"{ex['relative_bound']:.1e}" if "relative_bound" in ex else "-",
                    f"{ex['strict_ratio']:.1e}" if ex.get("strict_ratio") else "-",
                    f"{ex['kappa_max']:.2g}" if ex.get("kappa_max") else "-",
                    f"{eb:.1e}" if bnd else "", str(tries) if tries else "-",
                ])  # fmt: skip
                print(" | ".join(str(x) for x in rows[-1]), flush=True)
    headers = ["L", "R", "eps_mode", "asked", "method", "g", "r", "SDPA-autograd s", "exact s",
               "ours s", "vs SDPA", "vs exact", "max err", "bound", "bound / scale",
               "strict ratio", "kappa_G", "err/bound", "degrees run"]  # fmt: skip
    table = markdown_table(headers, rows)
    note = (
        f"\n\nd_head=8, full adaptation, d_model={D_MODEL}, rank={RANK}, alpha={ALPHA}, "
        f"eps={EPS}, dtype={args.dtype}, device={device}, torch threads="
        f"{torch.get_num_threads()}; one run each (no warm-up) in one process. 'exact s' = our "
        f"blocked closed form (method='exact'); '~' = SDPA extrapolated x16 from L=16384 (~"
        f"{SDPA_BYTES_PER_PAIR * 65536**2 / 2**30:.0f} GiB at L=65536); 'bound / scale' = the "
        f"ratio eps bounds in the row's mode (scale: b / N_lo; strict: b / (max|G~| - b)); "
        f"'strict ratio' = b / (max|G~| - b) ('-': b >= max|G~|); 'kappa_G' = max N / max|G~| "
        f"(worst gradient); 'max err' against the float64 exact path. "
        f"Total {time.perf_counter() - start:.0f} s."
    )
    print(table + note)
    save_text(args.out, "lora_gradient_targets.md", table + note)


def estimators(args, sizes: list[int]) -> None:  # type: ignore[no-untyped-def]
    """Reverse mode vs the chained estimator at equal certified eps (docs/lora.md)."""
    device = args.device
    compute.plan_lora_gradient(n=1024, d=8, radius=0.5, device=device, dtype="float64")
    start = time.perf_counter()
    rows = []
    for L in sizes:
        for R in (0.5, 1.0):
            case = make_inputs(L, 8, device, torch.float64, seed=L + 8, radius=R)
            sync(device)
            t0 = time.perf_counter()
            ref = ours(case, "exact").grads
            sync(device)
            t_exact = time.perf_counter() - t0
            plan = compute.plan_lora_gradient(
                n=L,
                d=8,
                radius=R,
                eps=EPS,
                full=True,
                dtype="float64",
                device=device,
                method="polynomial",
            )
            cands = plan.extra.get("estimators", {})
            results = {}
            for _rep in range(2 if L <= 16384 else 1):
                for est in ("reverse", "chained"):  # interleaved: same load for both
                    sync(device)
                    t0 = time.perf_counter()
                    res = compute.lora_gradient(
                        case["x"], case["y"], w_q=case["w_q"], w_k=case["w_k"],
                        w_v=case["w_v"], adapters=case["adapters"], alpha=ALPHA,
                        method="polynomial", eps=EPS, estimator=est,
                    )  # fmt: skip
                    sync(device)
                    t = time.perf_counter() - t0
                    if est not in results or t < results[est][1]:
                        results[est] = (res, t)
            for est, (res, t) in results.items():
                p = res.plan
                ex = p.extra
                err, bnd, eb = _worst(res, ref)
                c = cands.get(est, {})
                rows.append([
                    L, f"{R:g}", est, p.degree, p.features, f"{t:.3g}",
                    f"{c['cost']:.3g}" if c.get("certified") else "-", f"{t_exact:.3g}",
                    f"{bnd:.2e}" if bnd else "-", f"{ex['relative_bound']:.2e}",
                    f"{err:.2e}", f"{eb:.1e}",
                    str([(tr["estimator"][0], tr["degree"]) for tr in ex["tries"]]),
                    plan.extra.get("estimator", "-"),
                ])  # fmt: skip
                print(" | ".join(str(x) for x in rows[-1]), flush=True)
    headers = ["L", "R", "estimator", "g", "r", "time s", "predicted s", "exact s",
               "bound (worst G)", "bound / N_lo", "max err", "err/bound", "runs",
               "planner picks"]  # fmt: skip
    table = markdown_table(headers, rows)
    note = (
        f"\n\nd_head=8, full adaptation, d_model={D_MODEL}, rank={RANK}, alpha={ALPHA}, "
        f"eps={EPS} (eps_mode='scale'), float64 inputs, device={device}, torch threads="
        f"{torch.get_num_threads()}; method='polynomial' with the estimator forced; best of "
        f"2 interleaved runs at L <= 16384, one run above; 'predicted s' = the planner's "
        f"calibrated cost of that estimator at its degree; 'exact s' = method='exact' in float64 "
        f"(also the error reference); 'runs' = (estimator, degree) of every certified try. "
        f"Total {time.perf_counter() - start:.0f} s."
    )
    print(table + note)
    save_text(args.out, "lora_gradient_estimators.md", table + note)


def main() -> None:
    if "--estimators" in sys.argv[1:]:
        rest = sys.argv[sys.argv.index("--estimators") + 1 :]
        sizes = [int(a) for a in rest if a.isdigit()] or [16384, 65536]
        others = [a for a in sys.argv[1:] if a != "--estimators" and not a.isdigit()]
        estimators(parse_args(__doc__ or "", others), sizes)
        return
    want_targets = "--targets" in sys.argv[1:]
    args = parse_args(__doc__ or "", [a for a in sys.argv[1:] if a != "--targets"])
    if want_targets:
        targets(args)
        return
    device = args.device
    dtype = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}[
        args.dtype
    ]
    sizes = [256, 1024] if args.quick else [1024, 4096, 16384, 65536]
    dims = [8] if args.quick else [8, 16]
    start = time.perf_counter()
    rows = []
    sdpa_times: dict[tuple[int, int, str], float] = {}
    extrapolated: set[tuple[int, int, str]] = set()
    ref_times: dict[tuple[int, int], float] = {}
    series: dict[tuple[int, str], list[tuple[int, float, float]]] = {}
    for dh in dims:
        for L in sizes:
            case = make_inputs(L, dh, device, dtype, seed=L + dh)
            big = L > 4096
            # float64 reference (exact blocked path), shared by partial and full
            elapsed = time.perf_counter() - start
            guess = 16.0 * ref_times.get((L // 4, dh), 0.0)
            ref = None
            # forced-polynomial rows (d_head = 8, L >= 16384) show what the certified
            # polynomial costs when auto prefers exact
            forced = dh == 8 and L >= 16384 and not args.quick
            # the float64 reference at the largest L only where a polynomial row needs it
            want_ref = L <= 16384 or forced or ours(case).plan.method == "polynomial"
            if want_ref and elapsed + guess < BUDGET_S * 0.8:
                t0 = time.perf_counter()
                ref = compute.lora_gradient(
                    **{k: _to(v, device, torch.float64) for k, v in case.items()
                       if k not in ("alpha",)},
                    alpha=ALPHA, method="exact",
                ).grads  # fmt: skip
                ref_times[(L, dh)] = time.perf_counter() - t0
            auto_full = ""
            for mode in ("full", "partial", "full, forced poly")[: 3 if forced else 2]:
                if "forced" in mode and auto_full == "polynomial":
                    continue  # the auto row already is the certified polynomial
                c = case if mode != "partial" else partial_of(case)
                meth = "polynomial" if "forced" in mode else "auto"
                elapsed = time.perf_counter() - start
                prev = sdpa_times.get((L // 4, dh, mode.split(",")[0]))
                guess = 16.0 * prev if prev is not None else 0.0
                mark = ""
                too_big = 0.5 * available_bytes() < SDPA_BYTES_PER_PAIR * L * L
                if "forced" in mode:
                    t_sdpa = sdpa_times[(L, dh, "full")]
                    mark = "~" if (L, dh, "full") in extrapolated else ""
                elif big and prev is not None and (too_big or elapsed + guess > BUDGET_S):
                    t_sdpa = guess
                    mark = "~"
                    extrapolated.add((L, dh, mode))
                else:
                    t_sdpa = timed(lambda c=c: sdpa_backward(c), device, args.repeats, big)
                sdpa_times[(L, dh, mode)] = t_sdpa
                sync(device)
                t0 = time.perf_counter()
                try:
                    res = ours(c, meth)
                except compute.CertificationError as exc:  # forced polynomial, not certified
                    t_fail = time.perf_counter() - t0
                    failed = str(exc).split("(")[1].split(";")[0]
                    rows.append([L, dh, mode, "not certified", "-", "-", "", "", f"{t_sdpa:.3g}",
                                 f"{t_fail:.3g}", "", "", "", failed, ""])  # fmt: skip
                    print(" | ".join(str(x) for x in rows[-1]), flush=True)
                    continue
                sync(device)
                t_ours = time.perf_counter() - t0  # one run for L > 4096 (as timed())
                if not big:
                    t_ours = timed(lambda c=c, m=meth: ours(c, m), device, args.repeats, big)
                err_s, bound_s, ratio_s = "n/a", "n/a", "n/a"
                rel_s = "-"
                rel = res.plan.extra.get("relative_bound")  # polynomial rows (exact: bound only)
                if res.error_bounds is not None and rel is not None:
                    rel_s = f"{rel:.1e}"
                if ref is not None:
                    worst = (-1.0, 0.0, 0.0)
                    for mu, pair in res.grads.items():
                        for i, got in enumerate(pair):
                            err = float((got.double() - ref[mu][i].double()).abs().max())
                            bnd = None if res.error_bounds is None else res.error_bounds[mu][i]
                            ratio = err / bnd if bnd else math.nan
                            key = ratio if bnd else err
                            if key > worst[0]:
                                worst = (key, err, bnd if bnd else math.nan)
                    err_s = f"{worst[1]:.2e}"
                    bound_s = "none (exact)" if res.error_bounds is None else f"{worst[2]:.2e}"
                    ratio_s = "" if res.error_bounds is None else f"{worst[1] / worst[2]:.1e}"
                p = res.plan
                if mode == "full":
                    auto_full = p.method
                rows.append([
                    L, dh, mode, p.method, p.degree if p.degree else "-",
                    p.features if p.features else "-", f"{p.radius:.3f}", f"{p.rho:.3f}",
                    f"{mark}{t_sdpa:.3g}", f"{t_ours:.3g}", f"{mark}{t_sdpa / t_ours:.1f}x",
                    err_s, bound_s, rel_s, ratio_s,
                ])  # fmt: skip
                if "forced" not in mode:
                    series.setdefault((dh, mode), []).append((L, t_sdpa, t_ours))
                print(" | ".join(str(x) for x in rows[-1]), flush=True)
    headers = ["L", "d_head", "adapt", "method", "g", "r", "R", "rho", "SDPA-autograd s",
               "ours s", "speed-up", "max err", "bound", "bound / N_lo",
               "err/bound"]  # fmt: skip
    table = markdown_table(headers, rows)
    note = (
        f"\n\nd_model={D_MODEL}, rank={RANK}, alpha={ALPHA}, eps={EPS}, dtype={args.dtype}, "
        f"device={device}, torch threads={torch.get_num_threads()}; R = certified radius of "
        f"the centred scores. 'max err' = largest max-abs error of any dA/dB against the float64 "
        f"exact reference (with its certified bound; exact rows: the rounding bound of the "
        f"exact path); 'bound / N_lo' = the certified relative bound of the default "
        f"eps_mode='scale', b / N_lo(G) on the gradient's natural scale, worst over dA, dB "
        f"(eps bounds it; polynomial rows); "
        f"'full, forced poly' = method='polynomial' where auto chose exact ('not certified' = "
        f"CertificationError after the retries, its certified relative bound and the time of "
        f"all tries); "
        f"'~' = SDPA time extrapolated "
        f"quadratically from L/4 (it would need ~{SDPA_BYTES_PER_PAIR:.0f} bytes per pair: "
        f"{SDPA_BYTES_PER_PAIR * 65536**2 / 2**30:.0f} GiB at L=65536, or the time budget); "
        f"'n/a' = float64 reference skipped (time budget; only where ours ran exact). "
        f"Total {time.perf_counter() - start:.0f} s."
    )
    print(table + note)
    save_text(args.out, "lora_gradient.md", table + note)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (dh, mode), pts in sorted(series.items()):
            ls = [p[0] for p in pts]
            ax.loglog(ls, [p[1] for p in pts], "o--", label=f"SDPA autograd d={dh} {mode}")
            ax.loglog(ls, [p[2] for p in pts], "s-", label=f"ours (auto) d={dh} {mode}")
        ax.set_xlabel("L")
        ax.set_ylabel("seconds (loss + adapter gradients)")
        ax.set_title(f"LoRA gradients, R={RADIUS}, eps={EPS}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plot_path(args.out, "lora_gradient.png"), dpi=120)
    except ImportError:
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
