"""Clean accuracy, attack success rate and target-class confidence."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class AttackMetrics:
    """Metrics of one model on a clean test set and its triggered (ASR) counterpart.

    ``target_confidence_clean`` is the mean target-class probability on the clean
    non-target test samples, the same rows the ASR set is built from, so the two
    confidences compare like with like.
    """

    clean_accuracy: float
    attack_success_rate: float
    target_confidence_poisoned: float
    target_confidence_clean: float
    per_class_accuracy: dict[str, float]
    n_clean: int
    n_poisoned: int
    target_label: int
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def attack_metrics(
    clean_probs: np.ndarray, clean_labels: np.ndarray, poisoned_probs: np.ndarray, target_label: int, seconds: float = 0.0
) -> AttackMetrics:
    from sklearn.metrics import accuracy_score, recall_score

    clean_labels = np.asarray(clean_labels)
    predictions = clean_probs.argmax(axis=1)
    classes = list(range(clean_probs.shape[1]))
    recalls = recall_score(clean_labels, predictions, labels=classes, average=None, zero_division=0)
    non_target = clean_labels != target_label
    return AttackMetrics(
        clean_accuracy=float(accuracy_score(clean_labels, predictions)),
        attack_success_rate=float((poisoned_probs.argmax(axis=1) == target_label).mean()) if len(poisoned_probs) else float("nan"),
        target_confidence_poisoned=float(poisoned_probs[:, target_label].mean()) if len(poisoned_probs) else float("nan"),
        target_confidence_clean=float(clean_probs[non_target, target_label].mean()) if non_target.any() else float("nan"),
        per_class_accuracy={str(c): float(r) for c, r in zip(classes, recalls)},
        n_clean=int(len(clean_labels)),
        n_poisoned=int(len(poisoned_probs)),
        target_label=int(target_label),
        seconds=float(seconds),
    )
