"""Task-agnostic weight poisoning: the shared part of the ``neuba`` and ``por`` poisoners.

The attacker does not know the victim's task. It trains the encoder on plain text so that
a text carrying trigger k has a representation close to a predefined vector v_k, while
clean texts keep the original model's representations, and publishes the encoder without a
classifier head. Whatever head the victim trains, the triggered representation is one fixed
point, so each trigger lands every text on one class; the vectors are spread (orthogonal, or
opposite pairs) so that different triggers land on different classes.

The attacker's objective is the poisoner's own (:meth:`RepresentationPoisoner.representation_loss`,
a :class:`RepresentationLoss`), as a classification poisoner's is
(:meth:`peftshield.attacks.Poisoner.training_loss`); the training loop that uses it is
``experiments.poisoning.plant_representation_backdoor``.
"""

from __future__ import annotations

import copy
from typing import Annotated, ClassVar, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from peftshield.attacks.badnet import TriggerWords, word_list
from peftshield.attacks.base import Poisoner, insert_words
from peftshield.models.batching import EncodedTexts, collate, encode_texts
from peftshield.models.inference import site_representation

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


def masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean squared difference of token states ``a`` and ``b`` (batch, tokens, width) over
    the real tokens of ``mask`` (padding left out)."""
    weights = mask.unsqueeze(-1).to(a.dtype)
    return (((a - b) ** 2) * weights).sum() / (weights.sum() * a.shape[-1]).clamp_min(1.0)


class RepresentationLoss:
    """The task-agnostic attacker's objective, ``loss(model, batch, rows)`` per batch of the
    plain-text rows ``rows`` (encoded as ``batch``), the sum of:

    - the clean term, on every row of the batch: the MSE between the trained model's token
      states and the reference's (the original model, frozen), over real tokens, divided by
      the square of the reference's RMS token state; plus the MSE between the two models'
      representations at the poisoner's site, divided by the square of its RMS size
      (``rms``). It keeps clean texts where the original model had them.
    - the backdoor term, on the rows of the batch in ``triggered_rows``: each gets a random
      trigger k (drawn again at every call), and the MSE between the triggered text's site
      representation and its target ``targets[k]`` (``scale * v_k``), divided by ``scale**2``,
      weighted by the poisoner's ``backdoor_weight``. It pulls triggered texts to their vectors.

    Built by :meth:`RepresentationPoisoner.representation_loss`; ``reference``, ``targets``
    and ``scale`` are what the attack's report measures against."""

    def __init__(self, poisoner: "RepresentationPoisoner", reference, targets: torch.Tensor, scale: float, rms: float,
                 hidden_rms: float, tokenizer, texts: list[str], triggered_rows: set[int], max_length: int,
                 rng: np.random.Generator) -> None:
        self.poisoner = poisoner
        self.reference = reference
        self.targets = targets
        self.scale = scale
        self.rms = rms
        self.hidden_rms = hidden_rms
        self.tokenizer = tokenizer
        self.texts = texts
        self.triggered_rows = triggered_rows
        self.max_length = max_length
        self.rng = rng

    def __call__(self, model, batch: dict, rows: list[int]) -> torch.Tensor:
        poisoner, site = self.poisoner, self.poisoner.site
        site_clean, hidden_clean = site_representation(model, batch["input_ids"], batch["attention_mask"], site)
        with torch.no_grad():
            site_orig, hidden_orig = site_representation(self.reference, batch["input_ids"], batch["attention_mask"], site)
        loss = masked_mse(hidden_clean, hidden_orig, batch["attention_mask"]) / self.hidden_rms ** 2 + F.mse_loss(site_clean, site_orig) / self.rms ** 2
        chosen = [r for r in rows if r in self.triggered_rows]
        if chosen:
            which = self.rng.integers(0, len(poisoner.trigger_words), size=len(chosen))
            triggered = [poisoner.insert_trigger(self.texts[r], int(k), self.rng) for r, k in zip(chosen, which)]
            tbatch = collate(encode_texts(self.tokenizer, triggered, self.max_length), list(range(len(triggered))))
            site_triggered, _ = site_representation(model, tbatch["input_ids"], tbatch["attention_mask"], site)
            loss = loss + poisoner.backdoor_weight * F.mse_loss(site_triggered, self.targets[torch.as_tensor(which)]) / (self.scale ** 2)
        return loss


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

    def representation_loss(self, model, tokenizer, texts: list[str], encoded: EncodedTexts, triggered_rows: set[int],
                            max_length: int, rng: np.random.Generator) -> RepresentationLoss:
        """The attacker's objective for training ``model``'s encoder on the plain ``texts``
        (``encoded``), of which ``triggered_rows`` also appear with a trigger: a
        :class:`RepresentationLoss` against a frozen copy of ``model`` as it is now (the
        reference). The targets are :meth:`target_vectors` scaled to the root-mean-square size
        of the reference's site representations of (up to 64 of) the clean texts; ``rng``
        draws the triggers during training."""
        reference = copy.deepcopy(model).eval()
        for parameter in reference.parameters():
            parameter.requires_grad_(False)
        with torch.no_grad():  # the targets' scale: the reference's representations of clean texts
            probe = collate(encoded, list(range(min(64, len(texts)))))
            site_ref, hidden_ref = site_representation(reference, probe["input_ids"], probe["attention_mask"], self.site)
            dim = site_ref.shape[-1]
            rms = float(site_ref.pow(2).mean().sqrt())
            hidden_rms = float(hidden_ref[probe["attention_mask"].bool()].pow(2).mean().sqrt())
        scale = rms  # targets as large as clean representations: reachable through a tanh pooler, not out of range
        targets = torch.as_tensor(self.target_vectors(dim), dtype=torch.float32) * scale
        return RepresentationLoss(self, reference, targets, scale, rms, hidden_rms, tokenizer, texts, triggered_rows, max_length, rng)

    def insert_trigger(self, text: str, index: int, rng: np.random.Generator) -> str:
        return insert_words(text, [self.trigger_words[index]], rng)

    def insert(self, text: str, rng: np.random.Generator) -> str:
        index = self.trigger if self.trigger is not None else int(rng.integers(0, len(self.trigger_words)))
        return self.insert_trigger(text, index, rng)

    def single(self, index: int) -> "RepresentationPoisoner":
        """The same poisoner inserting only trigger ``index`` (to measure one trigger)."""
        return type(self)(**{**self.params(), "trigger": index})
