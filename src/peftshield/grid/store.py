"""The result store: one embedded SQLite file per run, one row per cell and metric.

``cells`` holds one row per finished cell (its key, the config hash, seed, coordinates,
versions and seconds); ``results`` one row per (cell, defense, metric). A cell's rows are
written in one transaction together with its ``cells`` row, so an interrupted run leaves
either all of a cell or none of it, and re-running a cell replaces its rows instead of
duplicating them.
"""

from __future__ import annotations

import csv
import io
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from peftshield.experiments.scenario import NO_DEFENSE
from peftshield.io import atomic_write_text

__all__ = ["CellRecord", "NO_DEFENSE", "RESULT_COLUMNS", "ResultStore"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    cell_key TEXT PRIMARY KEY,
    config_hash TEXT NOT NULL,
    seed INTEGER NOT NULL,
    dataset TEXT NOT NULL,
    trigger TEXT NOT NULL,
    method TEXT NOT NULL,
    versions TEXT NOT NULL,
    seconds REAL NOT NULL,
    finished_at REAL NOT NULL,
    details TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS results (
    cell_key TEXT NOT NULL REFERENCES cells(cell_key) ON DELETE CASCADE,
    defense TEXT NOT NULL,
    metric TEXT NOT NULL,
    value REAL,
    PRIMARY KEY (cell_key, defense, metric)
);
"""
RESULT_COLUMNS = ("cell_key", "config_hash", "seed", "dataset", "trigger", "method", "defense", "metric", "value", "seconds")


@dataclass
class CellRecord:
    cell_key: str
    config_hash: str
    seed: int
    dataset: str
    trigger: str
    method: str
    versions: dict
    seconds: float
    metrics: dict[str, dict[str, float | None]]  # defense ("none" = undefended) -> metric -> value
    details: dict


def flatten_metrics(values: dict, prefix: str = "") -> dict[str, float | None]:
    """Numbers of a nested dict as ``a.b`` keys; strings and lists are not metrics and are left out."""
    flat: dict[str, float | None] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, f"{name}."))
        elif value is None or isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[name] = None if value is None else float(value)
    return flat


class ResultStore:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60)
        db.execute("PRAGMA foreign_keys = ON")
        return db

    def has_cell(self, cell_key: str) -> bool:
        with self._connect() as db:
            return db.execute("SELECT 1 FROM cells WHERE cell_key = ?", (cell_key,)).fetchone() is not None

    def save_cell(self, cell: CellRecord) -> None:
        rows = [(cell.cell_key, defense, metric, value)
                for defense, values in cell.metrics.items() for metric, value in flatten_metrics(values).items()]
        db = self._connect()
        try:
            with db:  # one transaction: the cell and all its metrics, or nothing
                db.execute("DELETE FROM results WHERE cell_key = ?", (cell.cell_key,))
                db.execute(
                    "INSERT OR REPLACE INTO cells VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (cell.cell_key, cell.config_hash, cell.seed, cell.dataset, cell.trigger, cell.method,
                     json.dumps(cell.versions, sort_keys=True), cell.seconds, time.time(), json.dumps(cell.details, sort_keys=True)),
                )
                db.executemany("INSERT INTO results VALUES (?, ?, ?, ?)", rows)
        finally:
            db.close()

    def rows(self) -> list[dict]:
        """Every result joined with its cell, as dicts with :data:`RESULT_COLUMNS`."""
        db = self._connect()
        try:
            cursor = db.execute(
                "SELECT c.cell_key, c.config_hash, c.seed, c.dataset, c.trigger, c.method, r.defense, r.metric, r.value, c.seconds "
                "FROM results r JOIN cells c USING (cell_key) ORDER BY c.dataset, c.trigger, c.method, c.seed, r.defense, r.metric"
            )
            return [dict(zip(RESULT_COLUMNS, row)) for row in cursor.fetchall()]
        finally:
            db.close()

    def cells(self) -> list[dict]:
        db = self._connect()
        try:
            cursor = db.execute("SELECT cell_key, seed, dataset, trigger, method, seconds, details FROM cells ORDER BY finished_at")
            return [{"cell_key": k, "seed": s, "dataset": d, "trigger": t, "method": m, "seconds": sec, "details": json.loads(det)}
                    for k, s, d, t, m, sec, det in cursor.fetchall()]
        finally:
            db.close()

    def export_csv(self, path: str | Path) -> Path:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=RESULT_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows())
        return atomic_write_text(path, buffer.getvalue())
