"""Audits cached by content: the same weights (sha256) under the same audit settings are not
audited again; the earlier audit's files are reused.

Entries are folders ``<cache>/<key>/`` holding the audit's files and ``entry.json`` (when and
what). The default cache lives in the output folder (``OUT/.cache``): the output folder is
replaced whole at the end of a run, so entries are read from the old folder and carried
into the new one (hard links where the file system allows, copies elsewhere).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from peftshield.io import atomic_directory

CACHE_DIR = ".cache"
ENTRY_FILE = "entry.json"


def cache_key(weights_sha256: str, settings: dict) -> str:
    blob = json.dumps({"weights": weights_sha256, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def link_files(source: Path, dest: Path, copy: bool = False) -> None:
    """The regular files directly in ``source`` (an audit's files are flat) into ``dest``:
    hard links where the file system allows (cache to cache), copies with ``copy``."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if not path.is_file() or path.name.startswith("."):
            continue
        if not copy:
            try:
                os.link(path, dest / path.name)
                continue
            except OSError:
                pass
        shutil.copy2(path, dest / path.name)


class ContentCache:
    """Read entries from ``read_dir``, write new ones to ``write_dir`` (the same folder for
    ``--cache-dir``; the old and the new output folder for the default)."""

    def __init__(self, read_dir: Path | None, write_dir: Path | None = None) -> None:
        self.read_dir = read_dir
        self.write_dir = write_dir or read_dir

    def get(self, key: str) -> Path | None:
        for folder in (self.write_dir, self.read_dir):
            if folder is not None and (folder / key / ENTRY_FILE).is_file():
                return folder / key
        return None

    def put(self, key: str, files_from: Path, about: dict) -> None:
        if self.write_dir is None:
            return
        with atomic_directory(self.write_dir / key) as tmp:
            link_files(files_from, tmp, copy=True)
            (tmp / ENTRY_FILE).write_text(json.dumps({**about, "stored": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=1), encoding="utf-8")

    def carry_over(self) -> None:
        """Copy the entries of ``read_dir`` that ``write_dir`` lacks (the default cache, whose old folder is about to be replaced)."""
        if self.read_dir is None or self.write_dir is None or self.read_dir == self.write_dir or not self.read_dir.is_dir():
            return
        for entry in self.read_dir.iterdir():
            if (entry / ENTRY_FILE).is_file() and not (self.write_dir / entry.name).exists():
                link_files(entry, self.write_dir / entry.name)

    @staticmethod
    def about(entry: Path) -> dict:
        try:
            return json.loads((entry / ENTRY_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
