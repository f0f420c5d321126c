"""The typer application; command modules add themselves to it with ``@app.command``."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from peftshield.models.runtime import DEFAULT_RUNTIME, RUNTIME_HELP

app = typer.Typer(
    name="peftshield",
    help="Show, measure and stop weight-poisoning backdoors that survive parameter-efficient fine-tuning.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Off a terminal (logs, pipes, tests) a fixed width keeps tables and golden outputs unwrapped.
stdout = Console(width=None if sys.stdout.isatty() else 120)
stderr = Console(stderr=True, width=None if sys.stderr.isatty() else 120)


def info(message: str) -> None:
    """One line of progress or result on stderr, printed as written (no markup: '[grid]' stays)."""
    stderr.print(message, highlight=False, markup=False)


ProgressOption = typer.Option(True, "--progress/--no-progress", help="Show progress bars.")
RuntimeOption = typer.Option(DEFAULT_RUNTIME, "--runtime", help=RUNTIME_HELP)
SeedOption = typer.Option(0, "--seed", help="Seed of every random choice (numpy Generator and torch).")
BackboneOption = typer.Option("minilm", "--backbone", help="HF model name, local directory, 'minilm' (offline default) or 'tiny'.")
SkipEmptyOption = typer.Option(False, "--skip-empty", help="Drop rows with empty text (counted and reported) instead of failing.")
NumLabelsOption = typer.Option(None, "--num-labels", min=2, help="The task's class count (default: from the training labels, which must then be 0..K-1 with every class present).")
