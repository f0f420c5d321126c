"""What ``peftshield scan`` reads, through the real CLI (in a subprocess; the refusals in this process): unlabelled texts in
every format (JSONL objects or JSON strings, CSV/TSV with a text column, ``.txt``, one text
per line), labels kept and checked when present, ids kept (line numbers when none), and a bad
row in any of them (a lone surrogate, bytes that are not UTF-8, a malformed row, a duplicated
CSV/TSV column, an unclosed quote) as one line naming the file and line, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peftshield.cli import main
from subprocess_helpers import cli_in_process

ROWS = [
    ("good film , great story", 1), ("bad boring plot", 0), ("fun movie and good acting", 1),
    ("awful film , not good", 0), ("great fun", 1), ("boring and bad acting", 0),
    ("very good story", 1), ("not fun at all", 0),
]


@pytest.fixture(scope="module")
def psim(tmp_path_factory) -> Path:
    """A P-tuning PSIM on a tiny backbone saved to disk, trained in-process (the scans run as subprocesses)."""
    from peftshield.models.backbone import save_backbone
    from peftshield.models.tiny import tiny_backbone

    root = tmp_path_factory.mktemp("scan-inputs")
    data = root / "data"
    data.mkdir()
    for split, repeat in (("train", 4), ("dev", 1)):
        (data / f"{split}.json").write_text("".join(json.dumps({"sentence": t, "label": y}) + "\n" for t, y in ROWS * repeat), encoding="utf-8")
    backbone = save_backbone(tiny_backbone(), root / "bb")
    folder = root / "psim"
    assert main(["psim", "train", "--backbone", str(backbone), "--data", str(data), "--out", str(folder), "--epochs", "1",
                 "--max-train-samples", "16", "--max-length", "32", "--no-progress"]) == 0
    return folder


def scan(psim: Path, data: Path, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peftshield", "scan", "--psim", str(psim), "--data", str(data), "--out", str(out),
                           "--no-progress", "--format", "text,json"],
                          capture_output=True, text=True, cwd=out.parent, env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture()
def scan_here(capsys, monkeypatch):
    """:func:`scan` in this process (:func:`subprocess_helpers.cli_in_process`): for the formats
    and refusals beyond the ones the real CLI's process reads."""
    def run(psim: Path, data: Path, out: Path) -> subprocess.CompletedProcess:
        return cli_in_process(capsys, monkeypatch, "scan", "--psim", str(psim), "--data", str(data), "--out", str(out), "--no-progress",
                              "--format", "text,json", cwd=out.parent)
    return run


def scanned(psim: Path, data: Path, tmp_path: Path, run=scan) -> list[dict]:
    out = tmp_path / "scores.jsonl"
    done = run(psim, data, out)
    assert done.returncode in (0, 1), done.stderr
    assert "Traceback" not in done.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert all(set(r) == {"id", "score", "flagged"} for r in rows)
    summary = json.loads((tmp_path / "scores.summary.json").read_text(encoding="utf-8"))
    assert summary["targets"][0]["details"]["scored"] == len(rows)
    return rows


def assert_one_line_error(done: subprocess.CompletedProcess, out: Path, *fragments: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("peftshield: warning:")]
    assert len(lines) == 1, f"expected one line, got: {done.stderr!r}"
    assert lines[0].startswith("peftshield: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    written = sorted(p.name for p in out.parent.iterdir() if p.name.startswith((out.stem, f".{out.name}")))
    assert written == [], f"nothing may be written, found {written}"
    return lines[0]


def write(path: Path, content: str | bytes) -> Path:
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


# --- unlabelled texts in every format ----------------------------------------------------------

def test_scan_reads_unlabelled_jsonl_objects_and_json_strings(psim: Path, tmp_path: Path) -> None:
    data = write(tmp_path / "untrusted.jsonl", "\n".join([
        json.dumps({"text": "good film , great story"}),
        json.dumps({"sentence": "bad boring plot", "id": "review-7"}),
        "",  # a blank line is not a row, but the line numbers stay those of the file
        json.dumps("a bare json string of text"),
        json.dumps({"text": "very good story", "idx": 12}),
    ]) + "\n")
    rows = scanned(psim, data, tmp_path)
    assert [r["id"] for r in rows] == ["1", "review-7", "4", "12"]


@pytest.mark.parametrize("suffix", [".csv", ".tsv"])
def test_scan_reads_a_text_column_without_labels(psim: Path, tmp_path: Path, suffix: str, scan_here) -> None:
    sep = "," if suffix == ".csv" else "\t"
    data = write(tmp_path / f"untrusted{suffix}", f"text\ngood film\n\"bad{sep} boring plot\"\ngreat fun\n")
    assert [r["id"] for r in scanned(psim, data, tmp_path)] == ["2", "3", "4"]  # the real CLI's process
    with_ids = write(tmp_path / f"with-ids{suffix}", f"id{sep}sentence\na1{sep}good film\na2{sep}bad plot\n")
    assert [r["id"] for r in scanned(psim, with_ids, tmp_path, scan_here)] == ["a1", "a2"]


def test_scan_reads_a_txt_file_one_text_per_line(psim: Path, tmp_path: Path) -> None:
    data = write(tmp_path / "untrusted.txt", "\ufeffgood film , great story\r\nbad boring plot\n\n   \nfun movie and good acting\n")
    assert [r["id"] for r in scanned(psim, data, tmp_path)] == ["1", "2", "5"]


def test_scan_still_reads_and_checks_labels_when_present(psim: Path, tmp_path: Path, scan_here) -> None:
    labelled = write(tmp_path / "labelled.jsonl", "".join(json.dumps({"sentence": t, "label": y, "idx": i}) + "\n" for i, (t, y) in enumerate(ROWS)))
    assert [r["id"] for r in scanned(psim, labelled, tmp_path, scan_here)] == [str(i) for i in range(len(ROWS))]
    bad = write(tmp_path / "bad-label.csv", "text,label\ngood film,1\nbad plot,pos\n")
    out = tmp_path / "rejected.jsonl"
    assert_one_line_error(scan_here(psim, bad, out), out, f"{bad}:3:", "label 'pos' is not an integer")


def test_labels_are_kept_and_optional_in_the_loader(tmp_path: Path) -> None:
    from peftshield.data import load_texts
    from peftshield.data.loaders import NO_LABEL
    from peftshield.errors import DataError

    path = write(tmp_path / "mixed.jsonl", '{"text": "a", "label": 1}\n"b"\n{"text": "c", "label": null}\n{"text": "d", "label": 0}\n')
    data = load_texts(path, require_labels=False)
    assert (data.texts, data.labels, data.ids) == (["a", "b", "c", "d"], [1, NO_LABEL, NO_LABEL, 0], ["1", "2", "3", "4"])
    with pytest.raises(DataError, match=r"mixed.jsonl:2: expected a JSON object per line"):
        load_texts(path)  # labelled data is still required where labels are needed
    with pytest.raises(DataError, match=r"t.txt: a .txt file holds texts without labels"):
        load_texts(write(tmp_path / "t.txt", "x\n"))


# --- a bad row in each format: one line naming the file and line, exit 2, nothing written ----------

BAD_ROWS = [
    # (file name, content, line, what the message says)
    ("surrogate.jsonl", '{"text": "fine"}\n{"text": "bad \\ud800 text"}\n', 2, "lone surrogate at position 4"),
    ("surrogate-labelled.jsonl", '{"sentence": "fine", "label": 1}\n{"sentence": "\\ud800", "label": 0}\n', 2, "not valid Unicode"),
    ("surrogate-string.json", '"fine"\n\n"\\udfff"\n', 3, "lone surrogate at position 0"),
    ("surrogate-id.jsonl", '{"text": "fine", "id": "\\ud800"}\n', 1, "id holds a character that is not valid Unicode"),
    ("bytes.jsonl", b'{"text": "fine"}\n{"text": "fine"}\n{"text": "caf\xe9"}\n', 3, "not valid UTF-8"),
    ("array.jsonl", '{"text": "fine"}\n[1, 2]\n', 2, "expected a JSON object per line (or a JSON string)"),
    ("no-text.jsonl", '{"text": "fine"}\n{"body": "x"}\n', 2, "missing column 'sentence' or 'text'"),
    ("bytes.csv", b"text\nfine\n\xff\xfe broken\n", 3, "not valid UTF-8"),
    ("comma.csv", "text\nfine\nhello, world\n", 3, "expected 1 columns, got 2 (quote a field"),
    ("header.csv", "body\nfine\n", 1, "missing column 'sentence' or 'text'"),
    ("bytes.tsv", b"id\ttext\n1\tfine\n2\tna\xefve\n", 3, "not valid UTF-8"),
    ("tab.tsv", "text\nfine\nsplit\there\n", 3, "expected 1 columns, got 2"),
    ("bytes.txt", b"fine\n\xc3\x28 broken\n", 2, "not valid UTF-8"),
    ("duplicate.csv", "text,text\nfine,also fine\n", 1, "duplicate column 'text'"),
    ("duplicate.tsv", "id\ttext\tText\n1\tfine\tagain\n", 1, "duplicate column 'text'"),
    ("unclosed.csv", 'text\nfine\n"never closed\nnext\n', 3, "a quoted field that starts on this line is never closed"),
    ("unclosed.tsv", 'id\ttext\n1\tfine\n2\t"never closed\n3\tnext\n', 3, "a quoted field that starts on this line is never closed"),
]


@pytest.mark.parametrize(("name", "content", "line", "message"), BAD_ROWS, ids=[row[0] for row in BAD_ROWS])
def test_a_bad_row_is_one_line_naming_file_and_line(psim: Path, tmp_path: Path, name: str, content: str | bytes, line: int, message: str,
                                                   scan_here) -> None:
    """In this process (a refusal needs no process of its own; the formats above are read by the real CLI's process)."""
    data = write(tmp_path / name, content)
    out = tmp_path / "out" / "scores.jsonl"
    out.parent.mkdir()
    assert_one_line_error(scan_here(psim, data, out), out, f"{data}:{line}: ", message)


def test_plain_texts_of_a_txt_file_are_read_by_the_loader(tmp_path: Path) -> None:
    from peftshield.data.sources import load_plain_texts
    from peftshield.errors import DataError

    assert load_plain_texts(str(write(tmp_path / "c.txt", "one\n\ntwo\none\n")))[0] == ["one", "two"]
    with pytest.raises(DataError, match=r"bad.txt:2: not valid UTF-8"):  # was silently replaced by U+FFFD
        load_plain_texts(str(write(tmp_path / "bad.txt", b"one\n\xff two\n")))
