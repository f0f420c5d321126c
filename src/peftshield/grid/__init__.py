"""Experiment grids: a YAML config, cells cached by content hash, a SQLite result store,
and executors (local, Ray) that run the cells."""

from peftshield.grid.config import load_grid_config
from peftshield.grid.store import ResultStore

__all__ = ["load_grid_config", "ResultStore"]
