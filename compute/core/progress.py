"""Progress reports: ``progress(done, total)`` after each block of work.

An exception raised by the callback (the service raises ``compute.Cancelled``) stops the
computation at the next block and propagates to the caller.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Progress", "report"]

Progress = Callable[[int, int], object]


def report(progress: Progress | None, done: int, total: int) -> None:
    """Call ``progress(done, total)`` when there is a callback."""
    if progress is not None:
        progress(done, total)
