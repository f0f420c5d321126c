"""Defenses (one module each, registered in :data:`DEFENSES`): PSIM and the baselines it is compared with."""

from peftshield.defenses import bki, cube, dan, occlusion, onion, psim, psimplus, rap, reference, shift, strip  # noqa: F401  (registration)
from peftshield.defenses.base import DEFENSES, Defense, DefenseContext
from peftshield.defenses.psim import PSIM, random_label_reset
from peftshield.defenses.thresholds import ThresholdPolicy, calibrate_threshold, default_confidence_threshold

__all__ = ["DEFENSES", "Defense", "DefenseContext", "PSIM", "random_label_reset", "ThresholdPolicy", "calibrate_threshold", "default_confidence_threshold"]
