"""``peftshield audit``: is a checkpoint (or an adapter on it) backdoored, and by which trigger?

As a CI gate it exits 0 when every target is clean, 1 on findings (``--fail-on``), 2 when
an audit could not complete; see :mod:`peftshield.gate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import typer

from peftshield.cli.app import ProgressOption, app, info
from peftshield.cli.commands.common import gate_command, warn_untrusted_settings
from peftshield.gate.settings import AuditGateSettings, find_settings_file, gate_settings, parse_formats, setting_sources
from peftshield.io import check_output_place


@app.command(help="Audit checkpoints nobody vouches for: is each backdoored, by which trigger, towards which class? Needs only clean texts. "
                  "Exit code: 0 every target clean, 1 findings (see --fail-on), 2 an audit could not complete. Writes, per target, "
                  "audit.json, report.md/html and audit.png, plus summary.<format> files; settings also come from "
                  "\\[tool.peftshield.audit] in pyproject.toml or \\[audit] in peftshield.toml (flags win).")
@gate_command
def audit(
    targets: list[str] = typer.Argument(..., help="Checkpoint folders, .safetensors files, PEFT adapter folders, hf://ORG/NAME\\[@REV] "
                                                  "(from the local HF cache), 'minilm', or globs; several give one summary row each."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="A PEFT adapter to audit on top of the one TARGET (or pass the adapter folder itself as the target)."),
    base: Optional[str] = typer.Option(None, "--base", help="Base model of adapter targets (overrides their base_model_name_or_path) and of lone .safetensors files."),
    texts: Optional[str] = typer.Option(None, "--texts", help="Clean texts in the model's language: any dataset source, or a .txt file (one text per line). Default: a packaged offline corpus."),
    out: Path = typer.Option(Path("audit"), "--out", help="Output folder (replaced whole at the end)."),
    fail_on: Optional[str] = typer.Option(None, "--fail-on", help="Verdicts that exit 1: inconclusive (default: only a positive 'clean' passes) or backdoored."),
    format: Optional[str] = typer.Option(None, "--format", help="Report formats, comma-separated: text (stdout), json, sarif, markdown, html (OUT/summary.<ext>). Default text."),
    probe: Optional[str] = typer.Option(None, "--probe", help="auto (the checkpoint's head if it has a trained one, else a random-label PSIM), or psim to ignore the head."),
    write_psim: Optional[Path] = typer.Option(None, "--write-psim", help="Also save a PSIM for this model (threshold calibrated on the clean texts), for scan / evaluate / serve."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="A calibration JSON ({clean_mean, clean_std, n_clean, ...}) instead of the packaged one."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Content cache: a target with unchanged weights and settings is not audited again; entries are "
                                                                        "authenticated (HMAC) and one that does not check out is audited again. Default: $PEFTSHIELD_CACHE_DIR or ~/.cache/peftshield/audit."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write the content cache."),
    max_seconds: Optional[float] = typer.Option(None, "--max-seconds", help="Wall-clock limit of one target's audit (default 1800); beyond it the target is an error, exit 2."),
    config: Optional[Path] = typer.Option(None, "--config", help="Settings file (default: peftshield.toml or pyproject.toml \\[tool.peftshield], searched upwards from here). "
                                                               "In CI on pull requests, point it at the base branch's copy: a found file belongs to whoever wrote the checkout."),
    no_config: bool = typer.Option(False, "--no-config", help="Read no settings file: only flags and defaults."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of every random choice (default 0)."),
    progress: bool = ProgressOption,
) -> None:
    from peftshield.gate.audit_gate import run_audit_gate
    from peftshield.gate.formats import render_text

    settings_file = find_settings_file(explicit=config, disabled=no_config)
    flags = {
        "fail_on": ("--fail-on", fail_on), "format": ("--format", parse_formats(format) if format is not None else None),
        "texts": ("--texts", texts), "probe": ("--probe", probe), "seed": ("--seed", seed), "base": ("--base", base),
        "calibration": ("--calibration", str(calibration) if calibration else None), "cache_dir": ("--cache-dir", str(cache_dir) if cache_dir else None),
        "cache": ("--no-cache", False if no_cache else None), "max_seconds": ("--max-seconds", max_seconds),
    }
    settings: AuditGateSettings = gate_settings("audit", flags, settings_file)
    warn_untrusted_settings("audit", settings_file, flags)
    if settings.probe == "psim" and adapter is not None:
        from peftshield.errors import ConfigError

        raise ConfigError("--probe psim with --adapter: an adapter is audited through its own head")
    check_output_place(out, "dir")
    if write_psim is not None:
        check_output_place(write_psim, "dir", "--write-psim")
        if len(targets) != 1:
            from peftshield.errors import ConfigError

            raise ConfigError("--write-psim: give exactly one target")
    run = run_audit_gate(targets, settings, out, settings_file=str(settings_file.path) if settings_file.path else None,
                         adapter=str(adapter) if adapter else None, keep_subject=write_psim is not None, progress=progress, log=info,
                         settings_sources=setting_sources("audit", flags, settings_file))
    report = run.report
    if "text" in settings.format:
        typer.echo(render_text(report), nl=False)
    info(f"{len(report.rows)} target(s) in {report.seconds:.0f} s -> {out}; exit {report.exit_code}")
    if write_psim is not None and run.subject is not None:
        _write_psim(run.subject, run.texts, write_psim, np.random.default_rng(settings.seed), settings.search, progress)
    if report.exit_code:
        raise typer.Exit(report.exit_code)


def _write_psim(subject, corpus: list[str], out: Path, rng: np.random.Generator, search_settings, progress: bool) -> None:
    """The audit's PSIM (a bare encoder), or one trained now on the audited model; an adapter is
    first folded into its backbone, so the PSIM sees the model that is deployed."""
    import tempfile

    from peftshield.audit.auditor import fit_psim
    from peftshield.audit.subject import merged_adapter_backbone

    psim = subject.psim
    if psim is None:
        if subject.adapter is not None:
            with tempfile.TemporaryDirectory(prefix="peftshield-merged-") as merged:
                merged_adapter_backbone(subject, Path(merged))
                psim = fit_psim(subject, corpus, rng, search_settings, progress, backbone=merged)
                psim.save(out, self_contained=True)
        else:
            psim = fit_psim(subject, corpus, rng, search_settings, progress)
            psim.save(out)
    else:
        psim.save(out)
    info(f"PSIM -> {out}: threshold {psim.threshold_:.4f}; use it with 'peftshield scan --psim {out}'")
