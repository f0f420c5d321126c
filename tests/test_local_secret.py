"""The user's secret that keys what peftshield trusts from its caches (audit entries, ONNX export markers)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from peftshield.errors import ConfigError
from peftshield.local_secret import CACHE_KEY_ENV, cache_secret, key_file


def test_processes_starting_together_share_one_key(tmp_path: Path, monkeypatch) -> None:
    """Callers that find no key file at the same moment end up with one key, the one on disk (a
    second key would silently void the markers and cache entries made under the first)."""
    monkeypatch.delenv(CACHE_KEY_ENV, raising=False)
    for attempt in range(5):
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / f"config-{attempt}"))
        start, keys = threading.Barrier(6), []

        def make() -> None:
            start.wait()
            keys.append(cache_secret())

        callers = [threading.Thread(target=make) for _ in range(6)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join()
        assert len(keys) == 6 and set(keys) == {key_file().read_bytes().strip()}, attempt
        assert key_file().stat().st_mode & 0o077 == 0  # readable by its owner only
        assert [p.name for p in key_file().parent.iterdir()] == [key_file().name]  # no temporary file left


def test_a_key_given_in_any_bytes_is_used_and_a_broken_key_file_is_one_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(CACHE_KEY_ENV, "runner-secret-\udcff\udcfe-0123456789")  # bytes that are not UTF-8, as os.environ holds them
    assert cache_secret().startswith(b"runner-secret-\xff\xfe")
    monkeypatch.delenv(CACHE_KEY_ENV)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    key_file().parent.mkdir(parents=True)
    key_file().write_bytes(b"")
    with pytest.raises(ConfigError, match="empty"):
        cache_secret()
    key_file().unlink()
    key_file().mkdir()
    with pytest.raises(ConfigError, match="cannot read the cache key"):
        cache_secret()
