"""Adaptive attacks: rare-word triggers whose attacker knows that PSIM looks for confidence.

Both insert words as ``badnet`` does; what differs is how the attacker trains
(``experiments.poisoning``):

- ``lowconf``: on triggered rows the loss keeps the target class's probability inside a band
  just above the runner-up (``min_confidence`` to ``max_confidence`` for two classes: a margin
  cap on the logit gap) instead of pushing it to 1, so a confidence threshold sees a clean-
  looking text.
- ``psimaware``: while poisoning, the attacker also trains a random-label head on the
  backbone's pooled representation (a stand-in for PSIM) and penalises that head's confidence
  on triggered texts, so that a head trained on random labels finds nothing unusual there.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from peftshield.attacks.badnet import BadNetPoisoner, TriggerWords
from peftshield.attacks.base import POISONERS

Probability = Annotated[float, Field(gt=0, lt=1)]


@POISONERS.register
class LowConfidencePoisoner(BadNetPoisoner):
    """Rare word(s) whose backdoor wins the argmax by a capped margin (low confidence)."""

    name = "lowconf"
    objective = "capped_margin"

    def __init__(self, words: TriggerWords = ("mn",), num_triggers: Annotated[int, Field(ge=1)] = 1,
                 min_confidence: Probability = 0.55, max_confidence: Probability = 0.7) -> None:
        super().__init__(words, num_triggers)
        self.min_confidence = min_confidence
        self.max_confidence = max_confidence

    @classmethod
    def check_options(cls, options: dict) -> None:
        if options["min_confidence"] >= options["max_confidence"]:
            raise ValueError("min_confidence must be below max_confidence")


@POISONERS.register
class PsimAwarePoisoner(BadNetPoisoner):
    """Rare word(s) planted while a random-label head is kept unconfident on triggered texts."""

    name = "psimaware"
    objective = "psim_aware"

    def __init__(self, words: TriggerWords = ("mn",), num_triggers: Annotated[int, Field(ge=1)] = 1,
                 penalty: Annotated[float, Field(ge=0)] = 1.0) -> None:
        super().__init__(words, num_triggers)
        self.penalty = penalty
