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

from peftshield.defenses.base import DEFENSES, Defense, DefenseContext
from peftshield.defenses.thresholds import ThresholdPolicy
from peftshield.errors import ConfigError
from peftshield.io import atomic_directory, atomic_write_json, read_json
from peftshield.models.language_model import load_language_model, sentence_log_perplexity

STATE_FILE = "onion.json"


def leave_one_out(text: str, max_words: int) -> list[str]:
    words = text.split()[:max_words]
    return [" ".join(words[:i] + words[i + 1 :]) for i in range(len(words))] if len(words) > 1 else []


@DEFENSES.register
class ONION(Defense):
    """Perplexity outlier words (leave-one-word-out with a causal LM)."""

    name = "onion"

    def __init__(self, language_model: str = "smollm2", batch_size: int = 64, max_words: int = 64, max_length: int = 128,
                 threshold: ThresholdPolicy | None = None, calibration_texts: int = 300) -> None:
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
        reference = context.dev if context.dev is not None and len(context.dev) else context.train
        calibration = reference.sample(self.calibration_texts, rng)
        policy = self.threshold or ThresholdPolicy("frr", target_frr=0.01)
        self.threshold_ = policy.resolve(context.num_labels, self.score(calibration.texts), default=0.0)
        return self

    def score(self, texts: list[str]) -> np.ndarray:
        variants, owners = [], []
        for index, text in enumerate(texts):
            for variant in leave_one_out(text, self.max_words):
                variants.append(variant)
                owners.append(index)
        owners_array = np.asarray(owners, dtype=np.int64)
        full = sentence_log_perplexity(self.lm_, list(texts), self.batch_size, self.max_length)
        best = np.full(len(texts), -np.inf)
        if variants:
            reduced = sentence_log_perplexity(self.lm_, variants, self.batch_size, self.max_length)
            drops = np.nan_to_num(full[owners_array] - reduced, nan=-np.inf)
            np.maximum.at(best, owners_array, drops)
        self.single_word_texts_ = int(len(texts) - len(set(owners)))
        # texts without a leave-one-out variant (one word) score 0: nothing to single out
        return np.where(np.isfinite(best), best, 0.0)

    def save(self, directory: str | Path) -> Path:
        policy = self.threshold or ThresholdPolicy("frr", target_frr=0.01)
        with atomic_directory(directory) as tmp:
            atomic_write_json(tmp / STATE_FILE, {
                "params": {k: v for k, v in self.params().items() if k != "threshold"},
                "threshold_policy": {"kind": policy.kind, "value": policy.value, "target_frr": policy.target_frr},
                "threshold": self.threshold_,
            })
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path, context: DefenseContext | None = None) -> "ONION":
        path = Path(directory) / STATE_FILE
        if not path.is_file():
            raise ConfigError(f"{directory}: not an ONION directory (no {STATE_FILE})")
        state = read_json(path)
        onion = cls(**state["params"], threshold=ThresholdPolicy(**state["threshold_policy"]))
        onion._load()
        onion.threshold_ = state["threshold"]
        return onion
