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
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from pydantic import PositiveInt

from peftshield.defenses.base import DEFENSES, Defense, DefenseContext, load_json_state, save_json_state, victim_of
from peftshield.defenses.thresholds import ThresholdPolicy
from peftshield.models.inference import predict_proba

STATE_FILE = "occlusion.json"
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
class Occlusion(Defense):
    """Leave-one-word/clause-out on the victim: the largest drop of its predicted-class probability."""

    name = "occlusion"
    needs_victim = True

    def __init__(self, unit: Literal["word", "clause", "both"] = "both", max_units: PositiveInt = 40,
                 batch_size: PositiveInt = 128, max_length: PositiveInt = 128, threshold: Optional[ThresholdPolicy] = None) -> None:
        self.unit = unit
        self.max_units = max_units
        self.batch_size = batch_size
        self.max_length = max_length
        self.threshold = threshold

    def fit(self, context: DefenseContext, rng: np.random.Generator) -> "Occlusion":
        self.model_, self.tokenizer_ = victim_of(self.name, context)
        self.num_labels_ = context.num_labels
        dev_scores = self.score(context.dev.texts) if context.dev is not None and len(context.dev) else None
        self.threshold_ = (self.threshold or ThresholdPolicy()).resolve(context.num_labels, dev_scores, default=0.5)
        return self

    def score(self, texts: list[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros(0)
        probs = predict_proba(self.model_, self.tokenizer_, texts, self.batch_size, self.max_length)
        predicted = probs.argmax(axis=1)
        variants, owners = [], []
        for index, text in enumerate(texts):
            found = occluded_variants(text, self.unit, self.max_units)
            variants += found
            owners += [index] * len(found)
        scores = np.zeros(len(texts))
        if variants:
            occluded = predict_proba(self.model_, self.tokenizer_, variants, self.batch_size, self.max_length)
            owners_array = np.asarray(owners)
            drops = probs[owners_array, predicted[owners_array]] - occluded[np.arange(len(variants)), predicted[owners_array]]
            np.maximum.at(scores, owners_array, drops)
        return scores

    def save(self, directory: str | Path) -> Path:
        return save_json_state(self, directory, STATE_FILE, {"num_labels": self.num_labels_})

    @classmethod
    def load(cls, directory: str | Path, context: DefenseContext | None = None) -> "Occlusion":
        occlusion, state = load_json_state(cls, directory, STATE_FILE)
        occlusion.model_, occlusion.tokenizer_ = victim_of(cls.name, context)
        occlusion.num_labels_ = state["num_labels"]
        return occlusion
