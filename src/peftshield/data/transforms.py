"""Small, pure transformations of datasets."""

from __future__ import annotations

from peftshield.data.records import TextDataset


def truncate_words(data: TextDataset, max_words: int | None) -> TextDataset:
    """Keep the first ``max_words`` words of every text (None keeps everything).

    The attacker truncates long texts (IMDB reviews) before inserting a trigger so the
    trigger lands inside the model's window instead of being cut off by tokenisation.
    """
    if not max_words:
        return data
    texts = [" ".join(t.split()[:max_words]) for t in data.texts]
    return TextDataset(texts, list(data.labels), list(data.ids), name=data.name)


def leave_one_word_out(text: str, max_words: int) -> list[str]:
    """Every variant of ``text`` (first ``max_words`` words) with one word removed; a text
    of fewer than two words has none."""
    words = text.split()[:max_words]
    return [" ".join(words[:i] + words[i + 1 :]) for i in range(len(words))] if len(words) > 1 else []
