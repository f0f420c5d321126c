"""BadNet-style rare-word trigger: k words from a pool at random positions."""

from __future__ import annotations

import numpy as np

from peftshield.attacks.base import POISONERS, Poisoner, insert_words
from peftshield.errors import ConfigError

DEFAULT_WORDS = ("cf", "mn", "bb", "tq", "mb")


@POISONERS.register
class BadNetPoisoner(Poisoner):
    """Rare words (default pool cf mn bb tq mb) inserted at random positions."""

    name = "badnet"

    def __init__(self, words: tuple[str, ...] | list[str] | str = DEFAULT_WORDS, num_triggers: int = 1) -> None:
        self.words = words
        self.num_triggers = num_triggers

    def _pool(self) -> list[str]:
        pool = self.words.split(",") if isinstance(self.words, str) else list(self.words)
        pool = [w.strip() for w in pool if w.strip()]
        if not pool:
            raise ConfigError("badnet: the trigger word pool is empty")
        if int(self.num_triggers) < 1:
            raise ConfigError(f"badnet: num_triggers must be >= 1, got {self.num_triggers}")
        return pool

    def insert(self, text: str, rng: np.random.Generator) -> str:
        pool = self._pool()
        chosen = [pool[int(rng.integers(0, len(pool)))] for _ in range(int(self.num_triggers))]
        return insert_words(text, chosen, rng)
