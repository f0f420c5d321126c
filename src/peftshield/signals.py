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


class InterruptNote:
    """Whether Ctrl-C (SIGINT) arrived while :func:`noting_interrupts` was active."""

    received = False


@contextlib.contextmanager
def noting_interrupts() -> Iterator[InterruptNote]:
    """Within the block, SIGINT raises KeyboardInterrupt as usual and is also noted. An interrupt
    that lands inside a library's C code can come out as that library's own error (a model load
    says "cannot load"); the note lets the caller still report it as the interrupt it was. Left
    alone off the main thread, and where SIGINT is not Python's default handler (ignored in a
    background job, or taken over by a server)."""
    global _ACTIVE
    note = InterruptNote()
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield note
        return

    def handler(signum, frame):
        note.received = True
        signal.default_int_handler(signum, frame)

    signal.signal(signal.SIGINT, handler)
    outer, _ACTIVE = _ACTIVE, note
    try:
        yield note
    finally:
        _ACTIVE = outer
        signal.signal(signal.SIGINT, signal.default_int_handler)


_ACTIVE: InterruptNote | None = None


def interrupt_received() -> bool:
    """Whether Ctrl-C arrived within the innermost active :func:`noting_interrupts`."""
    return _ACTIVE is not None and _ACTIVE.received


__all__ = ["interrupt_received", "noting_interrupts", "raising_on"]
