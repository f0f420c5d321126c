"""Adaptive attacks: rare-word triggers whose attacker knows that PSIM looks for confidence.

Both insert words as ``badnet`` does; what differs is how the attacker trains: each poisoner
names its loss (:meth:`~peftshield.attacks.Poisoner.training_loss`, defined here), and the
study's full fine-tuning on the poisoned labelled proxy uses it in place of cross-entropy:

- ``lowconf``: on triggered rows the loss keeps the target class's probability inside a band
  just above the runner-up (``min_confidence`` to ``max_confidence`` for two classes: a margin
  cap on the logit gap) instead of pushing it to 1, so a confidence threshold sees a clean-
  looking text.
- ``psimaware``: while poisoning, the attacker also trains a random-label head on the
  backbone's pooled representation (a stand-in for PSIM) and penalises that head's confidence
  on triggered texts, so that a head trained on random labels finds nothing unusual there.
"""

from __future__ import annotations

import math
from typing import Annotated

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from peftshield.attacks.badnet import BadNetPoisoner, TriggerWords
from peftshield.attacks.base import POISONERS, AttackLoss
from peftshield.models.inference import site_representation

Probability = Annotated[float, Field(gt=0, lt=1)]


def triggered_flags(num_rows: int, triggered_rows: set[int]) -> torch.Tensor:
    """A flag per training row: whether it carries the trigger."""
    flags = torch.zeros(num_rows, dtype=torch.bool)
    flags[list(triggered_rows)] = True
    return flags


def capped_margin_loss(logits: torch.Tensor, labels: torch.Tensor, triggered: torch.Tensor,
                       min_confidence: float, max_confidence: float) -> torch.Tensor:
    """Cross-entropy on clean rows; on triggered rows, a hinge that keeps the logit gap between
    the target (the row's label) and the runner-up in [logit(min), logit(max)] (for two classes
    exactly the target probability's band)."""
    losses = F.cross_entropy(logits, labels, reduction="none")
    if bool(triggered.any()):
        rows = logits[triggered]
        target = labels[triggered]
        target_logit = rows.gather(1, target[:, None]).squeeze(1)
        others = rows.masked_fill(F.one_hot(target, rows.shape[1]).bool(), float("-inf"))
        gap = target_logit - others.max(dim=1).values
        low, high = math.log(min_confidence / (1 - min_confidence)), math.log(max_confidence / (1 - max_confidence))
        losses = losses.clone()
        losses[triggered] = F.relu(low - gap) + F.relu(gap - high)
    return losses.mean()


class PsimAwareLoss:
    """Cross-entropy, plus a penalty on the confidence a random-label head gives triggered texts.

    The head (a linear layer on the representation the classifier reads) is trained alongside,
    on the clean rows of each batch with labels drawn at random once per row, by its own
    optimiser; the penalty (its mean max-probability above chance on triggered rows) moves only
    the backbone. ``triggered``: a flag per training row."""

    def __init__(self, hidden_size: int, triggered: torch.Tensor, num_labels: int, penalty: float, rng: np.random.Generator,
                 learning_rate: float = 1e-3) -> None:
        self.head = torch.nn.Linear(hidden_size, num_labels)
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=learning_rate)
        self.random_labels = torch.as_tensor(rng.integers(0, num_labels, size=len(triggered)), dtype=torch.long)
        self.triggered = triggered
        self.penalty = penalty
        self.num_labels = num_labels

    def __call__(self, model, batch: dict, rows: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = F.cross_entropy(logits, batch["labels"])
        representation, _ = site_representation(model, batch["input_ids"], batch["attention_mask"], "head")
        triggered = self.triggered[rows]
        clean = ~triggered
        if bool(clean.any()):  # the stand-in PSIM learns random labels on clean texts
            self.optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(self.head(representation[clean].detach()), self.random_labels[rows[clean]]).backward()
            self.optimizer.step()
        if bool(triggered.any()) and self.penalty > 0:
            probs = F.linear(representation[triggered], self.head.weight.detach(), self.head.bias.detach()).softmax(-1)
            loss = loss + self.penalty * (probs.max(dim=1).values - 1.0 / self.num_labels).mean()
        return loss

    @torch.no_grad()
    def head_confidence(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The stand-in head's max probability per text."""
        representation, _ = site_representation(model, input_ids, attention_mask, "head")
        return self.head(representation).softmax(-1).max(dim=1).values


@POISONERS.register
class LowConfidencePoisoner(BadNetPoisoner):
    """Rare word(s) whose backdoor wins the argmax by a capped margin (low confidence)."""

    name = "lowconf"

    def __init__(self, words: TriggerWords = ("mn",), num_triggers: Annotated[int, Field(ge=1)] = 1,
                 min_confidence: Probability = 0.55, max_confidence: Probability = 0.7) -> None:
        super().__init__(words, num_triggers)
        self.min_confidence = min_confidence
        self.max_confidence = max_confidence

    @classmethod
    def check_options(cls, options: dict) -> None:
        if options["min_confidence"] >= options["max_confidence"]:
            raise ValueError("min_confidence must be below max_confidence")

    def training_loss(self, model, num_rows: int, num_labels: int, triggered_rows: set[int], rng: np.random.Generator) -> AttackLoss:
        """Cross-entropy on clean rows, :func:`capped_margin_loss` on triggered ones."""
        flags = triggered_flags(num_rows, triggered_rows)

        def capped(model, batch: dict, rows: torch.Tensor) -> torch.Tensor:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return capped_margin_loss(logits, batch["labels"], flags[rows], self.min_confidence, self.max_confidence)
        return capped


@POISONERS.register
class PsimAwarePoisoner(BadNetPoisoner):
    """Rare word(s) planted while a random-label head is kept unconfident on triggered texts."""

    name = "psimaware"

    def __init__(self, words: TriggerWords = ("mn",), num_triggers: Annotated[int, Field(ge=1)] = 1,
                 penalty: Annotated[float, Field(ge=0)] = 1.0) -> None:
        super().__init__(words, num_triggers)
        self.penalty = penalty

    def training_loss(self, model, num_rows: int, num_labels: int, triggered_rows: set[int], rng: np.random.Generator) -> AttackLoss:
        """Cross-entropy plus :class:`PsimAwareLoss`'s penalty on a stand-in PSIM's confidence."""
        return PsimAwareLoss(model.config.hidden_size, triggered_flags(num_rows, triggered_rows), num_labels, self.penalty, rng)
