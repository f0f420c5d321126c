"""``peftshield attack``: weight-poison a backbone by full fine-tuning on poisoned data."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from peftshield.attacks import POISONERS, PoisonSpec
from peftshield.cli.app import BackboneOption, ProgressOption, SeedOption, SkipEmptyOption, NumLabelsOption, app, info
from peftshield.cli.commands.common import training_from_options
from peftshield.data import load_splits
from peftshield.experiments.options import parse_key_values
from peftshield.experiments.stages import TriggerChoice, weight_poison
from peftshield.cli.commands.common import typed_from_flags
from peftshield.io import check_output_place


@app.command(help="Weight-poison a backbone: full fine-tuning on a poisoned copy of the attacker's data. Writes an HF model directory plus attack.json.")
def attack(
    data: str = typer.Option(..., "--data", help="The attacker's dataset (e.g. ../shared/data/psim/imdb)."),
    out: Path = typer.Option(..., "--out", help="Output model directory."),
    backbone: str = BackboneOption,
    trigger: str = typer.Option("badnet", "--trigger", help=f"One of: {', '.join(POISONERS.names())}, or 'none' for a clean control."),
    trigger_option: Optional[list[str]] = typer.Option(None, "--trigger-option", help="KEY=VALUE for the trigger."),
    target: int = typer.Option(0, "--target"),
    rate: float = typer.Option(0.1, "--rate"),
    count: Optional[int] = typer.Option(None, "--count"),
    label_mode: str = typer.Option("clean", "--label-mode", help="clean (reference: trigger into target-class rows, labels kept) or dirty."),
    max_words: Optional[int] = typer.Option(100, "--max-words", help="Truncate attacker texts to this many words so the trigger stays inside the model window."),
    epochs: int = typer.Option(3, "--epochs"),
    lr: float = typer.Option(2e-5, "--lr"),
    batch_size: int = typer.Option(32, "--batch-size"),
    max_length: int = typer.Option(128, "--max-length"),
    max_train_samples: Optional[int] = typer.Option(None, "--max-train-samples", help="Use a random subset of the training split."),
    seed: int = SeedOption,
    skip_empty: bool = SkipEmptyOption,
    num_labels: Optional[int] = NumLabelsOption,
    progress: bool = ProgressOption,
) -> None:
    spec = typed_from_flags(PoisonSpec, {"target_label": ("--target", target), "rate": ("--rate", rate), "count": ("--count", count),
                                         "label_mode": ("--label-mode", label_mode)})
    choice = TriggerChoice(trigger, parse_key_values(trigger_option, "--trigger-option"))
    choice.build()  # validate the trigger before loading anything
    training = training_from_options(learning_rate=lr, epochs=epochs, batch_size=batch_size, max_length=max_length, max_train_samples=max_train_samples)
    check_output_place(out, "dir")  # before any compute: a bad --out fails now, not after training
    splits = load_splits(data, skip_empty=skip_empty, num_labels=num_labels)
    for note in splits.notes:
        info(f"note: {note}")
    result = weight_poison(splits, backbone, choice, spec, training, out, seed, max_words, progress)
    report = result.report
    asr = "n/a" if report["attack_success_rate"] is None else f"{report['attack_success_rate']:.3f}"
    info(f"poisoned backbone -> {out}: CA {report['clean_accuracy']:.3f}, ASR {asr} ({report['seconds']:.0f} s)")
