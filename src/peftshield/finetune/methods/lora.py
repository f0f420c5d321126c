"""LoRA: low-rank updates of the attention projections."""

from typing import Optional

from pydantic import Field
from pydantic.dataclasses import dataclass

from peftshield.finetune.base import METHODS, STRICT
from peftshield.finetune.methods.peft_method import PeftLibraryMethod


@dataclass(config=STRICT)
class LoraOptions:
    r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    target_modules: Optional[list[str]] = None


@METHODS.register
class LoraMethod(PeftLibraryMethod):
    """LoRA via peft (r=8, alpha=16, dropout 0.1)."""

    name = "lora"
    Config = LoraOptions

    def peft_config(self, num_training_steps: int):
        from peft import LoraConfig, TaskType

        c = self.config()
        return LoraConfig(task_type=TaskType.SEQ_CLS, r=c.r, lora_alpha=c.alpha, lora_dropout=c.dropout, target_modules=c.target_modules)
