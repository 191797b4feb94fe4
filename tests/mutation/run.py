"""Curated mutation testing: plant one small bug at a time and check that a test fails.

Usage (from the repository root; ``make mutate`` runs it with no arguments)::

    python3 tests/mutation/run.py                  # every mutant in tests/mutation/mutants.toml
    python3 tests/mutation/run.py --area compute   # only the compute mutants
    python3 tests/mutation/run.py --only ID [ID ...]
    python3 tests/mutation/run.py --list           # the mutants, without running anything
    python3 tests/mutation/run.py --markdown out.md   # also write the result table

The working tree is never touched: the tracked and untracked-but-not-ignored files are copied to
a temporary directory, the selected tests are first run there unmutated (they must pass), then
each mutant is applied to the copy, its tests run with a timeout (``pytest -x``), and the file is
restored. A mutant is *killed* when the tests fail (or error, or time out) and *survived* when
they pass. The run prints a table and exits 1 if any mutant survived that is not marked
``equivalent`` (with the reason), 2 if the unmutated baseline fails or the mutants file is
invalid. See docs/testing.md for the format of mutants.toml and the current results.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_FILE = Path(__file__).with_name("mutants.toml")
DEFAULT_TIMEOUT = 600.0


@dataclass(frozen=True)
class Mutant:
    """One planted bug: replace the ``occurrence``-th ``original`` in ``file`` by ``mutated``."""

    id: str
    file: str
    original: str
    mutated: str
    tests: tuple[str, ...]
    description: str
    area: str = "compute"
    occurrence: int = 1
    equivalent: str = ""  # non-empty: why surviving breaks no promise
    source: str = ""
    timeout: float = DEFAULT_TIMEOUT


@dataclass
class Outcome:
    mutant: Mutant
    status: str  # killed | survived | timeout | error
    seconds: float
    detail: str = ""
    output: list[str] = field(default_factory=list)

    @property
    def killed(self) -> bool:
        return self.status != "survived"


def load(path: Path) -> list[Mutant]:
    """Read and validate the mutants file (see docs/testing.md); exits 2 when it is invalid."""
    data = tomllib.loads(path.read_text())
    mutants = []
    problems = []
    seen: set[str] = set()
    for i, raw in enumerate(data.get("mutant", [])):
        unknown = set(raw) - set(Mutant.__dataclass_fields__)
        if unknown:
            problems.append(f"mutant #{i + 1}: unknown keys {sorted(unknown)}")
            continue
        try:
            m = Mutant(**{**raw, "tests": tuple(raw.get("tests", ()))})
        except TypeError as e:
            problems.append(f"mutant #{i + 1}: {e}")
            continue
        if m.id in seen:
            problems.append(f"{m.id}: duplicate id")
        seen.add(m.id)
        if not m.tests:
            problems.append(f"{m.id}: no tests to run")
        if m.original == m.mutated:
            problems.append(f"{m.id}: mutated equals original")
        target = ROOT / m.file
        if not target.is_file():
            problems.append(f"{m.id}: no file {m.file}")
        else:
            count = target.read_text().count(m.original)
            if count < m.occurrence:
                problems.append(
                    f"{m.id}: {m.file} has {count} occurrence(s) of the original snippet, "
                    f"occurrence {m.occurrence} wanted (was the code changed?)"
                )
            elif count > 1 and "occurrence" not in raw:
                problems.append(f"{m.id}: the original occurs {count} times: set occurrence")
        for t in m.tests:
            if not (ROOT / t.split("::")[0]).exists():
                problems.append(f"{m.id}: no test path {t}")
        mutants.append(m)
    if problems:
        print("invalid mutants file " + str(path), *problems, sep="\n  ", file=sys.stderr)
        raise SystemExit(2)
    return mutants


def scratch_copy() -> Path:
    """Copy the repository's tracked and untracked-but-not-ignored files to a temp directory."""
    dest = Path(tempfile.mkdtemp(prefix="mutate-"))
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.split(b"\0")
    for raw in listed:
        if not raw:
            continue
        rel = raw.decode()
        src = ROOT / rel
        if not src.is_file():  # deleted in the working tree but still in the index
            continue
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, out)
    return dest


def replace_nth(text: str, old: str, new: str, n: int) -> str:
    start = -1
    for _ in range(n):
        start = text.find(old, start + 1)
        if start < 0:
            raise ValueError("snippet not found")
    return text[:start] + new + text[start + len(old) :]


def run_tests(workdir: Path, tests: tuple[str, ...], timeout: float) -> tuple[str, str, list[str]]:
    """pytest -x on ``tests`` in ``workdir``: (status, first failure, output lines)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(workdir),
        "PYTHONDONTWRITEBYTECODE": "1",  # never reuse a bytecode cache of another mutant
    }
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    proc = subprocess.Popen(
        cmd,
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: a timeout ends everything it started
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return "timeout", f"no result within {timeout:g} s", out.splitlines()
    lines = out.splitlines()
    failed = [ln for ln in lines if ln.startswith(("FAILED ", "ERROR "))]
    first = failed[0].split(" - ")[0] if failed else ""
    if proc.returncode == 0:
        return "survived", "", lines
    if proc.returncode == 1:
        return "killed", first, lines
    tail = next((ln for ln in reversed(lines) if ln.strip()), "")
    return "error", first or f"pytest exit {proc.returncode}: {tail[:120]}", lines


def check_imports_scratch(workdir: Path) -> None:
    """The scratch copy's tests must import the scratch copy's code, not an installed one."""
    probe = "import compute, pathlib; print(pathlib.Path(compute.__file__).resolve())"
    env = {**os.environ, "PYTHONPATH": str(workdir), "PYTHONDONTWRITEBYTECODE": "1"}
    got = subprocess.run(
        [sys.executable, "-c", probe], cwd=workdir, env=env, capture_output=True, text=True
    ).stdout.strip()
    if not got.startswith(str(workdir.resolve())):
        print(f"the scratch copy imports compute from {got!r}, not {workdir}", file=sys.stderr)
        raise SystemExit(2)


def table(outcomes: list[Outcome]) -> str:
    rows = [
        "| mutant | file | area | result | killed by (first failure) | s |",
        "|---|---|---|---|---|---|",
    ]
    for o in outcomes:
        result = o.status
        if o.status == "survived" and o.mutant.equivalent:
            result = "survived (equivalent)"
        detail = o.detail.removeprefix("FAILED ").removeprefix("ERROR ").replace("|", "\\|")
        rows.append(
            f"| {o.mutant.id} | {o.mutant.file} | {o.mutant.area} | {result} | {detail} "
            f"| {o.seconds:.0f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--file", type=Path, default=DEFAULT_FILE, help="mutants file (TOML)")
    ap.add_argument("--only", nargs="+", metavar="ID", help="run only these mutant ids")
    ap.add_argument("--area", help="run only mutants of this area (compute, service)")
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run")
    ap.add_argument("--markdown", type=Path, help="also write the result table to this file")
    ap.add_argument("--keep", action="store_true", help="keep the scratch copy")
    ap.add_argument("-v", "--verbose", action="store_true", help="print pytest's output tail")
    args = ap.parse_args(argv)

    mutants = load(args.file)
    if args.only:
        unknown = set(args.only) - {m.id for m in mutants}
        if unknown:
            print(f"unknown mutant ids: {sorted(unknown)}", file=sys.stderr)
            return 2
        mutants = [m for m in mutants if m.id in args.only]
    if args.area:
        mutants = [m for m in mutants if m.area == args.area]
    if args.list:
        for m in mutants:
            eq = f"  [equivalent: {m.equivalent}]" if m.equivalent else ""
            print(f"{m.id:34} {m.file:28} {m.description}{eq}")
        return 0
    if not mutants:
        print("no mutants selected", file=sys.stderr)
        return 2

    work = scratch_copy()
    print(f"scratch copy: {work}", flush=True)
    try:
        check_imports_scratch(work)
        if not args.no_baseline:
            tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
            t0 = time.monotonic()
            status, first, lines = run_tests(work, tests, max(m.timeout for m in mutants))
            print(f"baseline ({len(tests)} test paths): {status} in {time.monotonic() - t0:.0f} s")
            if status != "survived":  # the unmutated code must pass its own tests
                print("\n".join(lines[-30:]), file=sys.stderr)
                print(f"baseline fails ({first}): fix that first", file=sys.stderr)
                return 2
        outcomes: list[Outcome] = []
        for i, m in enumerate(mutants, 1):
            path = work / m.file
            original = path.read_text()
            path.write_text(replace_nth(original, m.original, m.mutated, m.occurrence))
            t0 = time.monotonic()
            try:
                status, first, lines = run_tests(work, m.tests, m.timeout)
            finally:
                path.write_text(original)
            o = Outcome(m, status, time.monotonic() - t0, first, lines)
            outcomes.append(o)
            mark = "killed" if o.killed else "SURVIVED"
            print(f"[{i}/{len(mutants)}] {m.id}: {mark} ({status}) {first} {o.seconds:.0f} s")
            if args.verbose or (status == "error" and not first.startswith(("FAILED", "ERROR"))):
                print("    " + "\n    ".join(lines[-12:]))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    text = table(outcomes)
    print()
    print(text)
    bad = [o for o in outcomes if not o.killed and not o.mutant.equivalent]
    equiv = [o for o in outcomes if not o.killed and o.mutant.equivalent]
    summary = (
        f"{sum(o.killed for o in outcomes)} killed, {len(bad)} survived, "
        f"{len(equiv)} survived as argued equivalent, of {len(outcomes)}"
    )
    print(summary)
    if args.markdown:
        args.markdown.write_text(text + "\n\n" + summary + "\n")
    for o in bad:
        print(f"SURVIVED: {o.mutant.id}: {o.mutant.description}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
