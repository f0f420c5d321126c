"""Prompt tuning: trainable soft-prompt embeddings prepended to the input."""

from pydantic import Field
from pydantic.dataclasses import dataclass

from peftshield.finetune.base import METHODS, STRICT
from peftshield.finetune.methods.peft_method import PeftLibraryMethod


@dataclass(config=STRICT)
class PromptTuningOptions:
    num_virtual_tokens: int = Field(5, gt=0)


@METHODS.register
class PromptTuningMethod(PeftLibraryMethod):
    """Prompt tuning via peft (5 virtual tokens)."""

    name = "prompt"
    feeds_embeddings = True
    Config = PromptTuningOptions

    def peft_config(self, num_training_steps: int):
        from peft import PromptTuningConfig, TaskType

        return PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=self.config().num_virtual_tokens)
