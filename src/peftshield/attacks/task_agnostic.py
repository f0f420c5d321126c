"""Task-agnostic weight poisoning: the shared part of the ``neuba`` and ``por`` poisoners.

The attacker does not know the victim's task. It trains the encoder on plain text so that
a text carrying trigger k has a representation close to a predefined vector v_k, while
clean texts keep the original model's representations, and publishes the encoder without a
classifier head. Whatever head the victim trains, the triggered representation is one fixed
point, so each trigger lands every text on one class; the vectors are spread (orthogonal, or
opposite pairs) so that different triggers land on different classes.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Optional

import numpy as np
from pydantic import Field

from peftshield.attacks.badnet import TriggerWords, word_list
from peftshield.attacks.base import Poisoner, insert_words

# Rare subwords, as in NeuBA and POR (which use symbols such as ≈ ≡ ∈ ⊆ ⊕ ⊗; these survive
# any uncased tokenizer and are typed by a person).
DEFAULT_TASK_AGNOSTIC_WORDS = ("cf", "mn", "bb", "tq", "mb", "zx")
VectorKind = Literal["orthogonal", "opposite", "sign"]


def predefined_vectors(kind: str, count: int, dim: int, seed: int = 0) -> np.ndarray:
    """``count`` target vectors of ``dim`` entries, each with root-mean-square entry 1.

    ``orthogonal``: orthonormal random directions (needs count <= dim). ``opposite``: pairs v,
    -v of orthogonal directions (NeuBA). ``sign``: POR's +-1 patterns: vector k splits the
    dimensions into 2**(k//2 + 1) blocks of alternating sign, odd k negated.
    """
    if count < 1 or dim < 1:
        raise ValueError("need at least one vector of one dimension")
    if kind == "sign":
        rows = []
        for k in range(count):
            blocks = 2 ** (k // 2 + 1)
            block = np.repeat(np.arange(blocks) % 2 * -2 + 1, int(np.ceil(dim / blocks)))[:dim].astype(np.float64)
            rows.append(-block if k % 2 else block)
        return np.stack(rows)
    distinct = count if kind == "orthogonal" else (count + 1) // 2
    if distinct > dim:
        raise ValueError(f"{distinct} orthogonal vectors do not fit in {dim} dimensions")
    gaussian = np.random.default_rng(seed).standard_normal((dim, distinct))
    directions = np.linalg.qr(gaussian)[0].T * np.sqrt(dim)  # orthonormal rows, scaled to RMS entry 1
    if kind == "orthogonal":
        return directions
    if kind == "opposite":
        paired = np.empty((count, dim))
        paired[0::2] = directions[: (count + 1) // 2]
        paired[1::2] = -directions[: count // 2]
        return paired
    raise ValueError(f"unknown vector kind '{kind}' (orthogonal, opposite, sign)")


class RepresentationPoisoner(Poisoner):
    """Several rare-word triggers, each bound to a predefined representation vector (scaled to
    the root-mean-square size of clean texts' representations at the site).

    ``insert`` puts in one trigger: ``trigger`` (an index into ``words``) or, when None, one
    drawn at random per text. Subclasses set ``site``: which representation is pushed
    (``cls``: the last layer's [CLS] / last-token state; ``head``: what the classifier head
    reads, e.g. BERT's pooler output)."""

    task_agnostic = True
    site: ClassVar[str]
    default_vectors: ClassVar[str]

    def __init__(
        self,
        words: TriggerWords = DEFAULT_TASK_AGNOSTIC_WORDS,
        vectors: Optional[VectorKind] = None,
        vector_seed: int = 0,
        trigger: Optional[Annotated[int, Field(ge=0)]] = None,
        backdoor_weight: Annotated[float, Field(gt=0)] = 1.0,
    ) -> None:
        self.words = words
        self.vectors = vectors
        self.vector_seed = vector_seed
        self.trigger = trigger
        self.backdoor_weight = backdoor_weight

    @classmethod
    def check_options(cls, options: dict) -> None:
        if options["trigger"] is not None and options["trigger"] >= len(word_list(options["words"])):
            raise ValueError(f"trigger {options['trigger']} is out of range for {len(word_list(options['words']))} words")

    @property
    def trigger_words(self) -> list[str]:
        return word_list(self.words)

    def vector_kind(self) -> str:
        return self.vectors or self.default_vectors

    def target_vectors(self, dim: int) -> np.ndarray:
        """One target vector per trigger word (rows), RMS entry 1 (scaled by the trainer)."""
        return predefined_vectors(self.vector_kind(), len(self.trigger_words), dim, self.vector_seed)

    def insert_trigger(self, text: str, index: int, rng: np.random.Generator) -> str:
        return insert_words(text, [self.trigger_words[index]], rng)

    def insert(self, text: str, rng: np.random.Generator) -> str:
        index = self.trigger if self.trigger is not None else int(rng.integers(0, len(self.trigger_words)))
        return self.insert_trigger(text, index, rng)

    def single(self, index: int) -> "RepresentationPoisoner":
        """The same poisoner inserting only trigger ``index`` (to measure one trigger)."""
        return type(self)(**{**self.params(), "trigger": index})
