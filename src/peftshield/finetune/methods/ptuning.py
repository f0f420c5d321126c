"""P-tuning: soft prompts produced by a small prompt encoder (MLP)."""

from pydantic import PositiveInt

from peftshield.finetune.base import METHODS
from peftshield.finetune.methods.peft_method import PeftLibraryMethod


@METHODS.register
class PTuningMethod(PeftLibraryMethod):
    """P-tuning via peft (5 virtual tokens, prompt-encoder hidden 128)."""

    name = "ptuning"
    feeds_embeddings = True

    def __init__(self, num_virtual_tokens: PositiveInt = 5, encoder_hidden_size: PositiveInt = 128) -> None:
        self.num_virtual_tokens, self.encoder_hidden_size = num_virtual_tokens, encoder_hidden_size

    def peft_config(self, num_training_steps: int):
        from peft import PromptEncoderConfig, TaskType

        return PromptEncoderConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=self.num_virtual_tokens, encoder_hidden_size=self.encoder_hidden_size)
