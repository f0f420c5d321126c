"""Fine-tuning methods (one module each, registered in :data:`METHODS`), the training loop and checkpoints."""

from peftshield.finetune import methods  # noqa: F401  (registration)
from peftshield.finetune.base import METHODS, FineTuneMethod, count_parameters
from peftshield.finetune.checkpoint import load_finetuned, save_finetuned
from peftshield.finetune.config import FineTuneFileConfig, TrainingConfig, load_finetune_yaml, merge_training
from peftshield.finetune.trainer import TrainResult, seed_torch, train_classifier

__all__ = [
    "METHODS", "FineTuneMethod", "count_parameters", "load_finetuned", "save_finetuned", "FineTuneFileConfig",
    "TrainingConfig", "load_finetune_yaml", "merge_training", "TrainResult", "seed_torch", "train_classifier",
]
