"""RAP: robustness-aware perturbations (Yang et al., 2021).

A rare word is inserted at the start of each input. Only that word's embedding row is
learned, so that on clean texts of the protected class the insertion lowers the
protected-class probability by a margin between ``drop_range[0]`` and ``drop_range[1]``.
A triggered input is held at the target class by the backdoor, so the same insertion
barely moves it. The score is the negative probability drop (higher = more robust =
more suspicious) for texts the victim assigns to the protected class; texts it assigns
to another class score -1 (they are not successful attacks). The threshold sits at a
clean-data FRR percentile.

The learned row is applied with a forward hook on the victim's input-embedding layer,
and every victim weight stays frozen, so RAP works unchanged in front of any PEFT model.
"""

from __future__ import annotations

from typing import Annotated, Optional

from pathlib import Path

import numpy as np
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt
import torch

from peftshield.defenses.base import DEFENSES, Defense, DefenseContext, clean_reference, load_json_state, save_json_state, victim_of
from peftshield.defenses.thresholds import CLEAN_FRR_POLICY, ThresholdPolicy
from peftshield.errors import ConfigError
from peftshield.models.batching import collate, encode_texts
from peftshield.models.inference import model_device, predict_proba

STATE_FILE = "rap.json"
NOT_PROTECTED_SCORE = -1.0


class _ReplaceEmbeddingRow:
    """Forward hook: wherever ``token_id`` occurs, the embedding output becomes ``vector``."""

    def __init__(self, token_id: int, vector: torch.Tensor) -> None:
        self.token_id, self.vector = token_id, vector

    def __call__(self, _module, inputs, output):
        mask = (inputs[0] == self.token_id).unsqueeze(-1)
        return torch.where(mask, self.vector.to(output.dtype), output)


@DEFENSES.register
class RAP(Defense):
    """Learned rare-word perturbation; flags inputs whose protected-class probability does not drop."""

    name = "rap"
    needs_victim = True

    def __init__(
        self, word: str = "jj", protected_label: Optional[NonNegativeInt] = None,
        drop_range: tuple[Annotated[float, Field(ge=0, le=1)], Annotated[float, Field(ge=0, le=1)]] = (0.1, 0.3),
        learning_rate: PositiveFloat = 1e-2, epochs: PositiveInt = 5, batch_size: PositiveInt = 32,
        max_train_samples: PositiveInt = 1000, threshold: ThresholdPolicy = CLEAN_FRR_POLICY, max_length: PositiveInt = 128,
    ) -> None:
        self.word = word
        self.protected_label = protected_label
        self.drop_range = drop_range
        self.learning_rate = learning_rate
        self.epochs = epochs
        self.batch_size = batch_size
        self.max_train_samples = max_train_samples
        self.threshold = threshold
        self.max_length = max_length

    @classmethod
    def check_options(cls, options: dict) -> None:
        low, high = options["drop_range"]
        if not low < high:
            raise ValueError(f"drop_range must satisfy low < high, got {tuple(options['drop_range'])}")

    def _attach(self, context: DefenseContext) -> None:
        self.model_, self.tokenizer_ = victim_of(self.name, context)
        pieces = self.tokenizer_.tokenize(self.word)
        if len(pieces) != 1:
            raise ConfigError(f"rap: word '{self.word}' must be one token of the victim's vocabulary, got {pieces}")
        self.token_id_ = int(self.tokenizer_.convert_tokens_to_ids(pieces[0]))
        self.embeddings_ = self.model_.get_input_embeddings()

    def _perturbed(self, texts: list[str]) -> list[str]:
        return [f"{self.word} {text}" for text in texts]

    def _hooked(self):
        return self.embeddings_.register_forward_hook(_ReplaceEmbeddingRow(self.token_id_, self.vector_))

    def fit(self, context: DefenseContext, rng: np.random.Generator) -> "RAP":
        low, high = self.drop_range
        if not 0 <= low < high <= 1:
            raise ConfigError(f"rap: drop_range must satisfy 0 <= low < high <= 1, got {self.drop_range}")
        self.protected_label_ = self.protected_label if self.protected_label is not None else context.protected_label
        if self.protected_label_ is None or not 0 <= self.protected_label_ < context.num_labels:
            raise ConfigError(f"rap: needs protected_label in 0..{context.num_labels - 1} (the class to protect), got {self.protected_label_}")
        self._attach(context)
        self.vector_ = self.embeddings_.weight[self.token_id_].detach().clone()
        protected = context.train.subset([i for i, y in enumerate(context.train.labels) if y == self.protected_label_])
        if not len(protected):
            raise ConfigError(f"rap: no training text has the protected label {self.protected_label_}")
        train = protected.sample(self.max_train_samples, rng).texts
        self._learn_vector(train, rng)
        reference = clean_reference(context)
        calibration = reference.subset([i for i, y in enumerate(reference.labels) if y == self.protected_label_])
        protected_prediction, negative_drop = self._protected_and_negative_drop(calibration.texts)
        if protected_prediction.any():  # only texts the victim puts in the protected class are ever scored
            negative_drop = negative_drop[protected_prediction]
        self.calibrate(context.num_labels, negative_drop, default=0.0)
        return self

    def _learn_vector(self, texts: list[str], rng: np.random.Generator) -> None:
        low, high = self.drop_range
        model, device = self.model_, model_device(self.model_)
        original = torch.as_tensor(predict_proba(model, self.tokenizer_, texts, 128, self.max_length)[:, self.protected_label_])
        encoded = encode_texts(self.tokenizer_, self._perturbed(texts), self.max_length)
        vector = torch.nn.Parameter(self.vector_.to(device))
        self.vector_ = vector
        optimizer = torch.optim.Adam([vector], lr=self.learning_rate)
        frozen = [(p, p.requires_grad) for p in model.parameters()]
        was_training = model.training
        model.eval()
        hook = self._hooked()
        try:
            for p, _ in frozen:
                p.requires_grad_(False)
            for _ in range(self.epochs):
                order = rng.permutation(len(texts))
                for start in range(0, len(order), self.batch_size):
                    indices = order[start : start + self.batch_size].tolist()
                    batch = {k: v.to(device) for k, v in collate(encoded, indices).items()}
                    perturbed = torch.softmax(model(**batch).logits.float(), dim=-1)[:, self.protected_label_]
                    drop = original[indices].to(device) - perturbed
                    loss = (torch.relu(low - drop) + torch.relu(drop - high)).mean()
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
        finally:
            hook.remove()
            for p, flag in frozen:
                p.requires_grad_(flag)
            model.train(was_training)
        self.vector_ = vector.detach()

    def _protected_and_negative_drop(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        original = predict_proba(self.model_, self.tokenizer_, texts, 128, self.max_length)
        hook = self._hooked()
        try:
            perturbed = predict_proba(self.model_, self.tokenizer_, self._perturbed(texts), 128, self.max_length)
        finally:
            hook.remove()
        drop = original[:, self.protected_label_] - perturbed[:, self.protected_label_]
        return original.argmax(axis=1) == self.protected_label_, -drop

    def score(self, texts: list[str]) -> np.ndarray:
        protected, negative_drop = self._protected_and_negative_drop(texts)
        return np.where(protected, negative_drop, NOT_PROTECTED_SCORE)

    def save(self, directory: str | Path) -> Path:
        return save_json_state(self, directory, STATE_FILE, {"protected_label": self.protected_label_, "vector": self.vector_.cpu().tolist()})

    @classmethod
    def load(cls, directory: str | Path, context: DefenseContext | None = None) -> "RAP":
        rap, state = load_json_state(cls, directory, STATE_FILE)
        rap.drop_range = tuple(rap.drop_range)
        rap._attach(context)
        rap.protected_label_ = state["protected_label"]
        rap.vector_ = torch.tensor(state["vector"], dtype=rap.embeddings_.weight.dtype, device=rap.embeddings_.weight.device)
        return rap
