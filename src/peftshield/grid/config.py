"""The grid file of ``peftshield run``: a scenario config (:class:`peftshield.experiments.config.ScenarioConfig`) read from YAML."""

from __future__ import annotations

from pathlib import Path

from peftshield.experiments.config import ScenarioConfig
from peftshield.yaml_config import load_yaml_model


def load_grid_config(path: str | Path) -> ScenarioConfig:
    return load_yaml_model(path, ScenarioConfig)
