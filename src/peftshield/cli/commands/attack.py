"""``peftshield attack``: weight-poison a backbone by full fine-tuning on poisoned data."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from peftshield.attacks import POISONERS, PoisonSpec
from peftshield.cli.app import BackboneOption, NumLabelsOption, ProgressOption, SeedOption, SkipEmptyOption, app, info
from peftshield.cli.commands.common import defaults_of, training_from_options
from peftshield.flags import given_flags, typed_from_flags
from peftshield.data import load_splits
from peftshield.experiments.config import AttackSection
from peftshield.experiments.options import parse_key_values
from peftshield.experiments.stages import TriggerChoice, weight_poison
from peftshield.io import check_output_place


_ATTACK = defaults_of(AttackSection)  # the scenario's attacker settings are this command's defaults


@app.command(help="Weight-poison a backbone: full fine-tuning on a poisoned copy of the attacker's data. Writes an HF model directory plus attack.json.")
def attack(
    data: str = typer.Option(..., "--data", help="The attacker's dataset (e.g. ../shared/data/psim/imdb); for task-agnostic triggers (neuba, por) any text: a .txt file, a pkg: corpus (peftshield list corpora) or a dataset's texts."),
    out: Path = typer.Option(..., "--out", help="Output model directory."),
    backbone: str = BackboneOption,
    trigger: str = typer.Option("badnet", "--trigger", help=f"One of: {', '.join(POISONERS.names())}, or 'none' for a clean control."),
    trigger_option: Optional[list[str]] = typer.Option(None, "--trigger-option", help="KEY=VALUE for the trigger."),
    target: Optional[int] = typer.Option(None, "--target", help=f"Default {_ATTACK['target_label']}."),
    rate: float = typer.Option(0.1, "--rate", help="Share of the training rows to poison (when --count is not given)."),
    count: Optional[int] = typer.Option(None, "--count"),
    label_mode: Optional[str] = typer.Option(None, "--label-mode", help=f"clean (trigger into target-class rows, labels kept) or dirty (default {_ATTACK['label_mode']})."),
    max_words: Optional[int] = typer.Option(None, "--max-words", min=0, help=f"Truncate attacker texts to this many words so the trigger stays inside the model window (default {_ATTACK['max_words']}; 0: no cut)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help=f"Default {_ATTACK['epochs']}."),
    lr: Optional[float] = typer.Option(None, "--lr", help=f"Default {_ATTACK['learning_rate']:g}."),
    batch_size: int = typer.Option(32, "--batch-size"),
    max_length: int = typer.Option(128, "--max-length"),
    max_train_samples: Optional[int] = typer.Option(None, "--max-train-samples", help="Use a random subset of the training split."),
    seed: int = SeedOption,
    skip_empty: bool = SkipEmptyOption,
    num_labels: Optional[int] = NumLabelsOption,
    progress: bool = ProgressOption,
) -> None:
    target = _ATTACK["target_label"] if target is None else target
    label_mode = _ATTACK["label_mode"] if label_mode is None else label_mode
    spec = typed_from_flags(PoisonSpec, given_flags({"target_label": "--target"}, target_label=target, rate=rate, count=count,
                                                     label_mode=label_mode))
    epochs = _ATTACK["epochs"] if epochs is None else epochs
    lr = _ATTACK["learning_rate"] if lr is None else lr
    max_words = _ATTACK["max_words"] if max_words is None else (max_words or None)
    choice = TriggerChoice(trigger, parse_key_values(trigger_option, "--trigger-option"))
    poisoner = choice.build()  # validate the trigger before loading anything
    training = training_from_options(learning_rate=lr, epochs=epochs, batch_size=batch_size, max_length=max_length, max_train_samples=max_train_samples)
    check_output_place(out, "dir")  # before any compute: a bad --out fails now, not after training
    if poisoner is not None and poisoner.task_agnostic:  # plain text, no labels: a .txt file, a pkg: corpus or any dataset's texts
        report = weight_poison(data, backbone, choice, spec, training, out, seed, max_words, progress).report
        cosines = report["representation"]["trigger_cosine"]
        info(f"task-agnostic backbone (no classifier head) -> {out}: triggered representations at cosine "
             f"{min(cosines.values()):.2f}-{max(cosines.values()):.2f} to their vectors, clean kept at "
             f"{report['representation']['clean_cosine']:.3f} ({report['seconds']:.0f} s)")
        return
    splits = load_splits(data, skip_empty=skip_empty, num_labels=num_labels)
    for note in splits.notes:
        info(f"note: {note}")
    result = weight_poison(splits, backbone, choice, spec, training, out, seed, max_words, progress)
    report = result.report
    asr = "n/a" if report["attack_success_rate"] is None else f"{report['attack_success_rate']:.3f}"
    info(f"poisoned backbone -> {out}: CA {report['clean_accuracy']:.3f}, ASR {asr} ({report['seconds']:.0f} s)")
