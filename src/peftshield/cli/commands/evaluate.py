"""``peftshield evaluate``: CA, ASR and confidences of a model; writes metrics.json."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer

from peftshield.cli.app import ProgressOption, RuntimeOption, SeedOption, SkipEmptyOption, NumLabelsOption, app, info
from peftshield.cli.commands.common import find_attack_manifest
from peftshield.data import load_splits
from peftshield.errors import ConfigError
from peftshield.experiments.options import parse_key_values
from peftshield.attacks import build_asr_set, check_target
from peftshield.defenses import PSIM
from peftshield.experiments.stages import TriggerChoice, evaluate_classifier, evaluate_defense, load_poisoned_test, trigger_of
from peftshield.finetune.checkpoint import load_classifier
from peftshield.io import atomic_write_json, check_output_place

@app.command(help="Evaluate a model: clean accuracy, attack success rate, target confidence on clean and triggered texts.")
def evaluate(
    model: Path = typer.Option(..., "--model", help="A fine-tuned model directory or a backbone directory."),
    data: str = typer.Option(..., "--data", help="Dataset whose test split is evaluated."),
    out: Optional[Path] = typer.Option(None, "--out", help="metrics.json path (default: MODEL/metrics.json)."),
    split: str = typer.Option("test", "--split"),
    trigger: Optional[str] = typer.Option(None, "--trigger", help="Trigger to test (default: the one in the backbone's attack.json)."),
    trigger_option: Optional[list[str]] = typer.Option(None, "--trigger-option"),
    poisoned_test: Optional[Path] = typer.Option(None, "--poisoned-test", help="A ready-made triggered test file (texts that already carry the trigger, e.g. HiddenKiller's syntactic test set) instead of inserting the trigger."),
    target: Optional[int] = typer.Option(None, "--target", help="Target label (default: from attack.json, else 0)."),
    batch_size: int = typer.Option(64, "--batch-size", min=1),
    max_length: int = typer.Option(128, "--max-length", min=8),
    defense: Optional[str] = typer.Option(None, "--defense", help="Also measure a defense in front of the model: psim."),
    psim_dir: Optional[Path] = typer.Option(None, "--psim", help="PSIM directory for --defense psim."),
    detector: Optional[list[Path]] = typer.Option(None, "--detector", help="Also measure a detector fitted for --model ('peftshield detector fit', "
                                                  "e.g. DAN or Shift) in front of it, at its own threshold (repeatable)."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="The backbone of --model (and --psim), if no longer where finetune.json recorded it."),
    seed: int = SeedOption,
    skip_empty: bool = SkipEmptyOption,
    num_labels: Optional[int] = NumLabelsOption,
    runtime: str = RuntimeOption,
    progress: bool = ProgressOption,
) -> None:
    started = time.perf_counter()
    if defense not in (None, "psim"):
        raise ConfigError(f"--defense '{defense}': only 'psim' can be applied to a saved model here")
    if defense == "psim" and psim_dir is None:
        raise ConfigError("--defense psim needs --psim DIR (train one with 'peftshield psim train')")
    if not model.is_dir():
        raise ConfigError(f"--model {model}: no such model directory")
    check_output_place(out or model / "metrics.json", "file")
    splits = load_splits(data, (split,), skip_empty=skip_empty, num_labels=num_labels)
    attack = find_attack_manifest(model) or {}
    recorded = trigger_of(attack)
    if trigger is None and recorded["name"] == "none" and poisoned_test is None:
        raise ConfigError("--trigger: the backbone was trained without a trigger; name one to test with --trigger, or pass --poisoned-test")
    trigger_name = trigger or (recorded["name"] if recorded["name"] != "none" else "badnet")
    options = dict(recorded["options"]) if trigger is None else {}
    options.update(parse_key_values(trigger_option, "--trigger-option"))
    target_label = target if target is not None else int(attack.get("target_label", 0))
    check_target(target_label, splits.num_labels)
    poisoner = None if poisoned_test is not None else TriggerChoice(trigger_name, options).build()
    if poisoner is not None and poisoner.draws_from_pool:
        raise ConfigError(f"--poisoned-test: the '{trigger_name}' trigger draws ready-made texts from a pool, which may hold "
                          "texts the attacker trained on; give a triggered test file")
    loaded = load_classifier(model, splits.num_labels, backbone)
    from peftshield.guard.detectors import detectors_for

    detectors = detectors_for(model, detector or [], backbone, victim=loaded, runtime=runtime)  # loaded (and refused, one line) before the victim is evaluated
    rng = np.random.default_rng(seed)
    test = splits[split]
    asr_set = load_poisoned_test(poisoned_test, target_label, skip_empty) if poisoned_test is not None else build_asr_set(test, poisoner, target_label, rng)
    metrics, clean_probs, poisoned_probs = evaluate_classifier(
        loaded.model, loaded.tokenizer, test, poisoner, target_label, rng, batch_size, max_length, progress, asr_set=asr_set
    )
    payload = {**metrics.to_dict(), "trigger": poisoner.spec() if poisoner else {"poisoned_test": str(poisoned_test)},
               "model": str(model), "data": splits.source}
    if defense == "psim":
        report = evaluate_defense(PSIM.load(psim_dir, backbone=backbone, runtime=runtime), test, asr_set, clean_probs, poisoned_probs, target_label, metrics, progress)
        payload.update({k: report[k] for k in ("defended_clean_accuracy", "defended_attack_success_rate", "detection", "score_seconds")})
        payload["defense"] = "psim"
    if detectors:
        payload["detectors"] = {}
        for loaded_detector in detectors:  # through the guard's own scoring: a score that is not a number fires
            report = evaluate_defense(loaded_detector, test, asr_set, clean_probs, poisoned_probs, target_label, metrics, progress)
            payload["detectors"][loaded_detector.name] = {k: report[k] for k in ("defended_clean_accuracy", "defended_attack_success_rate",
                                                                                  "detection", "score_seconds")}
    payload["seconds"] = time.perf_counter() - started
    destination = out or (model / "metrics.json")
    atomic_write_json(destination, payload)
    if defense == "psim":
        info(f"with PSIM: defended CA {payload['defended_clean_accuracy']:.3f}, defended ASR {payload['defended_attack_success_rate']:.3f}, AUROC {payload['detection']['auroc']:.3f}")
    for name, report in payload.get("detectors", {}).items():
        info(f"with {name}: defended CA {report['defended_clean_accuracy']:.3f}, defended ASR {report['defended_attack_success_rate']:.3f}, "
             f"AUROC {report['detection']['auroc']:.3f}, FRR {report['detection']['frr']:.3f}")
    info(
        f"CA {metrics.clean_accuracy:.3f}  ASR {metrics.attack_success_rate:.3f}  "
        f"target confidence: triggered {metrics.target_confidence_poisoned:.3f}, clean {metrics.target_confidence_clean:.3f} -> {destination}"
    )
