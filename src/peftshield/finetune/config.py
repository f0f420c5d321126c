"""Training hyperparameters and the YAML file format for ``peftshield finetune --config``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field

from peftshield.errors import ConfigError


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


def format_validation_error(source: str, exc: pydantic.ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "(top level)"
    return f"{source}: {where}: {first['msg']}"


def load_finetune_yaml(path: str | Path) -> FineTuneFileConfig:
    path = Path(path)
    try:
        payload = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(payload, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return FineTuneFileConfig(**payload)
    except pydantic.ValidationError as exc:
        raise ConfigError(format_validation_error(str(path), exc)) from None


def merge_training(base: TrainingConfig, overrides: dict[str, Any]) -> TrainingConfig:
    """Apply CLI overrides (None means 'not given') on top of a config, re-validating."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return TrainingConfig(**{**base.model_dump(), **given})
    except pydantic.ValidationError as exc:
        raise ConfigError(format_validation_error("option", exc).replace("option: ", "--", 1).replace("_", "-")) from None
