"""STRIP for text: perturb each input N times and measure how stable the victim's prediction is.

Words of the input are replaced by high-TF-IDF words from clean held-out text. A clean
input's prediction wobbles under such edits (high entropy); a triggered input stays
pinned to the target class while the trigger survives (low entropy). The score is the
negative mean prediction entropy over the N perturbations of *each input* (so higher is
more suspicious), and the threshold sits at a clean-data FRR percentile.
"""

from __future__ import annotations

from typing import Annotated

import hashlib
from pathlib import Path

import numpy as np
from pydantic import Field, PositiveInt

from peftshield.defenses.base import DEFENSES, Defense, DefenseContext, clean_reference, load_json_state, save_json_state, variants_of, victim_of
from peftshield.defenses.thresholds import CLEAN_FRR_POLICY, ThresholdPolicy
from peftshield.errors import ConfigError
from peftshield.models.inference import predict_proba

STATE_FILE = "strip.json"


def high_tfidf_words(texts: list[str], top_k: int) -> list[str]:
    """The ``top_k`` words with the highest mean TF-IDF over ``texts``."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z]+\b", lowercase=True)
    matrix = vectorizer.fit_transform(texts)
    mean = np.asarray(matrix.mean(axis=0)).ravel()
    vocabulary = vectorizer.get_feature_names_out()
    return [str(vocabulary[i]) for i in np.argsort(-mean)[:top_k]]


def perturb(text: str, words: list[str], replace_ratio: float, rng: np.random.Generator) -> str:
    tokens = text.split() or [""]
    n_replace = max(1, int(round(replace_ratio * len(tokens))))
    for position in rng.choice(len(tokens), size=min(n_replace, len(tokens)), replace=False):
        tokens[position] = words[int(rng.integers(0, len(words)))]
    return " ".join(tokens)


@DEFENSES.register
class STRIP(Defense):
    """Prediction entropy under word replacement; flags inputs whose prediction does not move."""

    name = "strip"
    needs_victim = True

    def __init__(
        self, num_perturbations: PositiveInt = 10, replace_ratio: Annotated[float, Field(gt=0, le=1)] = 0.25,
        top_words: PositiveInt = 1000, threshold: ThresholdPolicy = CLEAN_FRR_POLICY, batch_size: PositiveInt = 128,
        max_length: PositiveInt = 128, max_reference_texts: PositiveInt = 2000,
    ) -> None:
        self.num_perturbations = num_perturbations
        self.replace_ratio = replace_ratio
        self.top_words = top_words
        self.threshold = threshold
        self.batch_size = batch_size
        self.max_length = max_length
        self.max_reference_texts = max_reference_texts

    def _attach(self, context: DefenseContext) -> None:
        self.model_, self.tokenizer_ = victim_of(self.name, context)

    def fit(self, context: DefenseContext, rng: np.random.Generator) -> "STRIP":
        if self.num_perturbations < 1 or not 0 < self.replace_ratio <= 1:
            raise ConfigError("strip: num_perturbations must be >= 1 and replace_ratio in (0, 1]")
        self._attach(context)
        reference = clean_reference(context)
        self.words_ = high_tfidf_words(reference.sample(self.max_reference_texts, rng).texts, self.top_words)
        self.seed_ = int(rng.integers(0, 2**31 - 1))
        calibration = reference.sample(min(len(reference), 500), rng)
        self.calibrate(context.num_labels, self.score(calibration.texts), default=0.0)
        return self

    def _text_rng(self, text: str) -> np.random.Generator:
        """A text's own perturbation stream: the same text always gets the same perturbations,
        whatever else is scored with it."""
        digest = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
        return np.random.default_rng([self.seed_, digest])

    def _perturbations(self, text: str) -> list[str]:
        rng = self._text_rng(text)
        return [perturb(text, self.words_, self.replace_ratio, rng) for _ in range(self.num_perturbations)]

    def score(self, texts: list[str]) -> np.ndarray:
        perturbed, _ = variants_of(texts, self._perturbations)
        probs = predict_proba(self.model_, self.tokenizer_, perturbed, self.batch_size, self.max_length)
        entropy = -(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(axis=1)
        return -entropy.reshape(len(texts), self.num_perturbations).mean(axis=1)

    def save(self, directory: str | Path) -> Path:
        return save_json_state(self, directory, STATE_FILE, {"words": self.words_, "seed": self.seed_})

    @classmethod
    def load(cls, directory: str | Path, context: DefenseContext | None = None) -> "STRIP":
        strip, state = load_json_state(cls, directory, STATE_FILE)
        strip._attach(context)
        strip.words_, strip.seed_ = state["words"], state["seed"]
        return strip
