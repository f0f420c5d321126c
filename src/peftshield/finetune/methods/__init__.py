"""One module per fine-tuning method; importing this package registers them all."""

from peftshield.finetune.methods import adalora, adapter, full, ia3, lora, prefix, prompt, ptuning  # noqa: F401
