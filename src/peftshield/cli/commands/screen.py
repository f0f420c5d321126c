"""``peftshield screen``: triage a fleet of LoRA adapters (weights for all, the audit for the most unusual)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import typer

from peftshield.cli.app import ProgressOption, app, info
from peftshield.errors import ConfigError
from peftshield.io import check_output_place


@app.command(help="Screen a fleet of LoRA adapters. Stage 1 reads every adapter's weights (never runs it) and scores how unusual the "
                  "spectrum of its weight change is against the fleet's other adapters of the same base model, rank and modules (no "
                  "labels needed). Stage 2 audits the most unusual within --audit-budget, and --audit-sample of the rest drawn at random, "
                  "so the report estimates what stage 1 missed. Writes OUT/screen.json (schema shipped), screen.sarif, screen.md and screen.html (and the audits in OUT/audits). "
                  "Exit code as 'audit': 0 nothing found, 1 an audited adapter was found backdoored (or inconclusive, see --fail-on), "
                  "2 an adapter could not be read or audited.")
def screen(
    targets: Optional[list[str]] = typer.Argument(None, help="Adapter folders, hf://ORG/NAME (from the local HF cache) or globs."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="A file with one target per line, each taken as written (no patterns; # comments)."),
    out: Path = typer.Option(Path("screen"), "--out", help="Output folder (replaced whole at the end)."),
    audit_budget: str = typer.Option("10%", "--audit-budget", help="Adapters to audit in stage 2, most unusual first: a share of the fleet (10%) or a count."),
    audit_sample: str = typer.Option("2%", "--audit-sample", help="Further adapters drawn at random from the rest and audited, to estimate what stage 1 missed."),
    stage1_only: bool = typer.Option(False, "--stage1-only", help="Score the weights only; audit nothing."),
    min_cohort: int = typer.Option(8, "--min-cohort", min=3, help="Adapters a cohort needs to be scored against itself; smaller cohorts are audited first."),
    fail_on: str = typer.Option("inconclusive", "--fail-on", help="Audit verdicts that exit 1: inconclusive (only 'clean' passes) or backdoored."),
    texts: Optional[str] = typer.Option(None, "--texts", help="Clean texts for the audit (default: the packaged offline corpus)."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model of the adapters, overriding their base_model_name_or_path (stage 2)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random sample and of the audits."),
    executor: str = typer.Option("local", "--executor", help="Where the stages run: local (this process) or ray (stage 1 as Ray Data "
                                 "with an actor pool, stage 2 as one Ray task per audit)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="With --executor ray: join this cluster (auto, HOST:PORT or ray://HOST:PORT; a token-authenticated cluster needs RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH); "
                                              "default a local Ray. Every node must see the adapters at the same paths."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="With --executor ray: feature actors (and local Ray's CPUs)."),
    progress: bool = ProgressOption,
) -> None:
    from peftshield.gate.settings import AuditGateSettings
    from peftshield.gate.targets import expand_specs
    from peftshield.screen.fleet import FleetScreen, parse_budget
    from peftshield.screen.run import read_manifest, run_screen, unique_targets

    if fail_on not in ("inconclusive", "backdoored"):
        raise ConfigError(f"--fail-on {fail_on}: give inconclusive or backdoored")
    if executor not in ("local", "ray"):
        raise ConfigError(f"--executor {executor}: give local or ray")
    if executor != "ray" and (ray_address or workers):
        raise ConfigError("--ray-address and --workers: only with --executor ray")
    specs = unique_targets(expand_specs(list(targets or [])) + (list(read_manifest(manifest)) if manifest is not None else []))
    if not specs:
        raise ConfigError("screen: give adapter folders, globs or --manifest FILE")
    check_output_place(out, "dir")
    budget = 0 if stage1_only else parse_budget(audit_budget, len(specs), "--audit-budget")
    sample = 0 if stage1_only else parse_budget(audit_sample, len(specs), "--audit-sample")
    settings = None if stage1_only else AuditGateSettings(fail_on=fail_on, texts=texts, base=base, seed=seed)
    source, place = None, None
    if executor == "ray":
        from peftshield.screen.distributed import ray_features
        from peftshield.screen.run import RayPlace

        place = RayPlace(ray_address, workers)
        source = ray_features(specs, place.address, place.workers, place.nodes, progress)
    report = run_screen(specs, out, FleetScreen(min_cohort=min_cohort), budget, sample, np.random.default_rng(seed), settings,
                        progress=progress, log=info, source=source, ray=place)
    errors = sum(r.status == "error" for r in report.rows)
    where = f" on {len(place.nodes)} Ray node(s)" if place is not None else ""
    info(f"{len(report.rows)} adapters ({errors} unreadable), stage 1 {report.stage1_seconds:.1f} s{where}, "
         f"{sum(bool(r.audited) for r in report.rows)} audited in {report.stage2_seconds:.0f} s -> {out}; exit {report.exit_code}")
    if report.exit_code:
        raise typer.Exit(report.exit_code)
