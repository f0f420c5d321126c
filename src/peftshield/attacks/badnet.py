"""BadNet-style rare-word trigger: k words from a pool at random positions."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from pydantic import BeforeValidator, Field

from peftshield.attacks.base import POISONERS, Poisoner, insert_words

DEFAULT_WORDS = ("cf", "mn", "bb", "tq", "mb")


def word_list(value: object) -> object:
    """``"cf,mn"`` (as typed on a command line) -> ``["cf", "mn"]``; lists pass through, stripped."""
    if isinstance(value, str):
        value = value.split(",")
    if isinstance(value, (list, tuple)):
        return [str(word).strip() for word in value if str(word).strip()]
    return value


TriggerWords = Annotated[tuple[str, ...], BeforeValidator(word_list), Field(min_length=1)]


@POISONERS.register
class BadNetPoisoner(Poisoner):
    """Rare words (default pool cf mn bb tq mb) inserted at random positions."""

    name = "badnet"

    def __init__(self, words: TriggerWords = DEFAULT_WORDS, num_triggers: Annotated[int, Field(ge=1)] = 1) -> None:
        self.words = words
        self.num_triggers = num_triggers

    def insert(self, text: str, rng: np.random.Generator) -> str:
        pool = word_list(self.words)
        chosen = [pool[int(rng.integers(0, len(pool)))] for _ in range(int(self.num_triggers))]
        return insert_words(text, chosen, rng)
