"""``peftshield finetune``: the victim's fine-tuning with any registered method."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from peftshield.cli.app import BackboneOption, ProgressOption, SeedOption, SkipEmptyOption, NumLabelsOption, app, info
from peftshield.cli.commands.common import training_from_options
from peftshield.data import load_splits
from peftshield.experiments.options import parse_key_values
from peftshield.experiments.stages import finetune_victim
from peftshield.finetune import METHODS, FineTuneFileConfig, load_finetune_yaml
from peftshield.io import check_output_place


@app.command(help="Fine-tune a (possibly poisoned) backbone on clean data; saves the trained tensors (safetensors) and finetune.json.")
def finetune(
    data: str = typer.Option(..., "--data", help="The victim's dataset."),
    out: Path = typer.Option(..., "--out", help="Output directory."),
    backbone: str = BackboneOption,
    method: Optional[str] = typer.Option(None, "--method", help=f"One of: {', '.join(METHODS.names())} (default lora)."),
    method_option: Optional[list[str]] = typer.Option(None, "--method-option", help="KEY=VALUE method hyperparameter, e.g. r=16."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML file with method, options and training (CLI flags override it)."),
    epochs: Optional[int] = typer.Option(None, "--epochs"),
    lr: Optional[float] = typer.Option(None, "--lr", help="Default: 2e-5 for full, 2e-3 for PEFT methods."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size"),
    max_length: Optional[int] = typer.Option(None, "--max-length"),
    max_train_samples: Optional[int] = typer.Option(None, "--max-train-samples"),
    seed: int = SeedOption,
    skip_empty: bool = SkipEmptyOption,
    num_labels: Optional[int] = NumLabelsOption,
    self_contained: bool = typer.Option(False, "--self-contained", help="Copy the backbone into the output folder, so the folder alone can move to another machine."),
    progress: bool = ProgressOption,
) -> None:
    file_config = load_finetune_yaml(config) if config else FineTuneFileConfig()
    chosen = method or file_config.method
    METHODS.get(chosen)
    options = {**file_config.options, **parse_key_values(method_option, "--method-option")}
    training = training_from_options(
        file_config.training, learning_rate=lr, epochs=epochs, batch_size=batch_size, max_length=max_length, max_train_samples=max_train_samples
    )
    check_output_place(out, "dir")  # before any compute: a bad --out fails now, not after training
    splits = load_splits(data, skip_empty=skip_empty, num_labels=num_labels)
    for note in splits.notes:
        info(f"note: {note}")
    result = finetune_victim(splits, backbone, chosen, options, training, seed, out, progress, self_contained=self_contained)
    r = result.train_result
    dev = "n/a" if r.best_dev_accuracy is None else f"{r.best_dev_accuracy:.3f}"
    info(f"{chosen}: best epoch {r.best_epoch}, dev accuracy {dev}, {r.trainable_parameters:,} trainable parameters, {r.seconds:.0f} s -> {out}")
