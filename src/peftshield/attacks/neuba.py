"""NeuBA-style neuron-level backdoor (Zhang et al., 2021): task-agnostic, on the pooled representation.

The attacker pushes the pooled representation (BERT's pooler output where the encoder has one,
else the [CLS] / last-token state) of any text carrying trigger k to a predefined vector
(default: opposite pairs, NeuBA's layout), and keeps clean texts' representations where the
original model had them (the MiniLM package ships no masked-LM head, so this replaces NeuBA's
MLM loss). Training: ``experiments.poisoning.plant_representation_backdoor``.
"""

from __future__ import annotations

from peftshield.attacks.base import POISONERS
from peftshield.attacks.task_agnostic import RepresentationPoisoner


@POISONERS.register
class NeubaPoisoner(RepresentationPoisoner):
    """Task-agnostic: each rare word maps the pooled representation to its own fixed vector (NeuBA)."""

    name = "neuba"
    site = "head"
    default_vectors = "opposite"
