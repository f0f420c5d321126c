"""Detection metrics of a poisoned-input filter, and defended CA/ASR."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class DetectionMetrics:
    """Poisoned texts are the positive class; ``frr``: clean texts rejected, ``far``: triggered texts let through."""

    precision: float
    recall: float
    f1: float
    frr: float
    far: float
    auroc: float
    threshold: float

    def to_dict(self) -> dict:
        return asdict(self)


def detection_metrics(clean_scores: np.ndarray, poisoned_scores: np.ndarray, threshold: float) -> DetectionMetrics:
    """Scores are suspicion (higher = more likely poisoned); a text is flagged when score > threshold."""
    from sklearn.metrics import precision_recall_fscore_support, roc_auc_score

    truth = np.concatenate([np.zeros(len(clean_scores), dtype=int), np.ones(len(poisoned_scores), dtype=int)])
    scores = np.concatenate([clean_scores, poisoned_scores])
    flagged = (scores > threshold).astype(int)
    precision, recall, f1, _ = precision_recall_fscore_support(truth, flagged, average="binary", zero_division=0)
    auroc = roc_auc_score(truth, scores) if len(clean_scores) and len(poisoned_scores) else float("nan")
    return DetectionMetrics(
        precision=float(precision), recall=float(recall), f1=float(f1),
        frr=float((clean_scores > threshold).mean()) if len(clean_scores) else float("nan"),
        far=float((poisoned_scores <= threshold).mean()) if len(poisoned_scores) else float("nan"),
        auroc=float(auroc), threshold=float(threshold),
    )


def roc_points(clean_scores: np.ndarray, poisoned_scores: np.ndarray) -> dict[str, list[float]]:
    """The full ROC curve (false-positive rate = FRR, true-positive rate = 1 - FAR) for plots."""
    from sklearn.metrics import roc_curve

    truth = np.concatenate([np.zeros(len(clean_scores)), np.ones(len(poisoned_scores))])
    fpr, tpr, thresholds = roc_curve(truth, np.concatenate([clean_scores, poisoned_scores]))
    return {"frr": fpr.tolist(), "tpr": tpr.tolist(), "threshold": np.nan_to_num(thresholds, posinf=1e9).tolist()}


@dataclass
class DefendedMetrics:
    """CA and ASR with a filter in front of the model: a flagged clean text counts as an error,
    a flagged triggered text as a failed attack."""

    defended_clean_accuracy: float
    defended_attack_success_rate: float

    def to_dict(self) -> dict:
        return asdict(self)


def defended_metrics(
    clean_correct: np.ndarray, clean_flagged: np.ndarray, poisoned_hit_target: np.ndarray, poisoned_flagged: np.ndarray
) -> DefendedMetrics:
    return DefendedMetrics(
        defended_clean_accuracy=float((clean_correct & ~clean_flagged).mean()) if len(clean_correct) else float("nan"),
        defended_attack_success_rate=float((poisoned_hit_target & ~poisoned_flagged).mean()) if len(poisoned_hit_target) else float("nan"),
    )
