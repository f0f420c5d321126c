"""(IA)^3: learned rescaling vectors on keys, values and feed-forward activations."""

from peftshield.finetune.base import METHODS
from peftshield.finetune.methods.peft_method import PeftLibraryMethod


@METHODS.register
class IA3Method(PeftLibraryMethod):
    """(IA)^3 via peft: learned rescaling vectors."""

    name = "ia3"

    def __init__(self) -> None:
        pass

    def peft_config(self, num_training_steps: int):
        from peft import IA3Config, TaskType

        return IA3Config(task_type=TaskType.SEQ_CLS)
