"""Shared fixtures: the real data in ../shared/data (or its extracts in tests/data) and tiny datasets."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The audit cache and its key live in the user's folders: the tests (and the CLIs they start) get their own.
_USER_DIRS = tempfile.mkdtemp(prefix="peftshield-test-home-")
os.environ["XDG_CACHE_HOME"] = os.path.join(_USER_DIRS, "cache")
os.environ["XDG_CONFIG_HOME"] = os.path.join(_USER_DIRS, "config")
os.environ.pop("PEFTSHIELD_CACHE_DIR", None)
os.environ.pop("PEFTSHIELD_CACHE_KEY", None)
# The CI runner that runs these tests sets CI (and GitHub its GITHUB_* and RUNNER_*): the CLI reacts to
# them (warnings, job summaries), so the tests start from a plain shell and set them where they test them.
for _name in [name for name in os.environ if name == "CI" or name.startswith(("GITHUB_", "RUNNER_"))]:
    os.environ.pop(_name)

# Under pytest-xdist (make test: one worker per core) each worker and the CLIs it starts use one
# thread: two workers with two threads each would wait on each other.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PEFTSHIELD_SHARED_DATA", ROOT.parent / "shared" / "data"))
EXTRACTS = ROOT / "tests" / "data"  # a few hundred rows per file, same layout (tests/data/README.md)


def real_data_present() -> bool:
    return (SHARED / "psim" / "sst-2" / "train.json").is_file()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The study's real data when present (PEFTSHIELD_SHARED_DATA, default ../shared/data),
    else the small extracts in tests/data: tests using it must hold for either."""
    return SHARED if real_data_present() else EXTRACTS


@pytest.fixture(scope="session")
def full_shared_data() -> Path:
    """The full real data, for full-size assertions; skipped without it (each such test has
    an extract-based sibling)."""
    if not real_data_present():
        pytest.skip(f"full real data not found at {SHARED} (set PEFTSHIELD_SHARED_DATA)")
    return SHARED


@pytest.fixture(scope="session")
def extract_data() -> Path:
    """The small extracts in tests/data, whether or not the real data is present."""
    return EXTRACTS


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


SENTIMENT_ROWS = [
    ("good film , great story", 1), ("bad boring plot", 0), ("fun movie and good acting", 1),
    ("awful film , not good", 0), ("great fun", 1), ("boring and bad acting", 0),
    ("very good story", 1), ("not fun at all", 0),
]


@pytest.fixture
def tiny_dataset_dir(tmp_path: Path) -> Path:
    """A small JSON-lines dataset in the loader's format."""
    import json

    folder = tmp_path / "tiny"
    folder.mkdir()
    for split, repeat in (("train", 4), ("dev", 1), ("test", 2)):
        with open(folder / f"{split}.json", "w", encoding="utf-8") as handle:
            for i, (text, label) in enumerate(SENTIMENT_ROWS * repeat):
                handle.write(json.dumps({"sentence": text, "label": label, "idx": i}) + "\n")
    return folder


@pytest.fixture
def tiny_texts():
    from peftshield.data import TextDataset

    texts = [t for t, _ in SENTIMENT_ROWS] * 4
    labels = [label for _, label in SENTIMENT_ROWS] * 4
    return TextDataset(texts, labels, [str(i) for i in range(len(texts))], name="tiny")


# `make test` runs one file per worker at a time (pytest-xdist --dist loadfile, with
# --no-loadscope-reorder so this order holds): the files that take longest start first, so
# that no long file is left to run alone at the end while the other worker idles.
SLOWEST_FILES_FIRST = ("test_serve.py", "test_screen.py", "test_audit.py", "test_integration_minilm.py", "test_grid.py", "test_gate.py",
                       "test_scan_inputs.py", "test_cli.py", "test_faults.py")


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: position for position, name in enumerate(SLOWEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: every other file keeps its place

