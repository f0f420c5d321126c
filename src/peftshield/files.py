"""The file names of peftshield's artifacts and of the formats it reads, each written once."""

FINETUNE_MANIFEST = "finetune.json"  # what 'peftshield finetune', 'psim train' and the defenses that train write beside the weights
ADAPTER_CONFIG = "adapter_config.json"  # a PEFT adapter folder's config (peft's file name)
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # a PEFT adapter folder's weights (peft's file name)
TRAINABLE_WEIGHTS = "trainable.safetensors"  # the trained weights 'peftshield finetune' saves beside finetune.json
DETECTOR_MANIFEST = "detector.json"  # what 'peftshield detector fit' writes beside a fitted detector's state
ATTACK_MANIFEST = "attack.json"  # what 'peftshield attack' writes beside a poisoned backbone: its trigger, target and own CA/ASR
