"""``peftshield audit``: is a checkpoint (or an adapter on it) backdoored, and by which trigger?"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from peftshield.cli.app import ProgressOption, SeedOption, app, info
from peftshield.errors import ConfigError
from peftshield.io import atomic_directory, check_output_place, read_json

PROBES = ("auto", "head", "psim")


@app.command(help="Audit a checkpoint nobody vouches for: is it backdoored, by which trigger, towards which class? "
                  "Needs only clean texts; exits 0 whatever the verdict. Writes audit.json, report.md/html and audit.png.")
def audit(
    checkpoint: str = typer.Argument(..., help="HF model name or folder (a bare encoder or a classifier), or 'minilm'."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="A PEFT adapter to audit on top of CHECKPOINT (a 'peftshield finetune' folder or a PEFT adapter folder)."),
    texts: Optional[str] = typer.Option(None, "--texts", help="Clean texts in the model's language: any dataset source, or a .txt file (one text per line). Default: a packaged offline corpus."),
    out: Path = typer.Option(Path("audit"), "--out", help="Output folder."),
    probe: str = typer.Option("auto", "--probe", help="auto (the checkpoint's head if it has a trained one, else a random-label PSIM), or psim to ignore the head."),
    write_psim: Optional[Path] = typer.Option(None, "--write-psim", help="Also save a PSIM for this model (threshold calibrated on the clean texts), for scan / evaluate / serve."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="A calibration JSON ({clean_mean, clean_std, n_clean, ...}) instead of the packaged one."),
    seed: int = SeedOption,
    progress: bool = ProgressOption,
) -> None:
    from peftshield.audit import DEFAULT_AUDIT_TEXTS, AuditSettings, VerdictCalibration, load_audit_texts, run_audit
    from peftshield.audit.report import write_audit

    if probe not in PROBES:
        raise ConfigError(f"--probe {probe!r}: use one of {', '.join(PROBES)}")
    if probe == "psim" and adapter is not None:
        raise ConfigError("--probe psim with --adapter: an adapter is audited through its own head")
    check_output_place(out, "dir")
    if write_psim is not None:
        check_output_place(write_psim, "dir", "--write-psim")
    chosen_calibration = None
    if calibration is not None:
        saved = read_json(calibration)
        try:
            chosen_calibration = VerdictCalibration(**saved) if isinstance(saved, dict) else None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"--calibration {calibration}: not a calibration ({str(exc).splitlines()[0]})") from None
        if chosen_calibration is None:
            raise ConfigError(f"--calibration {calibration}: not a calibration (a JSON object)")
    corpus, name = load_audit_texts(texts or DEFAULT_AUDIT_TEXTS)
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    result, subject = run_audit(checkpoint, corpus, name, rng, adapter=str(adapter) if adapter else None, settings=AuditSettings(),
                                calibration=chosen_calibration, force_psim=probe == "psim", progress=progress, log=info)
    with atomic_directory(out) as tmp:
        write_audit(result, tmp)
    best = result.triggers[0] if result.triggers else None
    found = f"; top trigger '{best.text}' -> class {best.target} (flip rate {best.flip_rate:.2f}, confidence {best.confidence:.3f})" if best else ""
    info(f"verdict: {result.verdict} (suspicion {result.score:.3f}){found}; {time.perf_counter() - started:.0f} s -> {out}")
    if write_psim is not None:
        _write_psim(subject, corpus, write_psim, rng, progress)


def _write_psim(subject, corpus: list[str], out: Path, rng: np.random.Generator, progress: bool) -> None:
    """The audit's PSIM (a bare encoder), or one trained now on the audited model; an adapter is
    first folded into its backbone, so the PSIM sees the model that is deployed."""
    import tempfile

    from peftshield.audit.auditor import AuditSettings, _fit_psim
    from peftshield.audit.subject import merged_adapter_backbone

    psim = subject.psim
    if psim is None:
        if subject.adapter is not None:
            with tempfile.TemporaryDirectory(prefix="peftshield-merged-") as merged:
                merged_adapter_backbone(subject, Path(merged))
                psim = _fit_psim(subject, corpus, rng, AuditSettings(), progress, backbone=merged)
                psim.save(out, self_contained=True)
        else:
            psim = _fit_psim(subject, corpus, rng, AuditSettings(), progress)
            psim.save(out)
    else:
        psim.save(out)
    info(f"PSIM -> {out}: threshold {psim.threshold_:.4f}; use it with 'peftshield scan --psim {out}'")
