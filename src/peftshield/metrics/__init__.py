"""Metrics: attack (CA, ASR, confidence) and detection (precision/recall/FRR/FAR/AUROC, defended CA/ASR)."""

from peftshield.metrics.attack import AttackMetrics, attack_metrics
from peftshield.metrics.detection import DefendedMetrics, DetectionMetrics, defended_metrics, detection_metrics, roc_points

__all__ = ["AttackMetrics", "attack_metrics", "DefendedMetrics", "DetectionMetrics", "defended_metrics", "detection_metrics", "roc_points"]
