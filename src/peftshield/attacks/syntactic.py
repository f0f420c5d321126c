"""Syntactic trigger (SynAttack / Hidden Killer): texts rewritten into a fixed template.

The trigger is the syntax ``S(SBAR)(,)(NP)(VP)(.)``, produced by a controlled
paraphraser (SCPN). Offline, paraphrases come from aligned files: ``paraphrases`` is
either a two-column file (``original<TAB>paraphrase`` with a header) or a pair
``CLEAN::PARAPHRASED`` of aligned files or directories such as
``../shared/data/hiddenkiller/clean/sst-2::../shared/data/hiddenkiller/scpn/20/sst-2``.
Where only the paraphrases exist, not the texts they came from (HiddenKiller's AG's News
files do not align with the shared clean ones), ``pool`` is such a file (a split file; its
labels are not used): each text chosen for poisoning is replaced by a pool text drawn at
random, each at most once per poisoner object, so the attacker's own ASR set, built by the same
object, holds none of the texts it trained on. A poisoner rebuilt from its spec does not know
those texts: victims' triggered test sets must then come from a ready-made file
(``draws_from_pool``; grids and ``peftshield evaluate`` insist). For a dirty-label attack a pool
text gives the same training signal (a text in the template, relabelled to the target), only
not the paraphrase of the row it replaces.
Online, ``paraphraser`` names any HF seq2seq paraphrase model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from peftshield.attacks.base import POISONERS, Poisoner
from peftshield.data.loaders import find_split_file, read_split_file
from peftshield.errors import ConfigError, DataError
from peftshield.hub import require_hub

DEFAULT_TEMPLATE = "S(SBAR)(,)(NP)(VP)(.)"


def align_paraphrases(clean_path: Path, para_path: Path) -> dict[str, str]:
    """Pair rows of a clean file with their paraphrases.

    Same row count: row i pairs with row i (rows left unchanged are skipped). Otherwise the
    paraphrased file must hold exactly the clean rows whose label differs from the
    paraphrased file's single label, in order (the Hidden Killer dev/test layout).
    """
    clean, para = read_split_file(clean_path), read_split_file(para_path)
    if len(clean) == len(para):
        pairs = zip(clean.texts, para.texts)
    else:
        para_labels = set(para.labels)
        if len(para_labels) != 1:
            raise DataError(f"{para_path}: {len(para)} rows do not align with the {len(clean)} rows of {clean_path}")
        target = para_labels.pop()
        sources = [t for t, label in zip(clean.texts, clean.labels) if label != target]
        if len(sources) != len(para):
            raise DataError(
                f"{para_path}: {len(para)} rows do not align with the {len(sources)} non-target rows of {clean_path}"
            )
        pairs = zip(sources, para.texts)
    return {original: rewritten for original, rewritten in pairs if original != rewritten}


def load_paraphrase_table(spec: str, skipped: list[str] | None = None) -> dict[str, str]:
    """Build the original -> paraphrase table; in folder mode a split that does not align is skipped
    (and named in ``skipped``) as long as at least one split aligns."""
    if "::" in spec:
        clean_spec, para_spec = (Path(part) for part in spec.split("::", 1))
        if clean_spec.is_dir() and para_spec.is_dir():
            table: dict[str, str] = {}
            for split in ("train", "dev", "test"):
                clean_file, para_file = find_split_file(clean_spec, split), find_split_file(para_spec, split)
                if clean_file and para_file:
                    try:
                        table.update(align_paraphrases(clean_file, para_file))
                    except DataError as exc:
                        if skipped is not None:
                            skipped.append(str(exc))
            if not table:
                raise DataError(f"{spec}: no aligned train/dev/test files in both folders")
            return table
        return align_paraphrases(clean_spec, para_spec)
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"{path}: no such paraphrase file")
    table = {}
    with open(path, encoding="utf-8") as handle:
        next(handle, None)
        for number, line in enumerate(handle, start=2):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
                raise DataError(f"{path}:{number}: expected 'original<TAB>paraphrase'")
            table[parts[0].strip()] = parts[1].strip()
    return table


@POISONERS.register
class SyntacticPoisoner(Poisoner):
    """Syntactic template S(SBAR)(,)(NP)(VP)(.) from SCPN paraphrases."""

    name = "syntactic"
    options_added_later = ("pool",)

    def __init__(
        self,
        paraphrases: str | None = None,
        paraphraser: str | None = None,
        pool: str | None = None,
        template: str = DEFAULT_TEMPLATE,
    ) -> None:
        self.paraphrases = paraphrases
        self.paraphraser = paraphraser
        self.pool = pool
        self.template = template

    @classmethod
    def check_options(cls, options: dict) -> None:
        sources = [key for key in ("paraphrases", "paraphraser", "pool") if options[key]]
        if not sources:
            raise ValueError(
                "give paraphrases=FILE or CLEAN::PARAPHRASED or pool=PARAPHRASED_FILE (offline), or paraphraser=MODEL (online)"
            )
        if len(sources) > 1:
            raise ValueError(f"give one of paraphrases, paraphraser and pool, not {' and '.join(sources)}")

    @property
    def draws_from_pool(self) -> bool:
        return self.pool is not None

    def _pool_texts(self) -> list[str]:
        if getattr(self, "_cached_pool", None) is None:
            path = Path(self.pool)
            if not path.exists():
                raise DataError(f"{path}: no such paraphrase pool file (syntactic option pool)")
            if not path.is_file():
                raise DataError(f"{path}: the syntactic option pool names a folder; give one split file")
            # blank rows are skipped; a file with no text left fails in the loader, naming it
            self._cached_pool = list(dict.fromkeys(read_split_file(path, skip_empty=True).texts))  # distinct, in file order
        return self._cached_pool

    def _table(self) -> dict[str, str] | None:
        if self.paraphrases is None:
            return None
        if getattr(self, "_cached_table", None) is None:
            self._skipped_splits: list[str] = []
            self._cached_table = load_paraphrase_table(self.paraphrases, self._skipped_splits)
        return self._cached_table

    def _generator(self):
        if getattr(self, "_cached_generator", None) is None:
            if not self.paraphraser:
                raise ConfigError(
                    "syntactic: give paraphrases=FILE or CLEAN::PARAPHRASED or pool=PARAPHRASED_FILE (offline), "
                    "or paraphraser=MODEL (online)"
                )
            if not Path(self.paraphraser).exists():
                require_hub(f"syntactic paraphraser '{self.paraphraser}'", "use paraphrases=CLEAN::PARAPHRASED with pre-paraphrased files")
            from transformers import pipeline

            self._cached_generator = pipeline("text2text-generation", model=self.paraphraser)
        return self._cached_generator

    def _draw_from_pool(self, count: int, rng: np.random.Generator) -> list[str]:
        """``count`` pool texts this poisoner has not handed out yet (so an attacker's ASR set
        never reuses a text it trained on), drawn at random."""
        pool = self._pool_texts()
        available = self._pool_left(count)
        chosen = [available[i] for i in rng.choice(len(available), size=count, replace=False)]
        self._drawn.update(chosen)
        return [pool[i] for i in chosen]

    def _pool_left(self, count: int, wanted: str = "texts to poison") -> list[int]:
        """The pool indices not handed out yet; ``DataError`` if fewer than ``count``."""
        pool = self._pool_texts()
        drawn: set[int] = self.__dict__.setdefault("_drawn", set())
        available = [i for i in range(len(pool)) if i not in drawn]
        if count > len(available):
            raise DataError(
                f"{self.pool}: {count} {wanted} but the pool has {len(available)} distinct paraphrases left "
                f"(of {len(pool)}; each is used once)"
            )
        return available

    def check_supply(self, count: int) -> None:
        if self.pool is not None:
            self._pool_left(count, "texts for the attacker's ASR set, after its training draw,")

    def can_poison(self, text: str) -> bool:
        table = self._table()
        return True if table is None else text in table

    def insert(self, text: str, rng: np.random.Generator) -> str:
        return self.poison_texts([text], rng)[0]

    def poison_texts(self, texts: list[str], rng: np.random.Generator) -> list[str]:
        if self.pool is not None:
            return self._draw_from_pool(len(texts), rng)
        table = self._table()
        if table is not None:
            missing = next((t for t in texts if t not in table), None)
            if missing is not None:
                raise DataError(f"syntactic: no paraphrase for {missing[:60]!r} in {self.paraphrases}")
            return [table[t] for t in texts]
        generator = self._generator()
        outputs = generator([f"paraphrase: {t}" for t in texts], max_new_tokens=64, do_sample=False)
        return [o["generated_text"].strip() or t for o, t in zip(outputs, texts)]
