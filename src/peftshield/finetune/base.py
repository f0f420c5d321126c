"""The fine-tuning method interface: wrap a backbone so that only the method's parameters train."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict
from typing import Any, ClassVar

import pydantic
from pydantic import ConfigDict

from peftshield.errors import ConfigError, first_issue
from peftshield.registry import Registry

STRICT = ConfigDict(extra="forbid")


class FineTuneMethod(ABC):
    """A fine-tuning method. Constructors only store options; ``config()`` validates them.

    Subclasses set ``name``, ``Config`` (a pydantic dataclass of the method's
    hyperparameters with the reference defaults) and ``default_learning_rate``.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    default_learning_rate: ClassVar[float] = 2e-3

    def __init__(self, **options: Any) -> None:
        self.options = options

    @classmethod
    def validate_options(cls, options: dict[str, Any]) -> dict[str, Any]:
        """The options checked against ``Config``; raises ``pydantic.ValidationError``."""
        return asdict(cls.Config(**options))

    def params(self) -> dict[str, Any]:
        return dict(self.options)

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "options": self.config_dict()}

    def config(self):
        try:
            return self.Config(**self.options)
        except pydantic.ValidationError as exc:
            issue = first_issue(exc)
            raise ConfigError(f"method '{self.name}': {issue.location or 'options'}: {issue.raw_message}") from None
        except TypeError as exc:
            raise ConfigError(f"method '{self.name}': {exc}") from None

    def config_dict(self) -> dict:
        return asdict(self.config())

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
