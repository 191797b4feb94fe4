"""Optional compiled CPU kernels: plain C, built on first use with the system C compiler.

A kernel is a C source file beside the operation that uses it and a ctypes binding of its
functions (``attention/native/`` and ``tensor_attention/native/``); what their C code shares
(features, key moments, readout) is the header ``native_poly.h`` beside this module
(``HEADERS``), included by both and hashed into both. This module is what every kernel
shares: :class:`NativeKernel` compiles the source once per process (thread-safe), loads it,
binds it, and says which route is active and why (:meth:`NativeKernel.status`). A kernel that
cannot be used here (no C compiler, a failed build, ``COMPUTE_NATIVE=0``) is None, and its
operation takes the PyTorch route, which follows the same rounding model.

The library is compiled with ``-O3 -march=native -ffp-contract=fast`` (fused multiply-adds in
the dot products; never ``-ffast-math``: it would flush subnormals to zero process-wide and
reassociate sums) into a cache directory (``COMPUTE_NATIVE_CACHE``, else
``$XDG_CACHE_HOME/attention-service``, else ``~/.cache/attention-service``, else the temporary
directory), under a name that hashes the source, the flags, the compiler and this CPU's feature
flags (and the shared headers), so a cache shared between machines never loads code built for
another CPU and an edited header is never served from an old library. The build
writes a temporary file and renames it: concurrent processes never load a half-written library.
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
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Generic, TypeVar

import torch

from .monomials import monomial_table

__all__ = ["FLAGS", "HEADERS", "NativeKernel", "build", "cache_dir", "check_rc", "native_steps"]

# headers the kernels include ("native_poly.h"); on the include path of every build
HEADERS = (Path(__file__).with_name("native_poly.h"),)
FLAGS = (
    "-O3",
    "-march=native",
    "-ffp-contract=fast",
    "-fPIC",
    "-shared",
    "-std=gnu11",
    "-Wall",
    "-pthread",
)
T = TypeVar("T")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def cache_dir() -> Path:
    """Where compiled libraries are kept (see the module docstring)."""
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


def build(source: Path) -> tuple[ctypes.CDLL, Path] | str:
    """Compile ``source`` (or find it compiled in the cache) and load it: the library and its
    path, or one line saying why not."""
    if os.environ.get("COMPUTE_NATIVE", "1") == "0":
        return "disabled by COMPUTE_NATIVE=0"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return "no C compiler found (cc/gcc)"
    try:
        src = source.read_bytes()
        headers = [h.read_bytes() for h in HEADERS]
    except OSError as exc:
        return f"reading {source.name} failed: {exc}"
    key = hashlib.sha256(
        b"\0".join([src, *headers, " ".join(FLAGS).encode(), _cpu_flags().encode(), cc.encode()])
    ).hexdigest()[:16]
    includes = sorted({f"-I{h.parent}" for h in HEADERS})
    out_dir = cache_dir()
    lib_path = out_dir / f"{source.stem}-{key}.so"
    if not lib_path.exists():
        tmp: str | None = None
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
            os.close(fd)
            proc = subprocess.run(
                [cc, *FLAGS, *includes, "-o", tmp, str(source), "-lm"],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if proc.returncode != 0:
                return f"compiling {source.name} failed: {proc.stderr.strip()[:500]}"
            os.replace(tmp, lib_path)  # atomic: other processes see all of it or nothing
            tmp = None
        except (OSError, subprocess.SubprocessError) as exc:
            return f"compiling {source.name} failed: {exc}"
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
    try:
        return ctypes.CDLL(str(lib_path)), lib_path
    except OSError as exc:
        return f"loading {lib_path} failed: {exc}"


class NativeKernel(Generic[T]):
    """A C source and its binding, built on the first :meth:`get` (once per process)."""

    def __init__(self, source: Path, bind: Callable[[ctypes.CDLL, Path], T]) -> None:
        self.source = source
        self._bind = bind
        self._lock = threading.Lock()
        self._state: T | str | None = None  # the binding, or why there is none
        self._tested: bool | None = None  # the self-test's verdict (``checked``)

    def _load(self) -> T | str:
        got = build(self.source)
        if isinstance(got, str):
            return got
        try:
            return self._bind(*got)
        except (OSError, AttributeError) as exc:  # a library without the expected symbols
            return f"loading {got[1]} failed: {exc}"

    def get(self) -> T | None:
        """The bound kernel, built on the first call (cached); None when unavailable."""
        with self._lock:
            if self._state is None:
                self._state = self._load()
            got = self._state
        return None if isinstance(got, str) else got

    def status(self, describe: Callable[[T], str]) -> str:
        """One line: ``native (...)`` with ``describe(kernel)``, or why the PyTorch route runs."""
        got = self.get()
        if got is not None:
            return f"native ({describe(got)})"
        return f"PyTorch route: {self._state}"

    def checked(self, self_test: Callable[[T], bool]) -> T | None:
        """The bound kernel once ``self_test(kernel)`` has passed in this process (run on the
        first call, verdict cached), else None: a compiler or CPU that builds the library but
        computes something else is never used."""
        got = self.get()
        if got is None:
            return None
        if self._tested is None:
            self._tested = bool(self_test(got))
        return got if self._tested else None

    def self_test_failed(self) -> bool:
        """Whether the kernel loaded but failed its self-test (``checked``)."""
        return self._tested is False


@lru_cache(maxsize=64)
def check_rc(kernel: str, rc: int) -> None:
    """The kernels' C return codes: 0 success, -1 out of memory, -2 bad arguments."""
    if rc == -1:
        raise MemoryError(f"{kernel}: out of memory for the feature buffers")
    if rc != 0:
        raise ValueError(f"{kernel}: arguments out of range (code {rc})")


def native_steps(d: int, g: int) -> tuple[torch.Tensor, int, int]:
    """The monomial table's steps for C (``native_poly.h``): every step (degree 1 included) as
    int32 ``[nsteps, 4]`` (dst, end, src, var), the number of steps below the top degree and
    the first row of the top degree (1 when there are no steps)."""
    tables = monomial_table(d, g)
    steps = tables.steps
    top = tables.offsets[g] if g >= 1 else 1
    nlow = sum(1 for dst, _, _, _ in steps if dst < top)
    arr = torch.tensor(steps if steps else [[0, 0, 0, 0]], dtype=torch.int32)
    return arr, nlow, top
