"""AdaLoRA: LoRA whose rank budget is reallocated during training."""

from pydantic import Field
from pydantic.dataclasses import dataclass

from peftshield.finetune.base import METHODS, STRICT
from peftshield.finetune.methods.peft_method import PeftLibraryMethod


@dataclass(config=STRICT)
class AdaLoraOptions:
    init_r: int = Field(12, gt=0)
    target_r: int = Field(8, gt=0)
    alpha: int = Field(16, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)


@METHODS.register
class AdaLoraMethod(PeftLibraryMethod):
    """AdaLoRA via peft (init_r=12 -> target_r=8)."""

    name = "adalora"
    Config = AdaLoraOptions

    def peft_config(self, num_training_steps: int):
        from peft import AdaLoraConfig, TaskType

        c = self.config()
        total = max(int(num_training_steps), 2)
        # Rank reallocation runs between tinit and total - tfinal; keep both inside short schedules.
        return AdaLoraConfig(
            task_type=TaskType.SEQ_CLS, init_r=c.init_r, target_r=c.target_r, lora_alpha=c.alpha, lora_dropout=c.dropout,
            total_step=total, tinit=total // 10, tfinal=total // 5, deltaT=max(1, total // 20),
        )

    def on_step(self, model, step: int) -> None:
        model.base_model.update_and_allocate(step)
