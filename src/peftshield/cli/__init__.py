"""Command-line interface. ``main`` turns user errors into one line and exit code 2.

Ctrl-C exits 130 with ``peftshield: interrupted``; an output place that cannot be written
(an OSError the commands did not turn into an OutputError themselves) is one line, exit 2.
"""

from __future__ import annotations

import os
import sys
import warnings

import pydantic
import typer

from peftshield.cli.app import app
from peftshield.errors import GateInterrupted, OutputError, PeftshieldError, PeftshieldWarning, validation_line

try:  # typer >= 0.24 ships its own copy of click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older typer on top of click
    from click.exceptions import ClickException, NoArgsIsHelpError, UsageError

INTERRUPTED = 130


def _register_commands() -> None:
    from peftshield.cli.commands import attack, audit, calibrate, demo, detector, evaluate, finetune, grid, inspect, poison, psim, screen, serve  # noqa: F401


def _one_line_warnings(fallback):
    """A ``warnings.showwarning`` that prints peftshield's own warnings as one line."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if isinstance(category, type) and issubclass(category, PeftshieldWarning):
            print(f"peftshield: warning: {' '.join(str(message).split())}", file=sys.stderr)
        else:
            fallback(message, category, filename, lineno, file, line)

    return show


def _interrupted() -> int:
    print("peftshield: interrupted", file=sys.stderr)
    return INTERRUPTED


def _os_error_line(exc: OSError) -> str:
    """``PATH: cannot write there (REASON)``; a bare permission error may come from a read, so it
    is ``PATH: permission denied``."""
    import errno

    from peftshield.io import output_error

    name = exc.filename if exc.filename is not None else "output"
    if exc.errno == errno.EACCES:
        return f"{name}: permission denied"
    return str(output_error(name, exc))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    shown = warnings.showwarning
    warnings.showwarning = _one_line_warnings(shown)
    try:
        return _run(argv)
    finally:
        warnings.showwarning = shown


def _run(argv: list[str] | None) -> int:
    from peftshield.signals import noting_interrupts

    with noting_interrupts() as interrupt:
        try:
            return _run_command(argv, interrupt)
        except Exception:
            if interrupt.received:  # Ctrl-C inside a library's C code can surface as its own error
                return _interrupted()
            raise


def _run_command(argv: list[str] | None, interrupt) -> int:
    try:
        _register_commands()
        command = typer_command()
        # With standalone_mode=False typer turns Ctrl-C into ``return 130`` (and typer.Exit(n) into
        # ``return n``); a command itself returns None.
        code = command.main(args=argv, prog_name="peftshield", standalone_mode=False)
    except PeftshieldError as exc:
        if interrupt.received and not isinstance(exc, GateInterrupted):  # e.g. a model load broken by Ctrl-C says "cannot load"
            return _interrupted()
        print(f"peftshield: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except pydantic.ValidationError as exc:  # a typed option built outside the flag helpers: still one line
        print(f"peftshield: error: {validation_line(exc, whole=exc.title)}", file=sys.stderr)
        return 2
    except NoArgsIsHelpError as exc:
        print(exc.ctx.get_help() if exc.ctx else "", file=sys.stderr)
        return 2
    except UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else "peftshield"
        print(f"{where}: error: {' '.join(exc.format_message().split())}", file=sys.stderr)
        return 2
    except ClickException as exc:
        print(f"peftshield: error: {' '.join(exc.format_message().split())}", file=sys.stderr)
        return exc.exit_code or 1
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        return _interrupted()
    except KeyboardInterrupt:
        return _interrupted()
    except OSError as exc:
        from peftshield.io import OUTPUT_ERRNOS

        if exc.errno not in OUTPUT_ERRNOS:
            raise
        print(f"peftshield: error: {_os_error_line(exc)}", file=sys.stderr)
        return OutputError.exit_code
    if isinstance(code, int) and not isinstance(code, bool):
        if code == INTERRUPTED:
            return _interrupted()
        return code
    return 0


def typer_command():
    import typer.main

    return typer.main.get_command(app)


def entry() -> None:
    sys.exit(main())
