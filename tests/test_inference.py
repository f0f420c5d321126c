"""Batched inference: chunked tokenisation gives the same probabilities as one pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from peftshield.models import inference
from peftshield.models.tiny import tiny_backbone


def test_large_inputs_are_tokenised_in_chunks_with_identical_scores(monkeypatch) -> None:
    backbone = tiny_backbone()
    texts = [("good film " if i % 3 else "bad boring plot ") * (i % 7 + 1) for i in range(50)]
    whole = inference.predict_proba(backbone.model, backbone.tokenizer, texts, 8, 32)
    encoded_sizes: list[int] = []
    original = inference.encode_texts

    def counting_encode(tokenizer, batch, max_length):
        encoded_sizes.append(len(batch))
        return original(tokenizer, batch, max_length)

    monkeypatch.setattr(inference, "ENCODE_CHUNK", 7)
    monkeypatch.setattr(inference, "encode_texts", counting_encode)
    chunked = inference.predict_proba(backbone.model, backbone.tokenizer, texts, 8, 32)
    assert max(encoded_sizes) == 7 and sum(encoded_sizes) == 50, "never more than one chunk's token ids at once"
    np.testing.assert_allclose(chunked, whole, atol=1e-6)
    assert np.ptp(whole[:, 0]) > 0, "the texts get different scores, so the comparison means something"


def test_the_onnx_cache_write_probe_follows_no_link_a_folder_ships(tmp_path: Path) -> None:
    """A model or detector folder may ship onnx/.write-test as a link to a file anywhere (the
    marker that authorises running a graph, say): checking that onnx/ is writable must not
    create what the link points to, and the graph is exported and recorded as usual."""
    from peftshield.models.runtime import cached_graph, exported_here

    folder = tmp_path / "detector"
    (folder / "onnx").mkdir(parents=True)
    target = tmp_path / "elsewhere" / "created-by-the-probe"
    target.parent.mkdir()
    (folder / "onnx" / ".write-test").symlink_to(target)
    exports = []
    path = cached_graph(folder, "shift", "onnx", "fingerprint-1", lambda p: exports.append(p) or p.write_bytes(b"graph") or p)
    assert not target.exists() and not target.is_symlink()
    assert path == folder / "onnx" / "shift.onnx" and exports == [path] and exported_here(path, "fingerprint-1")
    assert not [p.name for p in (folder / "onnx").iterdir() if p.name.startswith(".write-test-")]  # the probe leaves nothing


def test_a_graph_planted_with_a_marker_made_without_the_users_secret_is_exported_again(tmp_path: Path, monkeypatch) -> None:
    """Whoever can write the user's cache (a CI cache restored from a pull request's job) can
    write any marker whose name they can compute: markers are keyed with the user's secret, so
    a planted graph whose marker was made without it (the old unkeyed name, or under another
    key) is not run but exported again; under the user's own key a graph it exported is reused."""
    import hashlib

    from peftshield.fingerprint import file_sha256
    from peftshield.models import runtime

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PEFTSHIELD_CACHE_KEY", "the-users-secret-0123456789")
    folder = tmp_path / "detector"
    exports = []

    def export(path: Path) -> Path:
        exports.append(path)
        path.write_bytes(b"the graph peftshield exported")
        return path

    path = runtime.cached_graph(folder, "shift", "onnx", "fingerprint-1", export)
    assert runtime.cached_graph(folder, "shift", "onnx", "fingerprint-1", export) == path and len(exports) == 1  # reused
    path.write_bytes(b"a planted graph")
    unkeyed = hashlib.sha256(f"fingerprint-1\0{path.name}\0{file_sha256(path)}".encode()).hexdigest()
    (runtime._exports_record() / unkeyed).touch()  # the marker as it was named before it was keyed
    monkeypatch.setenv("PEFTSHIELD_CACHE_KEY", "an-attackers-guess-0123456789")
    runtime.record_export(path, "fingerprint-1")  # the marker under another key
    monkeypatch.setenv("PEFTSHIELD_CACHE_KEY", "the-users-secret-0123456789")
    assert not runtime.exported_here(path, "fingerprint-1")
    assert runtime.cached_graph(folder, "shift", "onnx", "fingerprint-1", export) == path and len(exports) == 2
    assert path.read_bytes() == b"the graph peftshield exported"


def test_processes_that_start_together_export_a_graph_once(tmp_path: Path) -> None:
    """`serve --workers N` starts N processes that all look for the same graph: one exports it
    while the others wait on the lock, then find it made (two threads here, each with its own
    open of the lock file, as separate processes have). A lock file the folder ships as a link
    is not followed: nothing is created where it points, and the export goes on."""
    import threading
    import time

    from peftshield.models.runtime import cached_graph

    folder = tmp_path / "model"
    folder.mkdir()
    exports = []

    def export(path: Path) -> Path:
        exports.append(path)
        time.sleep(0.5)  # long enough for the other caller to arrive while this one exports
        path.write_bytes(b"graph")
        return path

    found = []
    callers = [threading.Thread(target=lambda: found.append(cached_graph(folder, "model", "onnx", "fingerprint-1", export))) for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert len(exports) == 1 and found == [folder / "onnx" / "model.onnx"] * 2

    shipped = tmp_path / "shipped"
    (shipped / "onnx").mkdir(parents=True)
    target = tmp_path / "elsewhere" / "created-by-the-lock"
    target.parent.mkdir()
    (shipped / "onnx" / ".shift.lock").symlink_to(target)
    assert cached_graph(shipped, "shift", "onnx", "fingerprint-1", export) == shipped / "onnx" / "shift.onnx"
    assert not target.exists() and len(exports) == 2


def test_a_link_in_the_user_cache_is_refused_before_anything_is_exported(tmp_path: Path, monkeypatch) -> None:
    """A restored cache may hold a link where peftshield keeps graphs of read-only folders (or its
    markers): it is one ConfigError, and nothing is exported, written or deleted where it points.
    An unreadable key is one line before any export too."""
    import hashlib

    import pytest

    from peftshield.errors import ConfigError
    from peftshield.models.runtime import cached_graph

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "shipped-onnx").mkdir()
    (folder / "onnx").symlink_to(tmp_path / "shipped-onnx")  # a link (as a read-only folder): graphs go to the user cache
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "model.onnx").write_bytes(b"the user's own file")
    user_onnx = tmp_path / "cache" / "peftshield" / "onnx"
    user_onnx.mkdir(parents=True)
    (user_onnx / hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16]).symlink_to(outside)
    exports = []

    def export(path: Path) -> Path:
        exports.append(path)
        path.write_bytes(b"graph")
        return path

    with pytest.raises(ConfigError, match="a link in peftshield's cache folder"):
        cached_graph(folder, "model", "onnx", "fingerprint-1", export)
    assert exports == [] and sorted(p.name for p in outside.iterdir()) == ["model.onnx"]
    assert (outside / "model.onnx").read_bytes() == b"the user's own file"
    (tmp_path / "cache" / "peftshield" / "onnx-exports").symlink_to(outside)
    with pytest.raises(ConfigError, match="a link in peftshield's cache folder"):
        cached_graph(tmp_path / "writable", "model", "onnx", "fingerprint-1", export)
    assert exports == []
    (tmp_path / "cache" / "peftshield" / "onnx-exports").unlink()
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    (tmp_path / "config" / "peftshield" / "cache.key").mkdir(parents=True)  # a key that cannot be read
    (tmp_path / "writable").mkdir()
    with pytest.raises(ConfigError, match="cannot read the cache key"):
        cached_graph(tmp_path / "writable", "model", "onnx", "fingerprint-1", export)
    assert exports == []
