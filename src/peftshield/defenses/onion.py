"""ONION: words that make a sentence much less fluent are outliers, and likely triggers.

For each text, the whole-sentence perplexity is computed explicitly, then again with each
word left out (all leave-one-word-out variants of a batch of texts go through the LM
together). A word's suspicion is how much its removal lowers the log perplexity; a text's
score is its most suspicious word's. The threshold sits at a clean-data FRR percentile.
A one-word text has no leave-one-out variant and scores 0, and is reported in
``single_word_texts_``: nothing is dropped silently.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import PositiveInt

from peftshield.data.transforms import leave_one_word_out
from peftshield.defenses.base import DEFENSES, Defense, DefenseContext, clean_reference, load_json_state, max_per_text, save_json_state, variants_of
from peftshield.defenses.thresholds import CLEAN_FRR_POLICY, ThresholdPolicy
from peftshield.models.language_model import load_language_model, sentence_log_perplexity

STATE_FILE = "onion.json"


@DEFENSES.register
class ONION(Defense):
    """Perplexity outlier words (leave-one-word-out with a causal LM)."""

    name = "onion"

    def __init__(self, language_model: str = "smollm2", batch_size: PositiveInt = 64, max_words: PositiveInt = 64,
                 max_length: PositiveInt = 128, threshold: ThresholdPolicy = CLEAN_FRR_POLICY, calibration_texts: PositiveInt = 300) -> None:
        self.language_model = language_model
        self.batch_size = batch_size
        self.max_words = max_words
        self.max_length = max_length
        self.threshold = threshold
        self.calibration_texts = calibration_texts

    def _load(self) -> None:
        self.lm_ = load_language_model(self.language_model)

    def fit(self, context: DefenseContext, rng: np.random.Generator) -> "ONION":
        self._load()
        calibration = clean_reference(context).sample(self.calibration_texts, rng)
        self.calibrate(context.num_labels, self.score(calibration.texts), default=0.0)
        return self

    def score(self, texts: list[str]) -> np.ndarray:
        variants, owners = variants_of(texts, lambda text: leave_one_word_out(text, self.max_words))
        full = sentence_log_perplexity(self.lm_, list(texts), self.batch_size, self.max_length)
        drops = np.zeros(0)
        if variants:
            reduced = sentence_log_perplexity(self.lm_, variants, self.batch_size, self.max_length)
            drops = np.nan_to_num(full[owners] - reduced, nan=-np.inf)
        best = max_per_text(len(texts), owners, drops, initial=-np.inf)
        self.single_word_texts_ = int(len(texts) - len(np.unique(owners)))
        # texts without a leave-one-out variant (one word) score 0: nothing to single out
        return np.where(np.isfinite(best), best, 0.0)

    def save(self, directory: str | Path) -> Path:
        return save_json_state(self, directory, STATE_FILE, {})

    @classmethod
    def load(cls, directory: str | Path, context: DefenseContext | None = None) -> "ONION":
        onion, _ = load_json_state(cls, directory, STATE_FILE)
        onion._load()
        return onion
