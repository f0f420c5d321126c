"""``peftshield run``, ``peftshield report`` and ``peftshield export``: experiment grids."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from peftshield.cli.app import ProgressOption, app, info


@app.command(help="Run an experiment grid from a YAML file; cached stages are reused and finished cells skipped (resumable).")
def run(
    config: Path = typer.Argument(..., help="Grid YAML (see configs/cpu-small.yaml)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default runs/<name from the config>)."),
    executor: str = typer.Option("local", "--executor", help="local (this process) or ray (a local Ray, or a cluster with --ray-address)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="CPUs for a local Ray."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Join a running Ray cluster ('auto' or ray://host:port)."),
    yes: bool = typer.Option(False, "--yes", help="Run a grid of more than 200 cells (it takes days on a CPU)."),
    wait: bool = typer.Option(False, "--wait", help="If another process is running in the run folder, wait for it instead of stopping."),
    progress: bool = ProgressOption,
) -> None:
    from peftshield.grid.config import load_grid_config
    from peftshield.grid.executors import EXECUTORS
    from peftshield.grid.runner import run_grid

    from peftshield.io import check_output_place

    grid = load_grid_config(config)
    check_output_place(out or Path("runs") / grid.name, "dir")
    options = {"workers": workers} if executor != "ray" else {"workers": workers, "address": ray_address}
    run_grid(grid, out or Path("runs") / grid.name, EXECUTORS.create(executor, **options), progress, log=info, wait=wait, confirmed=yes)


@app.command(help="Render a grid run's tables (Markdown, HTML) and plots (PNG).")
def report(
    run_dir: Path = typer.Argument(..., help="A directory written by 'peftshield run'."),
    out: Optional[Path] = typer.Option(None, "--out", help="Report directory (default RUN_DIR/report)."),
) -> None:
    from peftshield.io import check_output_place
    from peftshield.report import render_report

    check_output_place(out or run_dir / "report", "dir", label="--out" if out else None)

    info(f"report -> {render_report(run_dir, out) / 'report.md'}")


@app.command(help="Export a grid run's result store as CSV (one row per cell, defense and metric).")
def export(
    run_dir: Path = typer.Argument(..., help="A directory written by 'peftshield run'."),
    csv: Path = typer.Option(..., "--csv", help="Output CSV file."),
) -> None:
    from peftshield.errors import ConfigError
    from peftshield.grid.runner import STORE_FILE
    from peftshield.grid.store import ResultStore

    from peftshield.io import check_output_place

    if not (run_dir / STORE_FILE).is_file():
        raise ConfigError(f"{run_dir}: not a grid run (no {STORE_FILE})")
    check_output_place(csv, "file", label="--csv")
    info(f"{len(ResultStore(run_dir / STORE_FILE).rows())} rows -> {ResultStore(run_dir / STORE_FILE).export_csv(csv)}")
