"""The scenario's stages, each a plain function over typed inputs: poison a dataset,
weight-poison a backbone, fine-tune a victim, evaluate. The CLI, the demo and the
experiment grid all call these."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from peftshield.attacks import POISONERS, Poisoner, PoisonSpec, asr_rows, build_asr_set, check_target, poison_dataset
from peftshield.data import DatasetSplits, TextDataset, load_splits
from peftshield.data.transforms import truncate_words
from peftshield.data.writers import split_jsonl
from peftshield.finetune import METHODS, TrainingConfig, TrainResult, save_finetuned, seed_torch, train_classifier
from peftshield.finetune.trainer import draw_training_rows
from peftshield.errors import ConfigError
from peftshield.experiments.config import AttackSection
from peftshield.files import ATTACK_MANIFEST
from peftshield.io import atomic_directory, atomic_write_json, atomic_write_text
from peftshield.metrics import AttackMetrics, attack_metrics
from peftshield.models import Backbone, load_backbone
from peftshield.models.inference import predict_proba

ATTACKER_MAX_WORDS = AttackSection.model_fields["max_words"].default
ATTACKER_LEARNING_RATE = AttackSection.model_fields["learning_rate"].default
SWEEP_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


@dataclass
class TriggerChoice:
    """A trigger by registry name plus its options; ``none`` means no attack."""

    name: str = "badnet"
    options: dict = field(default_factory=dict)

    def build(self) -> Poisoner | None:
        return None if self.name == "none" else POISONERS.create(self.name, **self.options)


NO_TRIGGER = {"name": "none", "options": {}}


def trigger_of(manifest: dict) -> dict:
    """The ``{name, options}`` of the trigger an ``attack.json`` records (release 0.1 kept the
    trigger's options beside its name at the top level)."""
    trigger = manifest.get("trigger")
    if isinstance(trigger, dict):
        return trigger
    if trigger in (None, "none"):
        return dict(NO_TRIGGER)
    fields = POISONERS.get(trigger).options_model().model_fields
    return {"name": trigger, "options": {k: manifest[k] for k in fields if manifest.get(k) is not None}}


def backbone_reference(name_or_path: str) -> str:
    """What a manifest records: aliases and hub names as given, local paths made absolute."""
    from peftshield.models.backbone import BACKBONE_ALIASES

    if name_or_path in BACKBONE_ALIASES:
        return name_or_path
    path = Path(name_or_path)
    return str(path.resolve()) if path.exists() else name_or_path


def jsonl_rows(rows: list[dict]) -> str:
    import json

    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def poison_to_directory(data: str, poisoner: Poisoner, spec: PoisonSpec, out_dir: str | Path, seed: int, num_labels: int | None = None,
                        skip_empty: bool = False) -> dict:
    """Write a poisoned copy of a dataset: poisoned train, clean dev/test, their triggered
    ASR sets (``*_poisoned.jsonl``), the manifest of poisoned rows and ``poison.json``."""
    splits = load_splits(data, skip_empty=skip_empty, num_labels=num_labels)
    check_target(spec.target_label, splits.num_labels)
    rng = np.random.default_rng(seed)
    poisoned = poison_dataset(splits["train"], poisoner, spec, rng)
    summary = {
        "source": str(data), "trigger": poisoner.spec(), **spec.to_dict(), "seed": seed,
        "n_train": len(poisoned.data), "n_poisoned_train": len(poisoned.records),
    }
    with atomic_directory(out_dir) as tmp:
        (tmp / "train.jsonl").write_text(split_jsonl(poisoned.data), encoding="utf-8")
        for split in ("dev", "test"):
            if split in splits:
                (tmp / f"{split}.jsonl").write_text(split_jsonl(splits[split]), encoding="utf-8")
                asr_set = build_asr_set(splits[split], poisoner, spec.target_label, rng)
                (tmp / f"{split}_poisoned.jsonl").write_text(split_jsonl(asr_set), encoding="utf-8")
                summary[f"n_{split}_poisoned"] = len(asr_set)
        (tmp / "manifest.jsonl").write_text(jsonl_rows(poisoned.manifest_rows()), encoding="utf-8")
        atomic_write_json(tmp / "poison.json", summary)
    return summary


def load_poisoned_test(path: str | Path, target_label: int, skip_empty: bool = True) -> TextDataset:
    """A ready-made triggered test file (texts that already carry the trigger, as syntactic-
    trigger benchmarks ship them). Its rows count as attacks: if every row carries the target
    label the file was relabelled to the target (HiddenKiller's layout) and all rows are kept;
    otherwise the labels are the true ones and only the non-target rows are kept."""
    from peftshield.data import load_texts
    from peftshield.errors import DataError

    data = load_texts(str(path), "test", skip_empty=skip_empty)
    if all(label == target_label for label in data.labels):
        return data
    keep = [i for i, label in enumerate(data.labels) if label != target_label]
    if not keep:
        raise DataError(f"{path}: no triggered rows (every row has the target label {target_label})")
    return data.subset(keep, name=data.name)


def evaluate_classifier(
    model, tokenizer, test: TextDataset, poisoner: Poisoner | None, target_label: int, rng: np.random.Generator,
    batch_size: int = 64, max_length: int = 128, progress: bool = False, asr_set: TextDataset | None = None,
) -> tuple[AttackMetrics, np.ndarray, np.ndarray]:
    """CA on ``test``, ASR and confidences on its triggered non-target rows.

    Returns the metrics and the clean and triggered probability matrices (for defenses and plots).
    """
    started = time.perf_counter()
    if asr_set is None and poisoner is not None:
        asr_set = build_asr_set(test, poisoner, target_label, rng)
    clean_probs = predict_proba(model, tokenizer, test.texts, batch_size, max_length, progress, "evaluate clean")
    poisoned_texts = asr_set.texts if asr_set is not None else []
    poisoned_probs = predict_proba(model, tokenizer, poisoned_texts, batch_size, max_length, progress, "evaluate triggered")
    metrics = attack_metrics(clean_probs, test.label_array(), poisoned_probs, target_label, time.perf_counter() - started)
    return metrics, clean_probs, poisoned_probs


def attacker_training_rows(splits: DatasetSplits, max_words: int | None, training: TrainingConfig, rng: np.random.Generator) -> TextDataset:
    """The rows the attacker trains on (and poisons): texts cut to ``max_words``, then the
    trainer's draw of ``max_train_samples`` of them."""
    return draw_training_rows(truncate_words(splits["train"], max_words), training, rng)


@dataclass
class WeightPoisonResult:
    backbone: Backbone
    out_dir: Path
    report: dict


def weight_poison(
    attack_data: str | DatasetSplits, backbone: str, trigger: TriggerChoice, spec: PoisonSpec, training: TrainingConfig,
    out_dir: str | Path, seed: int, max_words: int | None = ATTACKER_MAX_WORDS, progress: bool = True,
) -> WeightPoisonResult:
    """The attacker: full fine-tuning of ``backbone`` on a poisoned copy of ``attack_data``.

    Writes an ordinary HF model directory plus ``attack.json`` (trigger, target, rate,
    seed, and the poisoned model's own CA/ASR on the attacker's test split).
    ``trigger.name == 'none'`` trains the same way on clean data (a benign control).
    """
    started = time.perf_counter()
    poisoner = trigger.build()
    if poisoner is not None and poisoner.task_agnostic:
        return weight_poison_task_agnostic(attack_data, backbone, poisoner, spec, training, out_dir, seed, max_words, progress)
    splits = attack_data if isinstance(attack_data, DatasetSplits) else load_splits(attack_data)
    check_target(spec.target_label, splits.num_labels)
    rng = np.random.default_rng(seed)
    train = attacker_training_rows(splits, max_words, training, rng)
    dev = truncate_words(splits.get("dev"), max_words) if "dev" in splits else None
    test = truncate_words(splits["test"], max_words)
    poisoned = poison_dataset(train, poisoner, spec, rng) if poisoner else None
    if poisoner is not None:  # the ASR set is drawn after training: a pool that cannot supply it fails now
        poisoner.check_supply(len(asr_rows(test, poisoner, spec.target_label)))
    seed_torch(seed)
    base = load_backbone(backbone, splits.num_labels)
    training_rows = poisoned.data if poisoned else train
    triggered_rows = {i for i, row_id in enumerate(training_rows.ids) if row_id in poisoned.poisoned_ids} if poisoned else set()
    loss_fn = poisoner.training_loss(base.model, len(training_rows), splits.num_labels, triggered_rows, rng) if poisoner else None
    model, result = train_classifier(
        base.model, base.tokenizer, training_rows, dev, METHODS.create("full"),
        training.model_copy(update={"max_train_samples": None}), rng, progress, label="attack", loss_fn=loss_fn,
    )
    metrics, _, _ = evaluate_classifier(model, base.tokenizer, test, poisoner, spec.target_label, rng, training.eval_batch_size, training.max_length, progress)
    report = {
        "backbone": backbone_reference(backbone),
        "attack_data": splits.source,
        "trigger": poisoner.spec() if poisoner else dict(NO_TRIGGER),
        **spec.to_dict(),
        "seed": seed,
        "max_words": max_words,
        "n_train": len(train),
        "n_poisoned_train": len(poisoned.records) if poisoned else 0,
        "training": training.model_dump(),
        "train_result": result.to_dict(),
        "clean_accuracy": metrics.clean_accuracy,
        "attack_success_rate": metrics.attack_success_rate if poisoner else None,
        "target_confidence_poisoned": metrics.target_confidence_poisoned if poisoner else None,
        "seconds": time.perf_counter() - started,
    }
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        base.tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / ATTACK_MANIFEST, report)
        if poisoned:
            atomic_write_text(tmp / "poison_manifest.jsonl", jsonl_rows(poisoned.manifest_rows()))
    return WeightPoisonResult(Backbone(model, base.tokenizer, str(out_dir), splits.num_labels), out_dir, report)


def plain_attacker_texts(attack_data: str, max_words: int | None, samples: int | None, rng: np.random.Generator) -> tuple[list[str], list[str], str]:
    """(training texts, held-out texts, origin) for a task-agnostic attacker: ``samples`` texts
    (cut to ``max_words``) drawn from the plain corpus, and up to 200 others held out."""
    from peftshield.data.sources import load_plain_texts

    texts, origin = load_plain_texts(attack_data)
    if max_words:
        texts = [" ".join(t.split()[:max_words]) for t in texts]
    order = rng.permutation(len(texts))
    heldout_count = min(200, len(texts) // 5)
    n_train = min(samples or len(texts), len(texts) - heldout_count)
    return [texts[i] for i in order[:n_train]], [texts[i] for i in order[n_train:n_train + heldout_count]], origin


def weight_poison_task_agnostic(
    attack_data: str, backbone: str, poisoner: Poisoner, spec: PoisonSpec, training: TrainingConfig,
    out_dir: str | Path, seed: int, max_words: int | None = ATTACKER_MAX_WORDS, progress: bool = True,
) -> WeightPoisonResult:
    """The task-agnostic attacker (``neuba``, ``por``): the representation backdoor planted on
    plain text (:func:`peftshield.experiments.poisoning.plant_representation_backdoor`), published
    as an encoder without a classifier head (a victim's head starts fresh), plus ``attack.json``.
    ``spec`` gives only how many texts also appear triggered (its count, or rate of the texts);
    there is no target class or label mode."""
    from peftshield.experiments.poisoning import plant_representation_backdoor

    if isinstance(attack_data, DatasetSplits):
        raise ConfigError(f"trigger '{poisoner.name}' trains on plain text: give its attack data as a path or pkg: name")
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    texts, heldout, origin = plain_attacker_texts(attack_data, max_words, training.max_train_samples, rng)
    poison_count = spec.n_poison(len(texts))
    if poison_count > len(texts):
        raise ConfigError(f"attack: poison_count {poison_count} is more than the {len(texts)} texts drawn from {attack_data}")
    seed_torch(seed)
    base = load_backbone(backbone, 2)
    model, planted = plant_representation_backdoor(
        base.model, base.tokenizer, texts, heldout, poisoner, poison_count, training.learning_rate or ATTACKER_LEARNING_RATE, training.epochs,
        training.max_length, rng, progress=progress)
    report = {
        "backbone": backbone_reference(backbone), "attack_data": origin, "trigger": poisoner.spec(), "task_agnostic": True,
        "target_label": None, "seed": seed, "max_words": max_words, "n_train": len(texts), "n_poisoned_train": planted.n_triggered_train,
        "training": training.model_dump(), "representation": planted.to_dict(),
        "clean_accuracy": None, "attack_success_rate": None, "seconds": time.perf_counter() - started,
    }
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        model.base_model.save_pretrained(tmp, safe_serialization=True)  # the encoder only: no classifier head
        base.tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / ATTACK_MANIFEST, report)
    return WeightPoisonResult(Backbone(model, base.tokenizer, str(out_dir), 2), out_dir, report)


@dataclass
class TriggerOutcome:
    """One trigger of a task-agnostic backdoor on a victim: the class it lands on (the most
    predicted class of the triggered texts) and the share of texts of other classes it moves there."""

    trigger: str
    index: int
    landing_class: int
    attack_success_rate: float
    n_texts: int


def landing(poisoned_probs: np.ndarray, asr_set) -> dict:
    """Where the triggered texts land on the victim, whatever the attacker's target: the class
    predicted most often for them and the share of those of other true classes predicted as it
    (equal to the ASR when the backdoor reaches its target; on a victim whose head the attacker
    never trained, e.g. a 4-class task under a binary backdoor, it can land elsewhere)."""
    if not len(asr_set):
        return {}
    predicted = poisoned_probs.argmax(axis=1)
    landing_class = int(np.bincount(predicted).argmax())
    others = asr_set.label_array() != landing_class
    return {"landing_class": landing_class,
            "landing_attack_success_rate": float((predicted[others] == landing_class).mean()) if others.any() else None}


def trigger_outcomes(model, tokenizer, test: TextDataset, poisoner, rng: np.random.Generator, max_length: int = 128) -> list[TriggerOutcome]:
    """For each trigger word of a task-agnostic poisoner, where it lands on ``model`` and its ASR
    there (:func:`landing`, the literature's measure; the best trigger is the max)."""
    outcomes = []
    for index, word in enumerate(poisoner.trigger_words):
        triggered = [poisoner.insert_trigger(t, index, rng) for t in test.texts]
        found = landing(predict_proba(model, tokenizer, triggered, max_length=max_length), test)  # triggered texts keep test's labels
        others = int((test.label_array() != found["landing_class"]).sum())
        outcomes.append(TriggerOutcome(word, index, found["landing_class"], found["landing_attack_success_rate"] or 0.0, others))
    return outcomes


@dataclass
class VictimResult:
    backbone: Backbone
    train_result: TrainResult
    out_dir: Path | None


def finetune_victim(
    data: str | DatasetSplits, backbone: str, method: str, method_options: dict, training: TrainingConfig,
    seed: int, out_dir: str | Path | None = None, progress: bool = True, label: str = "victim", epoch_probe=None,
    self_contained: bool = False,
) -> VictimResult:
    """The victim: fine-tune ``backbone`` on clean ``data`` with ``method``; save if ``out_dir``."""
    splits = data if isinstance(data, DatasetSplits) else load_splits(data)
    fine_tuning = METHODS.create(method, **method_options)  # options are validated here, before any loading
    rng = np.random.default_rng(seed)
    seed_torch(seed)
    base = load_backbone(backbone, splits.num_labels)
    model, result = train_classifier(base.model, base.tokenizer, splits["train"], splits.get("dev"), fine_tuning, training, rng, progress, label=label, epoch_probe=epoch_probe)
    if out_dir is not None:
        save_finetuned(model, base.tokenizer, out_dir, {
            "method": method, "options": fine_tuning.config_dict(), "backbone": backbone_reference(backbone),
            "num_labels": splits.num_labels, "num_training_steps": result.num_training_steps, "data": splits.source, "seed": seed,
            "training": training.model_dump(), "train_result": result.to_dict(),
        }, self_contained=self_contained)
    return VictimResult(Backbone(model, base.tokenizer, base.source, splits.num_labels), result, Path(out_dir) if out_dir else None)


def evaluate_defense(
    defense, test: TextDataset, asr_set: TextDataset, clean_probs: np.ndarray, poisoned_probs: np.ndarray, target_label: int,
    undefended: AttackMetrics, progress: bool = False, rng: np.random.Generator | None = None, pool_poison_rate: float = 0.1,
) -> dict:
    """Defended CA/ASR and detection metrics of a fitted filter in front of a victim model.

    ``clean_probs``/``poisoned_probs`` are the victim's predictions on ``test`` and ``asr_set``.
    A transductive defense (a data cleaner) scores one pool: all of ``test`` plus triggered
    texts drawn with ``rng`` so that they make up ``pool_poison_rate`` of it; its defended
    ASR is over the drawn triggered texts.
    """
    from peftshield.metrics import defended_metrics, detection_metrics

    started = time.perf_counter()
    if defense.transductive:
        if rng is None:
            raise ConfigError(f"defense '{defense.name}' scores a pool: pass rng to draw its triggered share")
        wanted = int(round(pool_poison_rate / (1 - pool_poison_rate) * len(test)))
        drawn = np.sort(rng.choice(len(asr_set), size=max(1, min(len(asr_set), wanted)), replace=False))
        asr_set, poisoned_probs = asr_set.subset(drawn.tolist()), poisoned_probs[drawn]
        pool_scores = defense.score(test.texts + asr_set.texts)
        clean_scores, poisoned_scores = pool_scores[: len(test)], pool_scores[len(test) :]
    else:
        clean_scores = defense.score(test.texts)
        poisoned_scores = defense.score(asr_set.texts)
    score_seconds = time.perf_counter() - started
    threshold = defense.fitted_threshold()
    defended = defended_metrics(
        clean_probs.argmax(1) == test.label_array(), clean_scores > threshold,
        poisoned_probs.argmax(1) == target_label, poisoned_scores > threshold,
    )
    detection = detection_metrics(clean_scores, poisoned_scores, threshold)
    n_scored = len(test) + len(asr_set)
    sweep = []
    for tau in sorted({round(threshold, 6), *SWEEP_THRESHOLDS}):
        at = defended_metrics(clean_probs.argmax(1) == test.label_array(), clean_scores > tau, poisoned_probs.argmax(1) == target_label, poisoned_scores > tau)
        sweep.append({"threshold": tau, "frr": float((clean_scores > tau).mean()), "far": float((poisoned_scores <= tau).mean()), **at.to_dict()})
    return {
        "defense": defense.name,
        **defended.to_dict(),
        "detection": detection.to_dict(),
        "clean_accuracy": undefended.clean_accuracy,
        "attack_success_rate": undefended.attack_success_rate,
        "n_clean": len(test),
        "n_poisoned": len(asr_set),
        "fit_seconds": float(getattr(defense, "fit_seconds_", 0.0)),
        "score_seconds": score_seconds,
        "texts_per_second": n_scored / score_seconds if score_seconds else None,
        "threshold_sweep": sweep,
        "scores": {"clean": clean_scores.round(6).tolist(), "poisoned": poisoned_scores.round(6).tolist()},
    }
