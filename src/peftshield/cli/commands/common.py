"""Helpers shared by the command modules."""

from __future__ import annotations

from pathlib import Path

from peftshield.finetune import TrainingConfig, merge_training


def training_from_options(base: TrainingConfig | None = None, **overrides) -> TrainingConfig:
    return merge_training(base or TrainingConfig(), overrides)


def find_attack_manifest(model_dir: Path) -> dict | None:
    """The ``attack.json`` of a backbone, or of the backbone a fine-tuned model was built on."""
    from peftshield.experiments.stages import ATTACK_MANIFEST
    from peftshield.finetune.checkpoint import MANIFEST_FILE
    from peftshield.io import read_json

    candidates = [model_dir / ATTACK_MANIFEST]
    if (model_dir / MANIFEST_FILE).is_file():
        candidates.append(Path(read_json(model_dir / MANIFEST_FILE)["backbone"]) / ATTACK_MANIFEST)
    for path in candidates:
        if path.is_file():
            return read_json(path)
    return None
