"""The poisoner interface and the dataset-level poisoning every trigger shares."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, Callable, ClassVar, Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from peftshield.components import Component
from peftshield.data.records import TextDataset
from peftshield.errors import ConfigError, DataError
from peftshield.registry import Registry

# An attacker's training loss, ``loss(model, batch, row_index) -> scalar tensor``, as
# peftshield.finetune.train_classifier takes it.
AttackLoss = Callable[[Any, dict, Any], Any]


class Poisoner(Component, ABC):
    """Inserts a trigger into texts. Constructors only store parameters (typed keyword
    parameters: they are the trigger's options model).

    How the attacker trains with it is the poisoner's own: :meth:`training_loss` for the full
    fine-tuning on the poisoned labelled proxy (the study's attack; adaptive attacks bring
    their own loss), or, for a :attr:`task_agnostic` poisoner, triggered texts' representation
    pushed to predefined vectors without labels
    (:meth:`~peftshield.attacks.task_agnostic.RepresentationPoisoner.representation_loss`).
    ``experiments.poisoning`` holds only the training loops."""

    name: ClassVar[str]
    # Whether the backdoor is planted without the victim's labels (no target class: the class
    # each trigger lands on is found on the victim).
    task_agnostic: ClassVar[bool] = False

    def training_loss(self, model, num_rows: int, num_labels: int, triggered_rows: set[int],
                      rng: np.random.Generator) -> "AttackLoss | None":
        """The attacker's loss for full fine-tuning ``model`` on ``num_rows`` rows of which
        ``triggered_rows`` carry the trigger, as ``loss(model, batch, row_index)`` for
        :func:`peftshield.finetune.train_classifier`; None: plain cross-entropy."""
        if self.task_agnostic:
            raise ValueError(f"trigger '{self.name}' is planted on representations, not by a classification loss")
        return None

    @property
    def draws_from_pool(self) -> bool:
        """Whether triggered texts are drawn from a pool of ready-made texts instead of
        rewriting each row. Such a poisoner supports dirty-label poisoning only, and a copy
        rebuilt from its spec does not know which texts the attacker trained on, so held-out
        triggered test sets must come from a ready-made file."""
        return False

    def check_supply(self, count: int) -> None:
        """Raise ``DataError`` if ``count`` more texts cannot be given the trigger (a pool that
        would run out); unlimited by default."""

    @abstractmethod
    def insert(self, text: str, rng: np.random.Generator) -> str:
        """Return ``text`` carrying the trigger."""

    def can_poison(self, text: str) -> bool:
        """Whether a trigger can be put into ``text`` (lookup-based triggers may not cover every text)."""
        return True

    def poison_texts(self, texts: list[str], rng: np.random.Generator) -> list[str]:
        return [self.insert(text, rng) for text in texts]

    def label(self) -> str:
        """A short human name: the trigger and its short option values (``badnet-mn``)."""
        defaults = self.options_model()().model_dump(mode="json")
        parts = [self.name]
        for key, value in self.spec()["options"].items():
            text = "+".join(map(str, value)) if isinstance(value, list) else str(value)
            if value != defaults.get(key) and value not in (None, "", []) and len(text) <= 12:
                parts.append(text)
        return "-".join(parts)


POISONERS: Registry[Poisoner] = Registry("trigger")


def insert_words(text: str, words: list[str], rng: np.random.Generator) -> str:
    """Insert each of ``words`` at a uniformly random word boundary of ``text``."""
    tokens = text.split()
    for word in words:
        tokens.insert(int(rng.integers(0, len(tokens) + 1)), word)
    return " ".join(tokens)


class PoisonSpec(BaseModel):
    """How a training set is poisoned.

    ``dirty``: non-target samples get the trigger and are relabelled to the target.
    ``clean``: target-class samples get the trigger, labels unchanged.
    Exactly one of ``rate`` (a fraction of the whole set) or ``count`` is used; ``count`` wins.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    target_label: int = Field(0, ge=0)
    rate: Optional[float] = Field(0.1, ge=0, le=1)
    count: Optional[int] = Field(None, ge=0)
    label_mode: Literal["dirty", "clean"] = "dirty"

    @model_validator(mode="after")
    def _rate_or_count(self) -> "PoisonSpec":
        if self.count is None and self.rate is None:
            raise ValueError("give a poison rate or a count")
        return self

    def n_poison(self, n_rows: int) -> int:
        return self.count if self.count is not None else int(round(self.rate * n_rows))

    def to_dict(self) -> dict:
        return self.model_dump()


@dataclass(frozen=True)
class PoisonRecord:
    """One poisoned row, for the manifest."""

    id: str
    original_text: str
    poisoned_text: str
    original_label: int
    label: int


@dataclass
class PoisonedData:
    data: TextDataset
    records: list[PoisonRecord]

    @property
    def poisoned_ids(self) -> set[str]:
        return {record.id for record in self.records}

    def manifest_rows(self) -> list[dict]:
        return [asdict(record) for record in self.records]


def check_target(target_label: int, num_labels: int) -> None:
    if not 0 <= target_label < num_labels:
        raise ConfigError(f"target label {target_label} is out of range for a {num_labels}-class dataset")


def poison_candidates(data: TextDataset, poisoner: Poisoner, spec: PoisonSpec) -> list[int]:
    """The rows that may be poisoned: non-target rows (dirty-label) or target rows (clean-label)
    that can take the trigger."""
    labels = data.label_array()
    pool = labels != spec.target_label if spec.label_mode == "dirty" else labels == spec.target_label
    return [int(i) for i in np.flatnonzero(pool) if poisoner.can_poison(data.texts[i])]


def poison_dataset(data: TextDataset, poisoner: Poisoner, spec: PoisonSpec, rng: np.random.Generator) -> PoisonedData:
    """Return a copy of ``data`` with ``spec.n_poison`` rows carrying the trigger."""
    if spec.label_mode == "clean" and poisoner.draws_from_pool:
        raise ConfigError(f"label mode 'clean': the '{poisoner.label()}' trigger draws ready-made texts from a pool, "
                          "which only dirty-label poisoning can use")
    candidates = poison_candidates(data, poisoner, spec)
    wanted = spec.n_poison(len(data))
    if wanted > len(candidates):
        raise ConfigError(
            f"cannot poison {wanted} rows of {data.name or 'the dataset'}: only {len(candidates)} "
            f"{'non-target' if spec.label_mode == 'dirty' else 'target'}-class rows can take the '{poisoner.name}' trigger"
        )
    chosen = np.sort(rng.choice(np.asarray(candidates, dtype=np.int64), size=wanted, replace=False)) if wanted else []
    texts, new_labels = list(data.texts), list(data.labels)
    poisoned_texts = poisoner.poison_texts([data.texts[i] for i in chosen], rng)
    records = []
    for i, poisoned in zip(chosen, poisoned_texts):
        label = spec.target_label if spec.label_mode == "dirty" else data.labels[i]
        records.append(PoisonRecord(data.ids[i], data.texts[i], poisoned, data.labels[i], label))
        texts[i], new_labels[i] = poisoned, label
    return PoisonedData(TextDataset(texts, new_labels, list(data.ids), name=data.name), records)


def asr_rows(data: TextDataset, poisoner: Poisoner, target_label: int) -> list[int]:
    """The rows of ``data`` an attack-success test set holds: non-target rows that can take the trigger."""
    return [i for i, label in enumerate(data.labels) if label != target_label and poisoner.can_poison(data.texts[i])]


def build_asr_set(data: TextDataset, poisoner: Poisoner, target_label: int, rng: np.random.Generator) -> TextDataset:
    """The attack-success test set: every non-target sample that can take the trigger, with it.

    Labels stay the true labels; an attack succeeds where the model predicts ``target_label``.
    """
    keep = asr_rows(data, poisoner, target_label)
    if not keep:
        raise DataError(f"{data.name or 'test set'}: no non-target rows can take the '{poisoner.name}' trigger")
    subset = data.subset(keep, name=f"{data.name}_poisoned")
    return TextDataset(poisoner.poison_texts(subset.texts, rng), subset.labels, subset.ids, name=subset.name)
