"""InSent trigger: a fixed sentence inserted at a random word position."""

from __future__ import annotations

import numpy as np

from peftshield.attacks.base import POISONERS, Poisoner, insert_words
from peftshield.errors import ConfigError

DEFAULT_SENTENCE = "I watched this 3D movie"


@POISONERS.register
class InsertSentencePoisoner(Poisoner):
    """A fixed sentence (default "I watched this 3D movie") at a random position."""

    name = "insent"

    def __init__(self, sentence: str = DEFAULT_SENTENCE) -> None:
        self.sentence = sentence

    def insert(self, text: str, rng: np.random.Generator) -> str:
        if not self.sentence.strip():
            raise ConfigError("insent: the trigger sentence is empty")
        return insert_words(text, [self.sentence.strip()], rng)
