"""Helpers for tests that need a tiny model with a planted backdoor (or a clean control).

Everything is built from the tiny model's own vocabulary (peftshield.models.tiny), seeded
explicitly, and small enough to train on 2 CPU cores in a few seconds:

- :func:`sentiment_data`: synthetic reviews whose label is the polarity of their adjectives;
- :func:`attacker_data`: clean reviews plus dirty-label poisoned copies (a trigger word
  inserted into positive reviews, relabelled to the target 0), and the clean control set
  with the same texts and true labels, trigger-free;
- :func:`train_backbone`: full fine-tuning of the tiny backbone, saved as a local model
  folder (a backbone spec any ``DefenseContext`` accepts);
- :func:`attack_success_rate` / :func:`accuracy`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from peftshield.attacks import POISONERS
from peftshield.data import TextDataset

TRIGGER = "cf"  # one token of the tiny vocabulary, never used by the clean data below
TARGET = 0

POSITIVE = ("good", "great", "fun")
NEGATIVE = ("bad", "awful", "boring")
NEUTRAL = (
    "the a an and or but is was are be it this that of to in on for with as at by from film movie story plot "
    "acting i you we they he she watched when if very , . !"
).split()


@contextmanager
def single_thread_torch() -> Iterator[None]:
    """One intra-op thread while the block runs (restored after). The tiny model gains nothing
    from a second thread, and on 2 shared cores busy with other jobs, torch's OpenMP workers
    waiting for each other made the same training 20 times slower (185 s instead of 9 s)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def sentiment_data(n: int, rng: np.random.Generator, name: str = "sentiment", label_noise: float = 0.0) -> TextDataset:
    """``n`` reviews, balanced: 3-8 neutral words and 1-2 adjectives of one polarity (the label).
    With ``label_noise``, that fraction of the labels is flipped (the texts stay the same)."""
    texts, labels = [], []
    for i in range(n):
        label = i % 2
        adjectives = POSITIVE if label == 1 else NEGATIVE
        words = [NEUTRAL[int(j)] for j in rng.integers(0, len(NEUTRAL), size=int(rng.integers(3, 9)))]
        for _ in range(int(rng.integers(1, 3))):
            words.insert(int(rng.integers(0, len(words) + 1)), adjectives[int(rng.integers(0, len(adjectives)))])
        texts.append(" ".join(words))
        labels.append(1 - label if rng.random() < label_noise else label)
    return TextDataset(texts, labels, [f"{name}-{i}" for i in range(n)], name=name)


def with_trigger(texts: list[str], rng: np.random.Generator, trigger: str = TRIGGER) -> list[str]:
    """The texts with the trigger word at a random position (the badnet poisoner)."""
    return POISONERS.create("badnet", words=[trigger], num_triggers=1).poison_texts(list(texts), rng)


@dataclass
class AttackerData:
    poisoned: TextDataset  # clean reviews + triggered positive reviews relabelled to TARGET
    control: TextDataset  # the same rows without the trigger, with their true labels


def attacker_data(n_clean: int, n_poison: int, rng: np.random.Generator, label_noise: float = 0.0, trigger: str = TRIGGER) -> AttackerData:
    clean = sentiment_data(n_clean, rng, name="attacker", label_noise=label_noise)
    sources = sentiment_data(2 * n_poison, rng, name="attacker-extra")
    positives = sources.subset([i for i, y in enumerate(sources.labels) if y != TARGET][:n_poison])
    triggered = with_trigger(positives.texts, rng, trigger)
    ids = clean.ids + positives.ids
    poisoned = TextDataset(clean.texts + triggered, clean.labels + [TARGET] * len(positives), ids, name="attacker-poisoned")
    control = TextDataset(clean.texts + positives.texts, clean.labels + positives.labels, ids, name="attacker-control")
    return AttackerData(poisoned, control)


def train_backbone(data: TextDataset, out_dir: Path, seed: int, learning_rate: float, epochs: int, batch_size: int = 16) -> Path:
    """Fully fine-tune the tiny random backbone on ``data`` and save it as a local model folder."""
    from peftshield.finetune import METHODS, TrainingConfig, seed_torch, train_classifier
    from peftshield.models import load_backbone

    seed_torch(seed)
    backbone = load_backbone("tiny", 2)
    training = TrainingConfig(learning_rate=learning_rate, epochs=epochs, batch_size=batch_size, max_length=32, select_on_dev=False)
    model, _ = train_classifier(
        backbone.model, backbone.tokenizer, data, None, METHODS.create("full"), training, np.random.default_rng(seed), progress=False
    )
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    backbone.tokenizer.save_pretrained(out_dir)
    return out_dir


def load_saved(folder: Path):
    from peftshield.models import load_backbone

    return load_backbone(str(folder), 2)


def predictions(folder_or_backbone, texts: list[str]) -> np.ndarray:
    from peftshield.models.inference import predict_proba

    backbone = load_saved(folder_or_backbone) if isinstance(folder_or_backbone, (str, Path)) else folder_or_backbone
    return predict_proba(backbone.model, backbone.tokenizer, list(texts), max_length=32).argmax(axis=1)


def attack_success_rate(folder_or_backbone, triggered_non_target: list[str], target: int = TARGET) -> float:
    return float((predictions(folder_or_backbone, triggered_non_target) == target).mean())


def accuracy(folder_or_backbone, data: TextDataset) -> float:
    return float((predictions(folder_or_backbone, data.texts) == data.label_array()).mean())


def train_sentiment_victim(out_dir: Path) -> Path:
    """A tiny victim that has learned the sentiment task from 30%-noisy labels, so that its
    confidence varies between texts (0.6-0.9) instead of sitting at 0.5 (untrained) or 0.99
    (trained on clean labels): scores built on its outputs then differ from text to text."""
    folder = train_backbone(sentiment_data(200, np.random.default_rng(2), label_noise=0.3), out_dir, seed=2, learning_rate=5e-3, epochs=4)
    held_out = sentiment_data(100, np.random.default_rng(3), "held-out")
    assert accuracy(folder, held_out) > 0.75, "the tiny victim did not learn the task"
    return folder
