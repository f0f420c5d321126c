"""``peftshield list``: what is registered (triggers, methods, defenses, executors, packaged datasets and corpora, backbones)."""

from __future__ import annotations

import typer

from peftshield.attacks import POISONERS
from peftshield.cli.app import app, stdout
from peftshield.data import PACKAGE_SOURCES
from peftshield.data.sources import PLAIN_TEXT_SOURCES
from peftshield.defenses import DEFENSES
from peftshield.finetune import METHODS
from peftshield.grid.executors import EXECUTORS
from peftshield.models.backbone import BACKBONES


@app.command(name="list", help="List triggers, fine-tuning methods, defenses, grid executors, offline packaged datasets and corpora, and backbones.")
def list_components(what: str = typer.Argument("all", help="triggers, methods, defenses, executors, datasets, corpora, backbones or all")) -> None:
    sections = {
        "triggers": [(name, POISONERS.get(name).__doc__ or "") for name in POISONERS.names()],
        "methods": [(name, (METHODS.get(name).__doc__ or METHODS.get(name).__module__)) for name in METHODS.names()],
        "defenses": [(name, DEFENSES.get(name).__doc__ or "") for name in DEFENSES.names()],
        "executors": [(name, EXECUTORS.get(name).__doc__ or "") for name in EXECUTORS.names()],
        "datasets": [(f"pkg:{s.name}", s.description) for s in PACKAGE_SOURCES.values()],
        "corpora": [(f"pkg:{name}", f"{description} (unlabelled: attack data of task-agnostic triggers)")
                    for name, (description, _) in PLAIN_TEXT_SOURCES.items()],
        "backbones": list(BACKBONES.items()),
    }
    if what != "all" and what not in sections:
        raise typer.BadParameter(f"choose from {', '.join(sections)} or all", param_hint="WHAT")
    for section, entries in sections.items():
        if what in ("all", section):
            stdout.print(f"[bold]{section}[/bold]")
            for name, description in entries:
                stdout.print(f"  {name:32} {description.strip().splitlines()[0] if description.strip() else ''}", highlight=False, soft_wrap=True)
