"""Reference: compare the victim with a model the defender trusts.

The defender trains their own classifier for the task (LoRA, on their training texts with their
true labels) on a backbone they trust: the publisher's original model, say, rather than the
downloaded checkpoint (offline here: the packaged MiniLM). A trigger makes the victim predict
the target class for a text whose content says otherwise, so the trusted model disagrees: the
score is the victim's probability of its predicted class minus the trusted model's probability
of that class. Clean texts on which both models learned the task score near 0 whatever makes the
victim's backdoor fire (a word, a sentence, a syntactic template, a low confidence), which is
what this filter is for; its blind spot is a triggered text whose content already agrees with
the target. The threshold is calibrated on clean dev texts (1% FRR by default).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
from pydantic import Field, PositiveFloat, PositiveInt

from peftshield.defenses.base import DEFENSES, Defense, DefenseContext, victim_of
from peftshield.defenses.thresholds import AUTO_POLICY, ThresholdPolicy
from peftshield.errors import ConfigError
from peftshield.finetune import METHODS, TrainingConfig, load_finetuned, save_finetuned, seed_torch, train_classifier
from peftshield.io import read_json
from peftshield.models import load_backbone
from peftshield.models.inference import predict_proba

REFERENCE_KEY = "reference_defense"


@DEFENSES.register
class Reference(Defense):
    """Disagreement with a classifier trained on a trusted backbone: victim's confidence minus the trusted model's, on the victim's class."""

    name = "reference"
    needs_victim = True
    default_threshold = AUTO_POLICY

    def __init__(self, backbone: str = "minilm", method: str = "lora", learning_rate: Optional[PositiveFloat] = None,
                 epochs: PositiveInt = 2, max_train_samples: Optional[PositiveInt] = 1000, max_length: Annotated[int, Field(ge=8)] = 128,
                 batch_size: PositiveInt = 128, threshold: Optional[ThresholdPolicy] = None) -> None:
        self.backbone = backbone
        self.method = method
        self.learning_rate = learning_rate
        self.epochs = epochs
        self.max_train_samples = max_train_samples
        self.max_length = max_length
        self.batch_size = batch_size
        self.threshold = threshold

    def fit(self, context: DefenseContext, rng: np.random.Generator) -> "Reference":
        started = time.perf_counter()
        self.victim_, self.victim_tokenizer_ = victim_of(self.name, context)
        training = TrainingConfig(learning_rate=self.learning_rate, epochs=self.epochs, max_length=self.max_length,
                                  max_train_samples=self.max_train_samples)
        seed_torch(int(rng.integers(0, 2**31 - 1)))
        trusted = load_backbone(self.backbone, context.num_labels)
        method = METHODS.create(self.method)
        self.model_, _ = train_classifier(trusted.model, trusted.tokenizer, context.train, context.dev, method, training, rng,
                                          context.progress, label="reference")
        self.tokenizer_, self.num_labels_, self.method_config_ = trusted.tokenizer, context.num_labels, method.config_dict()
        self.calibrate(context.num_labels, self.dev_scores(context), default=0.5)
        self.fit_seconds_ = time.perf_counter() - started
        return self

    def score(self, texts: list[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros(0)
        victim = predict_proba(self.victim_, self.victim_tokenizer_, texts, self.batch_size, self.max_length)
        trusted = predict_proba(self.model_, self.tokenizer_, texts, self.batch_size, self.max_length)
        predicted = victim.argmax(axis=1)
        rows = np.arange(len(texts))
        return victim[rows, predicted] - trusted[rows, predicted]

    def save(self, directory: str | Path) -> Path:
        return save_finetuned(self.model_, self.tokenizer_, directory, {
            "method": self.method, "options": self.method_config_, "backbone": self.backbone, "num_labels": self.num_labels_,
            REFERENCE_KEY: {"defense": self.spec(), "threshold": self.threshold_}})

    @classmethod
    def load(cls, directory: str | Path, context: DefenseContext | None = None) -> "Reference":
        from peftshield.files import FINETUNE_MANIFEST

        manifest_path = Path(directory) / FINETUNE_MANIFEST
        manifest = read_json(manifest_path) if manifest_path.is_file() else {}
        if REFERENCE_KEY not in manifest:
            raise ConfigError(f"{directory}: not a saved 'reference' defense")
        defense = DEFENSES.from_spec(manifest[REFERENCE_KEY]["defense"])
        loaded, _ = load_finetuned(directory)
        defense.model_, defense.tokenizer_ = loaded.model, loaded.tokenizer
        defense.num_labels_, defense.method_config_ = manifest["num_labels"], manifest["options"]
        defense.victim_, defense.victim_tokenizer_ = victim_of(cls.name, context)
        defense.threshold_ = manifest[REFERENCE_KEY]["threshold"]
        return defense
