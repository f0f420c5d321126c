"""Full fine-tuning: every parameter trains."""

from peftshield.finetune.base import METHODS, FineTuneMethod


@METHODS.register
class FullFineTuning(FineTuneMethod):
    """Full fine-tuning: every parameter trains (default lr 2e-5)."""

    name = "full"
    default_learning_rate = 2e-5

    def __init__(self) -> None:
        pass

    def wrap(self, model, num_training_steps: int):
        for parameter in model.parameters():
            parameter.requires_grad = True
        return model
