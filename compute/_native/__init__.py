"""Optional compiled CPU kernels (plain C, built on first use with the system C compiler).

``tensor_poly()`` returns the fused float32 core of the polynomial tensor-attention path
(``tensor_poly.c``), or None when it cannot be used here: no C compiler, a failed build, or the
environment variable ``COMPUTE_NATIVE=0``. Callers then take the PyTorch route, which computes
the same steps with the same rounding model (so the same certified bound holds either way).

The library is compiled with ``-O3 -march=native -ffp-contract=fast`` (fused multiply-adds in
the dot products; never ``-ffast-math``: it would flush subnormals to zero process-wide and
reassociate sums) into a cache directory
(``COMPUTE_NATIVE_CACHE``, else ``$XDG_CACHE_HOME/attention-service``, else
``~/.cache/attention-service``, else the temporary directory), under a name that hashes the
source, the flags and this CPU's feature flags, so a cache shared between machines never loads
code built for another CPU. The build writes a temporary file and renames it: concurrent
processes never load a half-written library. ``status()`` says which route is active and why.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

__all__ = ["TensorPoly", "status", "tensor_poly"]

_SOURCE = Path(__file__).with_name("tensor_poly.c")
_FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fPIC", "-shared", "-std=gnu11", "-Wall")
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


class TensorPoly:
    """ctypes bindings of ``tensor_poly.c``: ``ta_stats`` and ``ta_poly_run``."""

    def __init__(self, lib: ctypes.CDLL, path: Path) -> None:
        self.path = path
        self.vector_bytes = int(lib.ta_vector_bytes())
        p, i = ctypes.c_void_p, ctypes.c_int
        st = lib.ta_stats
        st.argtypes = [p, p, p, p, p, i, i, i, i, i, i, p, p, p]
        st.restype = ctypes.c_int
        self._stats = st
        run = lib.ta_poly_run
        run.argtypes = [p, i, i, i, i, i, p, p, p, p, p, i, p, i, i, i, i, p, i, p, p, i, i]
        run.restype = ctypes.c_int
        self._run = run

    def stats(self, *args: int) -> None:
        """``ta_stats`` on raw pointers and sizes, in its C argument order; raises on failure."""
        _check(self._stats(*args))

    def run(self, *args: int | None) -> None:
        """``ta_poly_run`` on raw pointers and sizes, in its C argument order (None for a NULL
        pointer); raises ``MemoryError``/``ValueError`` on failure."""
        _check(self._run(*args))


def _check(rc: int) -> None:
    """The C functions' return codes: 0 success, -1 out of memory, -2 bad arguments."""
    if rc == -1:
        raise MemoryError("tensor_poly: out of memory for the feature buffers")
    if rc != 0:
        raise ValueError(f"tensor_poly: arguments out of range (code {rc})")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cache_dir() -> Path:
    env = os.environ.get("COMPUTE_NATIVE_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "attention-service"
    try:
        home = Path.home()
    except RuntimeError:  # no HOME and no passwd entry
        home = None
    if home is not None and home.is_dir() and os.access(home, os.W_OK):
        return home / ".cache" / "attention-service"
    return Path(tempfile.gettempdir()) / "attention-service"


def _build() -> TensorPoly | str:
    if os.environ.get("COMPUTE_NATIVE", "1") == "0":
        return "disabled by COMPUTE_NATIVE=0"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return "no C compiler found (cc/gcc)"
    src = _SOURCE.read_bytes()
    key = hashlib.sha256(
        b"\0".join([src, " ".join(_FLAGS).encode(), _cpu_flags().encode(), cc.encode()])
    ).hexdigest()[:16]
    out_dir = _cache_dir()
    lib_path = out_dir / f"tensor_poly-{key}.so"
    if not lib_path.exists():
        tmp: str | None = None
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
            os.close(fd)
            proc = subprocess.run(
                [cc, *_FLAGS, "-o", tmp, str(_SOURCE), "-lm"],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if proc.returncode != 0:
                return f"compiling {_SOURCE.name} failed: {proc.stderr.strip()[:500]}"
            os.replace(tmp, lib_path)  # atomic: other processes see all of it or nothing
            tmp = None
        except (OSError, subprocess.SubprocessError) as exc:
            return f"compiling {_SOURCE.name} failed: {exc}"
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
    try:
        return TensorPoly(ctypes.CDLL(str(lib_path)), lib_path)
    except (OSError, AttributeError) as exc:
        return f"loading {lib_path} failed: {exc}"


def tensor_poly() -> TensorPoly | None:
    """The compiled kernel, built on the first call (cached); None when unavailable."""
    with _LOCK:
        if "tensor_poly" not in _STATE:
            _STATE["tensor_poly"] = _build()
        got = _STATE["tensor_poly"]
    return got if isinstance(got, TensorPoly) else None


def status() -> str:
    """One line: the compiled kernel's path and vector width, or why it is not used."""
    got = tensor_poly()
    if got is not None:
        return f"native ({got.path.name}, {got.vector_bytes}-byte vectors)"
    reason = _STATE.get("tensor_poly")
    return f"PyTorch route: {reason}"
