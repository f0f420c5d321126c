"""``peftshield calibrate``: a guard's thresholds per text length, on the deployment's own clean texts."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import typer

from peftshield.cli.app import ProgressOption, SeedOption, SkipEmptyOption, app, info
from peftshield.defenses.thresholds import DEFAULT_TARGET_FRR
from peftshield.errors import ConfigError
from peftshield.guard.calibration import DEFAULT_CONFIDENCE, DEFAULT_LENGTH_EDGES, MIN_BUCKET_TEXTS, check_confidence, check_target_frr
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


@app.command(help="Calibrate a guard on your own clean traffic: one PSIM threshold per text length (token buckets), set so that, with "
                  "probability --confidence, at most --target-frr of clean texts of that length are flagged; 'guard' and 'serve' use the file "
                  "with --calibration. With --detector (and --model), the detectors are calibrated with the PSIM under that one budget: "
                  "'guard' and 'serve' then take the same --detector folders. The sample must be clean texts the guard will see (a share of "
                  "triggered texts in it raises the thresholds), and not the texts a detector was fitted on. The file records the PSIM (and "
                  "detectors) it is for, the sample's hash and size, and each bucket's size; a bucket with too few texts joins its neighbour.")
def calibrate(
    psim_dir: Path = typer.Option(..., "--psim", help="A directory written by 'peftshield psim train'."),
    texts: str = typer.Option(..., "--texts", help="Clean texts of the deployment: .jsonl/.json, .csv/.tsv or .txt, as 'scan --data' reads them."),
    out: Path = typer.Option(..., "--out", help="The calibration to write (.json)."),
    target_frr: float = typer.Option(DEFAULT_TARGET_FRR, "--target-frr", help="Share of clean texts of each length to flag at most (0 < x < 0.5)."),
    confidence: float = typer.Option(DEFAULT_CONFIDENCE, "--confidence", help="Probability that the share flagged of clean traffic like the sample "
                                     "is at most --target-frr (0.5 <= x < 1); higher needs more texts: ln(1 - confidence) / ln(1 - target) "
                                     "per length bucket at least, 230 at 1% and 0.9."),
    detector: Optional[list[Path]] = typer.Option(None, "--detector", help="A detector folder ('peftshield detector fit') to calibrate with the "
                                                  "PSIM under one budget (repeatable; needs --model). Each length bucket then needs a third more texts "
                                                  "(307 at 1% and 0.9): a quarter of them, drawn with --seed, sets how each member's scores compare."),
    model: Optional[Path] = typer.Option(None, "--model", help="The deployed classifier the detectors were fitted for (with --detector)."),
    fill_lengths: bool = typer.Option(False, "--fill-lengths", help="Fill each length bucket the sample has too few texts of with texts "
                                      "joined from its own (e.g. calibrating on a PSIM's short dev sentences before any traffic is seen); "
                                      "for the PSIM alone. Each bucket short of texts is topped up to 3x the least size the bound needs; the file records "
                                      "how many were joined and the --seed that drew them."),
    seed: int = SeedOption,
    length_edges: str = typer.Option(",".join(map(str, DEFAULT_LENGTH_EDGES)), "--length-edges",
                                     help="Bucket edges in tokens (special tokens included, after the PSIM's --max-length cut)."),
    min_bucket_texts: int = typer.Option(MIN_BUCKET_TEXTS, "--min-bucket-texts", min=10, help="Texts a bucket needs to have its own threshold "
                                         "(never fewer than --confidence needs)."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="The PSIM's backbone, if it is no longer where finetune.json recorded it."),
    skip_empty: bool = SkipEmptyOption,
    progress: bool = ProgressOption,
) -> None:
    from peftshield.data import load_texts
    from peftshield.defenses import PSIM
    from peftshield.finetune.checkpoint import model_fingerprint
    from peftshield.guard.calibration import calibrate_guard
    from peftshield.guard.detectors import detectors_for

    edges = parse_edges(length_edges)
    check_target_frr(target_frr)
    check_confidence(confidence)
    if not psim_dir.is_dir():
        raise ConfigError(f"--psim {psim_dir}: no such PSIM directory")
    if bool(detector) != (model is not None):
        raise ConfigError("--detector and --model: the detectors are calibrated for the model they were fitted for; give both or neither")
    if fill_lengths and detector:
        raise ConfigError("--fill-lengths: joined texts are for the PSIM alone; calibrate detectors on a sample of real traffic (drop --detector or --fill-lengths)")
    if model is not None and not model.is_dir():
        raise ConfigError(f"--model {model}: no such model directory")
    if out.suffix.lower() != ".json":
        raise ConfigError(f"--out {out}: use a .json file name")
    check_output_place(out, "file")
    detectors = detectors_for(model, detector or [], backbone)  # none without --detector (and then --model is refused above)
    sample = load_texts(texts, "test", skip_empty=skip_empty, require_labels=False)
    psim = PSIM.load(psim_dir, backbone=backbone)
    scores = psim.score(list(sample.texts), progress=progress)
    calibration = calibrate_guard(psim, model_fingerprint(psim_dir), list(sample.texts), target_frr, texts, edges, min_bucket_texts, scores,
                                  confidence, {d.name: d.score(list(sample.texts)) for d in detectors},
                                  {d.name: d.manifest_sha256 for d in detectors}, np.random.default_rng(seed) if fill_lengths else None,
                                  fill_seed=seed if fill_lengths else None, split_rng=np.random.default_rng(seed), split_seed=seed)
    atomic_write_text(out, calibration.model_dump_json(indent=2) + "\n")
    info(f"calibration -> {out}: {calibration.describe()}")
