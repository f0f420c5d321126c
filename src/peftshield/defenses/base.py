"""The defense interface: fit on clean or suspect data, score texts, flag by threshold.

Scores are *suspicion*: higher means more likely poisoned. ``flag`` is
``score > threshold_``. Constructors only store parameters; everything learned ends
in an underscore (scikit-learn style) and exists only after ``fit``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from peftshield.data.records import TextDataset
from peftshield.errors import ConfigError
from peftshield.registry import Registry


@dataclass
class DefenseContext:
    """What a defender has: the backbone they were given, their training texts, clean
    held-out texts for calibration, and (for model-based filters) the victim model."""

    backbone: str
    train: TextDataset
    dev: TextDataset | None
    num_labels: int
    victim_model: object | None = None
    victim_tokenizer: object | None = None
    protected_label: int | None = None
    max_length: int = 128
    progress: bool = True


class Defense(ABC):
    name: ClassVar[str]
    needs_victim: ClassVar[bool] = False  # True: fitted per victim model (it scores with the victim)

    def params(self) -> dict:
        return {k: v for k, v in vars(self).items() if not k.endswith("_") and not k.startswith("_")}

    @abstractmethod
    def fit(self, context: DefenseContext, rng: np.random.Generator) -> "Defense":
        """Learn whatever the defense needs and set ``threshold_``."""

    @abstractmethod
    def score(self, texts: list[str]) -> np.ndarray:
        """Suspicion score per text, higher = more likely poisoned."""

    def flag(self, texts: list[str]) -> np.ndarray:
        return self.score(texts) > self.fitted_threshold()

    def fitted_threshold(self) -> float:
        threshold = getattr(self, "threshold_", None)
        if threshold is None:
            raise ConfigError(f"defense '{self.name}' is not fitted: call fit() first")
        return float(threshold)

    def save(self, directory: str | Path) -> Path:
        raise ConfigError(f"defense '{self.name}' cannot be saved")

    @classmethod
    def load(cls, directory: str | Path, context: DefenseContext | None = None) -> "Defense":
        raise ConfigError(f"defense '{cls.name}' cannot be loaded")


DEFENSES: Registry[Defense] = Registry("defense")
