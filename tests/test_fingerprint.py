"""The two persisted model digests keep their formats (saved finetune.json checksums, detector
and calibration identities, audit-cache keys all record them), and change with any byte."""

from __future__ import annotations

import os

import pytest

from peftshield.errors import DataError
from peftshield.finetune.checkpoint import backbone_fingerprint, model_fingerprint
from peftshield.fingerprint import file_sha256, files_sha256, short_content_sha256


@pytest.fixture()
def backbone(tmp_path):
    folder = tmp_path / "backbone"
    folder.mkdir()
    (folder / "config.json").write_bytes(b'{"model_type": "bert"}')
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


def test_formats_are_the_recorded_ones(backbone):
    files = [backbone / "config.json", backbone / "model.safetensors"]
    assert file_sha256(files[1]) == "9a129038d9a00aed0cf6a7ea059ca50a813449061ab87848cf1a13eafdf33b2c"  # sha256sum's
    assert files_sha256(files, "minilm") == "d8274f8ead22f97342e103c1926f39b632ad1436d0d1b2d7427902b56e8a2585"
    assert short_content_sha256(files) == "e72cc7f3afa36434"
    assert backbone_fingerprint(backbone) == short_content_sha256(files)


def test_every_byte_and_name_counts(backbone):
    files = [backbone / "config.json", backbone / "model.safetensors"]
    before = (files_sha256(files), short_content_sha256(files), model_fingerprint(backbone))
    assert files_sha256(files, "other") != before[0]
    stat = os.stat(files[1])
    files[1].write_bytes(b"weightz")
    os.utime(files[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    after = (files_sha256(files), short_content_sha256(files), model_fingerprint(backbone))
    assert all(a != b for a, b in zip(before, after))


def test_unreadable_file_is_one_line(tmp_path):
    with pytest.raises(DataError, match="missing.safetensors: cannot read"):
        file_sha256(tmp_path / "missing.safetensors")
    with pytest.raises(DataError, match="missing.safetensors: cannot read"):
        short_content_sha256([tmp_path / "missing.safetensors"])
