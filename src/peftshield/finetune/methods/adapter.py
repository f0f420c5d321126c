"""Bottleneck adapters (Houlsby/Pfeiffer style) through AdapterHub's ``adapters`` library."""

from typing import Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from peftshield.errors import ConfigError
from peftshield.finetune.base import METHODS, STRICT, FineTuneMethod, classification_head

ADAPTER_NAME = "peftshield"


@dataclass(config=STRICT)
class AdapterOptions:
    reduction_factor: int = Field(16, gt=0)
    variant: Literal["seq_bn", "double_seq_bn"] = "seq_bn"


@METHODS.register
class BottleneckAdapterMethod(FineTuneMethod):
    """Bottleneck adapter via AdapterHub adapters (reduction factor 16)."""

    name = "adapter"
    Config = AdapterOptions

    def wrap(self, model, num_training_steps: int):
        try:
            import adapters
            from adapters import DoubleSeqBnConfig, SeqBnConfig
        except ImportError:
            raise ConfigError("method 'adapter' needs AdapterHub's 'adapters' package (pip install adapters)") from None
        c = self.config()
        adapters.init(model)
        config_cls = SeqBnConfig if c.variant == "seq_bn" else DoubleSeqBnConfig
        model.add_adapter(ADAPTER_NAME, config=config_cls(reduction_factor=c.reduction_factor))
        model.train_adapter(ADAPTER_NAME)  # freezes the backbone and activates the adapter
        head = classification_head(model)
        for parameter in head.parameters():
            parameter.requires_grad = True
        return model
