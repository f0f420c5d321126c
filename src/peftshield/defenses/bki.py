"""BKI: backdoor keyword identification (Chen and Dai, 2021), a data cleaner.

For every text of a pool, each word's importance is how far the victim's representation
(the input of its classification head) moves when that word is removed. Each text
contributes its ``top_words_per_text`` most important words to pool-wide statistics, and
a word's keyword value is its mean importance times log10 of how many texts it was
important in: a trigger is both decisive and frequent among poisoned texts. The
``num_keywords`` words with the highest value are the backdoor keywords, and every text
containing one is flagged.

BKI is transductive: it judges the texts of one ``score`` call as one pool (the suspect
training set or batch of inputs). Scores are in [0, 1] for texts without a keyword (their
best word's value relative to the top keyword) and in (1, 2] for texts with one, so the
threshold is 1.
"""

from __future__ import annotations

from typing import Optional

from collections import defaultdict

import numpy as np
from pydantic import PositiveInt

from peftshield.data.transforms import leave_one_word_out
from peftshield.defenses.base import DEFENSES, DefenseContext, VictimDefense, variants_of
from peftshield.defenses.thresholds import ThresholdPolicy
from peftshield.errors import ConfigError
from peftshield.models.inference import classifier_inputs

KEYWORD_THRESHOLD = 1.0


@DEFENSES.register
class BKI(VictimDefense):
    """Pool-level keyword statistics from leave-one-word-out representation shifts."""

    name = "bki"
    transductive = True

    def __init__(self, top_words_per_text: PositiveInt = 5, num_keywords: PositiveInt = 1, max_words: PositiveInt = 64,
                 batch_size: PositiveInt = 128, max_length: PositiveInt = 128, threshold: Optional[ThresholdPolicy] = None) -> None:
        self.top_words_per_text = top_words_per_text
        self.num_keywords = num_keywords
        self.max_words = max_words
        self.batch_size = batch_size
        self.max_length = max_length
        self.threshold = threshold  # kept for the common interface; BKI flags by keyword

    def fit(self, context: DefenseContext, rng: np.random.Generator) -> "BKI":
        if self.top_words_per_text < 1 or self.num_keywords < 1:
            raise ConfigError("bki: top_words_per_text and num_keywords must be >= 1")
        self.fit_victim(context)
        self.threshold_ = KEYWORD_THRESHOLD
        return self

    def word_importance(self, texts: list[str]) -> list[list[tuple[str, float]]]:
        """(word, representation shift when it is removed) for every word of every text."""
        variants, owners = variants_of(texts, lambda text: leave_one_word_out(text, self.max_words))
        _, full = classifier_inputs(self.model_, self.tokenizer_, list(texts), self.num_labels_, self.batch_size, self.max_length)
        _, reduced = classifier_inputs(self.model_, self.tokenizer_, variants, self.num_labels_, self.batch_size, self.max_length)
        shifts = np.linalg.norm(reduced - full[owners], axis=1) if variants else np.zeros(0)
        result: list[list[tuple[str, float]]] = [[] for _ in texts]
        position = 0
        for index, text in enumerate(texts):
            words = text.split()[: self.max_words]
            if len(words) > 1:
                result[index] = [(w.lower(), float(s)) for w, s in zip(words, shifts[position : position + len(words)])]
                position += len(words)
        return result

    def keyword_values(self, importance: list[list[tuple[str, float]]]) -> dict[str, float]:
        collected: dict[str, list[float]] = defaultdict(list)
        for words in importance:
            for word, shift in sorted(words, key=lambda pair: -pair[1])[: self.top_words_per_text]:
                collected[word].append(shift)
        return {word: float(np.mean(shifts) * np.log10(len(shifts))) for word, shifts in collected.items()}

    def score(self, texts: list[str]) -> np.ndarray:
        importance = self.word_importance(texts)
        values = self.keyword_values(importance)
        ranked = sorted(values.items(), key=lambda pair: -pair[1])
        top = ranked[0][1] if ranked else 0.0
        self.keywords_ = [word for word, value in ranked[: self.num_keywords] if value > 0]
        scores = np.zeros(len(texts))
        if top <= 0:
            return scores
        keywords = set(self.keywords_)
        for index, text in enumerate(texts):
            words = {w.lower() for w in text.split()[: self.max_words]}
            best = max((values.get(w, 0.0) for w in words), default=0.0) / top
            scores[index] = 1.0 + best if words & keywords else min(best, 1.0)
        return scores
