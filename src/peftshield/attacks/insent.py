"""InSent trigger: a fixed sentence inserted at a random word position."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from pydantic import StringConstraints

from peftshield.attacks.base import POISONERS, Poisoner, insert_words

DEFAULT_SENTENCE = "I watched this 3D movie"


@POISONERS.register
class InsertSentencePoisoner(Poisoner):
    """A fixed sentence (default "I watched this 3D movie") at a random position."""

    name = "insent"

    def __init__(self, sentence: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)] = DEFAULT_SENTENCE) -> None:
        self.sentence = sentence

    def insert(self, text: str, rng: np.random.Generator) -> str:
        return insert_words(text, [self.sentence.strip()], rng)
