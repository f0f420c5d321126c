"""The defense interface: fit on clean or suspect data, score texts, flag by threshold.

Scores are *suspicion*: higher means more likely poisoned. ``flag`` is
``score > threshold_``. Constructors only store parameters; everything learned ends
in an underscore (scikit-learn style) and exists only after ``fit``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np

from peftshield.data.records import TextDataset
from peftshield.components import Component
from peftshield.defenses.thresholds import CLEAN_FRR_POLICY, ThresholdPolicy
from peftshield.errors import ConfigError
from peftshield.io import atomic_directory, atomic_write_json, read_json
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


class Defense(Component, ABC):
    """Constructors only store their typed keyword parameters (the defense's options model)."""

    name: ClassVar[str]
    needs_victim: ClassVar[bool] = False  # True: fitted per victim model (it scores with the victim)
    # True: a data cleaner that judges the texts passed to one score() call as one pool
    # (keyword statistics, clustering), so a text's score depends on the rest of the pool.
    transductive: ClassVar[bool] = False
    # True: its ``batch_size`` counts texts per forward pass of its own, so a guard runs those
    # passes in its length-sorted micro-batches (not set where it counts perturbed copies or training rows).
    text_passes: ClassVar[bool] = False
    # The threshold policy when the ``threshold`` option is None (or absent): the one place each
    # defense names its default. Baselines calibrate to 1% false rejections on clean texts.
    default_threshold: ClassVar[ThresholdPolicy] = CLEAN_FRR_POLICY

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

    def threshold_policy(self) -> ThresholdPolicy:
        """The ``threshold`` option, or this defense's :attr:`default_threshold`."""
        return getattr(self, "threshold", None) or self.default_threshold

    def calibrate(self, num_labels: int, clean_scores: np.ndarray | None, default: float | None = None) -> float:
        """Set ``threshold_`` by :meth:`threshold_policy` on the scores of clean texts (``default``:
        the fixed threshold when the policy is fixed without a value)."""
        self.threshold_ = self.threshold_policy().resolve(num_labels, clean_scores, default=default)
        return self.threshold_

    def dev_scores(self, context: DefenseContext) -> np.ndarray | None:
        """Scores of the clean dev texts (None without any)."""
        return self.score(context.dev.texts) if context.dev is not None and len(context.dev) else None

    def save(self, directory: str | Path) -> Path:
        raise ConfigError(f"defense '{self.name}' cannot be saved")

    @classmethod
    def load(cls, directory: str | Path, context: DefenseContext | None = None) -> "Defense":
        raise ConfigError(f"defense '{cls.name}' cannot be loaded")


class VictimDefense(Defense):
    """A defense that scores with the victim and learns nothing of its own beyond its threshold and
    the class count: fitted and saved (options, threshold, ``num_labels``) the same way."""

    needs_victim = True

    def attach_victim(self, context: DefenseContext | None) -> None:
        self.model_, self.tokenizer_ = victim_of(self.name, context)

    def fit_victim(self, context: DefenseContext) -> None:
        """The common first step of :meth:`fit`: the victim and the class count."""
        self.attach_victim(context)
        self.num_labels_ = context.num_labels

    def save(self, directory: str | Path) -> Path:
        return save_json_state(self, directory, f"{self.name}.json", {"num_labels": self.num_labels_})

    @classmethod
    def load(cls, directory: str | Path, context: DefenseContext | None = None) -> "VictimDefense":
        defense, state = load_json_state(cls, directory, f"{cls.name}.json")
        defense.attach_victim(context)
        defense.num_labels_ = state["num_labels"]
        return defense


def clean_reference(context: DefenseContext) -> TextDataset:
    """The defender's clean reference texts: the dev split when it has any, else the training texts."""
    return context.dev if context.dev is not None and len(context.dev) else context.train


def variants_of(texts: list[str], perturb: Callable[[str], list[str]]) -> tuple[list[str], np.ndarray]:
    """Perturb-and-score, first step: every text's variants in one flat list (scored with the
    victim in one batched pass), and for each variant the index of the text it came from."""
    variants: list[str] = []
    owners: list[int] = []
    for index, text in enumerate(texts):
        found = perturb(text)
        variants += found
        owners += [index] * len(found)
    return variants, np.asarray(owners, dtype=np.int64)


def max_per_text(count: int, owners: np.ndarray, values: np.ndarray, initial: float) -> np.ndarray:
    """Perturb-and-score, last step: each text's largest value over its variants (``initial``
    for a text without any)."""
    best = np.full(count, initial, dtype=np.float64)
    if len(owners):
        np.maximum.at(best, owners, values)
    return best


def victim_of(name: str, context: DefenseContext | None) -> tuple[object, object]:
    """The victim model and tokenizer a model-based defense scores with."""
    if context is None or context.victim_model is None or context.victim_tokenizer is None:
        raise ConfigError(f"defense '{name}' needs the victim model (it scores texts with the victim)")
    return context.victim_model, context.victim_tokenizer


def save_json_state(defense: Defense, directory: str | Path, file_name: str, state: dict) -> Path:
    """Write the defense as ``{name, options}``, its fitted threshold and ``state``, atomically."""
    with atomic_directory(directory) as tmp:
        atomic_write_json(tmp / file_name, {"defense": defense.spec(), "threshold": defense.fitted_threshold(), **state})
    return Path(directory)


MIN_REFERENCE_TEXTS = 8


def layer_scale(distances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per layer, the mean and spread of the clean calibration texts' distances, shape (layers,)
    each: what :func:`standardise_layers` puts every layer on one scale with."""
    return distances.mean(axis=1), distances.std(axis=1) + 1e-9


def standardise_layers(distances: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(layers, texts) distances as z-scores against the clean calibration texts, layer by layer."""
    return (distances - mean[:, None]) / std[:, None]


def clean_reference_halves(name: str, context: DefenseContext, max_texts: int, rng: np.random.Generator) -> tuple[TextDataset, np.ndarray, np.ndarray]:
    """The defender's clean reference texts (dev, else train; at most ``max_texts``, drawn from
    ``rng``) and a random split of their indices in two halves: one to fit statistics on, one to
    standardise and calibrate the threshold on, so calibration scores are out of sample."""
    reference = clean_reference(context)
    if len(reference) < MIN_REFERENCE_TEXTS:
        raise ConfigError(f"{name}: needs at least {MIN_REFERENCE_TEXTS} clean reference texts, got {len(reference)}")
    reference = reference.sample(max_texts, rng)
    order = rng.permutation(len(reference))
    return reference, order[: len(order) // 2], order[len(order) // 2:]


def save_array_state(defense: Defense, directory: str | Path, file_name: str, arrays_file: str, arrays: dict[str, np.ndarray]) -> Path:
    """:func:`save_json_state` (no extra state) with fitted arrays beside it in a safetensors file, atomically."""
    from safetensors.numpy import save_file

    with atomic_directory(directory) as tmp:
        save_file(arrays, str(tmp / arrays_file))
        atomic_write_json(tmp / file_name, {"defense": defense.spec(), "threshold": defense.fitted_threshold()})
    return Path(directory)


def load_array_state(cls: type[Defense], directory: str | Path, file_name: str, arrays_file: str) -> tuple[Defense, dict[str, np.ndarray]]:
    """The defense and its arrays, from what :func:`save_array_state` wrote."""
    from safetensors.numpy import load_file

    defense, _ = load_json_state(cls, directory, file_name)
    path = Path(directory) / arrays_file
    if not path.is_file():
        raise ConfigError(f"{directory}: not a saved '{cls.name}' defense (no {arrays_file})")
    return defense, load_file(str(path))


def load_json_state(cls: type[Defense], directory: str | Path, file_name: str) -> tuple[Defense, dict]:
    """The defense rebuilt from what :func:`save_json_state` wrote, with its threshold, and the state."""
    path = Path(directory) / file_name
    if not path.is_file():
        raise ConfigError(f"{directory}: not a saved '{cls.name}' defense (no {file_name})")
    state = read_json(path)
    saved = state.get("defense") or {}
    if saved.get("name") != cls.name:
        raise ConfigError(f"{path}: holds a '{saved.get('name')}' defense, not '{cls.name}'")
    defense = DEFENSES.from_spec(saved)
    defense.threshold_ = state["threshold"]
    return defense, state


DEFENSES: Registry[Defense] = Registry("defense")
