"""Command-line interface. ``main`` turns user errors into one line and exit code 2."""

from __future__ import annotations

import os
import sys

import typer

from peftshield.cli.app import app
from peftshield.errors import PeftshieldError

try:  # typer >= 0.24 ships its own copy of click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older typer on top of click
    from click.exceptions import ClickException, NoArgsIsHelpError, UsageError


def _register_commands() -> None:
    from peftshield.cli.commands import attack, demo, evaluate, finetune, grid, inspect, poison, psim  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    _register_commands()
    command = typer_command()
    try:
        command.main(args=argv, prog_name="peftshield", standalone_mode=False)
    except PeftshieldError as exc:
        print(f"peftshield: error: {exc}", file=sys.stderr)
        return exc.exit_code
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
        print("peftshield: interrupted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("peftshield: interrupted", file=sys.stderr)
        return 130
    return 0


def typer_command():
    import typer.main

    return typer.main.get_command(app)


def entry() -> None:
    sys.exit(main())
