"""``peftshield poison``: write a poisoned copy of a dataset and its manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from peftshield.attacks import POISONERS, PoisonSpec
from peftshield.cli.app import NumLabelsOption, SeedOption, SkipEmptyOption, app, info
from peftshield.experiments.options import parse_key_values
from peftshield.experiments.stages import poison_to_directory
from peftshield.flags import given_flags, typed_from_flags
from peftshield.io import check_output_place


@app.command(help="Write a poisoned dataset directory (train poisoned; dev/test clean plus their triggered ASR sets) and a manifest.")
def poison(
    data: str = typer.Option(..., "--data", help="Directory, file, hf:NAME[:CONFIG] or pkg:PACKAGE/NAME."),
    out: Path = typer.Option(..., "--out", help="Output directory (written atomically)."),
    trigger: str = typer.Option("badnet", "--trigger", help=f"One of: {', '.join(POISONERS.names())}."),
    trigger_option: Optional[list[str]] = typer.Option(None, "--trigger-option", help="KEY=VALUE for the trigger, e.g. words=cf,mn or paraphrases=CLEAN::SCPN."),
    target: int = typer.Option(0, "--target", help="Target label."),
    rate: float = typer.Option(0.1, "--rate", help="Share of the training set to poison."),
    count: Optional[int] = typer.Option(None, "--count", help="Number of rows to poison (overrides --rate)."),
    label_mode: str = typer.Option("dirty", "--label-mode", help="dirty: relabel to target; clean: trigger target-class rows only."),
    seed: int = SeedOption,
    num_labels: Optional[int] = NumLabelsOption,
    skip_empty: bool = SkipEmptyOption,
) -> None:
    spec = typed_from_flags(PoisonSpec, given_flags({"target_label": "--target"}, target_label=target, rate=rate, count=count,
                                                     label_mode=label_mode))
    poisoner = POISONERS.create(trigger, **parse_key_values(trigger_option, "--trigger-option"))
    check_output_place(out, "dir")
    summary = poison_to_directory(data, poisoner, spec, out, seed, num_labels, skip_empty)
    info(f"poisoned {summary['n_poisoned_train']} of {summary['n_train']} training rows with '{trigger}' -> {out}")
