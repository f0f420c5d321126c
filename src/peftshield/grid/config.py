"""The grid file of ``peftshield run``: a scenario config (:mod:`peftshield.experiments.config`) read from YAML."""

from __future__ import annotations

from pathlib import Path

from peftshield.experiments.config import (
    AttackSection,
    DatasetEntry,
    DefenseEntry,
    ScenarioConfig,
    TriggerEntry,
    VictimSection,
)
from peftshield.yaml_config import load_yaml_model

GridConfig = ScenarioConfig

__all__ = ["AttackSection", "DatasetEntry", "DefenseEntry", "GridConfig", "TriggerEntry", "VictimSection", "load_grid_config"]


def load_grid_config(path: str | Path) -> GridConfig:
    return load_yaml_model(path, GridConfig)
