"""Full fine-tuning: every parameter trains."""

from pydantic.dataclasses import dataclass

from peftshield.finetune.base import METHODS, STRICT, FineTuneMethod


@dataclass(config=STRICT)
class FullConfig:
    pass


@METHODS.register
class FullFineTuning(FineTuneMethod):
    """Full fine-tuning: every parameter trains (default lr 2e-5)."""

    name = "full"
    Config = FullConfig
    default_learning_rate = 2e-5

    def wrap(self, model, num_training_steps: int):
        for parameter in model.parameters():
            parameter.requires_grad = True
        return model
