"""``peftshield psim train`` and ``peftshield scan``: build a PSIM and screen texts with it."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from peftshield.cli.app import ProgressOption, SeedOption, SkipEmptyOption, app, info
from peftshield.data import load_splits, load_texts
from peftshield.defenses import PSIM, DefenseContext, ThresholdPolicy
from peftshield.errors import ConfigError
from peftshield.experiments.options import parse_key_values
from peftshield.io import atomic_write_text

psim_app = typer.Typer(help="Train a Poisoned Sample Identification Module (PSIM).", no_args_is_help=True)
app.add_typer(psim_app, name="psim")


@psim_app.command("train", help="Train a PSIM: a PEFT module on the backbone with randomly reset training labels.")
def psim_train(
    backbone: str = typer.Option(..., "--backbone", help="The backbone you were given (possibly poisoned)."),
    data: str = typer.Option(..., "--data", help="Your training data (labels are ignored: reset at random); its dev split calibrates."),
    out: Path = typer.Option(..., "--out"),
    method: str = typer.Option("ptuning", "--method", help="PEFT method of the PSIM (see bench/psim_methods.md)."),
    method_option: Optional[list[str]] = typer.Option(None, "--method-option"),
    lr: float = typer.Option(2e-5, "--lr"),
    epochs: int = typer.Option(1, "--epochs"),
    batch_size: int = typer.Option(32, "--batch-size"),
    max_train_samples: Optional[int] = typer.Option(2000, "--max-train-samples"),
    max_length: int = typer.Option(128, "--max-length"),
    threshold_mode: str = typer.Option("auto", "--threshold-mode", help="auto (frr when the data has a dev split, else fixed), fixed (--threshold, default 0.7 for 2 classes) or frr."),
    threshold: Optional[float] = typer.Option(None, "--threshold"),
    target_frr: float = typer.Option(0.01, "--target-frr", help="The clean false-rejection rate to allow when calibrating."),
    seed: int = SeedOption,
    skip_empty: bool = SkipEmptyOption,
    progress: bool = ProgressOption,
) -> None:
    policy = ThresholdPolicy(threshold_mode, threshold, target_frr)
    psim = PSIM(method, parse_key_values(method_option, "--method-option"), lr, epochs, batch_size, max_train_samples, max_length, policy)
    splits = load_splits(data, ("train", "dev"), skip_empty=skip_empty)
    context = DefenseContext(backbone, splits["train"], splits.get("dev"), splits.num_labels, max_length=max_length, progress=progress)
    psim.fit(context, np.random.default_rng(seed))
    psim.save(out)
    info(f"PSIM ({method}) -> {out}: threshold {psim.threshold_:.4f} ({threshold_mode}), trained in {psim.fit_seconds_:.0f} s")


@app.command(help="Score texts with a PSIM; writes id, score and flag per text (JSONL or CSV) and reports texts per second.")
def scan(
    psim_dir: Path = typer.Option(..., "--psim", help="A directory written by 'peftshield psim train'."),
    data: str = typer.Option(..., "--data", help="A file, or a dataset directory (see --split)."),
    out: Path = typer.Option(..., "--out", help="Output .jsonl or .csv."),
    split: str = typer.Option("test", "--split"),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Override the PSIM's threshold."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    skip_empty: bool = SkipEmptyOption,
    progress: bool = ProgressOption,
) -> None:
    if out.suffix.lower() not in (".jsonl", ".csv"):
        raise ConfigError(f"--out {out}: use a .jsonl or .csv file name")
    texts = load_texts(data, split, skip_empty=skip_empty)
    psim = PSIM.load(psim_dir)
    if batch_size:
        psim.score_batch_size = batch_size
    tau = psim.threshold_ if threshold is None else threshold
    started = time.perf_counter()
    scores = psim.score(texts.texts, progress=progress)
    seconds = time.perf_counter() - started
    flags = scores > tau
    if out.suffix.lower() == ".csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["id", "score", "flagged"])
        writer.writerows((row_id, f"{score:.6f}", int(flag)) for row_id, score, flag in zip(texts.ids, scores, flags))
        atomic_write_text(out, buffer.getvalue())
    else:
        atomic_write_text(out, "".join(json.dumps({"id": i, "score": round(float(s), 6), "flagged": bool(f)}) + "\n" for i, s, f in zip(texts.ids, scores, flags)))
    info(f"scanned {len(texts)} texts in {seconds:.1f} s ({len(texts) / seconds:.0f} texts/s): {int(flags.sum())} flagged at threshold {tau:.4f} -> {out}")
