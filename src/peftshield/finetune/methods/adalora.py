"""AdaLoRA: LoRA whose rank budget is reallocated during training."""

from pydantic import PositiveInt

from peftshield.finetune.base import METHODS
from peftshield.finetune.methods.peft_method import Dropout, PeftLibraryMethod


@METHODS.register
class AdaLoraMethod(PeftLibraryMethod):
    """AdaLoRA via peft (init_r=12 -> target_r=8)."""

    name = "adalora"

    def __init__(self, init_r: PositiveInt = 12, target_r: PositiveInt = 8, alpha: PositiveInt = 16, dropout: Dropout = 0.1) -> None:
        self.init_r, self.target_r, self.alpha, self.dropout = init_r, target_r, alpha, dropout

    def peft_config(self, num_training_steps: int):
        from peft import AdaLoraConfig, TaskType

        total = max(int(num_training_steps), 2)
        # Rank reallocation runs between tinit and total - tfinal; keep both inside short schedules.
        return AdaLoraConfig(
            task_type=TaskType.SEQ_CLS, init_r=self.init_r, target_r=self.target_r, lora_alpha=self.alpha, lora_dropout=self.dropout,
            total_step=total, tinit=total // 10, tfinal=total // 5, deltaT=max(1, total // 20),
        )

    def on_step(self, model, step: int) -> None:
        model.base_model.update_and_allocate(step)
