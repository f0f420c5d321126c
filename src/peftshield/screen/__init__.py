"""``peftshield screen``: triage a fleet of PEFT adapters.

Stage 1 (:mod:`peftshield.screen.weights`, :mod:`peftshield.screen.fleet`) reads every
adapter's weights, never runs it: the spectrum of each module's weight change B·A, compared with
the other adapters of the fleet on the same base model, targets and rank (no labels needed).
Stage 2 runs ``peftshield audit`` on the most unusual adapters within a budget, and on a
seeded random sample of the rest so the report can estimate what stage 1 missed.
"""

from peftshield.screen.fleet import FleetScreen, ScreenRow, select_for_audit
from peftshield.screen.weights import AdapterFeatures, adapter_features

__all__ = ["AdapterFeatures", "FleetScreen", "ScreenRow", "adapter_features", "select_for_audit"]
