"""PSIM, the Poisoned Sample Identification Module.

Train a PEFT module on the (possibly weight-poisoned) backbone with the training labels
reset uniformly at random. The labels carry no signal, so the module learns no task and
clean texts get low, near-uniform confidence; a backdoor in the frozen weights still
fires, so triggered texts keep extreme confidence. A text whose maximum softmax
probability exceeds the threshold is flagged as poisoned.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from peftshield.data.records import TextDataset
from peftshield.defenses.base import DEFENSES, Defense, DefenseContext
from peftshield.defenses.thresholds import ThresholdPolicy
from peftshield.finetune import METHODS, TrainingConfig, load_finetuned, save_finetuned, seed_torch, train_classifier
from peftshield.io import read_json
from peftshield.models import load_backbone
from peftshield.models.inference import predict_proba

PSIM_MANIFEST_KEY = "psim"


def random_label_reset(data: TextDataset, num_labels: int, rng: np.random.Generator) -> TextDataset:
    """The same texts with labels drawn uniformly at random from ``0..num_labels-1``."""
    labels = rng.integers(0, num_labels, size=len(data)).tolist()
    return TextDataset(list(data.texts), labels, list(data.ids), name=f"{data.name}_random_labels")


@DEFENSES.register
class PSIM(Defense):
    """PEFT module trained on randomly relabelled data; flags texts it is too confident about.

    Defaults (P-tuning, lr 2e-5, 1 epoch, threshold calibrated to 1% FRR on clean dev data)
    are the best of the methods compared in bench/psim_methods.md."""

    name = "psim"

    def __init__(
        self, method: str = "ptuning", method_options: dict | None = None, learning_rate: float = 2e-5, epochs: int = 1,
        batch_size: int = 32, max_train_samples: int | None = 2000, max_length: int = 128,
        threshold: ThresholdPolicy | None = None, score_batch_size: int = 128,
    ) -> None:
        self.method = method
        self.method_options = method_options
        self.learning_rate = learning_rate
        self.epochs = epochs
        self.batch_size = batch_size
        self.max_train_samples = max_train_samples
        self.max_length = max_length
        self.threshold = threshold
        self.score_batch_size = score_batch_size

    def fit(self, context: DefenseContext, rng: np.random.Generator) -> "PSIM":
        started = time.perf_counter()
        method = METHODS.create(self.method, **(self.method_options or {}))
        training = TrainingConfig(
            learning_rate=self.learning_rate, epochs=self.epochs, batch_size=self.batch_size, max_length=self.max_length, select_on_dev=False
        )
        train = random_label_reset(context.train.sample(self.max_train_samples, rng), context.num_labels, rng)
        seed_torch(int(rng.integers(0, 2**31 - 1)))
        base = load_backbone(context.backbone, context.num_labels)
        self.model_, self.train_result_ = train_classifier(base.model, base.tokenizer, train, None, method, training, rng, context.progress, label="psim")
        self.tokenizer_ = base.tokenizer
        self.backbone_, self.num_labels_ = context.backbone, context.num_labels
        self.method_config_ = method.config_dict()
        self.num_training_steps_ = ((len(train) + self.batch_size - 1) // self.batch_size) * self.epochs
        dev_scores = self.score(context.dev.texts) if context.dev is not None and len(context.dev) else None
        self.threshold_ = (self.threshold or ThresholdPolicy()).resolve(context.num_labels, dev_scores)
        self.fit_seconds_ = time.perf_counter() - started
        return self

    def predict_proba(self, texts: list[str], progress: bool = False) -> np.ndarray:
        return predict_proba(self.model_, self.tokenizer_, texts, self.score_batch_size, self.max_length, progress, "psim scan")

    def score(self, texts: list[str], progress: bool = False) -> np.ndarray:
        return self.predict_proba(texts, progress).max(axis=1)

    def save(self, directory: str | Path) -> Path:
        policy = self.threshold or ThresholdPolicy()
        return save_finetuned(self.model_, self.tokenizer_, directory, {
            "method": self.method, "options": self.method_config_, "backbone": self.backbone_, "num_labels": self.num_labels_,
            "num_training_steps": self.num_training_steps_,
            PSIM_MANIFEST_KEY: {
                "learning_rate": self.learning_rate, "epochs": self.epochs, "batch_size": self.batch_size,
                "max_train_samples": self.max_train_samples, "max_length": self.max_length, "score_batch_size": self.score_batch_size,
                "threshold_policy": {"kind": policy.kind, "value": policy.value, "target_frr": policy.target_frr},
                "threshold": self.threshold_, "train_result": self.train_result_.to_dict(),
            },
        })

    @classmethod
    def load(cls, directory: str | Path, context: DefenseContext | None = None) -> "PSIM":
        from peftshield.errors import ConfigError
        from peftshield.finetune.checkpoint import MANIFEST_FILE

        directory = Path(directory)
        manifest = read_json(directory / MANIFEST_FILE) if (directory / MANIFEST_FILE).is_file() else {}
        if PSIM_MANIFEST_KEY not in manifest:
            raise ConfigError(f"--psim {directory}: not a PSIM directory (train one with 'peftshield psim train')")
        saved = manifest[PSIM_MANIFEST_KEY]
        policy = ThresholdPolicy(**saved["threshold_policy"])
        psim = cls(manifest["method"], manifest["options"], saved["learning_rate"], saved["epochs"], saved["batch_size"],
                   saved["max_train_samples"], saved["max_length"], policy, saved["score_batch_size"])
        backbone, _ = load_finetuned(directory)
        psim.model_, psim.tokenizer_ = backbone.model, backbone.tokenizer
        psim.backbone_, psim.num_labels_ = manifest["backbone"], manifest["num_labels"]
        psim.method_config_, psim.num_training_steps_ = manifest["options"], manifest["num_training_steps"]
        psim.threshold_ = saved["threshold"]
        return psim
