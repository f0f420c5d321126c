"""Signals turned into exceptions where the program stands, so that it unwinds (temporary files
removed, nothing half-written) instead of dying: SIGTERM for a CI job's cancel, SIGALRM for a
wall-clock limit."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator


@contextlib.contextmanager
def raising_on(signum: int, make_error: Callable[[], BaseException]) -> Iterator[bool]:
    """Within the block, ``signum`` raises ``make_error()`` in the main thread; the previous
    handler is restored after. Off the main thread (where Python cannot take signals) nothing
    changes; the block gets False."""
    if threading.current_thread() is not threading.main_thread():
        yield False
        return

    def handler(_signum, _frame):
        raise make_error()

    previous = signal.signal(signum, handler)
    try:
        yield True
    finally:
        signal.signal(signum, previous)


__all__ = ["raising_on"]
