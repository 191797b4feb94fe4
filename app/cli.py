"""``attn``: submit ``.npy`` / ``.safetensors`` inputs, show status, wait (with a progress bar),
fetch results, cancel, ask the planner.

    attn submit attention q=q.npy k=k.npy v=v.npy --param eps=1e-3 --wait --out out.safetensors
    attn submit attention inputs.safetensors          # tensors named q, k, v; params in metadata
    attn status JOB_ID ; attn wait JOB_ID --out out.safetensors ; attn cancel JOB_ID
    attn plan attention --n 65536 --d 64 --radius 3
    attn plan lora-gradient --n 65536 --d 8 --radius 0.5 --full true --eps-mode strict
    attn plan attention q=q.npy k=k.npy v=v.npy --eps 1e-3   # R computed from the tensors
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from app.client import Client, ClientError, Job, Result
from app.jobs.codec import decode_safetensors, encode_safetensors, from_array

__all__ = ["main"]


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _load_inputs(specs: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    tensors: dict[str, Any] = {}
    params: dict[str, Any] = {}
    for spec in specs:
        name, _, path = spec.rpartition("=")
        p = Path(path)
        if p.suffix == ".safetensors":
            raw, meta = decode_safetensors(p.read_bytes(), max_elements=1 << 40)
            prefix = f"{name}." if name else ""
            tensors.update({prefix + n: t.to_numpy() for n, t in raw.items()})
            params.update({k: _value(v) for k, v in meta.items()})
        elif p.suffix == ".npy":
            if not name:
                name = p.stem
            tensors[name] = np.load(p, allow_pickle=False)
        else:
            raise SystemExit(f"attn: {path}: expected a .npy or .safetensors file")
    return tensors, params


def _options(extra: list[str]) -> dict[str, str]:
    """``--key value`` / ``--key=value`` pairs (the planner's other arguments)."""
    out: dict[str, str] = {}
    it = iter(extra)
    for token in it:
        if not token.startswith("--"):
            raise SystemExit(f"attn plan: expected --KEY VALUE, got {token!r}")
        key, eq, value = token[2:].partition("=")
        out[key.replace("-", "_")] = value if eq else next(it, "true")
    return out


def _bar(rec: dict[str, Any], start: float) -> None:
    prog = rec.get("progress") or {}
    done, total = prog.get("done", 0), prog.get("total", 0)
    frac = done / total if total else (1.0 if rec["status"] == "succeeded" else 0.0)
    width = 30
    filled = int(frac * width)
    sys.stderr.write(
        f"\r{rec['status']:<9} [{'#' * filled}{'.' * (width - filled)}] {100 * frac:5.1f}% "
        f"{time.monotonic() - start:6.1f}s"
    )
    sys.stderr.flush()


def _wait(job: Job, out: str | None, timeout: float | None, quiet: bool) -> int:
    start = time.monotonic()
    try:
        result = job.wait(timeout, on_progress=None if quiet else lambda r: _bar(r, start))
    finally:
        if not quiet:
            sys.stderr.write("\n")
    _emit(result, out)
    return 0


def _emit(result: Result, out: str | None) -> None:
    print(json.dumps({"id": result.id, "summary": result.summary}, indent=2))
    if out:
        raw = {n: from_array(a) for n, a in result.outputs.items()}
        Path(out).write_bytes(encode_safetensors(raw, {"summary": json.dumps(result.summary)}))
        print(f"outputs written to {out}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="attn", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument(
        "--url",
        default=os.environ.get("ATTN_URL", "http://127.0.0.1:8000"),
        help="the service (default: $ATTN_URL, else http://127.0.0.1:8000)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("API_KEY") or None,
        help="sent as `Authorization: Bearer KEY` (default: $API_KEY)",
    )
    sub = parser.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("submit", help="queue a job from .npy / .safetensors files")
    s.add_argument("op", help="the operation: attention, tensor-attention, lora-gradient, ...")
    s.add_argument("inputs", nargs="+", help="NAME=file.npy or [PREFIX=]file.safetensors")
    s.add_argument("--param", action="append", default=[], help="KEY=VALUE (JSON value)")
    s.add_argument(
        "--eps-mode",
        choices=("scale", "strict"),
        help="lora-gradient: eps relative to the gradient's natural scale (scale, the default) "
        "or to max|G| (strict); the same as --param eps_mode=...",
    )
    s.add_argument("--binary", action="store_true", help="always send safetensors")
    s.add_argument("--wait", action="store_true", help="wait and print the result")
    s.add_argument("--out", help="write outputs to this .safetensors file (with --wait)")
    s.add_argument("--timeout", type=float)
    s.add_argument("--quiet", action="store_true", help="no progress bar")

    for name, text in (("status", "show a job"), ("cancel", "cancel a job")):
        p = sub.add_parser(name, help=text)
        p.add_argument("id")
    w = sub.add_parser("wait", help="wait for a job (progress bar) and print its result")
    w.add_argument("id")
    w.add_argument("--out")
    w.add_argument("--timeout", type=float)
    w.add_argument("--quiet", action="store_true")
    r = sub.add_parser("result", help="fetch a finished job's result")
    r.add_argument("id")
    r.add_argument("--out")
    pl = sub.add_parser(
        "plan",
        help="what the planner would do, without running",
        description="attn plan OP --n N --d D --radius R [--eps E] [--KEY VALUE ...]: any of "
        "the operation's planner arguments (GET /v1/plan lists them); or attn plan OP "
        "NAME=file.npy ... [--eps E] [--KEY VALUE ...]: the job's tensors and parameters, "
        "whose certified radius R the service computes (POST /v1/plan)",
    )
    pl.add_argument("op", help="the operation")
    pl.add_argument("inputs", nargs="*", help="NAME=file.npy or [PREFIX=]file.safetensors")
    for flag in ("--n", "--d", "--radius"):
        pl.add_argument(flag)
    pl.add_argument("--eps", help="target error bound (default 0.001)")

    args, extra = parser.parse_known_args(argv)
    if extra and args.cmd != "plan":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    options = _options(extra) if args.cmd == "plan" else {}
    if args.cmd == "plan" and not args.inputs:
        missing = [f"--{f}" for f in ("n", "d", "radius") if getattr(args, f) is None]
        if missing:
            parser.error(f"attn plan: {', '.join(missing)} required (or the tensors: NAME=file)")
    try:
        with Client(args.url, api_key=args.api_key) as client:
            if args.cmd == "submit":
                tensors, params = _load_inputs(args.inputs)
                for kv in args.param:
                    key, _, value = kv.partition("=")
                    params[key] = _value(value)
                if args.eps_mode is not None:
                    params["eps_mode"] = args.eps_mode
                # with --wait, a job that ends within a minute is answered in one round trip
                hold = min(args.timeout or 60.0, 60.0) if args.wait else 0.0
                job = client.submit(
                    args.op, tensors, params, binary=True if args.binary else None, hold=hold
                )
                print(
                    job.id if not args.wait else f"job {job.id}",
                    file=sys.stdout if not args.wait else sys.stderr,
                )
                if args.wait:
                    return _wait(job, args.out, args.timeout, args.quiet)
                return 0
            if args.cmd == "status":
                print(json.dumps(client.job(args.id).record, indent=2))
            elif args.cmd == "cancel":
                print(json.dumps(Job(client, {"id": args.id}).cancel(), indent=2))
            elif args.cmd == "wait":
                return _wait(client.job(args.id), args.out, args.timeout, args.quiet)
            elif args.cmd == "result":
                _emit(Job(client, {"id": args.id}).result(), args.out)
            elif args.cmd == "plan" and args.inputs:
                tensors, params = _load_inputs(args.inputs)
                params.update({k: _value(v) for k, v in options.items()})
                if args.eps is not None:
                    params["eps"] = _value(args.eps)
                print(json.dumps(client.plan(args.op, tensors=tensors, **params), indent=2))
            elif args.cmd == "plan":
                eps = args.eps or "0.001"
                q = {"n": args.n, "d": args.d, "radius": args.radius, "eps": eps, **options}
                print(json.dumps(client.plan(args.op, **q), indent=2))
    except ClientError as exc:
        print(f"attn: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
