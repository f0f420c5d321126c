"""Metrics: attack (CA, ASR, confidence), detection (precision/recall/FRR/FAR/AUROC, defended CA/ASR) and trigger recovery."""

from peftshield.metrics.attack import AttackMetrics, attack_metrics
from peftshield.metrics.detection import DefendedMetrics, DetectionMetrics, defended_metrics, detection_metrics, roc_points
from peftshield.metrics.recovery import recovered, recovery_rank

__all__ = ["AttackMetrics", "attack_metrics", "DefendedMetrics", "DetectionMetrics", "defended_metrics", "detection_metrics", "roc_points", "recovered", "recovery_rank"]
