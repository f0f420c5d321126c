"""Prefix tuning (P-tuning v2): trainable key/value prefixes in every layer."""

from pydantic import PositiveInt

from peftshield.errors import ConfigError
from peftshield.finetune.base import METHODS
from peftshield.finetune.methods.peft_method import PeftLibraryMethod


@METHODS.register
class PrefixTuningMethod(PeftLibraryMethod):
    """Prefix tuning / P-tuning v2 via peft (5 virtual tokens)."""

    name = "prefix"

    def __init__(self, num_virtual_tokens: PositiveInt = 5) -> None:
        self.num_virtual_tokens = num_virtual_tokens

    def peft_config(self, num_training_steps: int):
        from peft import PrefixTuningConfig, TaskType

        return PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=self.num_virtual_tokens)

    def wrap(self, model, num_training_steps: int):
        """Prefix tuning breaks on some encoder classes in some peft versions (past_key_values
        handling); probe one forward pass so a breakage is a clear error, not a stack trace mid-training."""
        import torch

        wrapped = super().wrap(model, num_training_steps)
        probe = torch.ones((1, 4), dtype=torch.long)
        try:
            with torch.no_grad():
                wrapped(input_ids=probe, attention_mask=probe)
        except Exception as exc:  # peft raises TypeError/ValueError/RuntimeError here depending on version
            raise ConfigError(
                f"method 'prefix': peft prefix tuning does not work with {type(model).__name__} in this peft version "
                f"({type(exc).__name__}: {str(exc)[:120]}); use 'ptuning' or 'prompt' instead"
            ) from None
        return wrapped
