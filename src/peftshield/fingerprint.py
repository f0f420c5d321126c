"""How peftshield hashes a model: SHA-256 over its files' names and contents, in one module.

Two digests are built here, each persisted where it is used, so neither format may change
without re-creating what recorded it:

- :func:`files_sha256`: one ``FILENAME SHA256`` line per file after ``checkpoint=NAME`` (the
  model's name when it is not a local folder). The audit gate's content-cache key
  (:func:`peftshield.gate.targets.model_files_sha256`) and its weights' checksum.
- :func:`short_content_sha256`: 16 hex digits over each file's name and bytes. A backbone's
  checksum recorded in every ``finetune.json``
  (:func:`peftshield.finetune.checkpoint.backbone_fingerprint`), and the parts of a saved
  classifier's identity (:func:`peftshield.finetune.checkpoint.model_fingerprint`) that key its
  detectors, guard calibrations and ONNX export.

Digests are cached per process while a file's resolved path, size and modification time stay
the same, so a serving process that checks its model's identity on every load reads each
weight file once.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Iterable

from peftshield.errors import DataError

BLOCK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """The file's SHA-256 (what ``sha256sum`` prints); one line naming the file if it cannot be read."""
    path = Path(path)
    try:
        stat = path.stat()
        # Keyed by what a rewrite cannot keep: the inode and the change time too (os.utime can
        # reset the modification time of a file rewritten at the same size, not its ctime).
        return _file_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev, stat.st_ctime_ns)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _read_into(digest, path: str) -> None:
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(BLOCK), b""):
            digest.update(block)


@functools.lru_cache(maxsize=256)
def _file_sha256(resolved: str, size: int, mtime_ns: int, inode: int, device: int, ctime_ns: int) -> str:
    digest = hashlib.sha256()
    _read_into(digest, resolved)
    return digest.hexdigest()


def files_sha256(files: Iterable[Path], name: str = "") -> str:
    """SHA-256 over ``checkpoint=NAME`` and one ``FILENAME SHA256`` line per file, in the order
    given. ``name`` is the model's name when it is not a local folder, else empty."""
    digest = hashlib.sha256(f"checkpoint={name}\n".encode())
    for path in files:
        digest.update(f"{Path(path).name} {file_sha256(path)}\n".encode())
    return digest.hexdigest()


def short_content_sha256(files: Iterable[Path]) -> str:
    """16 hex digits of SHA-256 over each file's name, a NUL byte and its bytes, in the order given."""
    try:
        stats = tuple((str(Path(f).resolve()), Path(f).stat().st_size, Path(f).stat().st_mtime_ns) for f in files)
        return _short_content_sha256(stats)
    except OSError as exc:
        raise DataError(f"{exc.filename}: cannot read ({exc.strerror or exc})") from None


@functools.lru_cache(maxsize=64)
def _short_content_sha256(stats: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for resolved, _, _ in stats:
        digest.update(Path(resolved).name.encode("utf-8") + b"\0")
        _read_into(digest, resolved)
    return digest.hexdigest()[:16]
