"""Prompt tuning: trainable soft-prompt embeddings prepended to the input."""

from pydantic import PositiveInt

from peftshield.finetune.base import METHODS
from peftshield.finetune.methods.peft_method import PeftLibraryMethod


@METHODS.register
class PromptTuningMethod(PeftLibraryMethod):
    """Prompt tuning via peft (5 virtual tokens)."""

    name = "prompt"
    feeds_embeddings = True

    def __init__(self, num_virtual_tokens: PositiveInt = 5) -> None:
        self.num_virtual_tokens = num_virtual_tokens

    def peft_config(self, num_training_steps: int):
        from peft import PromptTuningConfig, TaskType

        return PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=self.num_virtual_tokens)
