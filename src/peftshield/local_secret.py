"""The secret this user's peftshield keys what it writes to caches with, so that a cache an
attacker can write (a CI cache restored from a pull request's job, a shared ``~/.cache``) cannot
vouch for itself.

What peftshield trusts from a cache is keyed with this secret: the audit gate's cached audits
(an HMAC over each entry, :mod:`peftshield.gate.cache`) and the markers that let an ONNX graph
found in a model's or detector's ``onnx/`` folder run (:mod:`peftshield.models.runtime`). The
secret never lives in a cache: ``$PEFTSHIELD_CACHE_KEY`` (a CI secret), else a random key made
on first use in ``$XDG_CONFIG_HOME/peftshield/cache.key`` (``~/.config``), readable by its owner
only. A cache restored without that key is only a miss: audited or exported again.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import tempfile
from pathlib import Path

from peftshield.errors import ConfigError

CACHE_KEY_ENV = "PEFTSHIELD_CACHE_KEY"
KEY_FILE = "cache.key"


def key_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "peftshield" / KEY_FILE


def cache_secret() -> bytes:
    """The key: ``$PEFTSHIELD_CACHE_KEY``, else the user's key file (made on first use, mode 600)."""
    given = os.environ.get(CACHE_KEY_ENV)
    if given:
        if len(given) < 16:
            raise ConfigError(f"{CACHE_KEY_ENV}: at least 16 characters (a random secret)")
        return os.fsencode(given)  # the bytes as given, whatever the locale (never a traceback)
    path = key_file()
    try:
        key = read_regular(path, 4096).strip()
    except FileNotFoundError:
        return _new_key(path)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the cache key ({exc.strerror or exc}); set {CACHE_KEY_ENV} or remove the file") from None
    if not key:
        raise ConfigError(f"{path}: the cache key file is empty; remove it (a new key is made) or set {CACHE_KEY_ENV}")
    return key


def keyed_digest(secret: bytes, message: bytes) -> str:
    """HMAC-SHA256 of ``message`` under ``secret``, hex: what only a holder of the secret can compute."""
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def _new_key(path: Path) -> bytes:
    """A new random key, written whole to a temporary file (mode 600) and linked into place: a
    process starting at the same moment either links its own first or reads the one linked
    (never a half-written file, never a second key that would silently void the first's markers)."""
    key = secrets.token_hex(32).encode()
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{KEY_FILE}-")
        try:
            with os.fdopen(handle, "wb") as out:  # closed even when the write fails
                out.write(key + b"\n")
            os.link(temporary, path)  # fails when the name exists (a link included): never replaces a key
        except FileExistsError:
            key = read_regular(path, 4096).strip()
            if not key:
                raise OSError("an empty key file") from None
        finally:
            os.unlink(temporary)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write the cache key ({exc.strerror or exc}); set {CACHE_KEY_ENV} "
                          "(or, for the audit gate, use --no-cache)") from None
    return key


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of ``path`` if it is a regular file (not a link, not a device) of at most ``limit`` bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            raise OSError(f"{path}: not a regular file of at most {limit} bytes")
        return handle.read(limit + 1)
