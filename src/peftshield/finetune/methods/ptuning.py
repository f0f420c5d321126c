"""P-tuning: soft prompts produced by a small prompt encoder (MLP)."""

from pydantic import Field
from pydantic.dataclasses import dataclass

from peftshield.finetune.base import METHODS, STRICT
from peftshield.finetune.methods.peft_method import PeftLibraryMethod


@dataclass(config=STRICT)
class PTuningOptions:
    num_virtual_tokens: int = Field(5, gt=0)
    encoder_hidden_size: int = Field(128, gt=0)


@METHODS.register
class PTuningMethod(PeftLibraryMethod):
    """P-tuning via peft (5 virtual tokens, prompt-encoder hidden 128)."""

    name = "ptuning"
    feeds_embeddings = True
    Config = PTuningOptions

    def peft_config(self, num_training_steps: int):
        from peft import PromptEncoderConfig, TaskType

        c = self.config()
        return PromptEncoderConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=c.num_virtual_tokens, encoder_hidden_size=c.encoder_hidden_size)
