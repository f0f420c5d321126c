"""The fine-tuning method interface: wrap a backbone so that only the method's parameters train."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import pydantic

from peftshield.components import Component
from peftshield.errors import ConfigError, validation_line
from peftshield.registry import Registry


class FineTuneMethod(Component, ABC):
    """A fine-tuning method, a :class:`~peftshield.components.Component` like a poisoner or a
    defense: its constructor's keyword parameters are its hyperparameters (with the reference
    defaults, typed and bounded) and it only stores them; the registry validates them, and
    :meth:`config_dict` validates a method built by hand.

    Subclasses set ``name`` and ``default_learning_rate`` and implement :meth:`wrap`.
    """

    default_learning_rate: ClassVar[float] = 2e-3

    def validated(self) -> "FineTuneMethod":
        """This method rebuilt from its options once typed and checked (types, bounds and the
        cross-option checks of :meth:`check_options`); a one-line :class:`ConfigError` naming the
        method otherwise. ``wrap`` builds from it, so a method made by hand trains with what was
        checked (``r="8"`` becomes 8), not with what it was given."""
        try:
            return type(self)(**self.validate_options(self.params()))
        except pydantic.ValidationError as exc:
            raise ConfigError(f"method '{self.name}': {validation_line(exc, whole='options', label='option')}") from None
        except ValueError as exc:  # check_options
            raise ConfigError(f"method '{self.name}': {exc}") from None

    def config_dict(self) -> dict[str, Any]:
        """The options, checked (:meth:`validated`), in JSON form: what a fine-tuned folder's
        manifest records and a stage key is built from."""
        return self.options_model()(**self.validated().params()).model_dump(mode="json")

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "options": self.config_dict()}

    # Soft prompts fed as input embeddings (prompt tuning, P-tuning): a decoder's classifier
    # cannot locate padding then and reads the last position, so decoders pad on the left.
    feeds_embeddings = False

    @abstractmethod
    def wrap(self, model, num_training_steps: int):
        """Return the model to train, with exactly the method's parameters trainable."""

    def on_step(self, model, step: int) -> None:
        """Called after each optimiser step (AdaLoRA reallocates ranks here)."""


METHODS: Registry[FineTuneMethod] = Registry("fine-tuning method")


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def classification_head(model):
    """The sequence-classification head module (``classifier`` on BERT-likes, ``score`` on decoders)."""
    for attribute in ("classifier", "score"):
        head = getattr(model, attribute, None)
        if head is not None:
            return head
    raise ConfigError(f"{type(model).__name__} has no classification head ('classifier' or 'score')")
