"""Typed records for text-classification data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np


@dataclass
class TextDataset:
    """One split: parallel lists of texts, integer labels and stable row ids."""

    texts: list[str]
    labels: list[int]
    ids: list[str]
    name: str = ""
    skipped_lines: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not (len(self.texts) == len(self.labels) == len(self.ids)):
            raise ValueError("texts, labels and ids must have the same length")

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int] | np.ndarray, name: str | None = None) -> "TextDataset":
        idx = [int(i) for i in indices]
        return TextDataset(
            texts=[self.texts[i] for i in idx],
            labels=[self.labels[i] for i in idx],
            ids=[self.ids[i] for i in idx],
            name=self.name if name is None else name,
        )

    def sample(self, n: int | None, rng: np.random.Generator) -> "TextDataset":
        """A random subset of ``n`` rows (all rows, in order, when ``n`` is None or too large)."""
        if n is None or n >= len(self):
            return self
        return self.subset(np.sort(rng.choice(len(self), size=n, replace=False)))

    def label_array(self) -> np.ndarray:
        return np.asarray(self.labels, dtype=np.int64)


@dataclass
class DatasetSplits:
    """The splits of one dataset, with the class count inferred from its labels."""

    splits: dict[str, TextDataset]
    num_labels: int
    source: str
    notes: list[str] = field(default_factory=list)

    def __getitem__(self, split: str) -> TextDataset:
        from peftshield.errors import DataError

        if split not in self.splits:
            raise DataError(
                f"{self.source}: no split '{split}' (available: {', '.join(sorted(self.splits)) or 'none'})"
            )
        return self.splits[split]

    def __contains__(self, split: str) -> bool:
        return split in self.splits

    def get(self, split: str) -> TextDataset | None:
        return self.splits.get(split)


def unencodable_at(text: str) -> int | None:
    """The index of the first character of ``text`` that UTF-8 cannot encode (a lone surrogate
    such as ``"\\ud800"``, which JSON and Python strings can hold but no tokenizer takes), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def check_encodable(text: str, where: str) -> str:
    """``text`` unchanged, or a :class:`DataError` naming ``where`` (a file and row, a request
    field) and the offending character's position: texts that cannot be encoded are the
    caller's error, found before anything is scored."""
    position = unencodable_at(text)
    if position is not None:
        from peftshield.errors import DataError

        raise DataError(f"{where}: text holds a character that is not valid Unicode (a lone surrogate at position {position})")
    return text
