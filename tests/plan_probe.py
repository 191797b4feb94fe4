"""``python tests/plan_probe.py``: the plans of the documentation's examples, as one JSON line.

A fresh process, as a new user would start one: it prices every example with whatever
calibration it finds (``COMPUTE_CALIBRATION_DIR``) or makes. tests/test_planning_reproducible.py
runs it many times and compares the methods and predictions; it also measures the spread across
processes for the report in docs/attention.md ("Planner and cost model").

The examples (each names where it is documented):

- ``readme-plan-d8``: README.md's ``/v1/plan?op=attention&n=65536&d=8&radius=1&eps=0.001``
  (also docs/attention.md's ``plan_attention(n=65536, d=8, radius=1.0, eps=1e-3)``);
- ``readme-plan-d64``: README.md's ``/v1/plan?op=attention&n=65536&d=64&radius=3&eps=0.001``
  (docs/service.md, and the CLI's ``attn plan attention --n 65536 --d 64 --radius 3``);
- ``tensor-plan``: docs/tensor_attention.md's ``plan_tensor_attention(n=1024, d=8, radius=1.0,
  eps=1e-3)``;
- ``readme-client``: the README's client example (numpy 4096 x 8 inputs times 0.3, seed 0,
  ``eps=1e-3``), run through ``compute.attention`` as the service's worker runs it;
- ``readme-library``: the README's library example (``torch.randn(1, 4, 65536, 8) * 0.3``,
  ``eps=1e-3``), planned from its radius (``attention_radius`` and ``plan_attention``; its
  reason's example says a polynomial is certified).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def readme_client_inputs() -> tuple[Any, Any, Any]:
    """The README's client example's arrays, exactly as it builds them."""
    import numpy as np

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((4096, 8), dtype=np.float32) * 0.3 for _ in range(3))
    return q, k, v


def plans() -> dict[str, dict[str, Any]]:
    import torch

    import compute

    out: dict[str, dict[str, Any]] = {}

    def keep(name: str, plan: Any) -> None:
        out[name] = {
            "method": plan.method,
            "cost_polynomial": plan.cost_polynomial,
            "cost_exact": plan.cost_exact,
            "radius": plan.radius,
            "reason": plan.reason,
        }

    keep("readme-plan-d8", compute.plan_attention(n=65536, d=8, radius=1, eps=0.001))
    keep("readme-plan-d64", compute.plan_attention(n=65536, d=64, radius=3, eps=0.001))
    keep("tensor-plan", compute.plan_tensor_attention(n=1024, d=8, radius=1.0, eps=1e-3))
    q, k, v = (torch.from_numpy(a) for a in readme_client_inputs())
    keep("readme-client", compute.attention(q, k, v, eps=1e-3).plan)
    torch.manual_seed(0)
    q, k = (torch.randn(1, 4, 65536, 8) * 0.3 for _ in range(2))
    r = compute.attention_radius(q, k)
    keep("readme-library", compute.plan_attention(**r.plan_args, eps=1e-3))
    return out


def run(
    processes: int, cache: str | None, *, env: dict[str, str] | None = None, parallel: int = 1
) -> list[dict[str, Any]]:
    """Run the probe in ``processes`` fresh processes, ``parallel`` at a time, and return each
    one's plans. ``cache``: one calibration directory they all share, or None for a new empty
    one each (every process calibrates itself)."""
    import os
    import subprocess
    import tempfile

    base = dict(os.environ if env is None else env)
    base.pop("COMPUTE_RECALIBRATE", None)
    if env is None:  # this checkout's packages, not an installed copy
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        base["PYTHONPATH"] = os.pathsep.join(filter(None, [root, base.get("PYTHONPATH")]))
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        for start in range(0, processes, parallel):
            procs = []
            for i in range(start, min(processes, start + parallel)):
                e = dict(base)
                e["COMPUTE_CALIBRATION_DIR"] = cache or os.path.join(scratch, f"cal{i}")
                procs.append(
                    subprocess.Popen(
                        [sys.executable, __file__],
                        env=e,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                    )
                )
            for p in procs:
                out, err = p.communicate(timeout=600)
                if p.returncode != 0:
                    raise RuntimeError(f"plan_probe failed ({p.returncode}): {err[-2000:]}")
                results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def spread(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per example: the methods seen and, per prediction, min, max and max/min."""
    out: dict[str, dict[str, Any]] = {}
    for name in results[0]["plans"]:
        got = [r["plans"][name] for r in results]
        row: dict[str, Any] = {"methods": sorted({g["method"] for g in got})}
        for field in ("cost_polynomial", "cost_exact"):
            xs = [g[field] for g in got if g[field] is not None]
            if xs:
                row[field] = {"min": min(xs), "max": max(xs), "ratio": max(xs) / min(xs)}
        out[name] = row
    return out


def main() -> int:
    if len(sys.argv) > 1:  # python tests/plan_probe.py N shared|separate [parallel]
        import tempfile

        n, mode = int(sys.argv[1]), sys.argv[2]
        parallel = int(sys.argv[3]) if len(sys.argv) > 3 else 1
        with tempfile.TemporaryDirectory() as shared:
            results = run(n, shared if mode == "shared" else None, parallel=parallel)
        print(json.dumps(spread(results), indent=1))
        print("probe seconds:", [round(r["seconds"], 2) for r in results])
        return 0
    t0 = time.perf_counter()
    got = plans()
    print(json.dumps({"plans": got, "seconds": time.perf_counter() - t0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
