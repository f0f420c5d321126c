"""Shared wrapping for the methods the ``peft`` library implements."""

from __future__ import annotations

from abc import abstractmethod
from typing import Annotated

from pydantic import Field

from peftshield.finetune.base import FineTuneMethod

Dropout = Annotated[float, Field(ge=0, lt=1)]  # a dropout probability, as LoRA-style methods take it


class PeftLibraryMethod(FineTuneMethod):
    """A method expressed as a ``peft`` config; ``peft`` freezes the rest and trains the head too."""

    @abstractmethod
    def peft_config(self, num_training_steps: int):
        """The ``peft`` config for this method's options."""

    def wrap(self, model, num_training_steps: int):
        from peft import get_peft_model

        # a method built by hand is checked before the model is touched, and trains with the checked values
        return get_peft_model(model, self.validated().peft_config(num_training_steps))
