"""LoRA: low-rank updates of the attention projections."""

from typing import Optional

from pydantic import PositiveInt

from peftshield.finetune.base import METHODS
from peftshield.finetune.methods.peft_method import Dropout, PeftLibraryMethod


@METHODS.register
class LoraMethod(PeftLibraryMethod):
    """LoRA via peft (r=8, alpha=16, dropout 0.1)."""

    name = "lora"

    def __init__(self, r: PositiveInt = 8, alpha: PositiveInt = 16, dropout: Dropout = 0.1, target_modules: Optional[list[str]] = None) -> None:
        self.r, self.alpha, self.dropout, self.target_modules = r, alpha, dropout, target_modules

    def peft_config(self, num_training_steps: int):
        from peft import LoraConfig, TaskType

        return LoraConfig(task_type=TaskType.SEQ_CLS, r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=self.target_modules)
