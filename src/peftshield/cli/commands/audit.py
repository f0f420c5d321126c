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
from peftshield.cli.commands.common import ConfigOption, NoConfigOption, gate_command, settings_options, warn_untrusted_settings
from peftshield.flags import GivenFlags
from peftshield.gate.settings import AuditGateSettings, find_settings_file, gate_settings, setting_sources
from peftshield.io import check_output_place


@app.command(help="Audit checkpoints nobody vouches for: is each backdoored, by which trigger, towards which class? Needs only clean texts. "
                  "Exit code: 0 every target clean, 1 findings (see --fail-on), 2 an audit could not complete. Writes, per target, "
                  "audit.json, report.md/html and audit.png, plus summary.<format> files; settings also come from "
                  "\\[tool.peftshield.audit] in pyproject.toml or \\[audit] in peftshield.toml (flags win).")
@settings_options(AuditGateSettings, layered=True)
@gate_command
def audit(
    flags: GivenFlags,
    targets: list[str] = typer.Argument(..., help="Checkpoint folders, .safetensors files, PEFT adapter folders, hf://ORG/NAME\\[@REV] "
                                                  "(from the local HF cache), 'minilm', or globs; several give one summary row each."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="A PEFT adapter to audit on top of the one TARGET (or pass the adapter folder itself as the target)."),
    out: Path = typer.Option(Path("audit"), "--out", help="Output folder (replaced whole at the end)."),
    write_psim: Optional[Path] = typer.Option(None, "--write-psim", help="Also save a PSIM for this model (threshold calibrated on the clean texts), for scan / evaluate / serve."),
    config: Optional[Path] = ConfigOption,
    no_config: bool = NoConfigOption,
    progress: bool = ProgressOption,
) -> None:
    from peftshield.gate.audit_gate import run_audit_gate
    from peftshield.gate.formats import render_text

    settings_file = find_settings_file(explicit=config, disabled=no_config)
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
