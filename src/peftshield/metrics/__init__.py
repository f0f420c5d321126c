"""Metrics: attack (CA, ASR, confidence) and, for defenses, detection."""

from peftshield.metrics.attack import AttackMetrics, attack_metrics

__all__ = ["AttackMetrics", "attack_metrics"]
