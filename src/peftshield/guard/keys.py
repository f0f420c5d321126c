"""The service's API keys: read from a file, checked in constant time, and the error a request gets."""

from __future__ import annotations

import hmac
from pathlib import Path

from peftshield.errors import ConfigError


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def read_api_keys(path: Path) -> list[str]:
    """One key per line (blank lines and ``#`` comments ignored)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"--api-key-file {path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--api-key-file {path}: not UTF-8 text") from None
    keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise ConfigError(f"--api-key-file {path}: holds no key (one key per line)")
    return keys


def api_key_file_warning(path: Path) -> str | None:
    """ssh's check: a key file that others can read (or write) is a warning, its keys are as
    good as shared; None when only its owner can."""
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return None
    if not mode & 0o077:
        return None
    what = "readable" if mode & 0o044 else "writable"
    return f"--api-key-file {path}: the file is {what} by others (permissions {mode:04o}); chmod 600 {path}"


def check_api_key(request, keys: list[str] | None) -> None:
    """401 unless the request carries one of ``keys`` (no keys: no check)."""
    if keys is not None:
        given = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization", "")
        if not given and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not given:
            raise ApiError(401, "missing API key (send it as 'Authorization: Bearer KEY' or 'X-API-Key: KEY')")
        if not any(hmac.compare_digest(given.encode(), key.encode()) for key in keys):
            raise ApiError(401, "wrong API key")
