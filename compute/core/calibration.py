"""Machine constants of the cost model, measured robustly once per machine and kept in a file.

The planners price both paths with throughputs measured on the machine (``core.cost``). Measured
once per process in a tenth of a second, they swung by up to two orders of magnitude with the
load of the moment (a busy core stalls a multi-threaded kernel at its barriers), and so did the
plans. Here every set of constants is:

- **measured robustly**: whole measuring rounds are repeated (at least ``MIN_ROUNDS``, at most
  ``MAX_ROUNDS`` or ``MAX_SECONDS``, with a short pause between rounds so that they sample
  different moments of the machine's load) until the two best rounds agree within
  ``AGREE`` for every constant, and the best value of each constant is kept (every constant is a
  rate, higher is better: load only ever lowers a rate);
- **cached per machine** in a JSON file, under a name that hashes everything the constants
  depend on: the constant set's name, this library's version and the source of the module that
  measures it, the torch version, the device (CPU model and feature flags, or the CUDA device's
  name and capability), the dtype, the number of threads and the host name. Every process on the
  machine then prices with the same numbers, so the same inputs give the same plan;
- **written atomically** (a temporary file renamed over the old one) under an exclusive lock
  (``fcntl.flock`` on a lock file beside it, where available), so that concurrent processes
  measure once and never read a half-written file;
- **refreshed deliberately**: :func:`recalibrate` (``compute.recalibrate``) measures again now
  and rewrites the files, and ``COMPUTE_RECALIBRATE=1`` makes a process measure anew (once per
  constant set) instead of reading the files. A file that cannot be read or parsed, whose key
  does not match, or whose values are not positive finite numbers is measured anew and
  rewritten, never an error; where the directory cannot be written (a read-only home) the
  constants are kept in memory for the process only.

The directory is ``COMPUTE_CALIBRATION_DIR`` when set, else ``calibration/`` in the directory of
the compiled kernels (``core.native.cache_dir``: ``COMPUTE_NATIVE_CACHE``, else
``$XDG_CACHE_HOME/attention-service``, else ``~/.cache/attention-service``, else the temporary
directory).
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import math
import os
import platform
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from .native import cache_dir as native_cache_dir

__all__ = [
    "AGREE",
    "MAX_ROUNDS",
    "MAX_SECONDS",
    "MIN_ROUNDS",
    "calibrated",
    "calibration_dir",
    "clear_memory",
    "epoch",
    "machine_key",
    "recalibrate",
    "robust",
]

_log = logging.getLogger(__name__)

SCHEMA = 1  # the file format; bump to invalidate every file
MIN_ROUNDS = 5
MAX_ROUNDS = 30
MAX_SECONDS = 2.0  # stop adding rounds after this long (then keep the best seen)
AGREE = 0.10  # the two best rounds of every constant within 10 %: stop
PAUSE = 0.05  # seconds between rounds: they sample different moments of the load

Measure = Callable[[], dict[str, float]]

_lock = threading.RLock()
_memory: dict[str, dict[str, float]] = {}  # file name -> constants, this process
# (name, device, dtype, depends, threads) -> constants: the lookup every prediction makes
_fast: dict[tuple[str, str, torch.dtype | None, str, int], dict[str, float]] = {}
_measured_here: set[str] = set()  # file names measured by this process (COMPUTE_RECALIBRATE)
_registered: dict[str, tuple[str, torch.device, torch.dtype | None, Measure, str]] = {}
# bumped whenever constants this process holds may change (clear_memory, recalibrate): caches of
# anything derived from them (``attention.cost``'s predictions) key on it
_epoch = 0


def epoch() -> int:
    """A number that changes whenever a constant set's values may have changed in this process
    (:func:`clear_memory`, :func:`recalibrate`): the key part of caches derived from them."""
    return _epoch


def calibration_dir() -> Path:
    """Where the constants' files are kept (see the module docstring)."""
    env = os.environ.get("COMPUTE_CALIBRATION_DIR")
    if env:
        return Path(env)
    return native_cache_dir() / "calibration"


@lru_cache(maxsize=1)
def _cpu_description() -> str:
    model, flags = platform.processor(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") or (line.startswith("Hardware") and not model):
                model = line.split(":", 1)[-1].strip()
            elif line.startswith(("flags", "Features")) and not flags:
                flags = hashlib.sha256(line.encode()).hexdigest()[:12]
    except OSError:
        pass
    return f"{platform.machine()} {model} flags:{flags} cpus:{os.cpu_count()}"


@lru_cache(maxsize=16)
def _device_description(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"cuda {props.name} sm_{props.major}{props.minor} {props.total_memory}"
    return f"{device.type} {_cpu_description()}"


@lru_cache(maxsize=1)
def _library_version() -> str:
    try:
        from importlib.metadata import version

        return version("certified-attention")
    except Exception:  # not installed as a distribution (a source checkout on sys.path)
        return "source"


@lru_cache(maxsize=64)
def _file_hash(path: str | None) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16] if path else "?"
    except OSError:
        return "?"


def _source_hash(fn: Callable[..., Any]) -> str:
    """A hash of the source file that defines ``fn`` and of this module: a change to how a
    constant is measured invalidates its files."""
    try:
        path = inspect.getsourcefile(fn)
    except TypeError:
        path = None
    return _file_hash(path) + _file_hash(__file__)


def machine_key(
    name: str, device: torch.device, dtype: torch.dtype | None, measure: Measure, depends: str = ""
) -> dict[str, Any]:
    """Everything a constant set depends on (hashed into its file's name, stored inside it)."""
    return {
        "schema": SCHEMA,
        "name": name,
        "library": _library_version(),
        "source": _source_hash(measure),
        "torch": torch.__version__,
        "device": _device_description(device),
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "threads": _threads(),
        "host": socket.gethostname(),
        "depends": depends,
    }


def _file_name(key: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return f"{key['name']}-{digest}.json"


def _valid(values: object, names: set[str] | None = None) -> dict[str, float] | None:
    if not isinstance(values, dict) or not values:
        return None
    out: dict[str, float] = {}
    for k, v in values.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int | float):
            return None
        if not (math.isfinite(v) and v > 0.0):
            return None
        out[k] = float(v)
    if names is not None and set(out) != names:
        return None
    return out


_pinned_threads: int | None = None  # the thread count the keys use while a round runs on one


def _threads() -> int:
    return _pinned_threads if _pinned_threads is not None else torch.get_num_threads()


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    global _pinned_threads
    before = torch.get_num_threads()
    _pinned_threads = before
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        _pinned_threads = None


def _stable(rounds: list[dict[str, float]], serial: list[dict[str, float]]) -> bool:
    """Every constant: the two best rounds agree within ``AGREE``, and no one-thread round beats
    the best multi-threaded one by more than ``AGREE`` (which only a disturbed machine does)."""
    for k in rounds[0]:
        top = sorted((r[k] for r in rounds), reverse=True)
        if top[1] < (1.0 - AGREE) * top[0]:
            return False
        if serial and max(r[k] for r in serial) * (1.0 - AGREE) > top[0]:
            return False
    return True


def robust(measure: Measure, *, serial_floor: bool = False) -> dict[str, float]:
    """Best of repeated measuring rounds (see the module docstring): per constant, the highest
    rate seen; rounds go on until :func:`_stable` (or ``MAX_ROUNDS`` / ``MAX_SECONDS``).

    ``serial_floor`` (CPU, more than one thread): each round is also measured on one thread,
    and a constant is never below its one-thread rate. A multi-threaded kernel on a machine
    whose cores are busy with another process waits at every barrier for a thread the scheduler
    has parked, and can run a hundred times slower than on one thread; a one-thread kernel only
    loses its share of a core. The floor keeps such a moment within a factor of the thread
    count of the undisturbed rate, and the extra rounds usually find an undisturbed moment.
    """
    rounds: list[dict[str, float]] = []
    serial: list[dict[str, float]] = []
    floor = serial_floor and torch.get_num_threads() > 1
    start = time.perf_counter()
    while True:
        for into, one in ((rounds, False), (serial, True)) if floor else ((rounds, False),):
            with _one_thread() if one else contextlib.nullcontext():
                got = _valid(measure())
            if got is None:
                raise ValueError("a calibration round returned a rate that is not positive")
            into.append(got)
        n = len(rounds)
        if n >= MAX_ROUNDS or (n >= MIN_ROUNDS and time.perf_counter() - start > MAX_SECONDS):
            break
        if n >= MIN_ROUNDS and _stable(rounds, serial):
            break
        time.sleep(PAUSE)
    return {k: max(r[k] for r in rounds + serial) for k in rounds[0]}


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (POSIX ``flock``); no lock where that is unavailable."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield  # a read-only or missing directory: nobody else can write there either
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _read(path: Path, key: dict[str, Any], names: set[str] | None) -> dict[str, float] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict) or doc.get("key") != key:
        return None
    return _valid(doc.get("values"), names)


def _write(path: Path, key: dict[str, Any], values: dict[str, float], seconds: float) -> None:
    doc = {
        "key": key,
        "values": values,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "measuring_seconds": round(seconds, 3),
    }
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.stem, suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: readers see the old file or the new one
        tmp = None
    except OSError as exc:
        _log.info("calibration kept in memory only (%s not writable: %s)", path.parent, exc)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _measure_and_store(
    path: Path, key: dict[str, Any], measure: Measure, device: torch.device
) -> dict[str, float]:
    t0 = time.perf_counter()
    values = robust(measure, serial_floor=device.type == "cpu")
    _write(path, key, values, time.perf_counter() - t0)
    return values


def calibrated(
    name: str,
    device: torch.device | str,
    dtype: torch.dtype | None,
    measure: Measure,
    *,
    depends: str = "",
    names: tuple[str, ...] | None = None,
) -> dict[str, float]:
    """The constants ``measure`` returns (a dict of positive rates), measured robustly once per
    machine and cached in memory and in a file (module docstring). ``depends`` names anything
    else they depend on (e.g. a compiled kernel's file); ``names``, the constants a file must
    hold to be used. The returned dict is shared: do not modify it."""
    dev = torch.device(device)
    fast_key = (name, str(dev), dtype, depends, _threads())
    got = _fast.get(fast_key)
    if got is not None:
        return got
    key = machine_key(name, dev, dtype, measure, depends)
    fname = _file_name(key)
    with _lock:
        _registered[fname] = (name, dev, dtype, measure, depends)
        values = _memory.get(fname)
        if values is None:
            path = calibration_dir() / fname
            fresh = os.environ.get("COMPUTE_RECALIBRATE", "") not in ("", "0")
            with _file_lock(path.with_suffix(".lock")):
                wanted = set(names) if names is not None else None
                values = None if fresh and fname not in _measured_here else _read(path, key, wanted)
                if values is None:
                    values = _measure_and_store(path, key, measure, dev)
                    _measured_here.add(fname)
            _memory[fname] = values
        _fast[fast_key] = values
        return values


def clear_memory() -> None:
    """Forget the constants this process holds and which sets it used (the files stay): the
    next use reads them."""
    global _epoch
    with _lock:
        _registered.clear()
        _memory.clear()
        _fast.clear()
        _measured_here.clear()
        _epoch += 1


def recalibrate() -> dict[str, dict[str, float]]:
    """Measure every constant set this process has used again, now, and rewrite its file.

    Returns the new constants by file name. Sets not used yet in this process are measured
    anew (from scratch, not read) only if ``COMPUTE_RECALIBRATE=1``; otherwise they are read
    from their files when first used, as usual.
    """
    global _epoch
    out: dict[str, dict[str, float]] = {}
    with _lock:
        _fast.clear()
        for fname, (name, dev, dtype, measure, depends) in list(_registered.items()):
            key = machine_key(name, dev, dtype, measure, depends)
            path = calibration_dir() / _file_name(key)
            with _file_lock(path.with_suffix(".lock")):
                values = _measure_and_store(path, key, measure, dev)
            _memory[fname] = values
            _measured_here.add(fname)
            out[fname] = dict(values)
        _epoch += 1  # after the new values (a cache filled meanwhile keyed the old number)
    return out
