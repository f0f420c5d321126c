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
