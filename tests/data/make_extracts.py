"""Rebuild the small extracts in tests/data from the study's real data (../shared/data).

Usage (from the repository root):  python tests/data/make_extracts.py [SHARED_DATA_DIR] [--out DIR]

SHARED_DATA_DIR defaults to ../shared/data, DIR to tests/data (this folder).

The extracts keep the folder layout of shared/data, so a test can point at either root.
Every file is cut, never rewritten: rows are copied byte for byte (CRLF endings, the
spaces around AG's tabs, escapes), so the extract has the same format quirks as the
original. The rules, per file:

- a split file: its header (TSV) and its first N rows;
- psim/cr/train.json: the first N rows plus every later row whose text is empty, so the
  "empty text" rule is exercised (on the full file those are lines 341, 624, 887, 1368);
- psim test_back/test_spcn: the same first N rows as test.json (they are row-aligned);
- psim test_char_back/test_char_spcn/test_poisoned: the rows for the label-1 rows among
  the first N rows of test.json (these files hold the label-1 test rows, in order);
- hiddenkiller/{clean,scpn/20}/sst-2/train.tsv: the same row positions of both files (they
  are row-aligned): the first 200 rows and rows 1384-1483. The SCPN training file
  paraphrases its first 1383 rows (all relabelled 1) and copies the rest unchanged, so
  the first rows alone would hold a single label and no unchanged row;
- hiddenkiller/scpn/20/<ds>/{dev,test}.tsv: the paraphrases of the non-target rows among
  the first N clean rows, in order. AG's test file has no paraphrase for its first
  non-target row (5699 paraphrases for 5700 rows), so its extract, like the full file,
  is one row short; AG's dev file does not correspond to the clean dev file at all, so its
  extract is simply its first N rows.

Only the standard library is used, so this runs with any Python 3.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DEFAULT_SHARED = ROOT.parent / "shared" / "data"

# rows kept per split file
PSIM_ROWS = {"train": 300, "dev": 200, "test": 200}
IMDB_ROWS = {"train": 200, "dev": 100, "test": 100}
HK_ROWS = {"train": 300, "dev": 200, "test": 200}
# HiddenKiller train: 0-based row positions kept in both the clean and the SCPN file
HK_TRAIN_ROWS = list(range(200)) + list(range(1383, 1483))
SCPN_TARGET = {"sst-2": 1, "ag": 0}
# paraphrases missing at the start of a file, by (dataset, split): see the docstring
SCPN_MISSING_AT_START = {("ag", "test"): 1}
SCPN_UNALIGNED = {("ag", "dev")}


def raw_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def json_rows(lines: list[bytes]) -> list[dict]:
    return [json.loads(line.decode("utf-8-sig")) for line in lines]


def tsv_label(line: bytes) -> int:
    return int(line.decode("utf-8").rstrip("\r\n").rpartition("\t")[2].strip())


def write(out: Path, lines: list[bytes]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join(lines)
    if not data.endswith(b"\n"):
        # the last row of a full file may lack its newline; inside an extract every row has one
        data += b"\r\n" if b"\r\n" in data else b"\n"
    out.write_bytes(data)


def psim(shared: Path, out: Path, dataset: str) -> None:
    src, dst = shared / "psim" / dataset, out / "psim" / dataset
    rows = IMDB_ROWS if dataset == "imdb" else PSIM_ROWS
    for split, n in rows.items():
        lines = [line for line in raw_lines(src / f"{split}.json") if line.strip()]
        kept = lines[:n]
        if dataset == "cr" and split == "train":
            kept += [line for line in lines[n:] if not json.loads(line)["sentence"].strip()]
        write(dst / f"{split}.json", kept)
    test = json_rows([line for line in raw_lines(src / "test.json") if line.strip()][: rows["test"]])
    n_positive = sum(1 for row in test if row["label"] == 1)
    for stem in ("test_back", "test_spcn", "test_char_back", "test_char_spcn", "test_poisoned"):
        path = src / f"{stem}.json"
        if path.is_file():
            n = n_positive if stem.startswith("test_char") or stem == "test_poisoned" else rows["test"]
            write(dst / f"{stem}.json", [line for line in raw_lines(path) if line.strip()][:n])


def hiddenkiller(shared: Path, out: Path, dataset: str) -> None:
    clean_src, scpn_src = shared / "hiddenkiller" / "clean" / dataset, shared / "hiddenkiller" / "scpn" / "20" / dataset
    clean_dst, scpn_dst = out / "hiddenkiller" / "clean" / dataset, out / "hiddenkiller" / "scpn" / "20" / dataset
    for split, n in HK_ROWS.items():
        clean_path = clean_src / f"{split}.tsv"
        if not clean_path.is_file():
            continue
        clean = raw_lines(clean_path)
        positions = HK_TRAIN_ROWS if split == "train" else range(n)
        header, all_rows = clean[0], [line for line in clean[1:] if line.strip()]
        body = [all_rows[i] for i in positions]
        write(clean_dst / f"{split}.tsv", [header] + body)
        scpn_path = scpn_src / f"{split}.tsv"
        if not scpn_path.is_file():
            continue
        scpn = raw_lines(scpn_path)
        scpn_header, scpn_body = scpn[0], [line for line in scpn[1:] if line.strip()]
        if split == "train":
            kept = [scpn_body[i] for i in positions]  # row-aligned with the clean training file
        elif (dataset, split) in SCPN_UNALIGNED:
            kept = scpn_body[:n]
        else:
            non_target = sum(1 for line in body if tsv_label(line) != SCPN_TARGET[dataset])
            kept = scpn_body[: non_target - SCPN_MISSING_AT_START.get((dataset, split), 0)]
        write(scpn_dst / f"{split}.tsv", [scpn_header] + kept)


def check(out: Path) -> None:
    """Each split keeps every class of its full file (both labels; AG's four)."""
    for path in sorted(out.rglob("*.json")) + sorted(out.rglob("*.tsv")):
        lines = [line for line in raw_lines(path) if line.strip()]
        if path.suffix == ".json":
            labels = {row["label"] for row in json_rows(lines)}
        else:
            labels = {tsv_label(line) for line in lines[1:]}
        if "scpn" in path.parts and path.stem != "train" or path.stem.startswith("test_char") or path.stem == "test_poisoned":
            continue  # single-label files by construction
        expected = {0, 1, 2, 3} if "ag" in path.parts else {0, 1}
        if labels != expected:
            raise SystemExit(f"{path}: labels {sorted(labels)}, expected {sorted(expected)}")


def build(shared: Path, out: Path) -> list[Path]:
    """Write every extract under ``out``; returns the files written."""
    if not (shared / "psim" / "sst-2" / "train.json").is_file():
        raise SystemExit(f"{shared}: not the shared data folder (no psim/sst-2/train.json)")
    for dataset in ("sst-2", "cr", "cola", "imdb"):
        psim(shared, out, dataset)
    for dataset in ("sst-2", "ag"):
        hiddenkiller(shared, out, dataset)
    check(out)
    return sorted(p for p in out.rglob("*") if p.suffix in (".json", ".tsv"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shared", nargs="?", type=Path, default=DEFAULT_SHARED, help="the shared data folder")
    parser.add_argument("--out", type=Path, default=HERE, help="where to write the extracts")
    args = parser.parse_args(argv)
    files = build(args.shared, args.out)
    total = sum(p.stat().st_size for p in files)
    print(f"wrote {len(files)} files, {total / 1024:.0f} KiB, under {args.out}")


if __name__ == "__main__":
    main()
