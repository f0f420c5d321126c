"""``peftshield calibrate``: a guard's thresholds per text length, on the deployment's own clean texts."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from peftshield.cli.app import ProgressOption, SkipEmptyOption, app, info
from peftshield.errors import ConfigError
from peftshield.guard.calibration import DEFAULT_LENGTH_EDGES, MIN_BUCKET_TEXTS, check_target_frr
from peftshield.io import atomic_write_text, check_output_place


def parse_edges(value: str) -> tuple[int, ...]:
    """``16,32,64`` -> (16, 32, 64): increasing positive token counts."""
    try:
        edges = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"--length-edges {value}: give increasing token counts, e.g. 16,32,64") from None
    if any(e <= 0 for e in edges) or list(edges) != sorted(set(edges)):
        raise ConfigError(f"--length-edges {value}: give increasing token counts, e.g. 16,32,64")
    return edges


@app.command(help="Calibrate a guard on your own clean traffic: one PSIM threshold per text length (token buckets), each flagging at most "
                  "--target-frr of the sample's texts of that length; 'guard' and 'serve' use the file with --calibration. "
                  "The sample must be clean texts the guard will see (a share of triggered texts in it raises the thresholds). "
                  "The file records the PSIM it is for, the sample's hash and size, and each bucket's size; a bucket with fewer than "
                  "--min-bucket-texts texts joins its neighbour.")
def calibrate(
    psim_dir: Path = typer.Option(..., "--psim", help="A directory written by 'peftshield psim train'."),
    texts: str = typer.Option(..., "--texts", help="Clean texts of the deployment: .jsonl/.json, .csv/.tsv or .txt, as 'scan --data' reads them."),
    out: Path = typer.Option(..., "--out", help="The calibration to write (.json)."),
    target_frr: float = typer.Option(0.01, "--target-frr", help="Share of clean texts of each length to flag at most (0 < x < 0.5)."),
    length_edges: str = typer.Option(",".join(map(str, DEFAULT_LENGTH_EDGES)), "--length-edges",
                                     help="Bucket edges in tokens (special tokens included, after the PSIM's --max-length cut)."),
    min_bucket_texts: int = typer.Option(MIN_BUCKET_TEXTS, "--min-bucket-texts", min=10, help="Texts a bucket needs to have its own threshold."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="The PSIM's backbone, if it is no longer where finetune.json recorded it."),
    skip_empty: bool = SkipEmptyOption,
    progress: bool = ProgressOption,
) -> None:
    from peftshield.data import load_texts
    from peftshield.defenses import PSIM
    from peftshield.finetune.checkpoint import model_fingerprint
    from peftshield.guard.calibration import calibrate_guard

    edges = parse_edges(length_edges)
    check_target_frr(target_frr)
    if not psim_dir.is_dir():
        raise ConfigError(f"--psim {psim_dir}: no such PSIM directory")
    if out.suffix.lower() != ".json":
        raise ConfigError(f"--out {out}: use a .json file name")
    check_output_place(out, "file")
    sample = load_texts(texts, "test", skip_empty=skip_empty, require_labels=False)
    psim = PSIM.load(psim_dir, backbone=backbone)
    scores = psim.score(list(sample.texts), progress=progress)
    calibration = calibrate_guard(psim, model_fingerprint(psim_dir), list(sample.texts), target_frr, texts, edges, min_bucket_texts, scores)
    atomic_write_text(out, calibration.model_dump_json(indent=2) + "\n")
    info(f"calibration -> {out}: {calibration.describe()}")
