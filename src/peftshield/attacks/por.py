"""POR-style poisoned output representation (Shen et al., 2021): task-agnostic, on the last
layer's output representation of [CLS] (the last token's, for a decoder): the state a
downstream head reads (directly in RoBERTa-style heads and decoders, through the pooler in BERT).

Targets default to POR's +-1 sign patterns (scaled to the size of clean representations).
Training: ``experiments.poisoning.plant_representation_backdoor``.
"""

from __future__ import annotations

from peftshield.attacks.base import POISONERS
from peftshield.attacks.task_agnostic import RepresentationPoisoner


@POISONERS.register
class PorPoisoner(RepresentationPoisoner):
    """Task-agnostic: each rare word maps the [CLS] output representation to a +-1 pattern (POR)."""

    name = "por"
    site = "cls"
    default_vectors = "sign"
