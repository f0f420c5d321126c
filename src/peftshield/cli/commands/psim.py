"""``peftshield psim train`` and ``peftshield scan``: build a PSIM and screen texts with it."""

from __future__ import annotations

import csv
import itertools
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from peftshield.cli.app import ProgressOption, SeedOption, SkipEmptyOption, NumLabelsOption, app, info
from peftshield.data import load_splits
from peftshield.data.loaders import iter_text_chunks
from peftshield.cli.commands.common import ConfigOption, NoConfigOption, defaults_of, gate_command, settings_options, warn_untrusted_settings
from peftshield.flags import GivenFlags, given_flags, typed_component, typed_from_flags
from peftshield.gate.settings import ScanGateSettings
from peftshield.defenses import DEFENSES, PSIM, DefenseContext, ThresholdPolicy
from peftshield.errors import ConfigError
from peftshield.experiments.options import parse_key_values
from peftshield.io import atomic_text_stream, atomic_write_text, check_output_place

psim_app = typer.Typer(help="Train a Poisoned Sample Identification Module (PSIM).", no_args_is_help=True)
app.add_typer(psim_app, name="psim")


SCAN_CHUNK_ROWS = 4096  # texts read, scored and written at a time
_PSIM = defaults_of(DEFENSES.get("psim").options_model())


@psim_app.command("train", help="Train a PSIM: a PEFT module on the backbone with randomly reset training labels.")
def psim_train(
    backbone: str = typer.Option(..., "--backbone", help="The backbone you were given (possibly poisoned)."),
    data: str = typer.Option(..., "--data", help="Your training data (labels are ignored: reset at random); its dev split calibrates."),
    out: Path = typer.Option(..., "--out"),
    method: Optional[str] = typer.Option(None, "--method", help=f"PEFT method of the PSIM (default {_PSIM['method']}; see bench/psim_methods.md)."),
    method_option: Optional[list[str]] = typer.Option(None, "--method-option"),
    lr: Optional[float] = typer.Option(None, "--lr", help=f"Default {_PSIM['learning_rate']}."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help=f"Default {_PSIM['epochs']}."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help=f"Default {_PSIM['batch_size']}."),
    max_train_samples: Optional[int] = typer.Option(None, "--max-train-samples", help=f"Random training rows, relabelled (default {_PSIM['max_train_samples']})."),
    max_length: Optional[int] = typer.Option(None, "--max-length", help=f"Default {_PSIM['max_length']}."),
    threshold_mode: Optional[str] = typer.Option(None, "--threshold-mode", help="auto (default: frr when the data has a dev split, else fixed), fixed (--threshold, default 0.7 for 2 classes) or frr."),
    threshold: Optional[float] = typer.Option(None, "--threshold"),
    target_frr: Optional[float] = typer.Option(None, "--target-frr", help=f"The clean false-rejection rate to allow when calibrating (default {_PSIM['threshold'].target_frr})."),
    seed: int = SeedOption,
    skip_empty: bool = SkipEmptyOption,
    num_labels: Optional[int] = NumLabelsOption,
    self_contained: bool = typer.Option(False, "--self-contained", help="Copy the backbone into the output folder, so the folder alone can move to another machine."),
    progress: bool = ProgressOption,
) -> None:
    policy = typed_from_flags(ThresholdPolicy, given_flags({"kind": "--threshold-mode", "value": "--threshold"},
                                                           kind=threshold_mode, value=threshold, target_frr=target_frr))
    psim = typed_component(DEFENSES, "psim", given_flags(
        {"method_options": "--method-option", "learning_rate": "--lr"},
        method=method, method_options=parse_key_values(method_option, "--method-option") or None, learning_rate=lr, epochs=epochs,
        batch_size=batch_size, max_train_samples=max_train_samples, max_length=max_length), threshold=policy)
    check_output_place(out, "dir")
    splits = load_splits(data, ("train", "dev"), skip_empty=skip_empty, num_labels=num_labels)
    context = DefenseContext(backbone, splits["train"], splits.get("dev"), splits.num_labels, max_length=psim.max_length, progress=progress)
    psim.fit(context, np.random.default_rng(seed))
    psim.save(out, self_contained=self_contained)
    info(f"PSIM ({psim.method}) -> {out}: threshold {psim.threshold_:.4f} ({policy.kind}), trained in {psim.fit_seconds_:.0f} s")


@app.command(help="Score texts with a PSIM; writes id (the row's id or idx, else its line number), score and flag per text "
                  "(JSONL or CSV) and reports texts per second. Texts need no labels (see --data). "
                  "Exit code: 0 clean, 1 findings (at least --fail-on-rate of the texts flagged; default any), 2 could not complete. "
                  "Settings also come from \\[tool.peftshield.scan] in pyproject.toml or \\[scan] in peftshield.toml (flags win).")
@settings_options(ScanGateSettings, layered=True)
@gate_command
def scan(
    given: GivenFlags,
    psim_dir: Path = typer.Option(..., "--psim", help="A directory written by 'peftshield psim train'."),
    data: str = typer.Option(..., "--data", help="The texts: .jsonl/.json ({\"text\": ...} or {\"sentence\": ...} per line, or a JSON string per line), "
                                                 ".csv/.tsv with a header holding a text or sentence column, or .txt (one text per line); "
                                                 "a label column is optional (checked when present). Or a dataset directory (see --split)."),
    out: Path = typer.Option(..., "--out", help="Output .jsonl or .csv (report files go beside it: OUT_STEM.summary.<ext>)."),
    split: str = typer.Option("test", "--split"),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="The PSIM's backbone, if it is no longer where finetune.json recorded it."),
    config: Optional[Path] = ConfigOption,
    no_config: bool = NoConfigOption,
    skip_empty: bool = SkipEmptyOption,
    detector: Optional[list[Path]] = typer.Option(None, "--detector", help="A detector folder ('peftshield detector fit') beside the PSIM, each "
                                                  "at its own threshold: a text is flagged when any member fires (repeatable; needs --model)."),
    model: Optional[Path] = typer.Option(None, "--model", help="The classifier the detectors were fitted for (with --detector)."),
    progress: bool = ProgressOption,
) -> None:
    from peftshield.gate.formats import RENDERERS, render_text, report_files
    from peftshield.gate.report import GateReport
    from peftshield.gate.scan_gate import ScanTally
    from peftshield.guard.detectors import detectors_for
    from peftshield.gate.settings import find_settings_file, gate_settings, setting_sources

    if out.suffix.lower() not in (".jsonl", ".csv"):
        raise ConfigError(f"--out {out}: use a .jsonl or .csv file name")
    settings_file = find_settings_file(explicit=config, disabled=no_config)
    settings = gate_settings("scan", given, settings_file)
    warn_untrusted_settings("scan", settings_file, given)
    if bool(detector) != (model is not None):
        raise ConfigError("--detector and --model: the detectors score texts with the model they were fitted for; give both or neither")
    if model is not None and not model.is_dir():
        raise ConfigError(f"--model {model}: no such model directory")
    check_output_place(out, "file")
    summaries = report_files(out.with_name(out.stem + ".summary"), settings.format)
    for path in summaries.values():
        check_output_place(path, "file", "--format")
    started_all = time.perf_counter()
    chunks = iter_text_chunks(data, split, chunk_rows=SCAN_CHUNK_ROWS, skip_empty=skip_empty, require_labels=False)
    first = next(chunks, None)  # the first rows are read, and a bad one refused, before any model loads
    psim = PSIM.load(psim_dir, backbone=backbone, runtime=settings.runtime)
    if settings.batch_size:
        psim.score_batch_size = settings.batch_size
    tau = psim.threshold_ if settings.threshold is None else settings.threshold
    detectors = detectors_for(model, detector or [], backbone, runtime=settings.runtime)  # none without --detector (and --model is refused above)
    tally = ScanTally(data, split, tau)
    seconds = 0.0
    # Read, score and write in bounded chunks: peak memory does not grow with the input.
    with atomic_text_stream(out) as handle:
        writer = csv.writer(handle, lineterminator="\n") if out.suffix.lower() == ".csv" else None
        names = [d.name for d in detectors]
        if writer:
            writer.writerow(["id", "score", "flagged", *(f"{name}_score" for name in names), *(["reasons"] if names else [])])
        for chunk in itertools.chain([] if first is None else [first], chunks):
            started = time.perf_counter()
            scores = psim.score(chunk.texts, progress=False)
            member_scores = {d.name: d.score(chunk.texts) for d in detectors}
            seconds += time.perf_counter() - started
            fired = {"psim": scores > tau, **{d.name: member_scores[d.name] > d.threshold for d in detectors}}
            flags = np.any(list(fired.values()), axis=0)
            reasons = [[name for name, hits in fired.items() if hits[i]] for i in range(len(scores))]
            if writer:
                writer.writerows((row_id, f"{score:.6f}", int(flag), *(f"{member_scores[n][i]:.6f}" for n in names), *([" ".join(reasons[i])] if names else []))
                                 for i, (row_id, score, flag) in enumerate(zip(chunk.ids, scores, flags)))
            else:
                handle.writelines(json.dumps({"id": row_id, "score": round(float(v), 6), "flagged": bool(f),
                                              **({"detector_scores": {n: round(float(member_scores[n][i]), 6) for n in names},
                                                  "reasons": reasons[i]} if names else {})}) + "\n"
                                  for i, (row_id, v, f) in enumerate(zip(chunk.ids, scores, flags)))
            tally.add(chunk, scores, flags, reasons)
            if progress:
                info(f"scan: {tally.scored:,} texts scored, {tally.flagged:,} flagged")
    rate = tally.scored / seconds if seconds else 0.0
    members = "".join(f", {d.name} above {d.threshold:.4g}" for d in detectors)
    info(f"scanned {tally.scored} texts in {seconds:.1f} s ({rate:.0f} texts/s): {tally.flagged} flagged at threshold {tau:.4f}{members} -> {out}")
    row = tally.row(settings.fail_on_rate)
    report = GateReport("scan", {"fail_on_rate": settings.fail_on_rate}, str(settings_file.path) if settings_file.path else None, [row],
                        time.perf_counter() - started_all, setting_sources("scan", given, settings_file))
    for fmt, path in summaries.items():
        atomic_write_text(path, RENDERERS[fmt](report))
    if "text" in settings.format:
        typer.echo(render_text(report), nl=False)
    if report.exit_code:
        raise typer.Exit(report.exit_code)
