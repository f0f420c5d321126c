"""``peftshield list``: what is registered (triggers, methods, packaged datasets)."""

from __future__ import annotations

import typer

from peftshield.attacks import POISONERS
from peftshield.cli.app import app, stdout
from peftshield.data import PACKAGE_SOURCES
from peftshield.finetune import METHODS


@app.command(name="list", help="List triggers, fine-tuning methods and offline packaged datasets.")
def list_components(what: str = typer.Argument("all", help="triggers, methods, datasets or all")) -> None:
    sections = {
        "triggers": [(name, POISONERS.get(name).__doc__ or "") for name in POISONERS.names()],
        "methods": [(name, (METHODS.get(name).__doc__ or METHODS.get(name).__module__)) for name in METHODS.names()],
        "datasets": [(f"pkg:{s.name}", s.description) for s in PACKAGE_SOURCES.values()],
    }
    if what != "all" and what not in sections:
        raise typer.BadParameter(f"choose from {', '.join(sections)} or all", param_hint="WHAT")
    for section, entries in sections.items():
        if what in ("all", section):
            stdout.print(f"[bold]{section}[/bold]")
            for name, description in entries:
                stdout.print(f"  {name:32} {description.strip().splitlines()[0] if description.strip() else ''}", highlight=False)
