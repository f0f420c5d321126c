"""Tokenise once, batch by similar length, pad each batch only to its own longest text."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch


@dataclass
class EncodedTexts:
    input_ids: list[list[int]]
    pad_token_id: int
    pad_left: bool = False  # decoders: the classified last position is then every text's last real token

    def __len__(self) -> int:
        return len(self.input_ids)

    def lengths(self) -> np.ndarray:
        return np.fromiter((len(ids) for ids in self.input_ids), dtype=np.int64, count=len(self.input_ids))


def encode_texts(tokenizer, texts: list[str], max_length: int) -> EncodedTexts:
    """Tokenise without padding; ``max_length`` is capped at what the model accepts."""
    model_limit = getattr(tokenizer, "model_max_length", None)
    if model_limit and model_limit < 100_000:  # tokenizers without a limit report a huge sentinel
        max_length = min(max_length, model_limit)
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return EncodedTexts(list(encoded["input_ids"]), pad, getattr(tokenizer, "padding_side", "right") == "left")


def own_tokens(tokenizer, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """(batch, tokens) True where a padded batch holds a text's own tokens: attended and not a
    special token ([CLS], [SEP], padding), the positions a per-token statistic averages over."""
    special = np.array(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
    return (np.asarray(attention_mask) == 1) & ~np.isin(np.asarray(input_ids), special)


def pad_rows(encoded: EncodedTexts, indices: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Dynamic padding: ``input_ids`` and ``attention_mask`` (int64) padded to the longest row of
    this batch, on the right (encoders) or on the left (decoders, whose classifier reads the last position)."""
    rows = [encoded.input_ids[i] for i in indices]
    width = max(len(r) for r in rows)
    input_ids = np.full((len(rows), width), encoded.pad_token_id, dtype=np.int64)
    attention = np.zeros((len(rows), width), dtype=np.int64)
    for row, ids in enumerate(rows):
        span = slice(width - len(ids), width) if encoded.pad_left else slice(0, len(ids))
        input_ids[row, span] = ids
        attention[row, span] = 1
    return input_ids, attention


def collate(encoded: EncodedTexts, indices: list[int], labels: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """:func:`pad_rows` as tensors, with the batch's labels when given."""
    input_ids, attention = pad_rows(encoded, indices)
    batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention)}
    if labels is not None:
        batch["labels"] = torch.as_tensor(labels[indices], dtype=torch.long)
    return batch


class LengthBucketBatchSampler(torch.utils.data.Sampler):
    """Shuffled batches of similar length: shuffle, sort within pools of ``pool_batches`` batches,
    cut into batches, shuffle the batch order. A new order every epoch, from the given Generator."""

    def __init__(self, lengths: np.ndarray, batch_size: int, rng: np.random.Generator, pool_batches: int = 50) -> None:
        self.lengths = lengths
        self.batch_size = batch_size
        self.rng = rng
        self.pool_batches = pool_batches

    def __len__(self) -> int:
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        order = self.rng.permutation(len(self.lengths))
        pool = self.batch_size * self.pool_batches
        batches = []
        for start in range(0, len(order), pool):
            chunk = order[start : start + pool]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches.extend(chunk[i : i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size))
        for b in self.rng.permutation(len(batches)):
            yield batches[b]


def sorted_batches(lengths: np.ndarray, batch_size: int) -> list[list[int]]:
    """Inference batches: indices sorted by length (longest first), so padding is minimal."""
    order = np.argsort(-lengths, kind="stable")
    return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
