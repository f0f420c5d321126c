"""Training hyperparameters and the YAML file format for ``peftshield finetune --config``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from peftshield.flags import given_flags, typed_from_flags
from peftshield.yaml_config import load_yaml_model


class TrainingConfig(BaseModel):
    """Hyperparameters of one training run. ``learning_rate=None`` takes the method's default
    (2e-5 for full fine-tuning, 2e-3 for PEFT methods, as in the reference experiments)."""

    model_config = ConfigDict(extra="forbid")

    learning_rate: Optional[float] = Field(None, gt=0)
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(32, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    max_length: int = Field(128, ge=8)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    select_on_dev: bool = True
    max_train_samples: Optional[int] = Field(None, ge=1)


class FineTuneFileConfig(BaseModel):
    """``method``, its ``options`` and ``training`` hyperparameters, as read from YAML."""

    model_config = ConfigDict(extra="forbid")

    method: str = "lora"
    options: dict[str, Any] = Field(default_factory=dict)
    training: TrainingConfig = Field(default_factory=TrainingConfig)


def load_finetune_yaml(path: str | Path) -> FineTuneFileConfig:
    return load_yaml_model(path, FineTuneFileConfig)


TRAINING_FLAGS = {"learning_rate": "--lr"}  # the training options whose flag is not their name


def merge_training(base: TrainingConfig, overrides: dict[str, Any]) -> TrainingConfig:
    """Apply CLI overrides (None means 'not given') on top of a config, re-validating; a bad value
    is one line naming the flag it was given as."""
    flags = given_flags(TRAINING_FLAGS, **overrides)
    return typed_from_flags(TrainingConfig, flags, **{k: v for k, v in base.model_dump().items() if not flags.was_given(k)})
