"""Fail fast and clearly when the Hugging Face hub cannot be reached."""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

from peftshield.errors import HubUnavailableError


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the hub host resolves and accepts a connection (cached per process)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def require_hub(what: str, hint: str) -> None:
    """Raise a one-line :class:`HubUnavailableError` for ``what`` when the hub is unreachable."""
    if not hub_reachable():
        raise HubUnavailableError(f"{what}: the Hugging Face hub is not reachable (offline or HF_HUB_OFFLINE=1); {hint}")
