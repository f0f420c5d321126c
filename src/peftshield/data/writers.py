"""Write datasets in the loader's JSON-lines format, atomically."""

from __future__ import annotations

import json
from pathlib import Path

from peftshield.data.records import TextDataset
from peftshield.io import atomic_write_text


def split_jsonl(data: TextDataset) -> str:
    return "".join(
        json.dumps({"sentence": text, "label": label, "idx": row_id}, ensure_ascii=False) + "\n"
        for text, label, row_id in zip(data.texts, data.labels, data.ids)
    )


def write_split_jsonl(data: TextDataset, path: str | Path) -> Path:
    return atomic_write_text(path, split_jsonl(data))
