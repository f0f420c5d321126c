"""Helpers for tests that run peftshield in a child process."""

from __future__ import annotations

import signal


def restore_sigint() -> None:
    """``preexec_fn`` for children that a test interrupts with SIGINT. A suite started in the
    background of a non-interactive shell (``make test &``, some CI runners) inherits SIGINT
    *ignored*, and Python then keeps it ignored, so Ctrl-C would never reach the child: reset
    it to the default, which Python turns into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
