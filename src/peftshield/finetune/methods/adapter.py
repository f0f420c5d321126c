"""Bottleneck adapters (Houlsby/Pfeiffer style) through AdapterHub's ``adapters`` library."""

from typing import Literal

from pydantic import PositiveInt

from peftshield.errors import ConfigError
from peftshield.finetune.base import METHODS, FineTuneMethod, classification_head

ADAPTER_NAME = "peftshield"


@METHODS.register
class BottleneckAdapterMethod(FineTuneMethod):
    """Bottleneck adapter via AdapterHub adapters (reduction factor 16)."""

    name = "adapter"

    def __init__(self, reduction_factor: PositiveInt = 16, variant: Literal["seq_bn", "double_seq_bn"] = "seq_bn") -> None:
        self.reduction_factor, self.variant = reduction_factor, variant

    def wrap(self, model, num_training_steps: int):
        try:
            import adapters
            from adapters import DoubleSeqBnConfig, SeqBnConfig
        except ImportError:
            raise ConfigError("method 'adapter' needs AdapterHub's 'adapters' package (pip install adapters)") from None
        checked = self.validated()  # a method built by hand is checked before the model is touched
        adapters.init(model)
        config_cls = SeqBnConfig if checked.variant == "seq_bn" else DoubleSeqBnConfig
        model.add_adapter(ADAPTER_NAME, config=config_cls(reduction_factor=checked.reduction_factor))
        model.train_adapter(ADAPTER_NAME)  # freezes the backbone and activates the adapter
        head = classification_head(model)
        for parameter in head.parameters():
            parameter.requires_grad = True
        return model
