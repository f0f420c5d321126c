"""Shared wrapping for the methods the ``peft`` library implements."""

from __future__ import annotations

from abc import abstractmethod

from peftshield.finetune.base import FineTuneMethod


class PeftLibraryMethod(FineTuneMethod):
    """A method expressed as a ``peft`` config; ``peft`` freezes the rest and trains the head too."""

    @abstractmethod
    def peft_config(self, num_training_steps: int):
        """The ``peft`` config for this method's options."""

    def wrap(self, model, num_training_steps: int):
        from peft import get_peft_model

        return get_peft_model(model, self.peft_config(num_training_steps))
