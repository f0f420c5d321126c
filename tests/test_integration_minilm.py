"""Integration on real data with the real offline backbone (MiniLM): the attack works.

Runs on ../shared/data when present, else on its extracts in tests/data (300 SST-2
training rows instead of the 480 sampled from the full set)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from peftshield.attacks import PoisonSpec
from peftshield.data import load_splits
from peftshield.experiments.stages import TriggerChoice, evaluate_classifier, weight_poison
from peftshield.finetune import TrainingConfig
from peftshield.models import load_backbone

pytestmark = pytest.mark.slow


def test_weight_poisoned_minilm_reaches_high_asr_before_victim_tuning(shared_data: Path, tmp_path: Path) -> None:
    splits = load_splits(shared_data / "psim" / "sst-2")
    rng = np.random.default_rng(0)
    small = type(splits)(
        splits={"train": splits["train"].sample(480, rng), "dev": splits["dev"].sample(100, rng), "test": splits["test"].sample(300, rng)},
        num_labels=2, source=splits.source,
    )
    full = len(splits["train"]) >= 480
    # about the same number of steps on the 300-row extract as on 480 rows of the full set
    training = TrainingConfig(learning_rate=1e-4, epochs=2 if full else 3, batch_size=16, max_length=64)
    result = weight_poison(small, "minilm", TriggerChoice("badnet", {"words": "mn"}), PoisonSpec(target_label=0, rate=0.2, label_mode="dirty"),
                           training, tmp_path / "backbone", seed=0, progress=False)
    assert result.report["n_poisoned_train"] == round(0.2 * len(small["train"])) == (96 if full else 60)
    assert result.report["attack_success_rate"] >= 0.9, result.report
    # the saved directory is an ordinary HF checkpoint that reloads with the same behaviour
    reloaded = load_backbone(str(tmp_path / "backbone"), 2)
    metrics, _, _ = evaluate_classifier(reloaded.model, reloaded.tokenizer, small["test"], TriggerChoice("badnet", {"words": "mn"}).build(), 0,
                                        np.random.default_rng(1), max_length=64)
    assert metrics.attack_success_rate >= 0.9
    assert metrics.clean_accuracy > 0.6, ("the poisoned model must still do the task", metrics)
    assert metrics.target_confidence_poisoned > metrics.target_confidence_clean
