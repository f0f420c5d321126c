"""The stage cache lives with the scenario (:mod:`peftshield.experiments.cache`); kept importable here."""

from peftshield.experiments.cache import STAGE_FILE, StageCache, canonical_json, run_lock, stage_key

__all__ = ["STAGE_FILE", "StageCache", "canonical_json", "run_lock", "stage_key"]
