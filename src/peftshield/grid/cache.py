"""Stages cached by a content hash of their inputs.

A stage's key hashes the canonical JSON of everything that decides its output (data,
settings, seed, the keys of the stages it builds on, the peftshield version), so a
weight-poisoned backbone is trained once and reused by every cell that needs it, and a
changed setting can never pick up a stale artefact. A stage's directory is complete only
once its ``stage.json`` exists; it is written last, inside an atomic directory rename.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

from peftshield.io import atomic_directory, atomic_write_json, read_json

STAGE_FILE = "stage.json"
KEY_LENGTH = 16


def canonical_json(payload: object) -> str:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)


def stage_key(kind: str, inputs: dict) -> str:
    """``kind-<first 16 hex digits of sha256(canonical inputs)>``: stable across runs and machines."""
    return f"{kind}-{hashlib.sha256(canonical_json({'kind': kind, **inputs}).encode()).hexdigest()[:KEY_LENGTH]}"


class StageCache:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key

    def done(self, key: str) -> bool:
        return (self.path(key) / STAGE_FILE).is_file()

    def result(self, key: str) -> dict:
        return read_json(self.path(key) / STAGE_FILE)["record"]

    def compute(self, key: str, inputs: dict, build: Callable[[Path], dict]) -> tuple[dict, bool]:
        """The stage's record, building it into a fresh directory if it is not cached.

        Returns (record, was_cached). ``build(directory)`` writes its artefacts there and
        returns a JSON-able record, saved as ``stage.json`` together with the inputs."""
        if self.done(key):
            return self.result(key), True
        self.root.mkdir(parents=True, exist_ok=True)
        for leftover in self.root.glob(f".{key}.*.tmp"):  # a killed run's half-built stage
            shutil.rmtree(leftover, ignore_errors=True)
        with atomic_directory(self.path(key)) as tmp:
            record = build(tmp)
            atomic_write_json(tmp / STAGE_FILE, {"key": key, "inputs": inputs, "record": record})
        return self.result(key), False
