"""PSIM, the Poisoned Sample Identification Module.

Train a PEFT module on the (possibly weight-poisoned) backbone with the training labels
reset uniformly at random. The labels carry no signal, so the module learns no task and
clean texts get low, near-uniform confidence; a backdoor in the frozen weights still
fires, so triggered texts keep extreme confidence. A text whose maximum softmax
probability exceeds the threshold is flagged as poisoned.
"""

from __future__ import annotations

from typing import Annotated, Optional

import time
from pathlib import Path

import numpy as np
from pydantic import Field, PositiveFloat, PositiveInt

from peftshield.data.records import TextDataset
from peftshield.defenses.base import DEFENSES, Defense, DefenseContext
from peftshield.defenses.thresholds import AUTO_POLICY, ThresholdPolicy, check_confidence_threshold
from peftshield.finetune import METHODS, TrainingConfig, load_finetuned, save_finetuned, seed_torch, train_classifier
from peftshield.finetune.checkpoint import model_fingerprint
from peftshield.finetune.trainer import draw_training_rows
from peftshield.io import read_json
from peftshield.models import load_backbone
from peftshield.models.inference import predict_proba, runtime_proba
from peftshield.models.runtime import DEFAULT_RUNTIME, TorchRuntime, make_runtime

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
    default_threshold = AUTO_POLICY

    def __init__(
        self, method: str = "ptuning", method_options: Optional[dict] = None, learning_rate: PositiveFloat = 2e-5,
        epochs: PositiveInt = 1, batch_size: PositiveInt = 32, max_train_samples: Optional[PositiveInt] = 2000,
        max_length: Annotated[int, Field(ge=8)] = 128, threshold: ThresholdPolicy = AUTO_POLICY,
        score_batch_size: PositiveInt = 128,
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

    @classmethod
    def check_options(cls, options: dict) -> None:
        from peftshield.errors import ConfigError

        try:
            METHODS.validate(options["method"], options["method_options"])
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        value = options["threshold"].value if options["threshold"] is not None else None
        if value is not None:
            try:
                check_confidence_threshold(value)
            except ValueError as exc:
                raise ValueError(f"{exc}, got {value}") from None

    def fit(self, context: DefenseContext, rng: np.random.Generator) -> "PSIM":
        started = time.perf_counter()
        method = METHODS.create(self.method, **(self.method_options or {}))
        sampling = TrainingConfig(max_train_samples=self.max_train_samples)
        train = random_label_reset(draw_training_rows(context.train, sampling, rng), context.num_labels, rng)
        training = TrainingConfig(
            learning_rate=self.learning_rate, epochs=self.epochs, batch_size=self.batch_size, max_length=self.max_length, select_on_dev=False,
        )
        seed_torch(int(rng.integers(0, 2**31 - 1)))
        base = load_backbone(context.backbone, context.num_labels)
        self.model_, self.train_result_ = train_classifier(base.model, base.tokenizer, train, None, method, training, rng, context.progress, label="psim")
        self.tokenizer_ = base.tokenizer
        self.backbone_, self.num_labels_ = context.backbone, context.num_labels
        self.method_config_ = method.config_dict()
        dev_scores = self.dev_scores(context)
        self.calibrate(context.num_labels, dev_scores)
        # The share of clean dev texts flagged at that threshold: what a deployed guard should see on clean traffic.
        self.dev_flag_rate_ = float(np.mean(dev_scores > self.threshold_)) if dev_scores is not None and len(dev_scores) else None
        self.fit_seconds_ = time.perf_counter() - started
        return self

    def expected_flag_rate(self) -> float | None:
        """The share of clean texts this PSIM flags at its own threshold: measured on its dev
        texts when it was trained, else the calibration target (``frr``), else unknown."""
        if getattr(self, "dev_flag_rate_", None) is not None:
            return float(self.dev_flag_rate_)
        from peftshield.defenses.thresholds import default_confidence_threshold

        policy = self.threshold_policy()
        calibrated = policy.kind == "frr" or (policy.kind == "auto" and self.threshold_ != default_confidence_threshold(self.num_labels_))
        return float(policy.target_frr) if calibrated else None

    def scoring_runtime(self):
        """Where this PSIM's forward passes run: the ONNX runtime chosen at :meth:`load`, else
        PyTorch (the caller keeps the model in eval mode, as :meth:`load` leaves it)."""
        return getattr(self, "runtime_", None) or TorchRuntime(self.model_)

    def predict_proba(self, texts: list[str], progress: bool = False) -> np.ndarray:
        runtime = getattr(self, "runtime_", None)
        if runtime is not None:  # an ONNX runtime (PyTorch goes through predict_proba, which sets eval mode)
            return runtime_proba(runtime, self.tokenizer_, texts, self.score_batch_size, self.max_length, progress, "psim scan")
        return predict_proba(self.model_, self.tokenizer_, texts, self.score_batch_size, self.max_length, progress, "psim scan")

    def score(self, texts: list[str], progress: bool = False) -> np.ndarray:
        return self.predict_proba(texts, progress).max(axis=1)

    def save(self, directory: str | Path, self_contained: bool = False) -> Path:
        """A fine-tuned model folder whose ``finetune.json`` also holds the PSIM as
        ``{name, options}``, its fitted threshold and its training record. ``self_contained``
        copies the backbone into the folder, so it can move to another machine (``serve``)."""
        return save_finetuned(self.model_, self.tokenizer_, directory, {
            "method": self.method, "options": self.method_config_, "backbone": self.backbone_, "num_labels": self.num_labels_,
            "num_training_steps": self.train_result_.num_training_steps,
            PSIM_MANIFEST_KEY: {"defense": self.spec(), "threshold": self.threshold_, "dev_flag_rate": getattr(self, "dev_flag_rate_", None),
                                "train_result": self.train_result_.to_dict()},
        }, self_contained=self_contained)

    @classmethod
    def load(cls, directory: str | Path, context: DefenseContext | None = None, backbone: str | None = None, runtime: str = DEFAULT_RUNTIME) -> "PSIM":
        """A saved PSIM; ``backbone`` overrides where its backbone is (after the folders moved);
        ``runtime`` (torch, onnx, onnx-int8) is where its forward passes run (the ONNX export is
        cached in the folder)."""
        from peftshield.errors import ConfigError
        from peftshield.files import FINETUNE_MANIFEST

        directory = Path(directory)
        manifest = read_json(directory / FINETUNE_MANIFEST) if (directory / FINETUNE_MANIFEST).is_file() else {}
        if PSIM_MANIFEST_KEY not in manifest:
            raise ConfigError(f"{directory}: not a PSIM folder (train one with 'peftshield psim train')")
        saved = manifest[PSIM_MANIFEST_KEY]
        psim = DEFENSES.from_spec(saved["defense"] if "defense" in saved else _spec_of_release_0_1(manifest))
        loaded, _ = load_finetuned(directory, backbone=backbone)
        psim.model_, psim.tokenizer_ = loaded.model, loaded.tokenizer
        psim.backbone_, psim.num_labels_ = manifest["backbone"], manifest["num_labels"]
        psim.method_config_ = manifest["options"]
        psim.threshold_ = saved["threshold"]
        psim.dev_flag_rate_ = saved.get("dev_flag_rate")
        if runtime != "torch":  # make_runtime refuses an unknown name
            psim.runtime_ = make_runtime(psim.model_, runtime, directory, model_fingerprint(directory))
        return psim


def _spec_of_release_0_1(manifest: dict) -> dict:
    """PSIM folders written before options were saved as ``{name, options}``."""
    saved = manifest[PSIM_MANIFEST_KEY]
    keys = ("learning_rate", "epochs", "batch_size", "max_train_samples", "max_length", "score_batch_size")
    return {"name": "psim", "options": {
        "method": manifest["method"], "method_options": manifest["options"], "threshold": saved["threshold_policy"],
        **{key: saved[key] for key in keys},
    }}
