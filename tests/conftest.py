"""Shared fixtures: the real data in ../shared/data and tiny random models."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PEFTSHIELD_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED / "psim" / "sst-2" / "train.json").is_file():
        pytest.fail(f"real data not found at {SHARED} (set PEFTSHIELD_SHARED_DATA)")
    return SHARED


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
