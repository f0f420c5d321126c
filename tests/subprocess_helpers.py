"""Helpers for tests that run peftshield in a child process, or in this one where no process of its own is needed."""

from __future__ import annotations

import signal
from pathlib import Path


def restore_sigint() -> None:
    """``preexec_fn`` for children that a test interrupts with SIGINT. A suite started in the
    background of a non-interactive shell (``make test &``, some CI runners) inherits SIGINT
    *ignored*, and Python then keeps it ignored, so Ctrl-C would never reach the child: reset
    it to the default, which Python turns into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli_in_process(capsys, monkeypatch, *args: str, cwd: Path | None = None, env: dict | None = None, stdin: str = ""):
    """``peftshield ARGS`` run by :func:`peftshield.cli.main` in this process, as a
    :class:`subprocess.CompletedProcess` (exit code, standard output and error), in ``cwd`` with
    ``env`` added to the environment and ``stdin`` as its standard input: a command whose test
    needs no process of its own (no signal, no server) skips the interpreter's start-up and imports."""
    import io
    import subprocess
    import sys

    from peftshield.cli import main

    with monkeypatch.context() as patch:
        if cwd is not None:
            patch.chdir(cwd)
        for name, value in (env or {}).items():
            patch.setenv(name, value)
        patch.setattr(sys, "stdin", io.StringIO(stdin))
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["peftshield", *args], code, out, err)
