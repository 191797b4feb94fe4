"""The compute package's exceptions: one hierarchy, one file."""

from __future__ import annotations

__all__ = [
    "Cancelled",
    "CertificationError",
    "ComputeError",
    "InvalidInputError",
    "OutOfRangeError",
]


class ComputeError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidInputError(ComputeError, ValueError):
    """An argument is unusable; the message names the argument and the problem."""

    def __init__(self, argument: str, problem: str) -> None:
        self.argument = argument
        self.problem = problem
        super().__init__(f"{argument}: {problem}")


class OutOfRangeError(InvalidInputError):
    """Finite inputs whose result (or a quantity the exact computation needs) is outside the
    range of the dtype it must be computed or returned in.

    ``argument`` names the input responsible; the message gives the size that does not fit and
    what to do (typically: pass float64 inputs, or rescale the named input).
    """


class CertificationError(ComputeError, ValueError):
    """``method="polynomial"`` was asked for, but no polynomial certifies the requested eps."""


class Cancelled(ComputeError):  # noqa: N818 - a signal, not a failure; name fixed by the API
    """Raised by a progress callback to stop a computation at the next block."""
