"""Audits cached by content: the same weights (sha256) under the same audit settings are not
audited again; the earlier audit's files are reused.

A cache is read from places an attacker may write (a folder committed beside a model, a CI
cache restored from another job), so an entry is trusted only when it proves it was written
by this machine's peftshield:

- **Where**: the user's cache folder (``$PEFTSHIELD_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/peftshield/audit``, else ``~/.cache/peftshield/audit``), never the output
  folder or the checkout unless ``--cache-dir`` says so.
- **Authenticated**: ``entry.json`` lists each file's sha256 and an HMAC-SHA256 over the
  entry's key and its whole record (that list included), with a secret that never lives in the
  cache (:func:`peftshield.local_secret.cache_secret`: ``$PEFTSHIELD_CACHE_KEY``, a CI secret,
  else a random key made on first use in ``$XDG_CONFIG_HOME/peftshield/cache.key``, readable by
  its owner only). An entry whose MAC, file list or any file
  does not check out, or that holds anything but regular files, is a miss: audited again.
- **No links**: an entry folder or file that is a symbolic link is a miss; files are opened
  without following links and copied only when they are regular files, so nothing outside
  the cache can be copied into a report.

The verdict of a hit is still recomputed by the caller from the stored raw score and the
calibration in force (:func:`peftshield.gate.audit_gate.row_from_audit`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from pathlib import Path

from peftshield.io import atomic_directory
from peftshield.local_secret import CACHE_KEY_ENV, cache_secret, keyed_digest, read_regular

ENTRY_FILE = "entry.json"
CACHE_DIR_ENV = "PEFTSHIELD_CACHE_DIR"
MAX_CACHED_FILE = 64 * 1024 * 1024  # an audit's files are small; a larger one is not an audit's


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "peftshield" / "audit"


def copy_regular_files(source: Path, dest: Path, names: list[str] | None = None) -> None:
    """The regular files directly in ``source`` (an audit's files are flat), or the ``names``
    among them, copied into ``dest``. Links and anything else are left behind, never followed."""
    dest.mkdir(parents=True, exist_ok=True)
    chosen = names if names is not None else sorted(p.name for p in source.iterdir())
    for name in chosen:
        if name.startswith(".") or "/" in name or name in ("", ".."):
            continue
        try:
            data = read_regular(source / name, MAX_CACHED_FILE)
        except OSError:
            continue
        (dest / name).write_bytes(data)


def _mac(secret: bytes, key: str, record: dict) -> str:
    """The MAC of an entry's record (every field but the MAC itself, the files' sha256 among them) under its key."""
    message = json.dumps({"key": key, "record": {k: v for k, v in record.items() if k != "mac"}}, sort_keys=True, default=str).encode()
    return keyed_digest(secret, message)


def cache_key(weights_sha256: str, settings: dict) -> str:
    blob = json.dumps({"weights": weights_sha256, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class ContentCache:
    """Entries ``<folder>/<key>/``: the audit's files and ``entry.json`` (when, what, the files'
    sha256, the MAC). ``folder`` None: no cache."""

    def __init__(self, folder: Path | None, secret: bytes | None = None) -> None:
        self.folder = folder
        self._secret = secret
        self.rejected: list[str] = []  # keys whose entries did not check out, for the log

    @property
    def secret(self) -> bytes:
        if self._secret is None:
            self._secret = cache_secret()
        return self._secret

    def get(self, key: str) -> tuple[Path, dict] | None:
        """The entry's folder and its ``entry.json`` when it checks out; else None (a miss)."""
        if self.folder is None:
            return None
        entry = self.folder / key
        if not entry.is_dir() or entry.is_symlink():
            return None
        try:
            about = json.loads(read_regular(entry / ENTRY_FILE, 1 << 20))
            files = about["files"]
            valid = (isinstance(files, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())
                     and hmac.compare_digest(str(about["mac"]), _mac(self.secret, key, about))
                     and all(hashlib.sha256(read_regular(entry / name, MAX_CACHED_FILE)).hexdigest() == digest for name, digest in files.items()))
        except (OSError, ValueError, KeyError, TypeError):
            valid = False
        if not valid:
            self.rejected.append(key)
            return None
        return entry, about

    def put(self, key: str, files_from: Path, about: dict) -> None:
        if self.folder is None:
            return
        names = sorted(p.name for p in files_from.iterdir() if p.is_file() and not p.is_symlink() and not p.name.startswith(".") and p.name != ENTRY_FILE)
        with atomic_directory(self.folder / key) as tmp:
            copy_regular_files(files_from, tmp, names)
            files = {name: hashlib.sha256((tmp / name).read_bytes()).hexdigest() for name in names if (tmp / name).is_file()}
            record = {**about, "stored": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files}
            record["mac"] = _mac(self.secret, key, record)
            (tmp / ENTRY_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")


__all__ = ["CACHE_DIR_ENV", "CACHE_KEY_ENV", "ContentCache", "cache_key", "cache_secret", "copy_regular_files", "default_cache_dir"]
