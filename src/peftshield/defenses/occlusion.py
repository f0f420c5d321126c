"""Occlusion: flag a text whose prediction leans on one small part of it.

Every word (up to ``max_units``) and every clause (the pieces between , ; :) is left out in
turn, and the victim's probability of its predicted class is measured again. The score is the
largest drop. A clean text's prediction rests on many words, so leaving one out changes little;
a triggered text's prediction rests on the trigger, so leaving out the trigger word (a rare-word
backdoor) or the subordinate clause that carries a syntactic template (a HiddenKiller-style
backdoor, ``S(SBAR)(,)(NP)(VP)(.)``) takes the prediction away. The threshold is calibrated on
clean dev texts (1% FRR by default). Cost: one forward pass per unit left out.
"""

from __future__ import annotations

import re
from typing import Literal, Optional

import numpy as np
from pydantic import PositiveInt

from peftshield.defenses.base import DEFENSES, DefenseContext, VictimDefense, max_per_text, variants_of
from peftshield.defenses.thresholds import AUTO_POLICY, ThresholdPolicy
from peftshield.models.inference import predict_proba

CLAUSE_BOUNDARY = re.compile(r"(?<=[,;:])\s+")


def occluded_variants(text: str, unit: str, max_units: int) -> list[str]:
    """The text with one unit left out, for every unit: words (the first ``max_units``) and/or
    clauses (only when there are at least two). Unlike ``data.transforms.leave_one_word_out``
    (BKI, ONION), a long text keeps its words past ``max_units``: only the one word is missing,
    so the drop measured is that word's, not the cut tail's."""
    variants: list[str] = []
    if unit in ("word", "both"):
        words = text.split()
        if len(words) > 1:
            variants += [" ".join(words[:i] + words[i + 1:]) for i in range(min(len(words), max_units))]
    if unit in ("clause", "both"):
        clauses = [c for c in CLAUSE_BOUNDARY.split(text.strip()) if c.strip()]
        if len(clauses) > 1:
            variants += [" ".join(clauses[:i] + clauses[i + 1:]) for i in range(len(clauses))]
    return variants


@DEFENSES.register
class Occlusion(VictimDefense):
    """Leave-one-word/clause-out on the victim: the largest drop of its predicted-class probability."""

    name = "occlusion"
    default_threshold = AUTO_POLICY

    def __init__(self, unit: Literal["word", "clause", "both"] = "both", max_units: PositiveInt = 40,
                 batch_size: PositiveInt = 128, max_length: PositiveInt = 128, threshold: Optional[ThresholdPolicy] = None) -> None:
        self.unit = unit
        self.max_units = max_units
        self.batch_size = batch_size
        self.max_length = max_length
        self.threshold = threshold

    def fit(self, context: DefenseContext, rng: np.random.Generator) -> "Occlusion":
        self.fit_victim(context)
        self.calibrate(context.num_labels, self.dev_scores(context), default=0.5)
        return self

    def score(self, texts: list[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros(0)
        probs = predict_proba(self.model_, self.tokenizer_, texts, self.batch_size, self.max_length)
        predicted = probs.argmax(axis=1)
        variants, owners = variants_of(texts, lambda text: occluded_variants(text, self.unit, self.max_units))
        if not variants:
            return np.zeros(len(texts))
        occluded = predict_proba(self.model_, self.tokenizer_, variants, self.batch_size, self.max_length)
        drops = probs[owners, predicted[owners]] - occluded[np.arange(len(variants)), predicted[owners]]
        return max_per_text(len(texts), owners, drops, initial=0.0)
